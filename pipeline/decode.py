"""The decode job: a validation pass over a manifest -> quarantine + report (and 16 kHz parts).

What it is for: finding, before a GPU job runs, which items of a manifest decode and which
would be quarantined (and why), and how fast decoding runs on this cluster. No spear job reads
its audio: tokenize, embed, features and the student decode each item from the original file
(checked against the manifest's ``file_version``), so the audio parts it writes are a
by-product for a person or an outside tool (``spear decode --check-only`` skips them), read
with :func:`spear.formats.audio.read_audio_part`. Its quarantine is the one the later jobs
will find at decode.

Steps:
1. Read the manifest's part list; each manifest part is one decode task (the resume unit).
   The run record (``spear/record.py``: the settings and the manifest parts' content, never
   the manifest's URL) goes to ``_work/plan.json``; a re-run into the same ``--out`` must
   record the same (a copy of the manifest elsewhere does), or it is refused naming what
   differs.
2. For every part without an output yet (Ray Data ``map_batches``, one part a row): decode its
   rows with :func:`spear.stages.decode.decode_batch` a batch at a time (at most
   ``rows_per_batch`` items and :data:`ROW_GROUP_SECONDS` of audio), streaming each batch into
   ``audio/part-*.parquet`` as a row group (memory per task: one batch, whatever the part's
   size); write ``quarantine/part-*.parquet``, then let the audio part appear whole (the commit
   marker; with ``--check-only`` an empty-schema marker holding only the item ids that
   decoded).
3. Write ``_SUCCESS.json``: items decoded and quarantined (per reason), hours, x real time.

The audio parts hold the manifest's columns, ``num_samples`` and ``audio``
(:mod:`spear.formats.audio`, ``schema: audio_shard``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.formats.audio import SAMPLE_RATE, audio_shard_schema, audio_shard_table
from spear.formats.manifest import require_finished
from spear.formats.parquet import parquet_bytes, table_digest
from spear.formats.quarantine import quarantine_table
from spear.ray_utils import RayConfig, init_ray
from spear.record import RunRecord, check_record
from spear.stages.decode import DecodeConfig, decode_batch, split_decoded
from spear.storage import StorageConfig, filesystem, join, read_bytes, write_atomic

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
ROW_GROUP_SECONDS = 600.0
"""Most audio a task decodes and holds at once, written as one row group of its part (10 min:
19 MB of int16); a longer item is a row group alone. (Not the teachers' ``batch_seconds``,
which is the padded audio of one forward pass.)"""


@dataclass
class DecodeSummary:
    out: str
    items: int = 0
    decoded: int = 0
    hours: float = 0.0
    quarantined: dict[str, int] = field(default_factory=dict)
    parts: int = 0
    parts_done_before: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def line(self) -> str:
        q = sum(self.quarantined.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.quarantined.items()))
        rt = ""
        if self.cpu_seconds:
            rt = f"; {self.hours * 3600 / self.cpu_seconds:.0f}x real time per CPU-second"
        resumed = f"; {self.parts_done_before} parts done before" if self.parts_done_before else ""
        return (
            f"decode: {self.items} items -> {self.decoded} decoded ({self.hours:.3f} h), "
            f"{q} quarantined{' (' + reasons + ')' if q else ''}{rt}{resumed}; "
            f"{self.wall_seconds:.1f} s -> {self.out}"
        )


def manifest_parts(manifest: str, storage: StorageConfig) -> tuple[str, list[str]]:
    """The manifest directory and its part file names (a run dir or its ``manifest/``)."""
    fs, path = filesystem(manifest, storage)
    base = manifest
    if fs.isdir(posixpath.join(path, "manifest")):
        require_finished(manifest, storage)
        base, path = join(manifest, "manifest"), posixpath.join(path, "manifest")
    else:
        require_finished(posixpath.dirname(manifest.rstrip("/")), storage)
    if not fs.isdir(path):
        raise SpearError(f"no manifest at {manifest!r}")
    parts = sorted(
        posixpath.basename(p)
        for p in fs.ls(path, detail=False)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
    )
    if not parts:
        raise SpearError(f"manifest {manifest!r} has no parts")
    return base, parts


def _decode_part(
    batch: dict[str, Any],
    manifest: str,
    out: str,
    cfg: DecodeConfig,
    storage: StorageConfig,
    check_only: bool,
    rows_per_batch: int,
    row_group_seconds: float = ROW_GROUP_SECONDS,
) -> dict[str, Any]:
    """Ray Data map_batches: decode whole manifest parts, write their outputs."""
    stats: dict[str, list[Any]] = {
        "part": [],
        "items": [],
        "decoded": [],
        "samples": [],
        "cpu": [],
        "quarantine": [],
    }
    for part in batch["part"]:
        t0 = time.process_time()
        rows = pq.read_table(io.BytesIO(read_bytes(join(manifest, part), storage)))
        quarantine: list[dict[str, str]] = []
        decoded = samples = 0
        schema = audio_shard_schema(check_only)
        with _StreamedParquet(join(out, "audio", part), schema, storage) as w:
            # One batch of items decoded and written at a time (a row group each): what the
            # task holds is one batch's audio, whatever the part's size.
            dur = rows["duration"].to_numpy() if "duration" in rows.column_names else None
            for a, b in _batches(rows.num_rows, dur, rows_per_batch, row_group_seconds):
                sub = rows.slice(a, b - a)
                got = decode_batch(
                    {c: sub[c].to_numpy(zero_copy_only=False) for c in sub.column_names},
                    cfg,
                    storage,
                )
                ok, bad = split_decoded(got)
                del got
                quarantine += bad
                table = audio_shard_table(ok, check_only)
                del ok
                w.write(table)
                decoded += table.num_rows
                samples += int(np.sum(table["num_samples"].to_numpy())) if len(table) else 0
            # The quarantine file first: the audio part is the commit marker.
            write_atomic(
                join(out, "quarantine", part), parquet_bytes(quarantine_table(quarantine)), storage
            )
        stats["part"].append(part)
        stats["items"].append(rows.num_rows)
        stats["decoded"].append(decoded)
        stats["samples"].append(samples)
        stats["cpu"].append(time.process_time() - t0)
        stats["quarantine"].append(json.dumps(Counter(q["error_type"] for q in quarantine)))
    return stats


def _batches(
    n: int, durations: np.ndarray | None, rows: int, seconds: float
) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges of at most ``rows`` items and ``seconds`` of audio."""
    out, start, acc = [], 0, 0.0
    for i in range(n):
        d = float(durations[i]) if durations is not None else 0.0
        if i > start and (i - start >= rows or acc + d > seconds):
            out.append((start, i))
            start, acc = i, 0.0
        acc += d
    if start < n:
        out.append((start, n))
    return out


class _StreamedParquet:
    """A Parquet file written a row group at a time, appearing whole at ``url`` on success:
    locally a hidden temporary beside it, renamed; on an object store a multipart upload
    (the object appears when it completes). Nothing is published when the block raises."""

    def __init__(self, url: str, schema: pa.Schema, storage: StorageConfig):
        self.url, self.schema, self.storage = url, schema, storage
        fs, path = filesystem(url, storage)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.local = proto in ("file", "local")
        self.fs = fs
        if self.local:
            parent = posixpath.dirname(path)
            fs.makedirs(parent, exist_ok=True)
            self.target = path
            self.path = posixpath.join(
                parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
            )
        else:
            self.path = self.target = path

    def __enter__(self) -> _StreamedParquet:
        # Object stores: multipart parts of 16 MB (S3's minimum is 5 MB; the storage config's
        # block size is tuned for range reads).
        kw = {} if self.local else {"block_size": 16 * 2**20}
        self.file = self.fs.open(self.path, "wb", **kw)
        # Audio barely compresses losslessly with a general codec; don't spend CPU on it.
        self.writer = pq.ParquetWriter(self.file, self.schema, compression="none")
        return self

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def __exit__(self, kind: object, err: object, tb: object) -> None:
        if kind is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            if self.local:
                with contextlib.suppress(OSError):
                    os.remove(self.path)
            else:
                with contextlib.suppress(Exception):
                    self.file.discard()  # an unfinished upload never appears
            return
        self.writer.close()
        self.file.close()
        if self.local:
            os.replace(self.path, self.target)


def decode_record(
    mdir: str, parts: list[str], cfg: DecodeConfig, check_only: bool, storage: StorageConfig
) -> RunRecord:
    """The decode job's run record: its settings and the manifest's content (every part's rows,
    under the part's name: a part is the job's unit), never the manifest's URL, so a copy of the
    manifest resumes and a changed one is refused."""
    h = hashlib.blake2b(digest_size=16)
    items = 0
    for part in parts:
        table = pq.read_table(io.BytesIO(read_bytes(join(mdir, part), storage)))
        h.update(part.encode() + b"\0" + table_digest(table, tuple(table.column_names)).encode())
        items += table.num_rows
    # Speed settings may change on resume.
    decides = {
        "decode": asdict(cfg) | {"io_threads": None, "io_retries": None},
        "check_only": check_only,
    }
    info = {"manifest": mdir}
    return RunRecord("decode", decides, h.hexdigest(), "manifest content", items, len(parts), info)


def run_decode(
    manifest: str,
    out: str,
    cfg: DecodeConfig,
    storage: StorageConfig,
    ray_cfg: RayConfig,
    *,
    check_only: bool = False,
    rows_per_batch: int = 16,
) -> DecodeSummary:
    """Decode (or resume decoding) every item of ``manifest`` into ``out``."""
    t0 = time.time()
    mdir, parts = manifest_parts(manifest, storage)
    fs, apath = filesystem(join(out, "audio"), storage)
    have = set()
    if fs.exists(apath):
        have = {posixpath.basename(p) for p in fs.ls(apath, detail=False)}
    record = decode_record(mdir, parts, cfg, check_only, storage)
    check_record(out, record, storage, made=bool(have))
    todo = [p for p in parts if p not in have]
    summary = DecodeSummary(out=out, parts=len(parts), parts_done_before=len(parts) - len(todo))
    if todo:
        init_ray(ray_cfg, out)
        import ray

        fn = partial(
            _decode_part,
            manifest=mdir,
            out=out,
            cfg=cfg,
            storage=storage,
            check_only=check_only,
            rows_per_batch=rows_per_batch,
        )
        ds = ray.data.from_items([{"part": p} for p in todo], override_num_blocks=len(todo))
        for row in ds.map_batches(fn, batch_size=1, num_cpus=1).iter_rows():
            summary.cpu_seconds += float(row["cpu"])

    # Summary over every part, those of earlier runs included.
    fs_q, qpath = filesystem(join(out, "quarantine"), storage)
    q = pq.read_table(qpath, filesystem=fs_q, columns=["error_type"])
    a = pq.read_table(apath, filesystem=fs, columns=["num_samples"])
    summary.decoded = a.num_rows
    summary.quarantined = dict(Counter(q["error_type"].to_pylist()))
    summary.items = a.num_rows + q.num_rows
    summary.hours = float(np.sum(a["num_samples"].to_numpy())) / SAMPLE_RATE / 3600
    summary.wall_seconds = time.time() - t0
    write_atomic(join(out, SUCCESS), json.dumps(asdict(summary), indent=1).encode(), storage)
    return summary
