"""Token shards as a product: open, inspect, validate, summarise and read a tokenize output.

A finished tokenize run leaves under ``OUT`` (any fsspec URL; ``docs/shards.md``):

* ``index.parquet`` - one row per token shard (:data:`spear.formats.TOKEN_INDEX_SCHEMA`): its
  path relative to OUT, rows, quarantined items, bytes, sha256 and audio seconds. Readers start
  here and never list the bucket.
* ``tokens/shard-NNNNN.parquet`` - the token shards (:func:`spear.formats.token_shard_schema`).
* ``quarantine/shard-NNNNN.parquet`` - the items of shard N that have no tokens, and why.
* ``report.json``, ``_SUCCESS.json``, ``_work/`` - the run's report, summary and resume state.

What this module offers:

* :func:`open_index`, :func:`list_shards` - the index as a table / as :class:`ShardEntry` rows.
* :func:`inspect` - schema, version, teachers and sizes of an output or of one shard file.
* :func:`validate` - every problem found (an empty list: valid): files against the index
  (bytes, sha256, rows), schema and version, frame counts against the teachers' formulas,
  nulls exactly where a teacher did not run, code lengths and ranges, one quantiser per
  teacher, no item twice.
* :func:`stats` - per teacher and codebook: usage histograms, entropy, perplexity, dead codes;
  hours by domain and source.
* :class:`TokenShardDataset` - a PyTorch ``IterableDataset`` that splits shards (or, when there
  are fewer shards than readers, rows) across DDP ranks and DataLoader workers, each row read
  exactly once; :func:`collate_tokens` pads a batch.
* :func:`ray_dataset` - the shards as a Ray Dataset (``ray.data.read_parquet`` over the index).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from spear.errors import SpearError
from spear.formats import (
    DOMAINS,
    SAMPLE_RATE,
    TOKEN_INDEX_SCHEMA,
    TOKEN_INDEX_VERSION,
    TOKEN_SHARD_VERSION,
    TokenTeacherInfo,
    codes_from_bytes,
    read_metadata,
    read_token_teachers,
    token_shard_schema,
)
from spear.stages.teachers import dasheng_num_frames, wavlm_num_frames
from spear.storage import StorageConfig, exists, filesystem, join, read_bytes, unstrip

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
SUCCESS_FILE = "_SUCCESS.json"
TOKENS_DIR = "tokens"
QUARANTINE_DIR = "quarantine"

ITEM_COLUMNS = ("item_id", "source", "domain", "url", "start", "duration", "num_samples")
"""The per-item columns every token shard has before its teachers' columns."""

FRAME_FORMULAS: dict[str, Callable[[int], int]] = {
    "wavlm": wavlm_num_frames,
    "dasheng": dasheng_num_frames,
}
"""Frames a teacher family gives for ``num_samples`` 16 kHz samples."""

MAX_EXAMPLES = 3
"""Rows named per kind of problem and shard; the rest are counted."""


class ShardError(SpearError):
    """A token output is missing, unfinished or unreadable."""


# ---------------------------------------------------------------- the index


@dataclass(frozen=True)
class ShardEntry:
    """One row of ``index.parquet``."""

    shard: int
    path: str
    """Relative to OUT: ``tokens/shard-NNNNN.parquet``."""
    rows: int
    quarantined: int
    bytes: int
    sha256: str
    audio_seconds: float

    @property
    def quarantine_path(self) -> str:
        """Relative to OUT: ``quarantine/shard-NNNNN.parquet``."""
        return posixpath.join(QUARANTINE_DIR, posixpath.basename(self.path))


def _storage(storage: StorageConfig | None) -> StorageConfig:
    return (storage or StorageConfig()).resolved()


def open_index(out: str, storage: StorageConfig | None = None) -> pa.Table:
    """``OUT/index.parquet`` as a table; :class:`ShardError` when OUT has none."""
    storage = _storage(storage)
    url = join(out, INDEX_FILE)
    if not exists(url, storage):
        raise ShardError(f"{out!r} is not a finished tokenize output (no {INDEX_FILE})")
    try:
        return pq.read_table(io.BytesIO(read_bytes(url, storage)))
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"cannot read {url!r}: {err}") from None


def list_shards(out: str, storage: StorageConfig | None = None) -> list[ShardEntry]:
    """The index's rows, by shard number."""
    table = open_index(out, storage)
    missing = [n for n in TOKEN_INDEX_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ShardError(f"{join(out, INDEX_FILE)!r} lacks columns {missing}")
    rows = table.select(TOKEN_INDEX_SCHEMA.names).to_pylist()
    return sorted((ShardEntry(**r) for r in rows), key=lambda e: e.shard)


def shard_url(out: str, entry: ShardEntry) -> str:
    return join(out, entry.path)


def read_table(url: str, storage: StorageConfig, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet file (a shard, the index, a quarantine file), whole, by URL."""
    fs, path = filesystem(url, storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(io.BytesIO(f.read()), columns=list(columns) if columns else None)
    except FileNotFoundError:
        raise ShardError(f"{url!r} does not exist") from None
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"cannot read {url!r}: {err}") from None


def _read_schema(url: str, storage: StorageConfig) -> pa.Schema:
    fs, path = filesystem(url, storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).schema_arrow
    except FileNotFoundError:
        raise ShardError(f"{url!r} does not exist") from None
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"cannot read {url!r}: {err}") from None


def shard_teachers(out: str, storage: StorageConfig | None = None) -> list[TokenTeacherInfo]:
    """The teachers recorded in the output's first shard."""
    storage = _storage(storage)
    entries = list_shards(out, storage)
    if not entries:
        return []
    schema = _read_schema(shard_url(out, entries[0]), storage)
    try:
        return read_token_teachers(schema)
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{shard_url(out, entries[0])!r}: {err}") from None


# ---------------------------------------------------------------- inspect


@dataclass
class Inspection:
    """What :func:`inspect` found: an output folder (``kind="output"``) or one shard file."""

    url: str
    kind: str
    schema: pa.Schema
    metadata: dict[str, Any]
    teachers: list[TokenTeacherInfo]
    shards: int
    rows: int
    quarantined: int | None
    """None for a single shard file (its quarantine lives beside it, in the output)."""
    bytes: int
    audio_seconds: float
    finished: bool | None = None
    """Whether ``_SUCCESS.json`` exists (None for a single shard file)."""

    @property
    def version(self) -> int | None:
        v = self.metadata.get("version")
        return int(v) if v is not None else None

    @property
    def audio_hours(self) -> float:
        return self.audio_seconds / 3600

    @property
    def bytes_per_audio_second(self) -> float:
        return self.bytes / self.audio_seconds if self.audio_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "kind": self.kind,
            "schema": self.metadata.get("schema"),
            "version": self.version,
            "run_id": self.metadata.get("run_id"),
            "teachers": [_teacher_dict(t) for t in self.teachers],
            "columns": {f.name: str(f.type) for f in self.schema},
            "shards": self.shards,
            "rows": self.rows,
            "quarantined": self.quarantined,
            "audio_hours": self.audio_hours,
            "bytes": self.bytes,
            "bytes_per_audio_second": self.bytes_per_audio_second,
            "finished": self.finished,
        }

    def text(self) -> str:
        lines = [
            f"{self.kind}: {self.url}",
            f"schema: {self.metadata.get('schema')} version {self.version}"
            + (f", run {self.metadata['run_id']}" if self.metadata.get("run_id") else ""),
        ]
        if self.finished is not None:
            lines.append(f"finished: {'yes' if self.finished else f'no ({SUCCESS_FILE} missing)'}")
        lines += [
            f"shards: {self.shards}",
            f"rows: {self.rows}",
            f"quarantined: {'-' if self.quarantined is None else self.quarantined}",
            f"audio: {self.audio_hours:.3f} h",
            f"bytes: {self.bytes} ({self.bytes_per_audio_second:.1f} per audio second)",
            "teachers:",
        ]
        for t in self.teachers:
            lines.append(
                f"  {t.prefix}: {t.teacher} ({t.family}) layer {t.layer}, {t.frame_rate:g} Hz, "
                f"C={t.num_codebooks} K={t.codebook_size}, quantizer {t.quantizer_id}, "
                f"domains {','.join(t.domains)}"
            )
        lines.append("columns: " + ", ".join(f"{f.name}:{f.type}" for f in self.schema))
        return "\n".join(lines)


def _teacher_dict(t: TokenTeacherInfo) -> dict[str, Any]:
    d = dict(t.__dict__)
    d["domains"] = list(t.domains)
    return d


def inspect(url: str, storage: StorageConfig | None = None) -> Inspection:
    """Describe a tokenize output (its index and first shard) or a single shard file.

    Reads only the index and Parquet footers, plus ``num_samples`` for a single shard."""
    storage = _storage(storage)
    fs, path = filesystem(url, storage)
    if url.endswith(".parquet") and fs.isfile(path):
        schema = _read_schema(url, storage)
        meta = read_metadata(schema)
        if meta.get("schema") == "token_index" or posixpath.basename(path) == INDEX_FILE:
            return inspect(posixpath.dirname(url.rstrip("/")) or ".", storage)
        teachers = _teachers_or_raise(schema, url)
        table = read_table(url, storage, ["num_samples"])
        samples = int(pc.sum(table["num_samples"]).as_py() or 0)
        return Inspection(
            url=url,
            kind="shard",
            schema=schema,
            metadata=meta,
            teachers=teachers,
            shards=1,
            rows=table.num_rows,
            quarantined=None,
            bytes=int(fs.size(path)),
            audio_seconds=samples / SAMPLE_RATE,
        )
    entries = list_shards(url, storage)
    if entries:
        first = shard_url(url, entries[0])
        schema = _read_schema(first, storage)
        teachers = _teachers_or_raise(schema, first)
    else:
        schema, teachers = token_shard_schema([]), []
    return Inspection(
        url=url,
        kind="output",
        schema=schema,
        metadata=read_metadata(schema),
        teachers=teachers,
        shards=len(entries),
        rows=sum(e.rows for e in entries),
        quarantined=sum(e.quarantined for e in entries),
        bytes=sum(e.bytes for e in entries),
        audio_seconds=sum(e.audio_seconds for e in entries),
        finished=exists(join(url, SUCCESS_FILE), storage),
    )


def _teachers_or_raise(schema: pa.Schema, url: str) -> list[TokenTeacherInfo]:
    try:
        return read_token_teachers(schema)
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{url!r}: {err}") from None


# ---------------------------------------------------------------- validate


def _rows_text(rows: np.ndarray, ids: pa.ChunkedArray | pa.Array) -> str:
    """``item_id``s of the first rows, and how many more."""
    shown = ", ".join(str(ids[int(i)]) for i in rows[:MAX_EXAMPLES])
    more = len(rows) - MAX_EXAMPLES
    return shown + (f" and {more} more" if more > 0 else "")


def _expected_frames(family: str, num_samples: np.ndarray) -> np.ndarray:
    """The family's frame formula on every row (called once per distinct length)."""
    formula = FRAME_FORMULAS[family]
    uniq, inverse = np.unique(num_samples, return_inverse=True)
    frames = np.fromiter((formula(int(n)) for n in uniq), dtype=np.int64, count=len(uniq))
    return frames[inverse.reshape(-1)]


def _binary_values(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n + 1,), all value bytes) of a binary array without copying per row."""
    arr = arr.cast(pa.binary()) if arr.type != pa.binary() else arr
    buffers = arr.buffers()
    if len(arr) == 0 or buffers[1] is None:
        return np.zeros(len(arr) + 1, np.int32), np.zeros(0, np.uint8)
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    values = buffers[2]
    data = np.frombuffer(values, dtype=np.uint8) if values is not None else np.zeros(0, np.uint8)
    return offsets, data


def check_shard_table(table: pa.Table, teachers: list[TokenTeacherInfo], name: str) -> list[str]:
    """The content problems of one token shard table (``name`` prefixes each message):
    domains, frame counts against the teachers' formulas, nulls exactly where a teacher did not
    run, code lengths (``frames * C``) and code values (``< K``)."""
    problems: list[str] = []
    expected = token_shard_schema([t.prefix for t in teachers])
    for f in expected:
        if f.name not in table.column_names:
            problems.append(f"{name}: column {f.name!r} is missing")
        elif not table.schema.field(f.name).type.equals(f.type):
            problems.append(
                f"{name}: column {f.name!r} is {table.schema.field(f.name).type}, not {f.type}"
            )
    extra = [c for c in table.column_names if c not in expected.names]
    if extra:
        problems.append(f"{name}: unexpected columns {extra}")
    if problems:
        return problems
    ids = table["item_id"]
    for col in ITEM_COLUMNS:
        if table[col].null_count:
            problems.append(f"{name}: {table[col].null_count} nulls in {col!r}")
    if problems:
        return problems
    domain = np.asarray(table["domain"].to_numpy(zero_copy_only=False), dtype=object)
    bad_domain = np.flatnonzero(~np.isin(domain, DOMAINS))
    if len(bad_domain):
        problems.append(
            f"{name}: {len(bad_domain)} rows of a domain not in {list(DOMAINS)} "
            f"({_rows_text(bad_domain, ids)})"
        )
    num_samples = table["num_samples"].to_numpy()
    for t in teachers:
        if t.family not in FRAME_FORMULAS:
            problems.append(f"{name}: teacher {t.prefix!r} has unknown family {t.family!r}")
            continue
        ran = np.isin(domain, list(t.domains))
        frames_col = table[f"{t.prefix}_frames"].combine_chunks()
        codes_col = table[f"{t.prefix}_codes"].combine_chunks()
        frames_null = np.asarray(frames_col.is_null().to_numpy(zero_copy_only=False))
        codes_null = np.asarray(codes_col.is_null().to_numpy(zero_copy_only=False))
        for what, nulls in (("frames", frames_null), ("codes", codes_null)):
            rows = np.flatnonzero(ran & nulls)
            if len(rows):
                problems.append(
                    f"{name}: {t.prefix}_{what} is null on {len(rows)} rows of domains "
                    f"{list(t.domains)} ({_rows_text(rows, ids)})"
                )
            rows = np.flatnonzero(~ran & ~nulls)
            if len(rows):
                problems.append(
                    f"{name}: {t.prefix}_{what} is set on {len(rows)} rows of domains the "
                    f"teacher did not run on ({_rows_text(rows, ids)})"
                )
        frames = np.asarray(frames_col.fill_null(-1).to_numpy(), dtype=np.int64)
        want = _expected_frames(t.family, num_samples)
        wrong_frames = ran & ~frames_null & (frames != want)
        rows = np.flatnonzero(wrong_frames)
        if len(rows):
            i = int(rows[0])
            problems.append(
                f"{name}: {t.prefix}_frames differs from the {t.family} formula on {len(rows)} "
                f"rows ({_rows_text(rows, ids)}; e.g. {frames[i]} frames for "
                f"{num_samples[i]} samples, expected {want[i]})"
            )
        offsets, data = _binary_values(codes_col)
        lengths = np.diff(offsets).astype(np.int64)
        rows = np.flatnonzero(
            ran & ~codes_null & ~frames_null & ~wrong_frames & (lengths != frames * t.num_codebooks)
        )
        if len(rows):
            i = int(rows[0])
            problems.append(
                f"{name}: {t.prefix}_codes length is not frames x {t.num_codebooks} on "
                f"{len(rows)} rows ({_rows_text(rows, ids)}; e.g. {lengths[i]} bytes for "
                f"{frames[i]} frames)"
            )
        if t.codebook_size < 256 and len(data):
            used = data[offsets[0] : offsets[-1]]
            if len(used) and int(used.max()) >= t.codebook_size:
                # Which rows: the running count of out-of-range codes, cut at the row offsets.
                bad = np.concatenate([[0], np.cumsum(used >= t.codebook_size)])
                per_row = bad[offsets[1:] - offsets[0]] - bad[offsets[:-1] - offsets[0]]
                rows = np.flatnonzero(per_row > 0)
                problems.append(
                    f"{name}: {t.prefix}_codes has codes >= codebook size {t.codebook_size} on "
                    f"{len(rows)} rows ({_rows_text(rows, ids)}; max {int(used.max())})"
                )
    return problems


def _id_hashes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """64-bit hashes of item ids (vectorised); duplicates are confirmed on the ids themselves."""
    import pandas as pd

    values = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    return np.asarray(pd.util.hash_array(values), dtype=np.uint64)


def validate(out: str, storage: StorageConfig | None = None) -> list[str]:
    """Every problem of the tokenize output at ``out``; an empty list means valid.

    Reads every shard whole (sha256) once, and the ``item_id`` column again of the shards
    that share a hashed id. Memory: 8 bytes per item for the duplicate check."""
    storage = _storage(storage)
    problems: list[str] = []
    index = open_index(out, storage)
    if not index.schema.remove_metadata().equals(TOKEN_INDEX_SCHEMA):
        have = {f.name: str(f.type) for f in index.schema}
        want = {f.name: str(f.type) for f in TOKEN_INDEX_SCHEMA}
        if have != want:
            return [f"{INDEX_FILE}: columns {have} are not {want}"]
    version = read_metadata(index.schema).get("version")
    if version is not None and version != TOKEN_INDEX_VERSION:
        problems.append(f"{INDEX_FILE}: version {version} is not {TOKEN_INDEX_VERSION}")
    entries = list_shards(out, storage)
    if not exists(join(out, SUCCESS_FILE), storage):
        problems.append(f"{SUCCESS_FILE} is missing: the run did not finish")
    for what, values in (
        ("shard", [str(e.shard) for e in entries]),
        ("path", [e.path for e in entries]),
    ):
        dups = sorted({v for v, n in Counter(values).items() if n > 1})
        if dups:
            problems.append(f"{INDEX_FILE}: {what} listed twice: {', '.join(dups)}")
    problems += _stray_files(out, storage, entries)
    numbers = sorted(e.shard for e in entries)
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        problems.append(
            f"{INDEX_FILE}: shards are not numbered 0..{len(numbers) - 1}"
            + (f" (missing {_shards_text(missing)})" if missing else "")
        )
    plan_url = join(out, "_work/plan.json")
    if exists(plan_url, storage):  # the run's plan says how many items the job had
        planned = json.loads(read_bytes(plan_url, storage)).get("items")
        n_items = sum(e.rows + e.quarantined for e in entries)
        if planned is not None and n_items != planned:
            problems.append(
                f"{INDEX_FILE}: {n_items} items (tokens + quarantine), the run's plan has {planned}"
            )

    teachers_seen: dict[str, dict[tuple[Any, ...], list[int]]] = {}
    token_hashes: list[np.ndarray] = []
    token_owner: list[np.ndarray] = []
    quarantine_hashes: list[np.ndarray] = []
    quarantine_owner: list[np.ndarray] = []
    readable = 0  # shards whose teachers could be read
    for e in entries:
        name = e.path
        url = shard_url(out, e)
        problems += _check_quarantine(out, storage, e, quarantine_hashes, quarantine_owner)
        try:
            data = read_bytes(url, storage)
        except FileNotFoundError:
            problems.append(f"{name}: listed in the index but missing")
            continue
        except Exception as err:
            problems.append(f"{name}: unreadable: {type(err).__name__}: {err}")
            continue
        if len(data) != e.bytes:
            problems.append(f"{name}: {len(data)} bytes, the index says {e.bytes}")
        if hashlib.sha256(data).hexdigest() != e.sha256:
            problems.append(f"{name}: sha256 differs from the index")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as err:
            problems.append(f"{name}: not a readable Parquet file: {err}")
            continue
        meta = read_metadata(table.schema)
        if meta.get("schema") != "token_shard":
            problems.append(f"{name}: metadata schema is {meta.get('schema')!r}, not 'token_shard'")
            continue
        if meta.get("version") != TOKEN_SHARD_VERSION:
            problems.append(
                f"{name}: token shard version {meta.get('version')}, not {TOKEN_SHARD_VERSION}"
            )
            continue
        try:
            teachers = read_token_teachers(table.schema)
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"{name}: bad teachers metadata: {err}")
            continue
        if "shard" in meta and meta["shard"] != e.shard:
            problems.append(f"{name}: metadata says shard {meta['shard']}, the index {e.shard}")
        if table.num_rows != e.rows:
            problems.append(f"{name}: {table.num_rows} rows, the index says {e.rows}")
        readable += 1
        for t in teachers:
            key = (t.teacher, t.family, t.layer, t.num_codebooks, t.codebook_size, t.quantizer_id)
            teachers_seen.setdefault(t.prefix, {}).setdefault(key, []).append(e.shard)
        problems += check_shard_table(table, teachers, name)
        if "num_samples" in table.column_names and table["num_samples"].null_count == 0:
            seconds = float(pc.sum(table["num_samples"]).as_py() or 0) / SAMPLE_RATE
            if not math.isclose(seconds, e.audio_seconds, rel_tol=1e-6, abs_tol=1e-3):
                problems.append(
                    f"{name}: {seconds:.3f} audio seconds, the index says {e.audio_seconds:.3f}"
                )
        if "item_id" in table.column_names:
            h = _id_hashes(table["item_id"])
            token_hashes.append(h)
            token_owner.append(np.full(len(h), e.shard, dtype=np.int64))

    problems += _teacher_consistency(teachers_seen, readable)
    problems += _duplicates(
        out, storage, entries, token_hashes, token_owner, quarantine_hashes, quarantine_owner
    )
    return problems


def _stray_files(out: str, storage: StorageConfig, entries: list[ShardEntry]) -> list[str]:
    """Shard files under ``tokens/`` that the index does not list (a glob would read them)."""
    fs, path = filesystem(join(out, TOKENS_DIR), storage)
    try:
        found = fs.find(path) if fs.isdir(path) else []
    except FileNotFoundError:
        found = []
    listed = {posixpath.basename(e.path) for e in entries}
    stray = sorted(
        posixpath.basename(p)
        for p in found
        if p.endswith(".parquet")
        and not posixpath.basename(p).startswith((".", "_"))
        and posixpath.basename(p) not in listed
    )
    if not stray:
        return []
    shown = ", ".join(stray[:MAX_EXAMPLES]) + (
        f" and {len(stray) - MAX_EXAMPLES} more" if len(stray) > MAX_EXAMPLES else ""
    )
    return [f"{TOKENS_DIR}/: {len(stray)} shard files not in the index ({shown})"]


def _check_quarantine(
    out: str,
    storage: StorageConfig,
    e: ShardEntry,
    hashes: list[np.ndarray],
    owners: list[np.ndarray],
) -> list[str]:
    url = join(out, e.quarantine_path)
    if not exists(url, storage):
        if e.quarantined:
            return [f"{e.quarantine_path}: missing, the index counts {e.quarantined} items"]
        return []
    try:
        table = read_table(url, storage)
    except ShardError as err:
        return [f"{e.quarantine_path}: {err}"]
    problems = []
    kind = read_metadata(table.schema).get("schema")
    if kind != "quarantine":
        problems.append(f"{e.quarantine_path}: metadata schema is {kind!r}, not 'quarantine'")
    if table.num_rows != e.quarantined:
        problems.append(
            f"{e.quarantine_path}: {table.num_rows} rows, the index says {e.quarantined}"
        )
    if "item_id" in table.column_names:
        ids = pc.filter(table["item_id"], pc.not_equal(table["item_id"], ""))
        h = np.unique(_id_hashes(ids))  # an item may be quarantined for two reasons
        hashes.append(h)
        owners.append(np.full(len(h), -1 - e.shard, dtype=np.int64))
    return problems


def _teacher_consistency(
    seen: dict[str, dict[tuple[Any, ...], list[int]]], num_shards: int
) -> list[str]:
    """Every teacher in every (readable) shard, with the same settings and quantiser."""
    problems = []
    for prefix, variants in sorted(seen.items()):
        covered = sum(len(v) for v in variants.values())
        if covered != num_shards:
            problems.append(f"teacher {prefix!r} is in {covered} of {num_shards} shards")
        if len(variants) > 1:
            parts = []
            for (teacher, _, layer, c, k, qid), shards in variants.items():
                parts.append(
                    f"{teacher} layer {layer} C={c} K={k} quantizer {qid} "
                    f"(shards {_shards_text(shards)})"
                )
            qids = {key[-1] for key in variants}
            what = f"{len(qids)} quantizer ids" if len(qids) > 1 else "different settings"
            problems.append(f"teacher {prefix!r}: {what} across shards: " + "; ".join(parts))
    return problems


def _shards_text(shards: list[int]) -> str:
    shown = ", ".join(str(s) for s in shards[:5])
    return shown + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")


def _duplicates(
    out: str,
    storage: StorageConfig,
    entries: list[ShardEntry],
    token_hashes: list[np.ndarray],
    token_owner: list[np.ndarray],
    quarantine_hashes: list[np.ndarray],
    quarantine_owner: list[np.ndarray],
) -> list[str]:
    """Item ids twice among the token rows, or both in tokens and in quarantine. Owners are
    shard numbers (tokens) or ``-1 - shard`` (quarantine)."""
    if not token_hashes:
        return []
    h = np.concatenate(token_hashes + quarantine_hashes)
    owner = np.concatenate(token_owner + quarantine_owner)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = hs[1:] == hs[:-1]
    if not same.any():
        return []
    suspect = set(hs[1:][same].tolist())
    involved = set(owner[order][1:][same].tolist()) | set(owner[order][:-1][same].tolist())
    # Confirm on the ids themselves (a 64-bit hash collision is possible, if unlikely).
    where: dict[str, list[str]] = {}
    by_shard = {e.shard: e for e in entries}
    for o in sorted(involved):
        e = by_shard[o if o >= 0 else -1 - o]
        path = e.path if o >= 0 else e.quarantine_path
        ids = read_table(join(out, path), storage, ["item_id"])["item_id"]
        hashes = _id_hashes(ids)
        rows = np.flatnonzero(np.isin(hashes, list(suspect)))
        for i in rows:
            where.setdefault(str(ids[int(i)]), []).append(path)
    dups = {}
    for k, paths in where.items():
        in_tokens = sum(not p.startswith(QUARANTINE_DIR + "/") for p in paths)
        # Twice in tokens, in tokens and quarantine, or in two shards' quarantine files.
        if k and (in_tokens > 1 or (in_tokens and len(paths) > in_tokens) or len(set(paths)) > 1):
            dups[k] = paths
    if not dups:
        return []
    shown = "; ".join(
        f"{k} in {', '.join(sorted(set(v)))}" for k, v in sorted(dups.items())[:MAX_EXAMPLES]
    )
    more = len(dups) - MAX_EXAMPLES
    return [
        f"{len(dups)} item ids appear more than once ({shown}"
        + (f"; and {more} more)" if more > 0 else ")")
    ]


# ---------------------------------------------------------------- stats


@dataclass
class TeacherStats:
    """Codebook usage of one teacher over the whole output."""

    prefix: str
    teacher: str
    num_codebooks: int
    codebook_size: int
    items: int = 0
    frames: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    """(C, K) occurrences of each code in each codebook."""

    def __post_init__(self) -> None:
        if self.counts.size == 0:
            self.counts = np.zeros((self.num_codebooks, self.codebook_size), np.int64)

    @property
    def entropy_bits(self) -> np.ndarray:
        """(C,) order-0 entropy of each codebook, in bits (at most log2 K)."""
        total = self.counts.sum(axis=1, keepdims=True)
        p = self.counts / np.maximum(total, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1)), 0.0)
        return np.asarray(terms.sum(axis=1))

    @property
    def perplexity(self) -> np.ndarray:
        """(C,) ``2 ** entropy``: the number of equally used codes that would give it."""
        return np.asarray(2.0**self.entropy_bits)

    @property
    def dead(self) -> np.ndarray:
        """(C,) codes never used."""
        return np.asarray((self.counts == 0).sum(axis=1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "items": self.items,
            "frames": self.frames,
            "entropy_bits": self.entropy_bits.round(4).tolist(),
            "perplexity": self.perplexity.round(2).tolist(),
            "dead": self.dead.tolist(),
            "histograms": self.counts.tolist(),
        }


@dataclass
class TokenStats:
    """What :func:`stats` computes."""

    url: str
    teachers: dict[str, TeacherStats]
    seconds_by_domain: dict[str, float]
    seconds_by_source: dict[str, float]
    items: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "items": self.items,
            "hours_by_domain": {k: v / 3600 for k, v in sorted(self.seconds_by_domain.items())},
            "hours_by_source": {k: v / 3600 for k, v in sorted(self.seconds_by_source.items())},
            "teachers": {p: t.to_dict() for p, t in self.teachers.items()},
        }

    def table(self) -> str:
        lines = [f"items: {self.items}", "", "hours by domain:"]
        lines += [f"  {k:<20} {v / 3600:10.3f}" for k, v in sorted(self.seconds_by_domain.items())]
        lines.append("hours by source:")
        lines += [f"  {k:<20} {v / 3600:10.3f}" for k, v in sorted(self.seconds_by_source.items())]
        for p, t in self.teachers.items():
            lines += [
                "",
                f"{p} ({t.teacher}): {t.items} items, {t.frames} frames, "
                f"C={t.num_codebooks} K={t.codebook_size} (max {math.log2(t.codebook_size):.2f} "
                "bits)",
                f"  {'codebook':>8} {'entropy':>9} {'perplexity':>11} {'dead':>6}",
            ]
            for c, (h, ppl, d) in enumerate(zip(t.entropy_bits, t.perplexity, t.dead, strict=True)):
                lines.append(f"  {c:>8} {h:9.3f} {ppl:11.1f} {int(d):6}")
        return "\n".join(lines)


def stats(out: str, storage: StorageConfig | None = None) -> TokenStats:
    """Codebook usage per teacher and codebook, and hours by domain and source (one pass over
    the shards, one at a time)."""
    storage = _storage(storage)
    entries = list_shards(out, storage)
    result = TokenStats(url=out, teachers={}, seconds_by_domain={}, seconds_by_source={}, items=0)
    for e in entries:
        url = shard_url(out, e)
        table = read_table(url, storage)
        teachers = _teachers_or_raise(table.schema, url)
        result.items += table.num_rows
        seconds = table["num_samples"].to_numpy() / SAMPLE_RATE
        for col, acc in (
            ("domain", result.seconds_by_domain),
            ("source", result.seconds_by_source),
        ):
            keys = np.asarray(table[col].to_numpy(zero_copy_only=False), dtype=object)
            for k in np.unique(keys):
                acc[str(k)] = acc.get(str(k), 0.0) + float(seconds[keys == k].sum())
        for t in teachers:
            ts = result.teachers.setdefault(
                t.prefix, TeacherStats(t.prefix, t.teacher, t.num_codebooks, t.codebook_size)
            )
            if (ts.num_codebooks, ts.codebook_size) != (t.num_codebooks, t.codebook_size):
                raise ShardError(f"{url!r}: teacher {t.prefix!r} changes C or K between shards")
            codes_col = table[f"{t.prefix}_codes"].combine_chunks()
            offsets, data = _binary_values(codes_col)
            codes = data[offsets[0] : offsets[-1]]
            if len(codes) % t.num_codebooks:
                raise ShardError(f"{url!r}: {t.prefix}_codes is not a whole number of frames")
            frames = codes.reshape(-1, t.num_codebooks)  # (frames, C)
            k = max(t.codebook_size, int(codes.max()) + 1 if len(codes) else 0)
            if k > ts.counts.shape[1]:
                raise ShardError(f"{url!r}: {t.prefix} codes >= codebook size {t.codebook_size}")
            flat = (frames.astype(np.int64) + np.arange(t.num_codebooks) * k).reshape(-1)
            ts.counts += np.bincount(flat, minlength=t.num_codebooks * k).reshape(-1, k)
            ts.items += len(codes_col) - codes_col.null_count
            ts.frames += len(frames)
    return result


# ---------------------------------------------------------------- PyTorch reader


@dataclass(frozen=True)
class ReadTask:
    """Rows ``[start, stop)`` (of the shard's row order for the epoch) of one shard."""

    shard: int
    start: int
    stop: int


def plan_reads(
    entries: Sequence[ShardEntry],
    reader: int,
    readers: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> list[ReadTask]:
    """What reader ``reader`` of ``readers`` (rank x DataLoader workers) reads in ``epoch``.

    With at least as many shards as readers, whole shards are dealt round-robin in the epoch's
    shard order (seeded by ``seed`` and ``epoch`` when ``shuffle``): I/O stays one file per
    shard. With fewer shards than readers, every shard's rows are cut into ``readers``
    contiguous slices and each reader takes its own slice of each. Either way every row is read
    exactly once across all readers, and every reader computes the same plan."""
    if not 0 <= reader < readers:
        raise ValueError(f"reader {reader} is not in [0, {readers})")
    order = list(range(len(entries)))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(entries)).tolist()
    if len(entries) >= readers:
        return [ReadTask(i, 0, entries[i].rows) for i in order[reader::readers]]
    tasks = []
    for i in order:
        n = entries[i].rows
        start, stop = n * reader // readers, n * (reader + 1) // readers
        if stop > start:
            tasks.append(ReadTask(i, start, stop))
    return tasks


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenShardDataset(IterableDataset[dict[str, Any]]):
    """Items of a tokenize output, for a PyTorch ``DataLoader``.

    Each item is a dict: ``item_id``, ``source``, ``domain``, ``url`` (str), ``start``,
    ``duration`` (float, seconds), ``num_samples`` (int, 16 kHz) and, per teacher prefix, a
    ``(frames, C)`` tensor of codes (``codes_dtype``: uint8, or long for a loss's targets), or
    None on items the teacher did not run on.

    Shards are split across DDP ranks (``rank`` / ``world_size``, default: torch.distributed's
    when initialised, else 0 / 1) and DataLoader workers (:func:`plan_reads`): each row once per
    epoch. Ranks may get different numbers of rows; a DDP loop must tolerate that (e.g. join or
    a fixed number of steps). ``shuffle`` permutes the shard order and the rows inside each
    shard per epoch (seeded: call :meth:`set_epoch` before each epoch, with non-persistent
    workers)."""

    def __init__(
        self,
        out: str,
        storage: StorageConfig | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        teachers: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        codes_dtype: torch.dtype = torch.uint8,
    ) -> None:
        super().__init__()
        self.out = out
        self.storage = _storage(storage)
        self.entries = list_shards(out, self.storage)
        known = {t.prefix: t for t in (shard_teachers(out, self.storage) if self.entries else [])}
        if teachers is not None:
            unknown = [p for p in teachers if p not in known]
            if unknown:
                raise ShardError(f"teachers {unknown} are not in {out!r} (it has {list(known)})")
        self.teachers = [known[p] for p in (teachers if teachers is not None else known)]
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.codes_dtype = codes_dtype
        self.epoch = 0
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_rows(self) -> int:
        """Rows of the whole output (all ranks)."""
        return sum(e.rows for e in self.entries)

    def reader(self) -> tuple[int, int]:
        """(this reader, readers): rank-major over DataLoader workers."""
        rank, world = (
            (self.rank, self.world_size)
            if self.rank is not None and self.world_size is not None
            else _distributed()
        )
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self.reader()
        tasks = plan_reads(
            self.entries, reader, readers, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch
        )
        columns = list(ITEM_COLUMNS)
        for t in self.teachers:
            columns += [f"{t.prefix}_frames", f"{t.prefix}_codes"]
        for task in tasks:
            e = self.entries[task.shard]
            table = read_table(shard_url(self.out, e), self.storage, columns)
            if table.num_rows != e.rows:
                raise ShardError(
                    f"{e.path!r} has {table.num_rows} rows, the index says {e.rows}: "
                    "run 'spear shards validate'"
                )
            rows = np.arange(e.rows)
            if self.shuffle:
                rows = np.random.default_rng([self.seed, self.epoch, e.shard]).permutation(e.rows)
            yield from self._items(table, rows[task.start : task.stop])

    def _items(self, table: pa.Table, rows: np.ndarray) -> Iterator[dict[str, Any]]:
        whole = len(rows) == table.num_rows and not self.shuffle
        part = table if whole else table.take(pa.array(rows, type=pa.int64()))
        cols = {c: part[c].to_pylist() for c in part.column_names}
        for i in range(part.num_rows):
            item: dict[str, Any] = {c: cols[c][i] for c in ITEM_COLUMNS}
            for t in self.teachers:
                raw = cols[f"{t.prefix}_codes"][i]
                if raw is None:
                    item[t.prefix] = None
                    continue
                codes = np.array(codes_from_bytes(raw, t.num_codebooks))  # (frames, C), writable
                item[t.prefix] = torch.from_numpy(codes).to(self.codes_dtype)
            yield item


def collate_tokens(items: Sequence[dict[str, Any]], pad: int = -100) -> dict[str, Any]:
    """A list of :class:`TokenShardDataset` items -> a batch: the per-item fields as lists
    (``num_samples`` as a tensor), per teacher ``codes`` ``(B, T_max, C)`` long padded with
    ``pad`` (items without the teacher are all ``pad``) and ``{prefix}_lens`` ``(B,)``."""
    batch: dict[str, Any] = {c: [it[c] for it in items] for c in ITEM_COLUMNS}
    batch["num_samples"] = torch.tensor(batch["num_samples"], dtype=torch.long)
    prefixes = [k for k in items[0] if k not in ITEM_COLUMNS] if items else []
    for p in prefixes:
        codes = [it[p] for it in items]
        present = [c for c in codes if c is not None]
        c_dim = present[0].shape[1] if present else 0
        t_max = max((c.shape[0] for c in present), default=0)
        out = torch.full((len(items), t_max, c_dim), pad, dtype=torch.long)
        lens = torch.zeros(len(items), dtype=torch.long)
        for i, c in enumerate(codes):
            if c is not None:
                out[i, : c.shape[0]] = c.long()
                lens[i] = c.shape[0]
        batch[p] = out
        batch[f"{p}_lens"] = lens
    return batch


# ---------------------------------------------------------------- Ray Data


def ray_dataset(
    out: str,
    storage: StorageConfig | None = None,
    columns: Sequence[str] | None = None,
    **read_kwargs: Any,
) -> ray.data.Dataset:
    """The token shards listed in the index as one Ray Dataset (``ray.data.read_parquet``),
    read through the same fsspec filesystem (and S3 endpoint) as the rest of spear."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    storage = _storage(storage)
    entries = list_shards(out, storage)
    if not entries:
        raise ShardError(f"{out!r} has no token shards")
    fs, _ = filesystem(out, storage)
    paths = [filesystem(shard_url(out, e), storage)[1] for e in entries]
    return ray.data.read_parquet(
        paths,
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        columns=list(columns) if columns else None,
        **read_kwargs,
    )


def shard_urls(out: str, storage: StorageConfig | None = None) -> list[str]:
    """Full URLs of the shards listed in the index (for pyarrow / pandas / DuckDB)."""
    storage = _storage(storage)
    fs, _ = filesystem(out, storage)
    return [
        unstrip(fs, filesystem(shard_url(out, e), storage)[1]) for e in list_shards(out, storage)
    ]
