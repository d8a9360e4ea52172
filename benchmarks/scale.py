"""How the token jobs' driver and actor pools scale: Ray Data (now) against the former scheduler.

    uv run python benchmarks/scale.py                       # all four parts
    uv run python benchmarks/scale.py --part driver --actors 16
    uv run python benchmarks/scale.py --part throughput --actors 1,4,16
    uv run python benchmarks/scale.py --part partial
    uv run python benchmarks/scale.py --part plan --plan-items 10000000

Every part but the plan runs on a simulated multi-node cluster (``ray.cluster_utils.Cluster``:
a 2-CPU head and four worker nodes offering a custom ``stub_gpu`` resource) with stub teachers
that sleep for the GPU time of each unit (its items' audio / ``--rate``) and return codes of
SPEC's size, through ``pipeline/job.py``'s real units, Datasink and commit protocol. The former
scheduler (``pipeline/scheduler.py``, Ray core tasks and actors chained by the driver) is
loaded from the last commit that has it into the benchmark's scratch folder, as the comparison.

1. **driver**: the driver process's CPU (all its threads: Ray Data's executor included) per
   committed shard, for each engine, as the difference between two run sizes (start-up left
   out); and the former scheduler's ``ray.wait`` over the pending work of a 64- and a 512-GPU
   cluster (one decode waiting per CPU: 1,700 and 13,000 refs), once per completed step. From
   these: the driver cores each engine needs at 64 and 512 GPUs (~8,000x real time per H100,
   issue 23) with 2 h shards (the former default) and 10 h shards (the default now).
2. **throughput**: job rate against the ideal N x rate for N stub actors. "steady" is the rate
   over the second half of the units (after actor start-up), fitted to their arrival times.
3. **partial**: a job asking for 3 actors on a cluster with room for 2: Ray Data runs with 2
   (2/3 of the asked rate); the former scheduler hands units to the actor that never starts and
   stalls (its stall limit set to ``--stall`` seconds here; 1,800 by default).
4. **plan**: a manifest of ``--plan-items`` rows (no audio) as Parquet parts; a fresh
   interpreter reads it, checks ids, sorts, cuts shards and digests the content (what
   ``spear tokenize`` does before any cluster work), then packs the unit rows the dataset is
   built from; wall seconds and the process's peak RSS.

Keep runs small on a shared host: each stub actor is a process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
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


def _cpu() -> float:
    """CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class StubTeacher:
    """Sleeps for the GPU time of a unit's audio at ``rate`` x real time, then gives codes."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(np.sum(batch["duration"])) / self.rate)
        return fake_codes(batch)


def stub_decode(batch: dict[str, Any], cfg: Any, storage: Any) -> dict[str, Any]:
    n = len(batch["item_id"])
    out = dict(batch)
    out["audio"] = np.array([b""] * n, dtype=object)
    out["num_samples"] = np.full(n, int(ITEM_SECONDS * 16_000), dtype=np.int64)
    out["error_type"] = np.array([""] * n, dtype=object)
    out["error"] = np.array([""] * n, dtype=object)
    return out


def old_scheduler(scratch: str) -> Any:
    """``pipeline/scheduler.py`` as of the last commit that has it, imported from ``scratch``."""
    root = Path(__file__).resolve().parent.parent
    rev = subprocess.run(
        ["git", "rev-list", "-n1", "HEAD", "--", "pipeline/scheduler.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    src = subprocess.run(
        ["git", "show", f"{rev}^:pipeline/scheduler.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(scratch) / "old_scheduler.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_scheduler", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_scheduler"] = mod
    spec.loader.exec_module(mod)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(mod)  # the workers cannot import the scratch file
    return mod


class Bench:
    """A simulated cluster and the two engines on it."""

    def __init__(self, gpus: int, scratch: str, rate: float, items: int):
        import ray
        from ray.cluster_utils import Cluster

        from spear.console import set_live

        set_live(False)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        per_node = -(-gpus // 4)
        left = gpus
        for _ in range(4):
            if left > 0:
                self.cluster.add_node(num_cpus=0, resources={"stub_gpu": min(per_node, left)})
                left -= per_node
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.scratch, self.rate, self.items = scratch, rate, items
        self.old = old_scheduler(scratch)
        self.runs = 0

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()

    def _table(self, units: int) -> pa.Table:
        from spear.units import cut_units

        self.runs += 1
        return cut_units(
            _items(units * self.items, offset=self.runs * 10**9), items_per_unit=self.items
        )

    def new(self, actors: int, units: int, stall: float = 600) -> dict[str, Any]:
        """The Ray Data path: ``run_units`` as the jobs call it."""
        from spear.pipeline.job import ActorStage, UnitJob, run_units
        from spear.ray_utils import RayConfig
        from spear.record import items_record
        from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
        from spear.stages.decode import DecodeConfig
        from spear.storage import StorageConfig

        table = self._table(units)
        out = f"{self.scratch}/new-{self.runs}"
        job = UnitJob(
            kind="bench",
            out=out,
            unit_prefix="shard",
            columns=INPUT_COLUMNS,
            outputs=lambda u: [f"tokens/{u}.parquet"],
            actors=[
                ActorStage(
                    name="stub",
                    cls=StubTeacher,
                    kwargs={"rate": self.rate},
                    num_actors=actors,
                    device="cpu",
                    num_cpus=0,
                    resources={"stub_gpu": 1},
                )
            ],
            writer=TokenShardWriter(_teacher_infos()),
            decode=DecodeConfig(),
            decode_fn=stub_decode,
        )
        record = items_record("bench", table, INPUT_COLUMNS, {})
        cpu0, t0 = _cpu(), time.perf_counter()
        run = run_units(job, record, table, StorageConfig(), RayConfig(stall_seconds=stall))
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        marks = run.progress.timeline if run.progress else []
        return {"wall": wall, "cpu": cpu, "units": units, "marks": marks}

    def former(self, actors: int, units: int, stall: float = 600) -> dict[str, Any]:
        """The former scheduler on the same units, actors and writer."""
        from spear.pipeline.job import unit_actor, unit_inputs
        from spear.pipeline.progress import Progress
        from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
        from spear.storage import StorageConfig

        table = self._table(units)
        todo = list(range(units))

        def prepare(items: dict[str, Any], cfg: Any, storage: Any) -> dict[str, Any]:
            return stub_decode(items, cfg, storage)

        progress = Progress("former", units * self.items, 1.0, units, 1e9)
        cpu0, t0 = _cpu(), time.perf_counter()
        error = ""
        try:
            self.old.run_scheduled(
                todo,
                unit_inputs(table, INPUT_COLUMNS, todo),
                prepare=prepare,
                prepare_kwargs={"cfg": None, "storage": None},
                prepare_options={"num_cpus": 0.25},
                pools=[
                    (
                        "stub",
                        unit_actor(StubTeacher),
                        {"kwargs": {"rate": self.rate}},
                        actors,
                        {"num_cpus": 0, "resources": {"stub_gpu": 1}},
                    )
                ],
                writer=TokenShardWriter(_teacher_infos()),
                write_options={"num_cpus": 0.25, "max_retries": 3},
                out=f"{self.scratch}/old-{self.runs}",
                storage=StorageConfig(),
                progress=progress,
                stall_seconds=stall,
                prepare_slots=2 * actors + 2,
            )
        except Exception as err:  # the stall, in the partial-capacity case
            error = str(err).split(";")[0]
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        return {"wall": wall, "cpu": cpu, "units": units, "done": progress.units, "error": error}


def wait_cost(pending: int, calls: int = 20) -> float:
    """Seconds of one ``ray.wait(num_returns=1)`` over ``pending`` refs that are not ready (the
    former scheduler's call per completed step)."""
    import ray

    @ray.remote(num_cpus=0, resources={"never": 1})
    def never() -> None:  # infeasible: stays pending
        return None

    refs = [never.remote() for _ in range(pending)]
    t0 = time.perf_counter()
    for _ in range(calls):
        ray.wait(refs, num_returns=1, timeout=0, fetch_local=False)
    cost = (time.perf_counter() - t0) / calls
    for r in refs:
        ray.cancel(r)
    return cost


def _steady(marks: list[dict[str, Any]]) -> float:
    """Audio seconds per second over the second half of the run, fitted to the marks."""
    pts = [(float(m["t"]), float(m["hours_done"]) * 3600) for m in marks if m["shards_done"]]
    half = pts[len(pts) // 2 :]
    if len(half) < 2:
        return float("nan")
    t = np.array([p[0] for p in half])
    return float(np.polyfit(t - t[0], [p[1] for p in half], 1)[0])


GPU_RATE = 8000.0
"""x real time of one H100 through WavLM and Dasheng (issue 23: 71-89 shards/s of 2 h at 64)."""


def driver(bench: Bench, actors: int, small: int, large: int) -> list[dict[str, Any]]:
    rows = []
    per = {}
    for name, fn in (("Ray Data (now)", bench.new), ("former scheduler", bench.former)):
        a, b = fn(actors, small), fn(actors, large)
        per[name] = (b["cpu"] - a["cpu"]) / (large - small)
        rows.append({"engine": name, "cpu_per_shard": per[name], "wall": b["wall"], "units": large})
    waits = {g: wait_cost(p) for g, p in ((64, 1_700), (512, 13_000))}
    for r in rows:
        for g in (64, 512):
            for hours in (2.0, 10.0):
                rate = g * GPU_RATE / (hours * 3600)  # shards/s the cluster finishes
                cost = r["cpu_per_shard"]
                if r["engine"].startswith("former"):
                    cost += 3 * waits[g]  # ray.wait per step: prepare, teacher, write
                r[f"cores_{g}_{hours:g}"] = rate * cost
    return [*rows, {"waits": waits}]


def throughput(bench: Bench, actors: list[int], waves: int) -> list[dict[str, Any]]:
    rows = []
    for n in actors:
        r = bench.new(n, n * waves)
        audio = r["units"] * bench.items * ITEM_SECONDS
        rows.append(
            {
                "actors": n,
                "wall": r["wall"],
                "x_rt": audio / r["wall"],
                "steady": _steady(r["marks"]),
                "ideal": n * bench.rate,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 4. A 10^7-item plan


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
from spear.pipeline.job import unit_rows
from spear.formats.manifest import read_manifest
from spear.record import check_record, items_record
from spear.shards.writer import INPUT_COLUMNS as RUN_COLUMNS
from spear.storage import StorageConfig
from spear.units import sorted_units
manifest, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
table = read_manifest(manifest, StorageConfig(), columns=list(RUN_COLUMNS))
table = sorted_units(table, items_per_unit=10000, max_unit_seconds=36000, what="the manifest")
plan = items_record("tokenize", table, RUN_COLUMNS, {}, {"manifest": manifest})
check_record(out, plan, StorageConfig(), made=False)
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


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def _report_driver(bench: Bench, args: argparse.Namespace) -> None:
    small, large = (int(x) for x in args.sizes.split(","))
    rows = driver(bench, args.driver_actors, small, large)
    waits = rows.pop()["waits"]
    _table(
        f"driver: {args.driver_actors} stub actors, shards of {args.unit_items} x "
        f"{ITEM_SECONDS:g} s, runs of {small} and {large} shards",
        [
            "engine",
            "driver CPU ms per shard",
            "wall s (larger run)",
            "driver cores, 64 GPUs, 2 h / 10 h shards",
            "driver cores, 512 GPUs, 2 h / 10 h shards",
        ],
        [
            [
                r["engine"],
                f"{r['cpu_per_shard'] * 1e3:.1f}",
                f"{r['wall']:.1f}",
                f"{r['cores_64_2']:.2f} / {r['cores_64_10']:.2f}",
                f"{r['cores_512_2']:.2f} / {r['cores_512_10']:.2f}",
            ]
            for r in rows
        ],
    )
    print(
        f"\nformer scheduler's ray.wait per completed step: {waits[64] * 1e3:.2f} ms at 1,700 "
        f"pending refs (64 GPUs), {waits[512] * 1e3:.2f} ms at 13,000 (512 GPUs); counted "
        "3 times per shard in its cores"
    )


def _report_throughput(bench: Bench, args: argparse.Namespace) -> None:
    rows = throughput(bench, [int(a) for a in args.actors.split(",")], args.waves)
    _table(
        f"throughput: stub teacher at {args.rate:g}x real time per actor, units of "
        f"{args.unit_items} x {ITEM_SECONDS:g} s, {args.waves} units per actor",
        ["actors", "wall s", "job x real time", "steady x real time", "ideal", "steady / ideal"],
        [
            [
                str(r["actors"]),
                f"{r['wall']:.1f}",
                f"{r['x_rt']:,.0f}",
                f"{r['steady']:,.0f}",
                f"{r['ideal']:,.0f}",
                f"{100 * r['steady'] / r['ideal']:.0f} %",
            ]
            for r in rows
        ],
    )


def _report_partial(bench: Bench, args: argparse.Namespace) -> None:
    units = 12
    new = bench.new(3, units)
    old = bench.former(3, units, stall=args.stall)
    steady = _steady(new["marks"])
    _table(
        f"partial: 3 stub actors asked, room for 2 (2 stub_gpu), {units} units of "
        f"{args.unit_items} x {ITEM_SECONDS:g} s",
        ["engine", "finished", "wall s", "steady x real time", "/ 3-actor ideal"],
        [
            [
                "Ray Data (now)",
                f"{units}/{units}",
                f"{new['wall']:.1f}",
                f"{steady:,.0f}",
                f"{steady / (3 * args.rate):.2f}",
            ],
            [
                "former scheduler",
                f"{old['done']}/{units}",
                f"{old['wall']:.1f}",
                "-",
                old["error"] or "finished",
            ],
        ],
    )


def _report_plan(args: argparse.Namespace, tmp: str) -> None:
    p = plan(args.plan_items, tmp)
    _table(
        f"plan: {p['items']:,} items -> {p['units']:,} shards (manifest written in "
        f"{p['make_s']:.0f} s)",
        ["step", "seconds", "peak RSS GB"],
        [
            [
                "read, check ids, sort, cut, digest, write plan",
                f"{p['plan_s']:.1f}",
                f"{p['rss_plan'] / 2**30:.2f}",
            ],
            [
                f"+ pack the unit rows ({p['packed_mb']:,.0f} MB)",
                f"{p['pack_s']:.1f}",
                f"{p['rss_all'] / 2**30:.2f}",
            ],
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = ["driver", "throughput", "partial", "plan"]
    ap.add_argument("--part", choices=["all", *parts], default="all")
    ap.add_argument("--actors", default="1,4,16", help="throughput: actor counts")
    ap.add_argument("--driver-actors", type=int, default=16, help="driver: stub actors")
    ap.add_argument("--sizes", default="32,160", help="driver: shards of the two runs")
    ap.add_argument("--rate", type=float, default=250.0, help="stub teacher x real time")
    ap.add_argument("--unit-items", type=int, default=100, help="items of 10 s per unit")
    ap.add_argument("--waves", type=int, default=6, help="throughput: units per actor")
    ap.add_argument("--stall", type=float, default=60.0, help="partial: the former's limit")
    ap.add_argument("--plan-items", type=int, default=10_000_000)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts if args.part == "all" else [args.part]:
            if part == "plan":
                _report_plan(args, tmp)
                continue
            most = max(int(a) for a in args.actors.split(","))
            gpus = {"driver": args.driver_actors, "partial": 2}.get(part, most)
            bench = Bench(gpus, tmp, args.rate, args.unit_items)
            try:
                {"driver": _report_driver, "throughput": _report_throughput}.get(
                    part, _report_partial
                )(bench, args)
            finally:
                bench.close()


if __name__ == "__main__":
    main()
