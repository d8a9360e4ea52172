"""The audio-part format of ``spear decode``: written a row group at a time from decoded
batches, read back with its checks (an audio part, a version this spear knows, with audio)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spear.errors import SpearError
from spear.formats.audio import (
    AUDIO_SHARD_KIND,
    SAMPLE_RATE,
    audio_from_bytes,
    audio_shard_schema,
    audio_shard_table,
    audio_to_bytes,
    read_audio_part,
)
from spear.formats.manifest import MANIFEST_SCHEMA
from spear.formats.parquet import read_metadata, with_metadata
from spear.formats.quarantine import quarantine_table
from spear.storage import StorageConfig

STORAGE = StorageConfig()


def _decoded(n: int) -> dict[str, np.ndarray]:
    """What the decode stage hands on for ``n`` items: the manifest columns, samples, audio."""
    rng = np.random.default_rng(1)
    samples = [rng.integers(-3000, 3000, SAMPLE_RATE // (i + 1), dtype=np.int16) for i in range(n)]
    row = {
        "source": "t",
        "domain": "speech",
        "segment": 0,
        "start": 0.0,
        "file_duration": 1.0,
        "sample_rate": 16000,
        "channels": 1,
        "format": "WAV",
        "subtype": "PCM_16",
        "file_size": 100,
    }
    cols: dict[str, np.ndarray] = {
        k: np.array([v] * n) for k, v in row.items() if k in MANIFEST_SCHEMA.names
    }
    cols["item_id"] = np.array([f"i{i}" for i in range(n)])
    cols["url"] = np.array([f"/a/{i}.wav" for i in range(n)])
    cols["duration"] = np.array([len(s) / SAMPLE_RATE for s in samples])
    cols["num_samples"] = np.array([len(s) for s in samples], np.int64)
    audio = np.empty(n, dtype=object)
    audio[:] = [audio_to_bytes(s) for s in samples]
    cols["audio"] = audio
    return cols


def test_parts_round_trip_samples(tmp_path: Path) -> None:
    batch = _decoded(3)
    path = tmp_path / "part-000.parquet"
    with pq.ParquetWriter(path, audio_shard_schema(False)) as w:
        w.write_table(audio_shard_table(batch, False))
        w.write_table(audio_shard_table({}, False))  # a batch where every item failed
    table = read_audio_part(str(path), STORAGE)
    meta = read_metadata(table.schema)
    assert (meta["schema"], meta["sample_rate"], meta["check_only"]) == (
        AUDIO_SHARD_KIND,
        SAMPLE_RATE,
        False,
    )
    assert table["item_id"].to_pylist() == ["i0", "i1", "i2"]
    for i, row in enumerate(table.to_pylist()):
        want = audio_from_bytes(batch["audio"][i])
        np.testing.assert_array_equal(audio_from_bytes(row["audio"]), want)
        assert len(want) == row["num_samples"]


def test_reader_refuses_what_holds_no_audio(tmp_path: Path) -> None:
    marker = tmp_path / "check.parquet"
    pq.write_table(audio_shard_table(_decoded(2), True), marker)
    with pytest.raises(SpearError, match="--check-only: it holds no audio"):
        read_audio_part(str(marker), STORAGE)
    other = tmp_path / "q.parquet"
    pq.write_table(quarantine_table([]), other)
    with pytest.raises(SpearError, match="is not an audio part \\(its schema is 'quarantine'\\)"):
        read_audio_part(str(other), STORAGE)
    newer = tmp_path / "v9.parquet"
    schema = with_metadata(pa.schema([pa.field("audio", pa.binary())]), AUDIO_SHARD_KIND, 9)
    pq.write_table(schema.empty_table(), newer)
    with pytest.raises(SpearError, match="version 9; this spear reads up to 1"):
        read_audio_part(str(newer), STORAGE)
    with pytest.raises(SpearError, match="does not exist"):
        read_audio_part(str(tmp_path / "none.parquet"), STORAGE)
