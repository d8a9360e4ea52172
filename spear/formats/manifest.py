"""The manifest (``schema: manifest``) and the skipped-paths table (``schema: skipped``):
what ``spear manifest`` writes and every job over items reads.

A manifest run ``OUT`` holds ``manifest/part-*.parquet`` (one row per item: a segment of an
audio file), ``skipped/part-*.parquet``, ``quarantine/part-*.parquet`` and ``_SUCCESS.json``
(written last: the run finished). :func:`read_manifest` is the one reader; the job that writes
it is :mod:`spear.pipeline.manifest`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.formats.parquet import with_metadata

if TYPE_CHECKING:  # storage (fsspec) is imported by the readers when called
    from spear.storage import StorageConfig

MANIFEST_VERSION = 2
"""2 added the provenance and seek columns (:data:`MANIFEST_V2_FIELDS`) and ids that hash the
file's version; version 1 manifests are still read (those columns null)."""
SKIPPED_VERSION = 1

MANIFEST_DIR = "manifest"
SUCCESS = "_SUCCESS.json"
"""Written last by ``spear manifest``: the run finished."""

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


def manifest_table(rows: list[dict[str, object]]) -> pa.Table:
    """One manifest part from its rows (the probe's output), with its metadata."""
    schema = with_metadata(MANIFEST_WRITE_SCHEMA, "manifest", MANIFEST_VERSION)
    return pa.Table.from_pylist(rows, schema=schema)


def skipped_table(rows: list[dict[str, str]]) -> pa.Table:
    schema = with_metadata(SKIPPED_SCHEMA, "skipped", SKIPPED_VERSION)
    return pa.Table.from_pylist(rows, schema=schema)


def require_finished(out: str, storage: StorageConfig) -> None:
    """Fail unless ``out`` holds a finished manifest run (a partial one would silently give
    later stages a subset)."""
    from spear.storage import exists, join

    if not exists(join(out, SUCCESS), storage):
        if not exists(out, storage):
            raise SpearError(
                f"manifest {out!r} does not exist; check the URL or run `spear manifest`"
            )
        raise SpearError(
            f"{out!r} is not a finished manifest (no {SUCCESS}); run or resume `spear manifest`"
        )


def read_manifest(out: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """The manifest table of a finished run at ``out`` (only ``columns``, when given)."""
    from spear.storage import filesystem, join

    require_finished(out, storage)
    fs, mpath = filesystem(join(out, MANIFEST_DIR), storage)
    if not fs.exists(mpath):
        raise SpearError(f"no manifest at {out!r} (expected {join(out, MANIFEST_DIR)})")
    # Version 1 parts lack MANIFEST_V2_FIELDS: read as nulls (no provenance check, no seek).
    return pq.read_table(mpath, filesystem=fs, schema=MANIFEST_WRITE_SCHEMA, columns=columns)
