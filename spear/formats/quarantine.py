"""The quarantine table (``schema: quarantine``): one row per input a stage could not process,
with the reason. Every job writes it beside its outputs (``OUT/quarantine/*.parquet``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from spear.formats.parquet import with_metadata

if TYPE_CHECKING:  # storage (fsspec) is imported by the readers when called
    from spear.storage import StorageConfig

QUARANTINE_VERSION = 1
QUARANTINE_DIR = "quarantine"

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),  # "" when the file never became an item
        pa.field("source", pa.string(), nullable=False),  # the file's URL
        pa.field("stage", pa.string(), nullable=False),  # "manifest", "decode", "teacher", ...
        pa.field("error_type", pa.string(), nullable=False),  # short machine-readable reason
        pa.field("message", pa.string(), nullable=False),  # what a person reads
    ]
)


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


def read_quarantine(out: str, storage: StorageConfig) -> pa.Table:
    """Every quarantine row of a job's output ``out`` (its ``quarantine/`` folder; empty when
    there is none)."""
    from spear.storage import filesystem, join

    fs, qpath = filesystem(join(out, QUARANTINE_DIR), storage)
    if not fs.exists(qpath):
        return quarantine_table([])
    return pq.read_table(qpath, filesystem=fs)
