"""Data contracts shared by every stage: one module, versioned. ``docs/formats.md`` describes them.

Tables (all Parquet, readable by pyarrow, pandas and DuckDB without this package):

* **manifest** - one row per item (a segment of an audio file): where it is, how long, which domain.
* **audio batch** - what the decode stage hands to the teachers: 16 kHz mono int16 samples as bytes.
* **quarantine** - one row per item that a stage could not process, with the reason.
* **embedding shard** - float16 teacher embeddings, the quantiser's training data.
* **token shard** - MVQ codes per teacher, the product other students reuse.

Variable-length arrays are stored as ``binary`` (raw little-endian bytes) plus a count column:
Parquet's UINT_8 annotates an INT32 physical type, so ``list<uint8>`` would cost 4 bytes per code.
Each file written by spear carries JSON metadata under the key ``spear`` with ``schema`` (the table
kind) and ``version``.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_VERSION = 1
QUARANTINE_VERSION = 1
EMBEDDING_SHARD_VERSION = 1
TOKEN_SHARD_VERSION = 1

METADATA_KEY = b"spear"

SAMPLE_RATE = 16_000
"""Every stage after decode works on 16 kHz mono audio."""

DOMAINS = ("speech", "audio")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),  # stable: hash of url + segment index
        pa.field("source", pa.string(), nullable=False),  # the source label (e.g. "librispeech")
        pa.field("domain", pa.string(), nullable=False),  # "speech" | "audio"
        pa.field("url", pa.string(), nullable=False),  # the audio file, as an fsspec URL
        pa.field("segment", pa.int32(), nullable=False),  # index of this segment in its file
        pa.field("start", pa.float64(), nullable=False),  # seconds from the file's start
        pa.field("duration", pa.float64(), nullable=False),  # seconds
        pa.field("file_duration", pa.float64(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),  # of the file, before resampling
        pa.field("channels", pa.int16(), nullable=False),
        pa.field("format", pa.string(), nullable=False),  # soundfile's major format: WAV, FLAC, ...
        pa.field("subtype", pa.string(), nullable=False),  # PCM_16, FLOAT, VORBIS, ...
        pa.field("file_size", pa.int64(), nullable=False),  # bytes
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),  # "" when the file never became an item
        pa.field("source", pa.string(), nullable=False),  # the file's URL
        pa.field("stage", pa.string(), nullable=False),  # "manifest", "decode", "teacher", ...
        pa.field("error_type", pa.string(), nullable=False),  # short machine-readable reason
        pa.field("message", pa.string(), nullable=False),  # what a person reads
    ]
)

# The audio batch between stages (Ray Data blocks). Besides these columns a batch carries the
# manifest columns it came from. ``audio`` holds ``num_samples`` int16 little-endian samples.
AUDIO_BATCH_COLUMNS = ("item_id", "domain", "num_samples", "audio")
AUDIO_DTYPE = np.dtype("<i2")

EMBEDDING_SHARD_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field(
            "embeddings", pa.binary(), nullable=False
        ),  # float16 LE, (num_frames, dim) C-order
    ]
)
EMBEDDING_DTYPE = np.dtype("<f2")


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
    ]
    for t in teachers:
        fields.append(pa.field(f"{t}_frames", pa.int32(), nullable=True))
        fields.append(pa.field(f"{t}_codes", pa.binary(), nullable=True))
    return pa.schema(fields)


TOKEN_INDEX_VERSION = 1

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
    if meta.get("version") != TOKEN_SHARD_VERSION:
        raise ValueError(
            f"token shard version {meta.get('version')} is not {TOKEN_SHARD_VERSION}; "
            "upgrade spear to read it"
        )
    return [TokenTeacherInfo(**(t | {"domains": tuple(t["domains"])})) for t in meta["teachers"]]


def with_metadata(schema: pa.Schema, kind: str, version: int, **extra: Any) -> pa.Schema:
    """Attach spear's JSON metadata (``schema``, ``version`` and ``extra``) to ``schema``."""
    meta = {"schema": kind, "version": version, **extra}
    return schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """spear's metadata of a table or file schema; empty when absent."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return dict(json.loads(raw)) if raw else {}


def audio_to_bytes(samples: np.ndarray) -> bytes:
    """int16 mono samples -> the ``audio`` column's bytes."""
    return np.ascontiguousarray(samples, dtype=AUDIO_DTYPE).tobytes()


def audio_from_bytes(data: bytes) -> np.ndarray:
    """The ``audio`` column's bytes -> int16 samples (read-only view)."""
    return np.frombuffer(data, dtype=AUDIO_DTYPE)


def codes_to_bytes(codes: np.ndarray) -> bytes:
    """uint8 codes (frames, C) -> a token shard's ``{t}_codes`` bytes."""
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"codes must be uint8 (frames, C), got {codes.dtype} {codes.shape}")
    return np.ascontiguousarray(codes).tobytes()


def codes_from_bytes(data: bytes, num_codebooks: int) -> np.ndarray:
    """A token shard's ``{t}_codes`` bytes -> uint8 codes (frames, C)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, num_codebooks)


def quarantine_row(
    *, item_id: str, source: str, stage: str, error_type: str, message: str
) -> dict[str, str]:
    return {
        "item_id": item_id,
        "source": source,
        "stage": stage,
        "error_type": error_type,
        "message": message,
    }


def quarantine_table(rows: list[dict[str, str]]) -> pa.Table:
    schema = with_metadata(QUARANTINE_SCHEMA, "quarantine", QUARANTINE_VERSION)
    return pa.Table.from_pylist(rows, schema=schema)


def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """A table as the bytes of one Parquet file (written whole by ``write_atomic``)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()
