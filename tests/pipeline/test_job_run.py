"""Unit jobs on Ray Data (``pipeline/job.py``) on the session's Ray: every unit once through a
stub pipeline, the driver's memory independent of how many items (and bytes) a unit holds, a
job asking for more actors than fit, and the sizing check."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from ray import cloudpickle

from spear.pipeline.job import ActorStage, UnitJob, cut_units, make_plan, run_units
from spear.ray_utils import RayConfig
from spear.shards.schema import TokenTeacherInfo
from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig

pytestmark = pytest.mark.integration

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


def test_every_unit_once_in_order_of_plan(ray_cluster: str, tmp_path: Path) -> None:
    entries, _ = run(tmp_path / "o", shards=7, per_shard=3)
    assert [e["unit"] for e in entries] == list(range(7))
    assert sum(e["rows"] for e in entries) == 21
    again, _ = run(tmp_path / "o", shards=7, per_shard=3)  # all committed: nothing reruns
    assert [e["attempt"] for e in again] == [e["attempt"] for e in entries]


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
