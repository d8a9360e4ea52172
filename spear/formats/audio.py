"""Decoded audio: the audio batch the decode stage hands the teachers (Ray Data blocks), and the
audio parts ``spear decode`` writes (``schema: audio_shard``).

Both hold 16 kHz mono int16 samples as little-endian bytes in a ``binary`` column ``audio``,
with ``num_samples`` beside it (int16 halves the object-store traffic of float32).

``spear decode`` is a validation pass (see :mod:`spear.pipeline.decode`): no spear job reads
its audio parts; :func:`read_audio_part` is their reader for a person or an outside tool.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.formats.manifest import MANIFEST_SCHEMA
from spear.formats.parquet import read_metadata, with_metadata

if TYPE_CHECKING:  # storage (fsspec) is imported by the reader when called
    from spear.storage import StorageConfig

SAMPLE_RATE = 16_000
"""Every stage after decode works on 16 kHz mono audio."""

# The audio batch between stages (Ray Data blocks). Besides these columns a batch carries the
# manifest columns it came from. ``audio`` holds ``num_samples`` int16 little-endian samples.
AUDIO_BATCH_COLUMNS = ("item_id", "domain", "num_samples", "audio")
AUDIO_DTYPE = np.dtype("<i2")

AUDIO_SHARD_VERSION = 1
AUDIO_SHARD_KIND = "audio_shard"


def audio_to_bytes(samples: np.ndarray) -> bytes:
    """int16 mono samples -> the ``audio`` column's bytes."""
    return np.ascontiguousarray(samples, dtype=AUDIO_DTYPE).tobytes()


def audio_from_bytes(data: bytes) -> np.ndarray:
    """The ``audio`` column's bytes -> int16 samples (read-only view)."""
    return np.frombuffer(data, dtype=AUDIO_DTYPE)


def audio_shard_schema(check_only: bool) -> pa.Schema:
    """An audio part's schema: the manifest's columns, ``num_samples`` and (unless the part was
    written by ``spear decode --check-only``) ``audio``."""
    fields = [MANIFEST_SCHEMA.field(n) for n in MANIFEST_SCHEMA.names]
    fields.append(pa.field("num_samples", pa.int64(), nullable=False))
    if not check_only:
        fields.append(pa.field("audio", pa.binary(), nullable=False))
    meta = {"sample_rate": SAMPLE_RATE, "sample_format": "int16le", "check_only": check_only}
    return with_metadata(pa.schema(fields), AUDIO_SHARD_KIND, AUDIO_SHARD_VERSION, **meta)


def audio_shard_table(ok: dict[str, np.ndarray], check_only: bool) -> pa.Table:
    """The decoded items of a batch (columns by name, as the decode stage gives them) as one
    row group of an audio part."""
    schema = audio_shard_schema(check_only)
    if not ok or len(ok.get("url", [])) == 0:
        return schema.empty_table()
    return pa.table(
        {n: pa.array(ok[n], type=schema.field(n).type) for n in schema.names}, schema=schema
    )


def read_audio_part(url: str, storage: StorageConfig) -> pa.Table:
    """One audio part (``OUT/audio/part-*.parquet`` of ``spear decode``), checked to be one
    that holds audio; :func:`audio_from_bytes` turns a row's ``audio`` into samples."""
    from spear.storage import read_bytes

    try:
        table = pq.read_table(io.BytesIO(read_bytes(url, storage)))
    except FileNotFoundError:
        raise SpearError(f"{url!r} does not exist") from None
    except (pa.ArrowException, OSError) as err:
        raise SpearError(f"cannot read {url!r}: {err}") from None
    meta = read_metadata(table.schema)
    if meta.get("schema") != AUDIO_SHARD_KIND:
        raise SpearError(f"{url!r} is not an audio part (its schema is {meta.get('schema')!r})")
    if int(meta.get("version", 0)) > AUDIO_SHARD_VERSION:
        raise SpearError(
            f"{url!r} is an audio part of version {meta['version']}; this spear reads up to "
            f"{AUDIO_SHARD_VERSION}"
        )
    if meta.get("check_only") or "audio" not in table.column_names:
        raise SpearError(f"{url!r} was written by spear decode --check-only: it holds no audio")
    return table
