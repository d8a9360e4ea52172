"""Data contracts between the boxes: one module per format, each versioned, owning its schema,
writer and reader. ``docs/formats.md`` describes them.

* :mod:`spear.formats.parquet` - what every table shares: the ``spear`` JSON metadata
  (``schema``: the kind, ``version``), whole-file Parquet bytes, a content digest.
* :mod:`spear.formats.manifest` - the manifest (one row per item: a segment of an audio file)
  and the skipped-paths table; :func:`read_manifest`, the one manifest reader.
* :mod:`spear.formats.quarantine` - one row per input a stage could not process, with the reason.
* :mod:`spear.formats.audio` - 16 kHz mono int16 audio: the audio batch between stages and the
  audio parts of ``spear decode``.
* :mod:`spear.formats.embeddings` - float16 frame embeddings (the quantiser's training data,
  the student's features): writer, index, reader of committed shards, validator.
* token shards - the product other students reuse: :mod:`spear.shards`.

Variable-length arrays are stored as ``binary`` (raw little-endian bytes) plus a count column:
Parquet's UINT_8 annotates an INT32 physical type, so ``list<uint8>`` would cost 4 bytes per code.

The names below are re-exported for ``from spear.formats import X``; each format's other names
live in its module.
"""

from __future__ import annotations

from spear.formats.audio import (
    AUDIO_BATCH_COLUMNS,
    AUDIO_DTYPE,
    SAMPLE_RATE,
    audio_from_bytes,
    audio_to_bytes,
)
from spear.formats.embeddings import (
    EMBEDDING_DTYPE,
    EMBEDDING_SHARD_SCHEMA,
    EMBEDDING_SHARD_VERSION,
)
from spear.formats.manifest import (
    DOMAINS,
    MANIFEST_SCHEMA,
    MANIFEST_V2_FIELDS,
    MANIFEST_VERSION,
    MANIFEST_WRITE_SCHEMA,
    SKIPPED_SCHEMA,
    SKIPPED_VERSION,
    skipped_table,
)
from spear.formats.parquet import (
    METADATA_KEY,
    parquet_bytes,
    read_metadata,
    table_digest,
    with_metadata,
)
from spear.formats.quarantine import (
    QUARANTINE_SCHEMA,
    QUARANTINE_VERSION,
    quarantine_row,
    quarantine_table,
)

__all__ = [
    "AUDIO_BATCH_COLUMNS",
    "AUDIO_DTYPE",
    "DOMAINS",
    "EMBEDDING_DTYPE",
    "EMBEDDING_SHARD_SCHEMA",
    "EMBEDDING_SHARD_VERSION",
    "MANIFEST_SCHEMA",
    "MANIFEST_V2_FIELDS",
    "MANIFEST_VERSION",
    "MANIFEST_WRITE_SCHEMA",
    "METADATA_KEY",
    "QUARANTINE_SCHEMA",
    "QUARANTINE_VERSION",
    "SAMPLE_RATE",
    "SKIPPED_SCHEMA",
    "SKIPPED_VERSION",
    "audio_from_bytes",
    "audio_to_bytes",
    "parquet_bytes",
    "quarantine_row",
    "quarantine_table",
    "read_metadata",
    "skipped_table",
    "table_digest",
    "with_metadata",
]
