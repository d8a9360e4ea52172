"""Looking at a tokenize output: :func:`inspect` (schema, teachers and their weights, sizes) and
:func:`stats` (codebook usage, hours by domain and source)."""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.formats import SAMPLE_RATE, read_metadata
from spear.shards.checks import binary_values
from spear.shards.index import (
    INDEX_FILE,
    ShardError,
    _read_schema,
    _storage,
    list_shards,
    read_table,
    shard_url,
    teachers_of,
)
from spear.shards.schema import SUCCESS_FILE, TokenTeacherInfo, token_shard_schema
from spear.storage import StorageConfig, exists, filesystem, join


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
            "teachers": [t.as_dict() | {"weights": weights_of(t)} for t in self.teachers],
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
                f"domains {','.join(t.domains)}, weights {weights_of(t)}"
            )
        lines.append("columns: " + ", ".join(f"{f.name}:{f.type}" for f in self.schema))
        return "\n".join(lines)


def weights_of(t: TokenTeacherInfo) -> str:
    """Which weights made a teacher's tokens: its checkpoint's sha256, or ``random`` (the token
    metadata's ``checkpoint_sha256`` is null for a random-weights teacher)."""
    return t.checkpoint_sha256 or "random"


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
        teachers = teachers_of(schema, url)
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
        teachers = teachers_of(schema, first)
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
        teachers = teachers_of(table.schema, url)
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
            offsets, data = binary_values(codes_col)
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
