"""Data contracts shared by every stage: one module, versioned. ``docs/formats.md`` describes them.

Tables (all Parquet, readable by pyarrow, pandas and DuckDB without this package):

* **manifest** - one row per item (a segment of an audio file): where it is, how long, which domain.
* **audio batch** - what the decode stage hands to the teachers: 16 kHz mono int16 samples as bytes.
* **quarantine** - one row per item that a stage could not process, with the reason.
* **embedding shard** - float16 teacher embeddings, the quantiser's training data.
* **token shard** - MVQ codes per teacher, the product other students reuse: its contract
  (schema, teachers, frame formulas, writer, reader, validator) is :mod:`spear.shards`.

Variable-length arrays are stored as ``binary`` (raw little-endian bytes) plus a count column:
Parquet's UINT_8 annotates an INT32 physical type, so ``list<uint8>`` would cost 4 bytes per code.
Each file written by spear carries JSON metadata under the key ``spear`` with ``schema`` (the table
kind) and ``version``.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.credentials import redact

MANIFEST_VERSION = 2
"""2 added the provenance and seek columns (:data:`MANIFEST_V2_FIELDS`) and ids that hash the
file's version; version 1 manifests are still read (those columns null)."""
SKIPPED_VERSION = 1
QUARANTINE_VERSION = 1
EMBEDDING_SHARD_VERSION = 1

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

MANIFEST_V2_FIELDS = (
    # What identifies the file's content: "size=N,mtime_ns=T" locally, "size=N,etag=E" (and
    # ",versionid=V" in a versioned bucket) on S3. Decode compares it: a mismatch is `changed`.
    pa.field("file_version", pa.string()),
    # Where this segment's decode may start (MP3, from the frame index; 0: at the top): the
    # byte offset, and the sample (at the file's rate) that decoding from there yields first.
    pa.field("seek_offset", pa.int64()),
    pa.field("seek_sample", pa.int64()),
    # The Xing/Info frame to read before seek_offset (offset, bytes; 0 bytes: none).
    pa.field("seek_header_offset", pa.int64()),
    pa.field("seek_header_bytes", pa.int64()),
)
"""Columns version 2 manifests add; absent (null when read) in version 1 ones."""

MANIFEST_WRITE_SCHEMA = pa.schema([*MANIFEST_SCHEMA, *MANIFEST_V2_FIELDS])
"""What ``spear manifest`` writes: :data:`MANIFEST_SCHEMA` (every manifest's columns) plus
:data:`MANIFEST_V2_FIELDS`."""

SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),  # the path or object
        pa.field("reason", pa.string(), nullable=False),  # spear.stages.manifest.SKIP_REASONS
        pa.field("message", pa.string(), nullable=False),  # what a person reads
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


def with_metadata(schema: pa.Schema, kind: str, version: int, **extra: Any) -> pa.Schema:
    """Attach spear's JSON metadata (``schema``, ``version`` and ``extra``) to ``schema``;
    credentials in ``extra`` (a checkpoint URL's signature) are masked."""
    meta = {"schema": kind, "version": version, **redact(extra)}
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


def skipped_table(rows: list[dict[str, str]]) -> pa.Table:
    schema = with_metadata(SKIPPED_SCHEMA, "skipped", SKIPPED_VERSION)
    return pa.Table.from_pylist(rows, schema=schema)


def quarantine_table(rows: list[dict[str, str]]) -> pa.Table:
    schema = with_metadata(QUARANTINE_SCHEMA, "quarantine", QUARANTINE_VERSION)
    return pa.Table.from_pylist(rows, schema=schema)


def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """A table as the bytes of one Parquet file (written whole by ``write_atomic``)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()


def _column_digest(h: Any, col: pa.ChunkedArray) -> None:
    arr = col.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        # Canonical bytes: int64 offsets from 0 and the UTF-8 data, whatever the chunking,
        # slicing or Arrow version.
        arr = pc.cast(arr, pa.large_string())
        offsets = np.frombuffer(arr.buffers()[1], dtype="<i8")[
            arr.offset : arr.offset + len(arr) + 1
        ]
        lo, hi = int(offsets[0]), int(offsets[-1])
        h.update((offsets - lo).astype("<i8").tobytes())
        data = arr.buffers()[2]
        if data is not None:
            h.update(memoryview(data)[lo:hi])
    else:
        a = np.asarray(arr.to_numpy(zero_copy_only=False))
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def table_digest(table: pa.Table, columns: tuple[str, ...]) -> str:
    """blake2b of ``columns`` of ``table``, row order included: the content, not its spelling."""
    h = hashlib.blake2b(digest_size=16)
    for name in columns:
        h.update(name.encode() + b"\0")
        _column_digest(h, table[name])
    return h.hexdigest()
