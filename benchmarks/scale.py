"""How the unit-job skeleton scales: the sink, orchestration over many actors, a 10^7-item plan.

    uv run python benchmarks/scale.py                       # all three parts
    uv run python benchmarks/scale.py --part sink --shards 200 --items 50
    uv run python benchmarks/scale.py --part orchestration --actors 1,2,4,8,16
    uv run python benchmarks/scale.py --part plan --plan-items 10000000

1. **sink**: token rows of 10 s items (WavLM 500 x 16 + Dasheng 250 x 8 bytes of codes each,
   random, as trained quantisers give) generated in Ray workers, then committed as token
   shards four ways, side by side on one local Ray: the *driver path* spear used before (every
   row travels to the driver, which gathers rows by shard and writes each shard; reproduced
   here from its code); a Ray Data *write stage* (one row per shard, a task builds and commits
   each shard, one entry per shard to the driver); a Ray Data *datasink* doing the same commit
   in its write tasks (nothing reaches the driver before the end); and *spear's scheduler*
   (``pipeline/scheduler.py``: the same tasks chained by object reference on Ray core, no Ray
   Data executor). Each path runs at two sizes; the driver's CPU per shard is the difference
   (what one more shard costs it). Reported: rows/s and x real time at the larger size, driver
   CPU seconds per 1,000 shards, the driver's RSS growth, and the driver capacity: the audio
   of one shard (this run's, and spear's default of 1,000 items) over the driver CPU it costs.
2. **orchestration**: a simulated multi-node cluster (``ray.cluster_utils.Cluster``: a head
   and worker nodes with a custom ``stub_gpu`` resource) runs ``run_units`` with a stub teacher
   that sleeps for the GPU time of each unit (its items' audio / ``--rate``) and returns codes;
   job throughput for 1..16 actors against the ideal N x rate. "steady" is the rate over the
   second half of the units (after actor start-up), fitted to the units' arrival times. The
   per-actor rate is set so that 16 actors' total stays inside what this 2-core host can
   decode-stub and write besides its five raylets: the part measures whether the scheduler
   keeps N actors busy, not the host's CPUs (the sink part measures those).
3. **plan**: a manifest of ``--plan-items`` rows (no audio) as Parquet parts; a fresh
   interpreter reads it, checks ids, sorts, cuts shards and digests the content (what
   ``spear tokenize`` does before any cluster work), then packs the unit rows the dataset is
   built from; wall seconds and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ITEM_SECONDS = 10.0
WAVLM_BYTES, DASHENG_BYTES = 500 * 16, 250 * 8


# ---------------------------------------------------------------------------------------------
# Shared stubs


def _items(n: int, offset: int = 0) -> pa.Table:
    ids = [f"{i + offset:016x}-0000" for i in range(n)]
    return pa.table(
        {
            "item_id": ids,
            "source": ["bench"] * n,
            "domain": ["audio"] * n,
            "url": [f"s3://bench/audio/{i}.flac" for i in ids],
            "start": np.zeros(n),
            "duration": np.full(n, ITEM_SECONDS),
        }
    )


def fake_codes(batch: dict[str, Any]) -> dict[str, Any]:
    """What the teacher actors hand on: codes of both teachers per row (random bytes)."""
    n = len(batch["item_id"])
    rng = np.random.default_rng(int(abs(hash(str(batch["item_id"][0]))) % 2**32))
    out = dict(batch)
    out["num_samples"] = np.full(n, int(ITEM_SECONDS * 16_000), dtype=np.int64)
    out["error_type"] = np.array([""] * n, dtype=object)
    out["error"] = np.array([""] * n, dtype=object)
    out["decode_seconds"] = np.zeros(n)
    for p, size, frames in (("wavlm", WAVLM_BYTES, 500), ("dasheng", DASHENG_BYTES, 250)):
        codes = np.empty(n, dtype=object)
        codes[:] = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(n)]
        out[f"{p}_codes"] = codes
        out[f"{p}_frames"] = np.full(n, frames, dtype=np.int32)
        out[f"{p}_seconds"] = np.zeros(n)
    return out


def _teacher_infos() -> tuple[Any, ...]:
    from spear.shards.schema import TokenTeacherInfo

    return tuple(
        TokenTeacherInfo(
            prefix=p,
            teacher=p,
            family=p,
            layer=1,
            frame_rate=r,
            num_codebooks=c,
            codebook_size=256,
            quantizer_id=f"mvq-bench-{p}",
            checkpoint_sha256=None,
            domains=("audio",),
        )
        for p, r, c in (("wavlm", 50.0, 16), ("dasheng", 25.0, 8))
    )


class _Rss:
    """Peak resident memory of this process above its level at start (sampled)."""

    def __init__(self) -> None:
        self.base = self.now()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> _Rss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------
# 1. The sink


def _old_write_shard(out: str, shard: int, rows: list[dict[str, Any]], infos: Any) -> None:
    """The shard write of spear's previous driver path (pipeline/tokenize.py:_write_shard)."""
    import hashlib

    from spear.formats import parquet_bytes, quarantine_table
    from spear.shards.schema import token_shard_metadata
    from spear.storage import StorageConfig, join, write_atomic

    storage = StorageConfig()
    good = sorted(rows, key=lambda r: str(r["item_id"]))
    schema, _ = token_shard_metadata(list(infos), shard=shard)
    cols: dict[str, Any] = {
        k: [r[k] for r in good]
        for k in ("item_id", "source", "domain", "url", "start", "duration", "num_samples")
    }
    cols = {k: [x.item() if hasattr(x, "item") else str(x) for x in v] for k, v in cols.items()}
    for t in infos:
        cols[f"{t.prefix}_frames"] = [int(r[f"{t.prefix}_frames"]) for r in good]
        cols[f"{t.prefix}_codes"] = [bytes(r[f"{t.prefix}_codes"]) for r in good]
    data = parquet_bytes(pa.table(cols, schema=schema))
    name = f"shard-{shard:05d}.parquet"
    entry = {
        "shard": shard,
        "rows": len(good),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_atomic(join(out, "quarantine", name), parquet_bytes(quarantine_table([])), storage)
    write_atomic(
        join(out, "_work/shards", f"shard-{shard:05d}.json"), json.dumps(entry).encode(), storage
    )
    write_atomic(join(out, "tokens", name), data, storage)


def _old_gather(batches: Any, expected: dict[int, int], write: Any) -> None:
    """spear's previous pipeline/parts.py:gather_parts (rows keyed by item id per shard)."""
    rows: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    written: set[int] = set()
    for batch in batches:
        for i in range(len(batch["item_id"])):
            part = int(batch["shard"][i])
            if part in written:
                continue
            rows[part][str(batch["item_id"][i])] = {k: batch[k][i] for k in batch}
            if len(rows[part]) == expected[part]:
                write(part, list(rows.pop(part).values()))
                written.add(part)


def _fake_prepare(batch: dict[str, Any], cfg: Any, storage: Any) -> dict[str, Any]:
    return fake_codes(batch)


def _rd_units(table: pa.Table, units: list[int]) -> Any:
    """Ray Data rows, one per unit, each unit's items generated into codes by a task."""
    import ray

    from spear.pipeline.job import unit_rows
    from spear.pipeline.scheduler import prepare_unit
    from spear.shards.writer import INPUT_COLUMNS

    def gen(batch: dict[str, Any]) -> dict[str, Any]:
        out = np.empty(len(batch["unit"]), dtype=object)
        out[:] = [prepare_unit(bytes(d), fake_codes, {}) for d in batch["data"]]
        return {"unit": batch["unit"], "data": out}

    ds = ray.data.from_arrow(list(unit_rows(table, INPUT_COLUMNS, units)))
    return ds.map_batches(gen, batch_size=1, batch_format="numpy", num_cpus=1)


def _rd_write(batch: dict[str, Any], writer: Any, out: str) -> dict[str, Any]:
    from spear.pipeline.scheduler import write_unit
    from spear.storage import StorageConfig

    entries = np.empty(len(batch["unit"]), dtype=object)
    entries[:] = [
        json.dumps(write_unit(int(u), bytes(d), writer, out, StorageConfig()))
        for u, d in zip(batch["unit"], batch["data"], strict=True)
    ]
    return {"entry": entries}


def sink(shards: int, items: int, tmp: str) -> list[dict[str, Any]]:
    import ray

    from spear.pipeline.job import cut_units, unit_inputs
    from spear.pipeline.progress import Progress, set_live
    from spear.pipeline.scheduler import run_scheduled
    from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
    from spear.storage import StorageConfig

    set_live(False)
    infos = _teacher_infos()
    writer = TokenShardWriter(infos)
    results = []

    def old(table: pa.Table, n_shards: int, out: str) -> None:
        n = table.num_rows
        blocks = [table.slice(i, 64) for i in range(0, n, 64)]
        ds = ray.data.from_arrow(blocks).rename_columns({"unit": "shard"})
        ds = ds.map_batches(fake_codes, batch_format="numpy", batch_size=64, num_cpus=1)
        expected = {s: items for s in range(n_shards)}
        _old_gather(
            ds.iter_batches(batch_format="numpy", batch_size=None),
            expected,
            lambda s, rows: _old_write_shard(out, s, rows, infos),
        )

    def stage(table: pa.Table, n_shards: int, out: str) -> None:
        ds = _rd_units(table, list(range(n_shards))).map_batches(
            _rd_write,
            fn_kwargs={"writer": writer, "out": out},
            batch_size=1,
            batch_format="numpy",
            num_cpus=0.25,
        )
        for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass

    def datasink(table: pa.Table, n_shards: int, out: str) -> None:
        _rd_units(table, list(range(n_shards))).write_datasink(_CommitSink(out, writer))

    def scheduled(table: pa.Table, n_shards: int, out: str) -> None:
        units = list(range(n_shards))
        run_scheduled(
            units,
            unit_inputs(table, INPUT_COLUMNS, units),
            prepare=_fake_prepare,
            prepare_kwargs={"cfg": None, "storage": None},
            prepare_options={"num_cpus": 1},
            pools=[],
            writer=writer,
            write_options={"num_cpus": 0.25},
            out=out,
            storage=StorageConfig(),
            progress=Progress("sink", 1, 1.0, n_shards, 1e9),
            stall_seconds=600,
            prepare_slots=4,
        )

    # Warm the workers once; then each path at two sizes, so the driver's CPU per shard is the
    # difference between them (what one more shard costs, start-up costs left out).
    ray.data.range(8).map_batches(lambda b: b, num_cpus=1).take_all()
    small = max(2, shards // 4)
    paths = (
        ("driver path (before)", old),
        ("Ray Data write stage", stage),
        ("Ray Data datasink", datasink),
        ("spear scheduler (now)", scheduled),
    )
    for name, fn in paths:
        runs = {}
        for k in (small, shards):
            table = cut_units(_items(k * items, offset=k * 10**6), items_per_unit=items)
            cpu0, t0 = _cpu(), time.perf_counter()
            with _Rss() as rss:
                fn(table, k, f"{tmp}/{name[:6]}-{k}")
            runs[k] = (time.perf_counter() - t0, _cpu() - cpu0, (rss.peak - rss.base) / 2**20)
        wall, cpu, rss_mb = runs[shards]
        marginal = (cpu - runs[small][1]) / (shards - small)
        n = shards * items
        results.append(
            {
                "path": name,
                "rows_s": n / wall,
                "x_rt": n * ITEM_SECONDS / wall,
                "cpu_per_1000": marginal * 1000,
                "rss_mb": rss_mb,
                "rss_small": runs[small][2],
                "capacity": items * ITEM_SECONDS / marginal if marginal > 0 else float("inf"),
                "capacity_1000": 1000 * ITEM_SECONDS / marginal if marginal > 0 else float("inf"),
            }
        )
    return results


class _CommitSink:  # a ray.data.Datasink: built lazily so importing this file needs no Ray
    def __new__(cls, out: str, writer: Any) -> Any:
        from ray.data.datasource import Datasink

        class CommitSink(Datasink):
            def write(self, blocks: Any, ctx: Any) -> int:
                done = 0
                for block in blocks:
                    batch = {k: block[k].to_numpy(zero_copy_only=False) for k in ("unit", "data")}
                    done += len(_rd_write(batch, writer, out)["entry"])
                return done

        return CommitSink()


# ---------------------------------------------------------------------------------------------
# 2. Orchestration over many (stub) actors


class StubTeacher:
    """Sleeps for the GPU time of a unit's audio at ``rate`` x real time, then gives codes."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(np.sum(batch["duration"])) / self.rate)
        return fake_codes(batch)


def stub_prepare(batch: dict[str, Any], cfg: Any, storage: Any) -> dict[str, Any]:
    return dict(batch)


def orchestration(actors: list[int], rate: float, items: int, waves: int) -> list[dict]:
    import ray
    from ray.cluster_utils import Cluster

    from spear.pipeline.job import ActorStage, UnitJob, cut_units, make_plan, run_units
    from spear.pipeline.progress import Progress, set_live
    from spear.ray_utils import RayConfig
    from spear.shards.writer import INPUT_COLUMNS as RUN_COLUMNS
    from spear.shards.writer import TokenShardWriter
    from spear.stages.decode import DecodeConfig
    from spear.storage import StorageConfig

    set_live(False)
    # Every committed unit's arrival at the driver (time, audio seconds), for the steady rate.
    arrivals: list[tuple[float, float]] = []
    add = Progress.add

    def record(self: Progress, entry: dict[str, Any]) -> None:
        arrivals.append((time.perf_counter(), float(entry["audio_seconds"])))
        add(self, entry)

    Progress.add = record  # type: ignore[method-assign]
    nodes, per_node = 4, max(1, max(actors) // 4)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(nodes):
        cluster.add_node(num_cpus=0, resources={"stub_gpu": per_node})
    ray.init(address=cluster.address)
    rows = []
    try:
        for n in actors:
            units = n * waves
            table = cut_units(_items(units * items, offset=n * 10**9), items_per_unit=items)
            with tempfile.TemporaryDirectory() as tmp:
                job = UnitJob(
                    kind=f"stub x{n}",
                    out=f"{tmp}/o",
                    unit_prefix="shard",
                    columns=RUN_COLUMNS,
                    outputs=lambda u: [f"tokens/{u}.parquet"],
                    actors=[
                        ActorStage(
                            name="stub",
                            cls=StubTeacher,
                            kwargs={"rate": rate},
                            num_actors=n,
                            device="cpu",
                            num_cpus=0,
                            resources={"stub_gpu": 1},
                        )
                    ],
                    writer=TokenShardWriter(_teacher_infos()),
                    decode=DecodeConfig(),
                    decode_cpus=0.25,
                    prepare=stub_prepare,
                )
                plan = make_plan("bench", table, RUN_COLUMNS, {})
                arrivals.clear()
                t0 = time.perf_counter()
                run_units(job, plan, table, StorageConfig(), RayConfig())
                wall = time.perf_counter() - t0
            steady = _steady_rate(arrivals[-units:])
            rows.append(
                {
                    "actors": n,
                    "units": units,
                    "wall": wall,
                    "x_rt": units * items * ITEM_SECONDS / wall,
                    "steady": steady,
                    "ideal": n * rate,
                }
            )
    finally:
        Progress.add = add  # type: ignore[method-assign]
        ray.shutdown()
        cluster.shutdown()
    return rows


def _steady_rate(arrivals: list[tuple[float, float]]) -> float:
    """Audio seconds per second over the second half of a run's units (every actor has started
    by then; on a 2-core host 16 actor processes take a minute between them): the least-squares
    slope of audio done against time, which units that finish in bursts (all actors at once)
    do not bias the way a first-to-last difference does."""
    half = arrivals[len(arrivals) // 2 :]
    t = np.array([a[0] for a in half])
    done = np.cumsum([a[1] for a in half])
    return float(np.polyfit(t - t[0], done, 1)[0])


# ---------------------------------------------------------------------------------------------
# 3. A 10^7-item plan


def write_big_manifest(root: Path, n: int, parts: int = 20) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from spear.formats import MANIFEST_SCHEMA, MANIFEST_VERSION, with_metadata

    schema = with_metadata(MANIFEST_SCHEMA, "manifest", MANIFEST_VERSION)
    (root / "manifest").mkdir(parents=True)
    rng = np.random.default_rng(0)
    step = -(-n // parts)
    for p in range(parts):
        k = min(step, n - p * step)
        ids = pc.utf8_lpad(pa.array(rng.integers(0, 2**62, k).astype(str)), 19, "0")
        seg = pa.array(np.zeros(k, dtype=np.int32))
        t = pa.table(
            {
                "item_id": pc.binary_join_element_wise(ids, pa.array(["0000"] * k), "-"),
                "source": pa.array(["libriheavy"] * k),
                "domain": pa.array(["speech"] * k),
                "url": pc.binary_join_element_wise(
                    pa.array(["s3://corpus/libriheavy/"] * k), ids, pa.array([".flac"] * k), ""
                ),
                "segment": seg,
                "start": pa.array(np.zeros(k)),
                "duration": pa.array(rng.uniform(2, 30, k)),
                "file_duration": pa.array(np.full(k, 30.0)),
                "sample_rate": pa.array(np.full(k, 16000, dtype=np.int32)),
                "channels": pa.array(np.ones(k, dtype=np.int16)),
                "format": pa.array(["FLAC"] * k),
                "subtype": pa.array(["PCM_16"] * k),
                "file_size": pa.array(np.full(k, 500_000, dtype=np.int64)),
            },
            schema=schema,
        )
        pq.write_table(t, root / "manifest" / f"part-{p:05d}.parquet")
    (root / "_SUCCESS.json").write_text(json.dumps({"items": n}))


_PLAN_CHILD = r"""
import json, resource, sys, time
import numpy as np, pyarrow as pa, pyarrow.compute as pc
from spear.pipeline.job import check_plan, make_plan, sorted_units, unit_rows
from spear.pipeline.manifest import read_manifest
from spear.shards.writer import INPUT_COLUMNS as RUN_COLUMNS
from spear.storage import StorageConfig
manifest, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
table = read_manifest(manifest, StorageConfig(), columns=list(RUN_COLUMNS))
table = sorted_units(table, items_per_unit=1000, max_unit_seconds=7200, what="the manifest")
plan = make_plan("tokenize", table, RUN_COLUMNS, {}, {"manifest": manifest})
check_plan(out, plan, 0, StorageConfig())
t1 = time.perf_counter()
rss_plan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rows = unit_rows(table, RUN_COLUMNS, list(range(plan.units)))
packed = sum(r["data"][0].as_buffer().size for r in rows)
t2 = time.perf_counter()
print(json.dumps({"items": table.num_rows, "units": plan.units, "plan_s": t1 - t0,
                  "pack_s": t2 - t1, "packed_mb": packed / 2**20, "rss_plan": rss_plan,
                  "rss_all": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def plan(n: int, tmp: str) -> dict[str, Any]:
    root = Path(tmp) / "m"
    t0 = time.perf_counter()
    write_big_manifest(root, n)
    made = time.perf_counter() - t0
    child = subprocess.run(
        [sys.executable, "-c", _PLAN_CHILD, str(root), f"{tmp}/o"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(child.stdout) | {"make_s": made}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["all", "sink", "orchestration", "plan"], default="all")
    ap.add_argument("--shards", type=int, default=200, help="sink: shards")
    ap.add_argument("--items", type=int, default=50, help="sink: items per shard")
    ap.add_argument("--actors", default="1,2,4,8,16", help="orchestration: actor counts")
    ap.add_argument("--rate", type=float, default=250.0, help="stub teacher x real time")
    ap.add_argument("--unit-items", type=int, default=200, help="orchestration: items per unit")
    ap.add_argument("--waves", type=int, default=8, help="orchestration: units per actor")
    ap.add_argument("--plan-items", type=int, default=10_000_000)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "sink"):
            import ray

            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
            try:
                res = sink(args.shards, args.items, tmp)
            finally:
                ray.shutdown()
            print(
                f"\n## sink: {args.shards} shards x {args.items} items of {ITEM_SECONDS:g} s "
                f"({WAVLM_BYTES + DASHENG_BYTES} B of codes per item), local Ray, "
                f"{os.cpu_count()} CPUs\n"
            )
            print(
                "| path | rows/s | x real time | driver CPU s per 1,000 shards | driver RSS "
                f"growth MB ({args.shards // 4} / {args.shards} shards) | driver capacity, "
                f"{args.items}-item shards (x real time) | driver capacity, 1,000-item shards |"
            )
            print("|---|---|---|---|---|---|---|")
            for r in res:
                print(
                    f"| {r['path']} | {r['rows_s']:,.0f} | {r['x_rt']:,.0f} | "
                    f"{r['cpu_per_1000']:.1f} | {r['rss_small']:.0f} / {r['rss_mb']:.0f} | "
                    f"{r['capacity']:,.0f} | {r['capacity_1000']:,.0f} |"
                )
        if args.part in ("all", "orchestration"):
            rows = orchestration(
                [int(a) for a in args.actors.split(",")], args.rate, args.unit_items, args.waves
            )
            print(
                f"\n## orchestration: stub teacher at {args.rate:g}x real time per actor, "
                f"units of {args.unit_items} x {ITEM_SECONDS:g} s, {args.waves} units per "
                "actor, 4 simulated nodes\n"
            )
            print(
                "| actors | units | wall s | job x real time | steady x real time | ideal | "
                "steady / ideal |"
            )
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                print(
                    f"| {r['actors']} | {r['units']} | {r['wall']:.1f} | {r['x_rt']:,.0f} | "
                    f"{r['steady']:,.0f} | {r['ideal']:,.0f} | "
                    f"{100 * r['steady'] / r['ideal']:.0f} % |"
                )
        if args.part in ("all", "plan"):
            p = plan(args.plan_items, tmp)
            print(
                f"\n## plan: {p['items']:,} items -> {p['units']:,} shards (manifest written "
                f"in {p['make_s']:.0f} s)\n"
            )
            print("| step | seconds | peak RSS GB |")
            print("|---|---|---|")
            print(
                f"| read, check ids, sort, cut, digest, write plan | {p['plan_s']:.1f} | "
                f"{p['rss_plan'] / 2**30:.2f} |"
            )
            print(
                f"| + pack the unit rows ({p['packed_mb']:,.0f} MB) | {p['pack_s']:.1f} | "
                f"{p['rss_all'] / 2**30:.2f} |"
            )


if __name__ == "__main__":
    main()
