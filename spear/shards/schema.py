"""The token shard contract: layout, schema, versions, teacher metadata and frame formulas.

A tokenize output under ``OUT`` (any fsspec URL; ``docs/shards.md``)::

    index.parquet                    # TOKEN_INDEX_SCHEMA: one row per shard; readers start here
    tokens/shard-NNNNN.parquet       # token_shard_schema(prefixes) + metadata (TokenTeacherInfo)
    quarantine/shard-NNNNN.parquet   # spear.formats.QUARANTINE_SCHEMA: items without tokens
    report.json, _SUCCESS.json       # the run's report and summary
    _work/                           # resume state (plan, commit entries)

Codes are ``uint8 (frames, C)`` C-order bytes in ``{prefix}_codes`` with ``{prefix}_frames``;
both null on items the teacher did not run on. A teacher's frame count follows its family's
formula from the item's 16 kHz ``num_samples`` (:data:`FRAME_FORMULAS`): the reader, the
validator, the writer and the teachers themselves use these same functions.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from spear.formats import read_metadata, with_metadata

TOKEN_SHARD_VERSION = 2
TOKEN_SHARD_READS = (1, 2)
"""Versions this spear reads: 2 added the nullable :data:`SOURCE_COLUMNS`; a version 1 shard
reads with them absent (its items are then decoded without the ``changed`` check)."""
TOKEN_INDEX_VERSION = 1

INDEX_FILE = "index.parquet"
SUCCESS_FILE = "_SUCCESS.json"
REPORT_FILE = "report.json"
PLAN_FILE = "_work/plan.json"
TOKENS_DIR = "tokens"
QUARANTINE_DIR = "quarantine"

NOT_RUN_FRAMES = -1
"""``{prefix}_frames`` of an item a teacher did not run on, between the teacher stage and the
writer (the shard stores a null)."""

ITEM_COLUMNS = ("item_id", "source", "domain", "url", "start", "duration", "num_samples")
"""The per-item columns every token shard has before its teachers' columns."""

SOURCE_COLUMNS = (
    "file_size",
    "file_version",
    "seek_offset",
    "seek_sample",
    "seek_header_offset",
    "seek_header_bytes",
)
"""The manifest's provenance columns (``spear.stages.decode.PROVENANCE_COLUMNS``), copied into
shards since version 2 (nullable: null where the manifest was version 1): a reader that decodes
an item passes them on, so a file changed since the manifest is ``changed``, never other audio."""


def shard_name(shard: int) -> str:
    """``shard-NNNNN``: the name of shard ``shard`` in every folder of the layout."""
    return f"shard-{shard:05d}"


def token_path(shard: int) -> str:
    """Relative to OUT: ``tokens/shard-NNNNN.parquet``."""
    return posixpath.join(TOKENS_DIR, f"{shard_name(shard)}.parquet")


def quarantine_path(shard: int) -> str:
    """Relative to OUT: ``quarantine/shard-NNNNN.parquet``."""
    return posixpath.join(QUARANTINE_DIR, f"{shard_name(shard)}.parquet")


# ---------------------------------------------------------------- frame formulas

# WavLM's CNN: (kernel, stride) per conv, shared by the Large and tiny presets.
_WAVLM_CONVS = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2


def wavlm_num_frames(num_samples: int) -> int:
    """50 Hz frames for ``num_samples``: ``max(0, (n - 400) // 320 + 1)`` (the conv chain)."""
    n = num_samples
    for k, s in _WAVLM_CONVS:
        n = (n - k) // s + 1 if n >= k else 0
    return n


def dasheng_num_frames(num_samples: int) -> int:
    """25 Hz frames for ``num_samples``: ``(1 + n // 160) // 4`` (mel frames, 4 per patch)."""
    return (1 + num_samples // 160) // 4


FRAME_FORMULAS: dict[str, Callable[[int], int]] = {
    "wavlm": wavlm_num_frames,
    "dasheng": dasheng_num_frames,
}
"""Frames a teacher family gives for ``num_samples`` 16 kHz samples."""


# ---------------------------------------------------------------- schema and metadata


def token_shard_schema(teachers: list[str]) -> pa.Schema:
    """Token shard columns: per teacher ``{t}_frames`` and ``{t}_codes`` (uint8, (frames, C)
    C-order, as binary). A teacher's columns are null for items it did not run on (speech
    items carry no Dasheng tokens)."""
    fields = [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("start", pa.float64(), nullable=False),
        pa.field("duration", pa.float64(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),  # at 16 kHz, after decode
        pa.field("file_size", pa.int64(), nullable=True),
        pa.field("file_version", pa.string(), nullable=True),
        pa.field("seek_offset", pa.int64(), nullable=True),
        pa.field("seek_sample", pa.int64(), nullable=True),
        pa.field("seek_header_offset", pa.int64(), nullable=True),
        pa.field("seek_header_bytes", pa.int64(), nullable=True),
    ]
    for t in teachers:
        fields.append(pa.field(f"{t}_frames", pa.int32(), nullable=True))
        fields.append(pa.field(f"{t}_codes", pa.binary(), nullable=True))
    return pa.schema(fields)


# ``OUT/index.parquet`` of a tokenize run: one row per token shard (the reader's entry point).
TOKEN_INDEX_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to OUT: tokens/shard-N.parquet
        pa.field("rows", pa.int64(), nullable=False),  # items with tokens
        pa.field("quarantined", pa.int64(), nullable=False),  # items of the shard in quarantine
        pa.field("bytes", pa.int64(), nullable=False),  # size of the Parquet file
        pa.field("sha256", pa.string(), nullable=False),  # of the Parquet file's bytes
        pa.field("audio_seconds", pa.float64(), nullable=False),  # sum of num_samples / 16 kHz
    ]
)


@dataclass(frozen=True)
class TokenTeacherInfo:
    """One teacher's entry in a token shard's metadata (``teachers`` list)."""

    prefix: str
    """Column prefix: ``{prefix}_frames`` / ``{prefix}_codes`` (``wavlm``, ``dasheng``)."""
    teacher: str
    """Teacher registry name (``wavlm``, ``dasheng``, ``wavlm-tiny``, ...)."""
    family: str
    """``wavlm`` or ``dasheng``: fixes the frame formula."""
    layer: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int
    quantizer_id: str
    checkpoint_sha256: str | None
    domains: tuple[str, ...]
    """Domains of the items this teacher ran on; its columns are null on the others."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"domains": list(self.domains)}


def token_shard_metadata(
    teachers: list[TokenTeacherInfo], **extra: Any
) -> tuple[pa.Schema, dict[str, Any]]:
    """The token shard schema for ``teachers`` with spear's metadata attached, and the metadata."""
    meta = {"teachers": [asdict(t) for t in teachers], **extra}
    schema = with_metadata(
        token_shard_schema([t.prefix for t in teachers]), "token_shard", TOKEN_SHARD_VERSION, **meta
    )
    return schema, read_metadata(schema)


def read_token_teachers(schema: pa.Schema) -> list[TokenTeacherInfo]:
    """The teachers recorded in a token shard's schema; ValueError if it is not a token shard."""
    meta = read_metadata(schema)
    if meta.get("schema") != "token_shard":
        raise ValueError(f"not a spear token shard (metadata schema {meta.get('schema')!r})")
    if meta.get("version") not in TOKEN_SHARD_READS:
        raise ValueError(
            f"token shard version {meta.get('version')} is not one of {TOKEN_SHARD_READS}; "
            "upgrade spear to read it"
        )
    return [TokenTeacherInfo(**(t | {"domains": tuple(t["domains"])})) for t in meta["teachers"]]


def codes_to_bytes(codes: np.ndarray) -> bytes:
    """uint8 codes (frames, C) -> a token shard's ``{t}_codes`` bytes."""
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"codes must be uint8 (frames, C), got {codes.dtype} {codes.shape}")
    return np.ascontiguousarray(codes).tobytes()


def codes_from_bytes(data: bytes, num_codebooks: int) -> np.ndarray:
    """A token shard's ``{t}_codes`` bytes -> uint8 codes (frames, C)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, num_codebooks)
