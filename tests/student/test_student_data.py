"""Training data without Ray: shards -> prepared rows -> length buckets -> batches."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spear.errors import ConfigError, SpearError
from spear.shards.index import open_run
from spear.shards.schema import SOURCE_COLUMNS
from spear.stages.audio_io import local_version
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig
from spear.student.config import HeadConfig, MixConfig, StudentConfig, TrainDataConfig
from spear.student.data import (
    SecondsBucketer,
    ShardRows,
    bucket_batches,
    collate_rows,
    iter_rows,
    plan_epoch,
    prepare_batch,
    stream_batches,
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
    # int16 audio travels (32 kB per audio second); the fbank is the training device's work.
    assert b.audio.dtype == torch.int16 and b.audio.shape[0] == len(rows)
    assert int(b.num_samples.max()) == b.audio.shape[1]
    assert sum(len(r["audio"]) for r in rows) == 2 * int(b.num_samples.sum())
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


HEADS = {"wavlm": 2, "dasheng": 1}
SMALL = TrainDataConfig(batch_seconds=6.0, max_seconds=4.0, num_buckets=2, shuffle_buffer=6)


def _run(tmp_path: Path, n: int = 40) -> list[str]:
    write_synthetic_output(str(tmp_path), n, (1.0, 3.0), seed=0, items_per_shard=8)
    return open_run(str(tmp_path), StorageConfig()).urls()


def _plan(
    urls: list[str], data: TrainDataConfig = SMALL, **kw: int
) -> list[list[tuple[int, int, int]]]:
    reader = ShardRows(urls, list(HEADS), StorageConfig())
    args = {"seed": 0, "epoch": 0} | kw
    return [
        [(r.shard, r.row, r.copy) for r in b]
        for b in plan_epoch(len(urls), reader.light, data, **args)
    ]


def test_plan_is_a_function_of_seed_and_epoch(tmp_path: Path) -> None:
    urls = _run(tmp_path)
    first = _plan(urls)
    assert first == _plan(urls)  # recomputed: the same order
    rows = sorted(r for b in first for r in b)
    assert rows == sorted(set(rows)) and len(rows) == 40  # every item once (all within 1-3 s)
    other_epoch, other_seed = _plan(urls, epoch=1), _plan(urls, seed=1)
    assert other_epoch != first and other_seed != first
    assert sorted(r for b in other_epoch for r in b) == rows
    # Shards are shuffled per epoch, and a shard's items do not come out in row order.
    assert [b[0][0] for b in first[:3]] != [b[0][0] for b in other_epoch[:3]]
    order = [r[:2] for b in first for r in b]
    assert order != sorted(order)
    # Two workers: disjoint shard sets covering the run.
    ranks = [_plan(urls, rank=r, world=2) for r in (0, 1)]
    shards = [{r[0] for b in p for r in b} for p in ranks]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(len(urls)))


def _prepare(calls: list[str]) -> Callable[[dict[str, np.ndarray]], dict[str, object]]:
    def prepare(rows: dict[str, np.ndarray]) -> dict[str, object]:
        calls.extend(str(i) for i in rows["item_id"])
        return prepare_batch(
            rows,
            teachers=HEADS,
            rates={"wavlm": 50.0, "dasheng": 25.0},
            data=SMALL,
            mix=MixConfig(inbatch_prob=0.5, noise_prob=0.0, token_mixing=True),
            decode=DecodeConfig(),
            storage=StorageConfig(),
            seed=0,
        )

    return prepare


def _stream(urls: list[str], skip: int, calls: list[str]) -> list[tuple[int, object]]:
    reader = ShardRows(urls, list(HEADS), StorageConfig())
    plan = plan_epoch(len(urls), reader.light, SMALL, planned=reader.planned, seed=0, epoch=1)
    return list(
        stream_batches(plan, reader, _prepare(calls), HEADS, skip=skip, prep_rows=2, prefetch=3)
    )


def test_resumed_stream_equals_uninterrupted_and_skips_without_decoding(tmp_path: Path) -> None:
    urls = _run(tmp_path)
    full_calls: list[str] = []
    full = _stream(urls, 0, full_calls)
    assert [i for i, _ in full] == list(range(len(full))) and len(full) > 8
    skip = len(full) // 2
    calls: list[str] = []
    resumed = _stream(urls, skip, calls)
    assert [i for i, _ in resumed] == [i for i, _ in full[skip:]]
    for (_, a), (_, b) in zip(resumed, full[skip:], strict=True):
        assert torch.equal(a.audio, b.audio) and torch.equal(a.num_samples, b.num_samples)
        for t in HEADS:
            assert torch.equal(a.targets[t], b.targets[t])
    # Only the items of the batches after the resume point were decoded and mixed.
    plan = _plan(urls, epoch=1)
    later = sum(len(b) for b in plan[skip:])
    assert len(calls) == later < len(full_calls) == sum(len(b) for b in plan)
    assert calls == full_calls[len(full_calls) - later :]


def test_sampling_weights_repeat_and_drop_items(tmp_path: Path) -> None:
    urls = _run(tmp_path)
    light = ShardRows(urls, list(HEADS), StorageConfig()).light
    domains = {(s, r): str(d) for s in range(len(urls)) for r, d in enumerate(light(s)["domain"])}
    n_audio = sum(d == "audio" for d in domains.values())
    assert 0 < n_audio < len(domains)

    def count(data: TrainDataConfig) -> dict[str, int]:
        out = {"speech": 0, "audio": 0}
        for b in _plan(urls, data):
            for s, r, _ in b:
                out[domains[(s, r)]] += 1
        return out

    base = count(SMALL)
    assert base == {"speech": len(domains) - n_audio, "audio": n_audio}
    twice = count(dataclasses.replace(SMALL, domain_weights={"audio": 2.0, "speech": 0.0}))
    assert twice == {"speech": 0, "audio": 2 * n_audio}
    # Fractional weights: floor(w) copies, one more with probability frac(w); the synthetic
    # shards' source is "synthetic".
    half = count(dataclasses.replace(SMALL, source_weights={"synthetic": 1.5}))
    assert 1.2 * len(domains) < half["speech"] + half["audio"] < 1.8 * len(domains)
    assert _plan(urls, dataclasses.replace(SMALL, source_weights={"synthetic": 1.5})) == _plan(
        urls, dataclasses.replace(SMALL, source_weights={"synthetic": 1.5})
    )
    with pytest.raises(ConfigError, match="domain_weights"):
        TrainDataConfig(domain_weights={"audio": -1.0})


def _with_versions(urls: list[str], drop_sources: bool = False) -> list[str]:
    """The shards as tokenize writes them from a version 2 manifest: each row's `file_version`
    is its file's (what `spear manifest` records); ``drop_sources``: a version 1 shard."""
    for url in urls:
        table = pq.read_table(url)
        if drop_sources:
            table = table.drop_columns(list(SOURCE_COLUMNS))
        else:
            versions = [local_version(os.stat(u)) for u in table["url"].to_pylist()]
            at = table.schema.get_field_index("file_version")
            table = table.set_column(at, "file_version", pa.array(versions, pa.string()))
        pq.write_table(table, url)
    return urls


def _stream_ids(urls: list[str]) -> tuple[list[str], ShardRows]:
    reader = ShardRows(urls, list(HEADS), StorageConfig())
    plan = plan_epoch(len(urls), reader.light, SMALL, planned=reader.planned, seed=0, epoch=1)
    prepared: list[str] = []
    prepare = _prepare([])

    def record(rows: dict[str, np.ndarray]) -> dict[str, object]:
        out = prepare(rows)
        prepared.extend(str(i) for i in out["item_id"])  # type: ignore[attr-defined]
        return out

    list(stream_batches(plan, reader, record, HEADS, prep_rows=4, prefetch=2))
    return prepared, reader


def test_a_file_changed_since_the_manifest_is_dropped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls = _with_versions(_run(tmp_path, 16))
    rows = pq.read_table(urls[0]).to_pylist()
    planned = {r["item_id"] for u in urls for r in pq.read_table(u).to_pylist()}
    before, _ = _stream_ids(urls)
    assert before and set(before) <= planned
    # Replaced by another (valid) recording: never trained on, as the tokens are not of it.
    victim = next(r for r in rows if r["item_id"] in before)
    other = next(r for r in rows if r["url"] != victim["url"])
    time.sleep(0.01)
    Path(victim["url"]).write_bytes(Path(other["url"]).read_bytes())
    with caplog.at_level(logging.WARNING, logger="spear.student.data"):
        after, reader = _stream_ids(urls)
    assert sorted(after) == sorted(i for i in before if i != victim["item_id"])
    assert reader.dropped == {"changed": 1}
    assert any(victim["item_id"] in m and "changed" in m for m in caplog.messages)


def test_a_training_worker_counts_its_drops_over_every_epoch(tmp_path: Path) -> None:
    """The recipe's per-worker data keeps one count over the run (the ``dropped`` metric): a
    file changed since its manifest is dropped once an epoch, each time counted."""
    from spear.student.config import TrainConfig
    from spear.student.recipe import _Data

    urls = _with_versions(_run(tmp_path, 16))
    rows = pq.read_table(urls[0]).to_pylist()
    before, _ = _stream_ids(urls)
    victim = next(r for r in rows if r["item_id"] in before)
    other = next(r for r in rows if r["url"] != victim["url"])
    time.sleep(0.01)
    Path(victim["url"]).write_bytes(Path(other["url"]).read_bytes())
    config = {
        "cfg": TrainConfig(data=SMALL),
        "teachers": HEADS,
        "files": urls,
        "storage": StorageConfig(),
        "rates": {"wavlm": 50.0, "dasheng": 25.0},
        "decode": DecodeConfig(),
    }
    data = _Data(config, rank=0, world=1)
    prepare = _prepare([])
    # In process instead of a Ray CPU task: the same prepare_batch, resolved at once.
    data.prepare = lambda rows, mix=None: prepare(rows)
    data.resolve = lambda chunks: chunks
    for epoch in (0, 1):
        assert list(data.epoch(epoch, 0, {"wait": 0.0}))
    assert data.dropped == {"changed": 2}


def test_a_version_1_shard_without_source_columns_still_reads(tmp_path: Path) -> None:
    urls = _with_versions(_run(tmp_path, 16), drop_sources=True)
    assert "file_version" not in pq.read_schema(urls[0]).names
    ids, reader = _stream_ids(urls)
    assert ids and not reader.dropped
