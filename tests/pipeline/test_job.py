"""The job skeleton (``pipeline/job.py``): its pure parts (units, content digests, packing, the
plan check, resources), then unit jobs on Ray Data on the session's Ray (integration): every
unit once through a stub pipeline, the driver's memory independent of how many items (and
bytes) a unit holds, a job asking for more actors than fit, and the sizing check."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pytest
from ray import cloudpickle

from spear.errors import SpearError
from spear.pipeline.job import (
    ActorStage,
    Demand,
    UnitJob,
    actor_resources,
    check_fits,
    check_plan,
    cpu_share,
    cut_units,
    make_plan,
    pack,
    run_units,
    table_digest,
    unpack,
)
from spear.ray_utils import RayConfig
from spear.shards.schema import TokenTeacherInfo
from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig

LOCAL = StorageConfig()
COLS = ("item_id", "url", "duration")


def _items(n: int, seconds: float = 10.0) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"id{i:05d}" for i in range(n)],
            "url": [f"s3://b/{i}.flac" for i in range(n)],
            "duration": np.full(n, seconds),
        }
    )


def test_units_cut_by_items_and_by_seconds() -> None:
    t = cut_units(_items(10), items_per_unit=4)
    assert t["unit"].to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # 25 s per unit at most: two 10 s items each, never zero (an item longer than the cap
    # is a unit of its own).
    t = cut_units(_items(5), items_per_unit=4, max_unit_seconds=25)
    assert t["unit"].to_pylist() == [0, 0, 1, 1, 2]
    t = cut_units(_items(3, seconds=100), items_per_unit=4, max_unit_seconds=25)
    assert t["unit"].to_pylist() == [0, 1, 2]


def test_digest_follows_content_not_layout() -> None:
    t = _items(6)
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(2, 4)])
    assert table_digest(t, COLS) == table_digest(chunked, COLS)
    assert table_digest(t, COLS) == table_digest(t.slice(0, 6).cast(t.schema), COLS)
    changed = t.set_column(2, "duration", pa.array([10.0] * 5 + [10.5]))
    assert table_digest(changed, COLS) != table_digest(t, COLS)
    renamed = t.set_column(1, "url", pa.array([f"s3://b/{i}.flac" for i in range(5)] + ["x"]))
    assert table_digest(renamed, COLS) != table_digest(t, COLS)
    # The boundary between two strings is part of the content.
    a = pa.table({"item_id": ["ab", "c"]})
    b = pa.table({"item_id": ["a", "bc"]})
    assert table_digest(a, ("item_id",)) != table_digest(b, ("item_id",))


def test_pack_roundtrip() -> None:
    batch = {
        "item_id": np.array(["a", "b"], dtype=object),
        "audio": np.array([b"\x00\x01", b""], dtype=object),
        "num_samples": np.array([1, 0], dtype=np.int64),
        "start": np.array([0.5, 1.5]),
    }
    got = unpack(pack(batch))
    assert list(got["item_id"]) == ["a", "b"] and list(got["audio"]) == [b"\x00\x01", b""]
    assert got["num_samples"].dtype == np.int64 and list(got["start"]) == [0.5, 1.5]


def test_plan_check(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    table = cut_units(_items(10), items_per_unit=4)
    plan = make_plan("tokenize", table, COLS, {"q": "mvq-1"}, {"manifest": "/a/m"})
    check_plan(out, plan, 0, LOCAL)
    # The same content read from elsewhere is the same run.
    moved = make_plan("tokenize", table, COLS, {"q": "mvq-1"}, {"manifest": "s3://copy/m"})
    check_plan(out, moved, 2, LOCAL)
    other = make_plan("tokenize", table, COLS, {"q": "mvq-2"})
    with pytest.raises(SpearError, match="q: 'mvq-1' there, 'mvq-2' now"):
        check_plan(out, other, 2, LOCAL)
    changed = cut_units(_items(11), items_per_unit=4)
    with pytest.raises(SpearError, match="manifest content"):
        check_plan(out, make_plan("tokenize", changed, COLS, {"q": "mvq-1"}), 2, LOCAL)
    # With nothing committed, a corrected plan replaces the old one.
    check_plan(out, other, 0, LOCAL)
    check_plan(out, other, 1, LOCAL)


def test_resource_rule_and_sizing() -> None:
    assert actor_resources("auto", 1.0, True, None, 0.5) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert actor_resources("auto", 1.0, False, None, 0.5) == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert actor_resources("cuda", 0.5, False, 2.0, 0.5) == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert actor_resources("cpu", 1.0, True, None, 1.0)["num_gpus"] == 0.0
    assert cpu_share(2, 2, 1.0) == 0.5 and cpu_share(64, 2, 1.0) == 1.0
    cluster = {"CPU": 2.0}
    check_fits([Demand("decode", 1, 1.0), Demand("wavlm", 2, 0.5)], cluster, autoscaling=False)
    with pytest.raises(SpearError, match="needs 3 CPUs"):
        check_fits([Demand("decode", 1, 1.0), Demand("wavlm", 2, 1.0)], cluster, autoscaling=False)
    with pytest.raises(SpearError, match="needs 1 GPUs"):
        check_fits([Demand("wavlm", 1, 1.0, 1.0)], cluster, autoscaling=False)
    check_fits([Demand("wavlm", 1, 1.0, 1.0)], cluster, autoscaling=True)
    # `spear submit embed` on a 2-CPU head: the driver holds 1 CPU; one commit task and one
    # actor sharing the other fit (the former decode task made it 1.375 CPUs, refused).
    share = cpu_share(1.0, 1, 0.25)
    free = {"CPU": 1.0}
    check_fits([Demand("write", 1, 0.25), Demand("wavlm", 1, share)], free, autoscaling=False)


def test_sorted_units_sort_and_refuse_repeated_ids() -> None:
    from spear.pipeline.job import sorted_units

    t = _items(5).take([4, 2, 0, 1, 3])
    units = sorted_units(t, items_per_unit=2, max_unit_seconds=None, what="m")
    assert units["item_id"].to_pylist() == sorted(t["item_id"].to_pylist())
    assert units["unit"].to_pylist() == [0, 0, 1, 1, 2]
    twice = pa.concat_tables([t, t.slice(0, 1)])
    with pytest.raises(SpearError, match="m repeats item ids"):
        sorted_units(twice, items_per_unit=2, max_unit_seconds=None, what="m")


# The stubs below travel to Ray workers by value: the tests folder is not importable there.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CODE_BYTES = 8000  # 500 frames x 16 codebooks: a 10 s item's WavLM codes


def items(n: int, offset: int = 0) -> pa.Table:
    ids = [f"{i + offset:012d}" for i in range(n)]
    return pa.table(
        {
            "item_id": ids,
            "source": ["s"] * n,
            "domain": ["speech"] * n,
            "url": [f"memory://x/{i}" for i in ids],
            "start": np.zeros(n),
            "duration": np.full(n, 10.0),
        }
    )


def stub_prepare(batch: dict[str, Any], cfg: Any, storage: Any) -> dict[str, Any]:
    n = len(batch["item_id"])
    out = dict(batch)
    out["num_samples"] = np.full(n, 160_000, dtype=np.int64)
    out["audio"] = np.array([b""] * n, dtype=object)
    out["error_type"] = np.array([""] * n, dtype=object)
    out["error"] = np.array([""] * n, dtype=object)
    out["decode_seconds"] = np.zeros(n)
    return out


class StubTeacher:
    """Codes of the right size for the frame formula, derived from the item id."""

    def __init__(self, num_codebooks: int):
        self.c = num_codebooks

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["item_id"])
        codes = np.empty(n, dtype=object)
        codes[:] = [bytes([int(i) % 256]) * (499 * self.c) for i in batch["item_id"]]
        return dict(batch) | {
            "wavlm_codes": codes,
            "wavlm_frames": np.full(n, 499, dtype=np.int32),
            "wavlm_seconds": np.zeros(n),
        }


def job(out: str, c: int = 16) -> UnitJob:
    info = TokenTeacherInfo(
        "wavlm", "wavlm-test", "wavlm", 21, 50.0, c, 256, "mvq-x", None, ("speech", "audio")
    )
    return UnitJob(
        kind="stub",
        out=out,
        unit_prefix="shard",
        columns=INPUT_COLUMNS,
        outputs=lambda n: [f"tokens/{n}.parquet"],
        actors=[
            ActorStage(
                name="t",
                cls=StubTeacher,
                kwargs={"num_codebooks": c},
                num_actors=2,
                device="cpu",
                num_cpus=0.25,
            )
        ],
        writer=TokenShardWriter((info,)),
        decode=DecodeConfig(),
        decode_fn=stub_prepare,
    )


class PeakRss:
    """Peak resident memory of this process above its level at start, sampled every 5 ms
    (tracemalloc is no option: Python 3.11's crashes under Ray Data's executor threads)."""

    def __init__(self) -> None:
        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(
    out: Path, shards: int, per_shard: int, offset: int = 0, unit_job: UnitJob | None = None
) -> tuple[list[dict], int]:
    table = cut_units(items(shards * per_shard, offset), items_per_unit=per_shard)
    plan = make_plan("stub", table, INPUT_COLUMNS, {})
    gc.collect()
    with PeakRss() as rss:
        result = run_units(unit_job or job(str(out)), plan, table, StorageConfig(), RayConfig())
    return result.entries, rss.peak - rss.base


@pytest.mark.integration
def test_every_unit_once_in_order_of_plan(ray_cluster: str, tmp_path: Path) -> None:
    entries, _ = run(tmp_path / "o", shards=7, per_shard=3)
    assert [e["unit"] for e in entries] == list(range(7))
    assert sum(e["rows"] for e in entries) == 21
    again, _ = run(tmp_path / "o", shards=7, per_shard=3)  # all committed: nothing reruns
    assert [e["attempt"] for e in again] == [e["attempt"] for e in entries]


@pytest.mark.integration
@pytest.mark.slow  # two more runs with fresh actors: ~30 s
def test_driver_memory_does_not_grow_with_items_per_shard(ray_cluster: str, tmp_path: Path) -> None:
    # Same number of shards, 32x the items (and codes) per shard: the driver handles entries,
    # never rows, so its memory stays about the same (a row path would add the rows' 49 MB).
    _, small = run(tmp_path / "a", shards=6, per_shard=8, unit_job=job(str(tmp_path / "a"), 64))
    _, large = run(
        tmp_path / "b",
        shards=6,
        per_shard=256,
        offset=10**6,
        unit_job=job(str(tmp_path / "b"), 64),
    )
    rows_bytes = 6 * 256 * 499 * 64
    assert large < small + rows_bytes / 4, (small, large)


@pytest.mark.integration
def test_more_actors_asked_than_fit_runs_with_those_that_do(
    ray_cluster: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 3 actors of 0.75 CPU asked on 2 CPUs beside a 0.25-CPU write task: 2 fit. The job runs
    # with 2, says so once, and finishes every unit.
    out = tmp_path / "o"
    unit_job = dataclasses.replace(
        job(str(out)),
        actors=[dataclasses.replace(job(str(out)).actors[0], num_actors=3, num_cpus=0.75)],
    )
    with caplog.at_level(logging.WARNING, logger="spear.pipeline.job"):
        entries, _ = run(out, shards=6, per_shard=2, offset=5000, unit_job=unit_job)
    assert [e["unit"] for e in entries] == list(range(6))
    said = [r.getMessage() for r in caplog.records if "room for" in r.getMessage()]
    assert len(said) == 1 and "2 of 3 t actors" in said[0], said


@pytest.mark.integration
def test_sizing_waits_for_resources_a_finished_job_still_holds(ray_cluster: str) -> None:
    # Ray releases a killed actor's resources asynchronously: a job started right after
    # another must not fail its sizing check on them (the demo runs jobs back to back).
    import threading
    import time

    import ray

    from spear.errors import SpearError
    from spear.pipeline.job import Demand, fit_now

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # type: ignore[attr-defined]
    ray.get(holder.ready.remote())
    threading.Timer(1.5, ray.kill, args=(holder,)).start()
    t0 = time.monotonic()
    free, _ = fit_now(lambda _: [Demand("t", 1, 2.0)], autoscaling=False)
    assert free["CPU"] >= 2.0 and time.monotonic() - t0 >= 1.0
    with pytest.raises(SpearError, match=r"needs 3 CPUs at once .* has 2 in all"):
        fit_now(lambda _: [Demand("t", 1, 3.0)], autoscaling=False)  # never fits: no wait


def test_pool_sizes_start_with_what_fits() -> None:
    from spear.pipeline.job import pool_sizes

    gpu = Demand("wavlm", 1, 1.0, 1.0)
    small = Demand("dasheng", 1, 1.0, 0.5)
    # 3 GPUs, 8 CPUs: one of each first (1.5 GPU), then in turn: wavlm 2 (2.5), dasheng 2 (3.0).
    assert pool_sizes([gpu, small], [4, 2], {"CPU": 8, "GPU": 3}) == [2, 2]
    assert pool_sizes([gpu, small], [1, 1], {"CPU": 8, "GPU": 3}) == [1, 1]
    # Nothing fits now (an autoscaling cluster): each pool still starts with its minimum of one.
    assert pool_sizes([gpu], [3], {"CPU": 0}) == [1]


class _Doubler:
    """A stage that records the chunks it sees and doubles ``x`` of the rows it runs on."""

    seen: ClassVar[list[int]] = []

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        _Doubler.seen.append(len(batch["item_id"]))
        rows = zip(batch["audio"], batch["error_type"], batch["domain"], strict=True)
        assert all(len(a) == (4 if d == "audio" and not e else 0) for a, e, d in rows)
        return dict(batch) | {"y": np.asarray(batch["x"]) * 2}


def _fake_decode(batch: dict[str, Any], cfg: Any, storage: Any) -> dict[str, Any]:
    n = len(batch["item_id"])
    bad = np.array(["io" if str(i).endswith("3") else "" for i in batch["item_id"]], dtype=object)
    audio = np.empty(n, dtype=object)
    audio[:] = [b"" if e else b"\x00" * 4 for e in bad]
    return dict(batch) | {
        "audio": audio,
        "num_samples": np.where(bad == "", 2, 0).astype(np.int64),
        "error_type": bad,
        "error": bad.copy(),
        "decode_seconds": np.full(n, 0.5),
    }


def test_unit_actor_decodes_its_domains_in_chunks_and_sends_no_audio() -> None:
    from spear.pipeline.job import unit_actor

    items = {
        "item_id": np.array([f"i{k}" for k in range(6)], dtype=object),
        "domain": np.array(["speech", "audio"] * 3, dtype=object),
        "duration": np.full(6, 10.0),
        "x": np.arange(6),
    }
    actor = unit_actor(_Doubler)(
        decode=_fake_decode,
        decodes=("audio",),
        chunk_seconds=25.0,
        decode_kwargs={"cfg": None, "storage": None},
    )
    _Doubler.seen.clear()
    out = unpack(actor.run(pack(items)))
    assert _Doubler.seen == [2, 2, 2]  # 25 s chunks of 10 s items, the next decoded ahead
    assert "audio" not in out and list(out["y"]) == [0, 2, 4, 6, 8, 10]
    # Only audio rows were decoded (speech rows: no samples, no error); i3 failed to decode.
    assert list(out["num_samples"]) == [0, 2, 0, 0, 0, 2]
    assert list(out["error_type"]) == ["", "", "", "io", "", ""]
    assert list(out["decode_seconds"]) == [0.0, 0.5, 0.0, 0.5, 0.0, 0.5]
