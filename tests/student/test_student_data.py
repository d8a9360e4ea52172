"""Training data without Ray: shards -> prepared rows -> length buckets -> batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spear.errors import SpearError
from spear.shards.index import open_run
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig
from spear.student.config import HeadConfig, MixConfig, StudentConfig, TrainDataConfig
from spear.student.data import (
    SecondsBucketer,
    bucket_batches,
    collate_rows,
    iter_rows,
    prepare_batch,
)
from spear.student.recipe import check_heads
from spear.testing import write_synthetic_output


def test_prepare_and_collate(tmp_path: Path) -> None:
    teachers = write_synthetic_output(str(tmp_path), 6, (0.5, 2.0), seed=0)
    run = open_run(str(tmp_path), StorageConfig())
    files, found = run.urls(), run.teachers
    assert found == teachers and len(files) == 1
    table = pq.read_table(files[0]).to_pydict()
    batch = {k: np.asarray(v, dtype=object) for k, v in table.items()}
    data = TrainDataConfig(min_seconds=0.9, max_seconds=32.0)
    out = prepare_batch(
        batch,
        teachers={"wavlm": 2, "dasheng": 1},
        rates={"wavlm": 50.0, "dasheng": 25.0},
        data=data,
        mix=MixConfig(inbatch_prob=0.5, noise_prob=0.0),
        decode=DecodeConfig(),
        storage=StorageConfig(),
        seed=0,
    )
    secs = np.asarray(table["num_samples"]) / 16000
    assert len(out["item_id"]) == int(((secs >= 0.9) & (secs <= 32)).sum()) > 0
    rows = list(iter_rows([out]))
    b = collate_rows(rows, {"wavlm": 2, "dasheng": 1})
    assert b.feats.shape[0] == len(rows) and b.feats.shape[2] == 128
    assert int(b.feat_lens.max()) == b.feats.shape[1]
    speech = b.domains == 0
    assert (b.targets["dasheng"][speech] == -100).all()  # speech items carry no Dasheng codes
    assert (b.targets["wavlm"][:, 0] >= 0).all()


def test_bucketer_bounds_seconds_and_groups_lengths() -> None:
    rng = np.random.default_rng(0)
    secs = rng.uniform(1, 30, size=300)
    rows = [{"num_samples": int(s * 16000), "i": i} for i, s in enumerate(secs)]
    data = TrainDataConfig(batch_seconds=100.0, num_buckets=6)
    batches = list(bucket_batches(rows, data))
    assert sorted(r["i"] for b in batches for r in b) == list(range(300))  # every row once
    b = SecondsBucketer(0.9, 32.0, 100.0, 6)
    for batch in batches:
        s = [r["num_samples"] / 16000 for r in batch]
        assert sum(s) <= 100.0 or len(batch) == 1
        assert len({b.bucket_of(x) for x in s}) == 1


def test_heads_must_match_shards(tmp_path: Path) -> None:
    teachers = write_synthetic_output(str(tmp_path), 2, (1.0, 1.5))
    ok = StudentConfig(
        preset="tiny",
        heads=(
            HeadConfig(name="wavlm", num_codebooks=2),
            HeadConfig(name="dasheng", num_codebooks=1, frame_rate=25.0),
        ),
    )
    check_heads(ok, teachers)
    with pytest.raises(SpearError, match="16x256"):
        check_heads(StudentConfig(preset="tiny"), teachers)
    with pytest.raises(SpearError, match="not a finished tokenize output"):
        open_run(str(tmp_path / "nothing"), StorageConfig())


def test_heads_take_their_shapes_from_the_shards(tmp_path: Path) -> None:
    from spear.student.recipe import heads_from_shards

    teachers = write_synthetic_output(str(tmp_path), 2, (1.0, 1.5))
    heads = heads_from_shards(StudentConfig(preset="tiny"), teachers)  # default 16x256 heads
    check_heads(StudentConfig(preset="tiny", heads=heads), teachers)
    shapes = {h.name: (h.num_codebooks, h.frame_rate, h.weight_audio) for h in heads}
    assert shapes == {"wavlm": (2, 50.0, 1.0), "dasheng": (1, 25.0, 0.1)}  # weights kept
    only = StudentConfig(preset="tiny", heads=(HeadConfig(name="other", num_codebooks=4),))
    with pytest.raises(SpearError, match="nothing to train"):
        heads_from_shards(only, teachers)


def test_the_student_reads_through_the_shard_contract(tmp_path: Path) -> None:
    """Stray shard files are ignored; a shard of other quantisers is refused wherever it is."""
    import shutil

    out = tmp_path / "run"
    write_synthetic_output(str(out), 12, (1.0, 1.5), seed=0, items_per_shard=4)
    shutil.copy(out / "tokens/shard-00000.parquet", out / "tokens/shard-00000 (copy).parquet")
    run = open_run(str(out), StorageConfig())
    assert len(run.urls()) == 3 and run.num_rows == 12  # the copy is not read twice
    from spear.testing import TokenItem, teacher, write_token_output

    other = tmp_path / "other"
    mixed = [teacher("wavlm", 2, quantizer_id="mvq-another"), teacher("dasheng", 1)]
    item = TokenItem("x", 16000, codes={"wavlm": np.zeros((49, 2), np.uint8)})
    write_token_output(str(other), [[item]], mixed)
    shutil.copy(other / "tokens/shard-00000.parquet", out / "tokens/shard-00001.parquet")
    with pytest.raises(SpearError, match="mvq-another"):
        open_run(str(out), StorageConfig())
