"""The job skeleton (``pipeline/job.py``): its pure parts (content digests, packing), then unit
jobs on Ray Data on the session's Ray (integration): every unit once through a stub pipeline,
the driver's memory independent of how many items (and bytes) a unit holds, a job asking for
more actors than fit."""

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

from spear.errors import ConfigError
from spear.formats import table_digest
from spear.pipeline.job import ActorStage, UnitJob, pack, run_units, unpack
from spear.ray_utils import RayConfig
from spear.record import items_record
from spear.shards.schema import TokenTeacherInfo
from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig
from spear.units import cut_units

COLS = ("item_id", "url", "duration")


def _items(n: int, seconds: float = 10.0) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"id{i:05d}" for i in range(n)],
            "url": [f"s3://b/{i}.flac" for i in range(n)],
            "duration": np.full(n, seconds),
        }
    )


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
    out: Path,
    shards: int,
    per_shard: int,
    offset: int = 0,
    unit_job: UnitJob | None = None,
    ray_cfg: RayConfig | None = None,
) -> tuple[list[dict], int]:
    table = cut_units(items(shards * per_shard, offset), items_per_unit=per_shard)
    record = items_record("stub", table, INPUT_COLUMNS, {})
    gc.collect()
    with PeakRss() as rss:
        result = run_units(
            unit_job or job(str(out)), record, table, StorageConfig(), ray_cfg or RayConfig()
        )
    return result.entries, rss.peak - rss.base


@pytest.mark.integration
def test_every_unit_once_in_order_of_plan(ray_cluster: str, tmp_path: Path) -> None:
    entries, _ = run(tmp_path / "o", shards=7, per_shard=3, ray_cfg=RayConfig(units_per_call=1))
    assert [e["unit"] for e in entries] == list(range(7))
    assert sum(e["rows"] for e in entries) == 21
    again, _ = run(tmp_path / "o", shards=7, per_shard=3)  # all committed: nothing reruns
    assert [e["attempt"] for e in again] == [e["attempt"] for e in entries]
    # Three units per call (the last call takes one): each unit still commits on its own,
    # with the same files as one unit per call.
    grouped, _ = run(tmp_path / "g", shards=7, per_shard=3, ray_cfg=RayConfig(units_per_call=3))
    assert [e["unit"] for e in grouped] == list(range(7))
    assert [e["files"] for e in grouped] == [e["files"] for e in entries]


def test_units_per_call_leaves_each_actor_four_calls() -> None:
    from spear.pipeline.job import unit_rows
    from spear.units import UNITS_PER_CALL, units_per_call

    most = UNITS_PER_CALL  # tokenize's cap
    assert units_per_call(7, 2, most=most) == 1  # a small job: one unit per call
    assert units_per_call(48, 2, most=most) == 6
    assert units_per_call(20_000, 448, most=most) == most  # 512 GPUs, 197k h in 10 h shards
    assert units_per_call(20_000, 448, asked=1, most=most) == 1
    assert units_per_call(20_000, 448) == 1  # embed and features: one unit per call
    table = cut_units(items(7), items_per_unit=1)
    blocks = list(unit_rows(table, INPUT_COLUMNS, [0, 2, 3, 4, 6], per_call=2))
    assert [b["unit"].to_pylist() for b in blocks] == [[0, 2], [3, 4], [6]]
    assert [unpack(d)["item_id"][0] for d in blocks[2]["data"].to_pylist()] == ["000000000006"]
    with pytest.raises(ConfigError, match="units_per_call must be >= 1"):
        RayConfig(units_per_call=0)


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
    # Two units in one call: the same outputs per unit, and the chunks run as one sequence.
    _Doubler.seen.clear()
    first, second = (unpack(d) for d in actor.run_many([pack(items), pack(items)]))
    assert _Doubler.seen == [2, 2, 2, 2, 2, 2]
    for got in (first, second):
        assert list(got["y"]) == list(out["y"]) and list(got["error_type"]) == list(
            out["error_type"]
        )
