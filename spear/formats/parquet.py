"""What every spear table shares: its JSON metadata under the Parquet key ``spear``
(``schema``: the table kind, ``version``, and what the writer adds), whole-file Parquet bytes
for :func:`spear.storage.write_atomic`, and a content digest of columns."""

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

METADATA_KEY = b"spear"


def with_metadata(schema: pa.Schema, kind: str, version: int, **extra: Any) -> pa.Schema:
    """Attach spear's JSON metadata (``schema``, ``version`` and ``extra``) to ``schema``;
    credentials in ``extra`` (a checkpoint URL's signature) are masked."""
    meta = {"schema": kind, "version": version, **redact(extra)}
    return schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """spear's metadata of a table or file schema; empty when absent."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return dict(json.loads(raw)) if raw else {}


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
