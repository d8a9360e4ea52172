"""The embedding format: one writer, a reader of committed shards only (a stray copy in the
folder is never read), a validator that names what is wrong, and the test builder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spear.formats.embeddings import (
    EMBEDDING_SHARD_KIND,
    INDEX_FILE,
    EmbeddingDataError,
    committed_shards,
    embedding_frames,
    embedding_shard_table,
    read_embedding_shard,
    validate_embeddings,
)
from spear.formats.parquet import read_metadata
from spear.pipeline.quantize import open_embeddings
from spear.quantizer.config import QuantizerDataConfig
from spear.storage import StorageConfig
from spear.testing import write_embedding_shards

STORAGE = StorageConfig()


def _output(tmp_path: Path, frames: int = 600, dim: int = 8) -> tuple[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((frames, dim)).astype(np.float32)
    out = str(tmp_path / "emb")
    write_embedding_shards(out, x, shards=3, item_frames=50, teacher="wavlm", layer=21)
    return out, x


def test_writer_table_round_trips_frames_and_metadata() -> None:
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    b = np.ones((1, 4), np.float16)
    table = embedding_shard_table(
        ["x", "y"], np.array([3, 1]), [a.tobytes(), b.tobytes()], dim=4, teacher="wavlm"
    )
    meta = read_metadata(table.schema)
    assert (meta["schema"], meta["version"], meta["dim"]) == (EMBEDDING_SHARD_KIND, 1, 4)
    assert meta["teacher"] == "wavlm"
    assert table["num_frames"].to_pylist() == [3, 1]
    np.testing.assert_array_equal(embedding_frames(table["embeddings"][0].as_py(), 4), a)


def test_reader_reads_the_indexed_shards_and_ignores_a_stray_copy(tmp_path: Path) -> None:
    out, x = _output(tmp_path)
    shards = committed_shards(out, STORAGE)
    assert [Path(u).name for u in shards] == [f"shard-{i:05d}.parquet" for i in range(3)]
    before = open_embeddings(out, STORAGE, QuantizerDataConfig())
    assert before.total_frames == len(x) and len(before.items) == 12
    # A copy of a shard dropped beside the others (a file manager, an rsync gone wrong), and
    # a shard file of another run: a folder listing would read their items twice.
    emb = tmp_path / "emb" / "embeddings"
    shutil.copy(emb / "shard-00001.parquet", emb / "copy of shard-00001.parquet")
    shutil.copy(emb / "shard-00002.parquet", emb / "shard-00003.parquet")
    assert committed_shards(out, STORAGE) == shards
    after = open_embeddings(out, STORAGE, QuantizerDataConfig())
    assert after.shards == before.shards and after.items == before.items
    problems = validate_embeddings(out, STORAGE)
    assert len(problems) == 1 and "2 files not in the index" in problems[0], problems
    assert "copy of shard-00001.parquet" in problems[0]


def test_a_single_shard_file_is_read_by_its_url(tmp_path: Path) -> None:
    out, _ = _output(tmp_path)
    one = committed_shards(out, STORAGE)[1]
    assert committed_shards(one, STORAGE) == [one]
    table = read_embedding_shard(one, STORAGE, ["item_id", "num_frames"])
    assert read_metadata(table.schema)["dim"] == 8 and table.num_rows == 4


def test_validate_passes_a_valid_output_and_names_each_problem(tmp_path: Path) -> None:
    out, _ = _output(tmp_path)
    assert validate_embeddings(out, STORAGE) == []
    emb = tmp_path / "emb" / "embeddings"
    # Shard 0 rewritten with one item cut short: its bytes no longer match the index, and the
    # item's bytes no longer hold num_frames x dim values.
    t = pq.read_table(emb / "shard-00000.parquet")
    blobs = t["embeddings"].to_pylist()
    blobs[0] = blobs[0][:-2]
    bad = embedding_shard_table(
        t["item_id"].to_pylist(), t["num_frames"].to_numpy(), blobs, dim=8, teacher="wavlm"
    )
    pq.write_table(bad, emb / "shard-00000.parquet")
    (emb / "shard-00002.parquet").unlink()
    problems = validate_embeddings(out, STORAGE)
    text = "\n".join(problems)
    assert "shard-00000.parquet: bytes or sha256 differ from the index" in text
    assert "1 rows whose bytes are not num_frames x 8 float16" in text and "item000000" in text
    assert "shard-00002.parquet: listed in the index, missing" in text
    assert len(problems) == 3, problems


def test_validate_catches_shards_of_two_teachers(tmp_path: Path) -> None:
    out, _ = _output(tmp_path)
    other = tmp_path / "other"
    x = np.zeros((100, 8), np.float32)
    write_embedding_shards(str(other), x, shards=1, teacher="dasheng")
    # The index of the first output now names a shard whose file is the other's (same name):
    # its sha256 differs and the teachers disagree.
    shutil.copy(other / "embeddings" / "shard-00000.parquet", tmp_path / "emb" / "embeddings")
    text = "\n".join(validate_embeddings(out, STORAGE))
    assert "shards disagree on teacher: ['dasheng', 'wavlm']" in text


def test_missing_unfinished_and_unindexed_outputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingDataError, match="no embeddings at"):
        committed_shards(str(tmp_path / "none"), STORAGE)
    out, _ = _output(tmp_path)
    (tmp_path / "emb" / "_SUCCESS.json").unlink()
    (tmp_path / "emb" / INDEX_FILE).unlink()
    with pytest.raises(EmbeddingDataError, match=r"are unfinished: .* committed 3 shard\(s\)"):
        committed_shards(out, STORAGE)
    (tmp_path / "emb" / "_SUCCESS.json").write_text(json.dumps({}))
    with pytest.raises(EmbeddingDataError, match="rerun the same spear embed command"):
        committed_shards(out, STORAGE)
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(tmp_path / "emb" / "embeddings" / "shard-00000.parquet", loose / "a.parquet")
    with pytest.raises(EmbeddingDataError, match="not an embedding shard nor a finished"):
        committed_shards(str(loose), STORAGE)
    assert "no index.parquet" in validate_embeddings(str(loose), STORAGE)[0]
