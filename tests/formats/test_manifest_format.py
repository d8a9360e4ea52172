"""The manifest format's reader: finished runs only, version 1 parts read with the version 2
columns as nulls, a column selection."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spear.errors import SpearError
from spear.formats.manifest import (
    MANIFEST_SCHEMA,
    MANIFEST_V2_FIELDS,
    MANIFEST_VERSION,
    SUCCESS,
    manifest_table,
    read_manifest,
)
from spear.formats.parquet import read_metadata, with_metadata
from spear.storage import StorageConfig

STORAGE = StorageConfig()


def _row(i: int, **extra: object) -> dict[str, object]:
    return {
        "item_id": f"{i:016x}-0000",
        "source": "s",
        "domain": "speech",
        "url": f"/a/{i}.flac",
        "segment": 0,
        "start": 0.0,
        "duration": 2.5,
        "file_duration": 2.5,
        "sample_rate": 16000,
        "channels": 1,
        "format": "FLAC",
        "subtype": "PCM_16",
        "file_size": 1000 + i,
        **extra,
    }


def test_read_manifest_of_a_finished_run(tmp_path: Path) -> None:
    (tmp_path / "manifest").mkdir()
    v2 = manifest_table([_row(1, file_version="size=1001,mtime_ns=5", seek_offset=0)])
    assert read_metadata(v2.schema) == {"schema": "manifest", "version": MANIFEST_VERSION}
    pq.write_table(v2, tmp_path / "manifest" / "part-000-00000-00000.parquet")
    v1_schema = with_metadata(MANIFEST_SCHEMA, "manifest", 1)
    v1 = pa.Table.from_pylist([_row(2)], schema=v1_schema)
    pq.write_table(v1, tmp_path / "manifest" / "part-001-00000-00000.parquet")
    with pytest.raises(SpearError, match="is not a finished manifest"):
        read_manifest(str(tmp_path), STORAGE)
    (tmp_path / SUCCESS).write_text("{}")
    got = read_manifest(str(tmp_path), STORAGE).sort_by("item_id").to_pylist()
    assert [r["file_version"] for r in got] == ["size=1001,mtime_ns=5", None]
    assert [r["seek_offset"] for r in got] == [0, None]
    assert set(got[0]) == {*MANIFEST_SCHEMA.names, *(f.name for f in MANIFEST_V2_FIELDS)}
    cols = read_manifest(str(tmp_path), STORAGE, columns=["item_id", "file_size"])
    assert cols.column_names == ["item_id", "file_size"] and cols.num_rows == 2


def test_missing_manifest_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpearError, match="does not exist; check the URL"):
        read_manifest(str(tmp_path / "none"), STORAGE)
    (tmp_path / SUCCESS).write_text("{}")
    with pytest.raises(SpearError, match="no manifest at"):
        read_manifest(str(tmp_path), STORAGE)
