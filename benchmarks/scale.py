"""How the token jobs' driver and actor pools scale, and where decode runs: Ray Data (now)
against the former scheduler and against the other decode placements.

    uv run python benchmarks/scale.py                       # all five parts
    uv run python benchmarks/scale.py --part driver --gpus 64,512
    uv run python benchmarks/scale.py --part throughput --actors 1,4,16
    uv run python benchmarks/scale.py --part partial
    uv run python benchmarks/scale.py --part decode
    uv run python benchmarks/scale.py --part plan --plan-items 10000000

Every part but the plan runs on a simulated multi-node cluster (``ray.cluster_utils.Cluster``:
a 2-CPU head and four worker nodes offering a custom ``stub_gpu`` resource) with stub teachers
that sleep for the GPU time of each unit (its items' audio / the rate) and return codes of
SPEC's size, through ``pipeline/job.py``'s real units, Datasink and commit protocol. The former
scheduler (``pipeline/scheduler.py``, Ray core tasks and actors chained by the driver) is
loaded from the last commit that has it into the benchmark's scratch folder, as the comparison.

1. **driver**: per simulated cluster of ``--gpus`` H100s (64 and 512), the driver process's
   CPU (all its threads: Ray Data's executor included) per committed shard, in the steady
   state of one run (from a fifth to four fifths of its shards committed: no start-up, no
   tail). Runs: one pool of ``--driver-actors`` stub actors (the fused default) and tokenize's
   two pools (WavLM 7/8, Dasheng 1/8, rates that balance them), each at one unit per call
   (before) and at the units per call the job chooses for that cluster and the corpus
   (``spear.units.units_per_call``: 8), ``--steady-calls`` calls a run; each actor is
   handed gpus / actors times the job's two calls in flight, so 16 processes carry the call
   slots of such a cluster. Carrying: the driver's CPU per second with the corpus's 197k h as
   ``--backlog`` queued shards (20,000 of 10 h) and every call held (the calls hold until the
   stall limit, ``--window`` s, ends the run; sampled over its second half). The cores such a
   cluster's driver needs = carrying + per shard (net of carrying) x the shards/s it finishes
   (~8,000x real time per H100, issue 23) with 2 h shards (the former default) and 10 h (the
   default now). Like for like, once, in the steady state: the former scheduler and Ray Data
   at one and eight shards per call, one pool of 16 actors with two calls in flight each; the
   former's cost adds its ``ray.wait`` over the pending refs of a 64- and a 512-GPU cluster (one
   decode waiting per CPU: 1,700 and 13,000 refs), three per shard. At 32x calls in flight
   the benchmark starts every actor before the first call (``wait_for_min_actors_s``):
   otherwise the first actor up takes 64 calls, an imbalance a real cluster's two calls per
   actor cannot have.
2. **throughput**: job rate against the ideal N x rate for N stub actors. "steady" is the rate
   over the second half of the units (after actor start-up), fitted to their arrival times.
3. **partial**: a job asking for 3 actors on a cluster with room for 2: Ray Data runs with 2
   (2/3 of the asked rate); the former scheduler hands units to the actor that never starts and
   stalls (its stall limit set to ``--stall`` seconds here; 1,800 by default).
4. **decode**: the same real files (SPEC's mix: 16 kHz FLAC speech, 6 % of the hours 44.1 kHz
   FLAC audio items that both teachers run) through three placements, one after the other on
   one cluster of ``--decode-gpus`` stub GPUs: (a) one pool per teacher (10/1 of 11), each
   actor decoding its items on its thread, a chunk ahead; (b) a fused actor per GPU that
   decodes once and runs both stub teachers (the default); (c) a decode stage (one CPU actor)
   handing int16 audio through the object store to the teachers' pools (the way before).
   Measured per variant: wall, first shard, steady rate; audio decoded per audio second;
   decode CPU seconds (the decoding thread's CPU time) and all actors' CPU seconds per audio
   hour; bytes of the rows the stages hand on (what enters the object store: the units' item
   lists plus every stage's output, audio included in (c)) per audio second; peak RSS of the
   actors (and its growth over the actor's start).
5. **plan**: a manifest of ``--plan-items`` rows (no audio) as Parquet parts; a fresh
   interpreter reads it, checks ids, sorts, cuts shards and digests the content (what
   ``spear tokenize`` does before any cluster work), then packs the unit rows the dataset is
   built from; wall seconds and the process's peak RSS.

Keep runs small on a shared host: each stub actor is a process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


def _teacher_infos(domains: dict[str, tuple[str, ...]] | None = None) -> tuple[Any, ...]:
    from spear.shards.schema import TokenTeacherInfo

    domains = domains or {"wavlm": ("audio",), "dasheng": ("audio",)}

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
            domains=domains[p],
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


@contextlib.contextmanager
def in_flight(factor: int) -> Iterator[None]:
    """Ray Data's ``ActorPoolStrategy`` as ``pipeline/job.py`` builds it, each actor taking
    ``factor`` x its calls in flight: N actors then carry the pending calls of N x ``factor``
    actors (the executor tracks every call in flight; the actor queues them)."""
    import ray.data

    real = ray.data.ActorPoolStrategy
    if factor == 1:
        yield
        return
    # The first actor up would take every call (64 in flight each at 32x): start them all first,
    # as a real cluster's 2 calls per actor spread the work.
    ctx = ray.data.DataContext.get_current()
    wait = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = 600

    def scaled(**kw: Any) -> Any:
        kw["max_tasks_in_flight_per_actor"] = factor * (
            kw.get("max_tasks_in_flight_per_actor") or 2
        )
        return real(**kw)

    ray.data.ActorPoolStrategy = scaled  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        ray.data.ActorPoolStrategy = real  # type: ignore[misc]
        ctx.wait_for_min_actors_s = wait


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
    # The commit protocol has moved since (spear/commit.py, same function).
    src = src.replace("from spear.pipeline.commit import", "from spear.commit import")
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
        self.rate, self.items, self.gpus = rate, items, gpus
        self.scratch = tempfile.mkdtemp(dir=scratch)  # one folder per Bench: runs never meet
        self.old = old_scheduler(scratch)
        self.runs = 0

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()

    def _table(self, units: int, items: int | None = None) -> pa.Table:
        from spear.units import cut_units

        self.runs += 1
        items = items or self.items
        assert not Path(f"{self.scratch}/new-{self.runs}").exists(), "scratch reused"
        return cut_units(_items(units * items, offset=self.runs * 10**9), items_per_unit=items)

    def new(
        self,
        actors: int,
        units: int,
        stall: float = 600,
        *,
        pools: int = 1,
        inflight: int = 1,
        rate: float | None = None,
        items: int | None = None,
        hold: str = "",
        per_call: int = 1,
    ) -> dict[str, Any]:
        """The Ray Data path: ``run_units`` as the jobs call it. ``pools=2``: a WavLM and a
        Dasheng pool as tokenize has (7/8 and 1/8 of ``actors``, rates that balance them);
        ``inflight``: each actor is handed that many times the job's calls in flight."""
        from spear.pipeline.job import ActorStage, UnitJob, run_units
        from spear.ray_utils import RayConfig
        from spear.record import items_record
        from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
        from spear.stages.decode import DecodeConfig
        from spear.storage import StorageConfig

        rate = rate or self.rate
        table = self._table(units, items)
        out = f"{self.scratch}/new-{self.runs}"
        if pools == 1:
            stages = [
                ActorStage(
                    name="stub",
                    cls=StubTeacher,
                    kwargs={"rate": rate},
                    num_actors=actors,
                    device="cpu",
                    num_cpus=0,
                    resources={"stub_gpu": 1},
                )
            ]
        else:
            n_d = max(1, actors // 8)
            sizes = {"wavlm": actors - n_d, "dasheng": n_d}
            domains = {"wavlm": ("audio",), "dasheng": ("audio",)}
            stages = [
                ActorStage(
                    name=p,
                    cls=StubStage,
                    kwargs={
                        "rates": {p: rate * sizes["wavlm"] / n},
                        "domains": domains,
                        "log": "",
                        "stage": p,
                        "hold": hold,
                    },
                    num_actors=n,
                    device="cpu",
                    num_cpus=0,
                    resources={"stub_gpu": 1},
                )
                for p, n in sizes.items()
            ]
        job = UnitJob(
            kind="bench",
            out=out,
            unit_prefix="shard",
            columns=INPUT_COLUMNS,
            outputs=lambda u: [f"tokens/{u}.parquet"],
            actors=stages,
            writer=TokenShardWriter(_teacher_infos()),
            decode=DecodeConfig(),
            decode_fn=stub_decode,
        )
        record = items_record("bench", table, INPUT_COLUMNS, {})
        _wait_free("stub_gpu", self.gpus)  # the previous run's actors gone
        samples: list[tuple[float, float]] = []
        with _sampling(samples):
            cpu0, t0 = _cpu(), time.perf_counter()
            with in_flight(inflight):
                ray_cfg = RayConfig(stall_seconds=stall, units_per_call=per_call)
                run = run_units(job, record, table, StorageConfig(), ray_cfg)
            wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        marks = run.progress.timeline if run.progress else []
        steady = _steady_cost(marks, run.progress.t0 if run.progress else 0.0, samples)
        return {"wall": wall, "cpu": cpu, "units": units, "marks": marks, "steady": steady}

    def backlog(
        self, actors: int, units: int, inflight: int, window: float, per_call: int = 1
    ) -> dict[str, Any]:
        """The driver's CPU per second while it carries ``units`` queued shards and
        ``inflight`` x 2 calls per actor that do not finish (stub teachers that take hours):
        the run ends by its stall limit (``window`` s without a shard); the CPU is sampled
        over the window's second half. Then the held calls fail, which ends Ray Data's run."""
        import threading

        from spear.errors import SpearError

        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                samples.append((time.perf_counter(), _cpu()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        hold = f"{self.scratch}/hold-{self.runs}"
        t0 = time.perf_counter()
        try:
            self.new(
                actors,
                units,
                window,
                pools=2,
                inflight=inflight,
                items=1,
                hold=hold,
                per_call=per_call,
            )
            raise RuntimeError("the backlog run finished: its stub teachers did not hold")
        except SpearError:
            pass
        end = time.perf_counter()
        stop.set()
        sampler.join()
        Path(hold).touch()  # the held calls fail: Ray Data's run ends, its actors go
        for t in threading.enumerate():
            if t.name == "ray-data":
                t.join(timeout=120)
        half = [(t, c) for t, c in samples if t >= end - window / 2]
        return {
            "cores": (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]),
            "wall": end - t0,
        }

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
        _wait_free("stub_gpu", self.gpus)
        cpu0, t0 = _cpu(), time.perf_counter()
        error = ""
        samples: list[tuple[float, float]] = []
        try:
            with _sampling(samples):
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
        steady = _steady_cost(progress.timeline, progress.t0, samples)
        return {
            "wall": wall,
            "cpu": cpu,
            "units": units,
            "done": progress.units,
            "error": error,
            "steady": steady,
        }


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


@contextlib.contextmanager
def _sampling(samples: list[tuple[float, float]], every: float = 0.2) -> Iterator[None]:
    """(wall clock, driver CPU seconds) every ``every`` s while the block runs."""
    import threading

    stop = threading.Event()

    def sample() -> None:
        while True:
            samples.append((time.time(), _cpu()))
            if stop.wait(every):
                samples.append((time.time(), _cpu()))
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _steady_cost(
    marks: list[dict[str, Any]], t0: float, samples: list[tuple[float, float]]
) -> dict[str, float]:
    """The driver's cost while shards commit, start-up and tail left out: from the mark where a
    fifth of the shards were done to the one where four fifths were, driver CPU seconds per
    shard committed, driver cores and shards/s over that window (CPU interpolated from the
    samples at the marks' times). One run measures it, so no difference of two runs' noisy
    start-ups enters it."""
    pts = [(t0 + float(m["t"]), int(m["shards_done"])) for m in marks]
    if not pts or len(samples) < 2:
        return {"per_shard": float("nan"), "cores": float("nan"), "rate": float("nan")}
    total = pts[-1][1]
    a = next((p for p in pts if p[1] >= max(1, total // 5)), None)
    b = next((p for p in reversed(pts) if p[1] <= max(2, 4 * total // 5)), None)
    if a is None or b is None or b[1] <= a[1] or b[0] <= a[0]:
        return {"per_shard": float("nan"), "cores": float("nan"), "rate": float("nan")}
    ts = np.array([s[0] for s in samples])
    cs = np.array([s[1] for s in samples])
    ca, cb = float(np.interp(a[0], ts, cs)), float(np.interp(b[0], ts, cs))
    return {
        "per_shard": (cb - ca) / (b[1] - a[1]),
        "cores": (cb - ca) / (b[0] - a[0]),
        "rate": (b[1] - a[1]) / (b[0] - a[0]),
    }


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


def driver(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """Per simulated cluster size: the driver's steady-state CPU per shard with one pool (the
    fused default) and with tokenize's two pools, each at one unit per call (before) and at the
    units per call the job chooses for that cluster's corpus (now), each actor carrying the
    calls in flight of gpus / actors actors; and its CPU per second carrying that cluster's
    calls in flight and the corpus's queued shards. Like for like, once, in the steady state:
    the former scheduler and Ray Data at one and at eight shards per call, two calls in flight
    per actor."""
    from spear.units import UNITS_PER_CALL, units_per_call

    actors = args.driver_actors
    levels = [int(g) for g in args.gpus.split(",")]
    out: dict[str, Any] = {"levels": []}
    for i, g in enumerate(levels):
        bench = Bench(actors, tmp, args.driver_rate, args.unit_items)
        try:
            if i == 0:
                n = args.steady_calls
                out["like"] = [
                    ("Ray Data, 1 shard per call", bench.new(actors, n)),
                    ("Ray Data, 8 shards per call", bench.new(actors, 8 * n, per_call=8)),
                    ("former scheduler", bench.former(actors, n)),
                ]
                out["waits"] = {lv: wait_cost(p) for lv, p in ((64, 1_700), (512, 13_000))}
            k = max(1, g // actors)
            # What `spear tokenize` chooses on this cluster: its largest pool has ~7/8 x gpus
            # actors (one per GPU) for the corpus's shards.
            chosen = units_per_call(args.backlog, g - max(1, g // 8), most=UNITS_PER_CALL)
            lv: dict[str, Any] = {"gpus": g, "factor": k, "per_call": chosen, "runs": []}
            for pools in (1, 2):
                slots = 2 * k * (actors if pools == 1 else actors - max(1, actors // 8))
                for per_call in sorted({1, chosen}):
                    n = args.steady_calls * per_call
                    r = bench.new(actors, n, pools=pools, inflight=k, per_call=per_call)
                    lv["runs"].append(
                        {"pools": pools, "per_call": per_call, "shards": n, "slots": slots}
                        | {"wall": r["wall"], "steady": r["steady"]}
                    )
            lv["carry"] = bench.backlog(actors, args.backlog, k, args.window, chosen)["cores"]
            out["levels"].append(lv)
        finally:
            bench.close()
    return out


def shard_rate(gpus: int, hours: float) -> float:
    """Shards/s a cluster of ``gpus`` H100s finishes at GPU_RATE x real time each."""
    return gpus * GPU_RATE / (hours * 3600)


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
# 5. Where decode runs: in each teacher's actor, a fused actor (the default), or a decode stage


CODEBOOKS = {"wavlm": (50.0, 16), "dasheng": (25.0, 8)}  # frames/s, codebooks (SPEC)


def _log(path: str, rec: dict[str, Any]) -> None:
    """One JSON line per call into the benchmark's scratch log (all nodes share this host)."""
    with open(path, "a") as f:
        f.write(json.dumps(rec | {"pid": os.getpid()}) + "\n")


def _rows_bytes(batch: dict[str, Any]) -> int:
    """Bytes of a unit's row as the actor hands it on (:func:`spear.pipeline.job.pack`)."""
    from spear.pipeline.job import pack

    return len(pack({k: v for k, v in batch.items() if k != "audio"}))


def timed_decode(batch: dict[str, Any], cfg: Any, storage: Any, log: str) -> dict[str, Any]:
    """The jobs' decode (``decode_timed``), its CPU seconds on this thread logged; items that
    arrive with audio (``pcm``, the decode-stage variant) are passed on, not decoded."""
    from spear.pipeline.job import decode_timed

    n = len(batch["item_id"])
    if "pcm" in batch:
        out = {k: v for k, v in batch.items() if k != "pcm"}
        out["audio"] = batch["pcm"]
        out["num_samples"] = np.array([len(p) // 2 for p in batch["pcm"]], dtype=np.int64)
        out["error_type"] = np.array([""] * n, dtype=object)
        out["error"] = np.array([""] * n, dtype=object)
        out["decode_seconds"] = np.zeros(n)
        return out
    c0 = time.thread_time()
    out = decode_timed(batch, cfg, storage)
    _log(
        log, {"decode_cpu": time.thread_time() - c0, "decoded_s": float(np.sum(batch["duration"]))}
    )
    return out


def _stub_codes(prefix: str, batch: dict[str, Any], run: np.ndarray, rng: Any) -> dict[str, Any]:
    """``prefix``'s columns as ``tokenize_batch`` leaves them: codes of SPEC's size on ``run``."""
    from spear.shards.schema import NOT_RUN_FRAMES

    fps, books = CODEBOOKS[prefix]
    n = len(batch["item_id"])
    secs = np.asarray(batch["num_samples"], dtype=np.float64) / 16_000
    frames = np.where(run, np.maximum(1, (secs * fps).astype(np.int32)), NOT_RUN_FRAMES)
    codes = np.empty(n, dtype=object)
    codes[:] = [
        rng.integers(0, 256, int(f) * books, np.uint8).tobytes() if r else b""
        for f, r in zip(frames, run, strict=True)
    ]
    return {
        f"{prefix}_frames": frames.astype(np.int32),
        f"{prefix}_codes": codes,
        f"{prefix}_seconds": np.zeros(n),
    }


class StubStage:
    """Teachers at a fixed GPU-like rate (sleep for the audio they run on / rate) giving codes
    of SPEC's size: one teacher (``prefixes`` of one) per pool, or both in one actor (fused).
    ``keep`` domains pass their audio on as ``pcm`` (decode-stage variant); ``pcm_only`` is
    the decode stage itself (no teacher: the decoded audio leaves as ``pcm``)."""

    def __init__(
        self,
        rates: dict[str, float],
        domains: dict[str, tuple[str, ...]],
        log: str,
        stage: str,
        keep: tuple[str, ...] = (),
        pcm_only: bool = False,
        hold: str = "",
    ):
        self.rates, self.domains, self.log, self.stage = rates, domains, log, stage
        self.keep, self.pcm_only, self.hold = keep, pcm_only, hold
        self.rng = np.random.default_rng(os.getpid())
        if log:
            _log(log, {"stage": stage, "init_rss": _rss(), "cpu": _cpu()})

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.hold:  # the driver part's backlog: a call that ends only with the job
            while not os.path.exists(self.hold):
                time.sleep(0.2)
            raise RuntimeError("backlog measured: the job ends here")
        n = len(batch["item_id"])
        ok = np.array([str(e) == "" for e in batch["error_type"]])
        dom = np.array([str(d) for d in batch["domain"]])
        secs = np.asarray(batch["num_samples"], dtype=np.float64) / 16_000
        out = {k: v for k, v in batch.items() if k not in ("audio", "pcm")}
        if self.pcm_only:
            out["pcm"] = batch["audio"]
        else:
            for p, rate in self.rates.items():
                run = ok & np.isin(dom, self.domains[p])
                time.sleep(float(secs[run].sum()) / rate)
                out |= _stub_codes(p, batch, run, self.rng)
            if self.keep:
                pcm = np.empty(n, dtype=object)
                pcm[:] = [
                    a if k else b""
                    for a, k in zip(batch["audio"], ok & np.isin(dom, self.keep), strict=True)
                ]
                out["pcm"] = pcm
        if not self.log:  # the driver part: no per-call record
            return out
        _log(
            self.log,
            {
                "stage": self.stage,
                "out_bytes": _rows_bytes(out),
                "rss": _rss(),
                "cpu": _cpu(),
                "audio_s": float(secs.sum()),
            },
        )
        return out


def _rss() -> int:
    """Peak RSS of this process, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_mix(root: str, speech_min: float, audio_share: float) -> pa.Table:
    """SPEC's mix in small: 16 kHz FLAC speech items of 10-20 s and 44.1 kHz FLAC audio
    items of 10 s making ``audio_share`` of the hours (SPEC: 12.2k of 197k h, 6 %)."""
    import soundfile as sf

    from spear.synth import write_speech_like

    n_speech = round(speech_min * 60 / 15)
    n_audio = max(1, round(speech_min * 60 * audio_share / (1 - audio_share) / 10))
    urls = write_speech_like(f"{root}/speech", n_speech, seconds=(10, 20), seed=1)
    urls_a = write_speech_like(
        f"{root}/audio", n_audio, seconds=(10, 10.001), seed=2, sample_rate=44100
    )
    rows = [(u, "speech") for u in urls] + [(u, "audio") for u in urls_a]
    # Audio items spread through the shards, as sorted item ids put them.
    rows.sort(key=lambda r: hash(r[0]) % 9973)
    return pa.table(
        {
            "item_id": [f"{i:016x}-0000" for i in range(len(rows))],
            "source": [d for _, d in rows],
            "domain": [d for _, d in rows],
            "url": [u for u, _ in rows],
            "start": np.zeros(len(rows)),
            "duration": [float(sf.info(u).duration) for u, _ in rows],
        }
    )


def _wait_free(resource: str, amount: float, timeout: float = 120) -> None:
    """Until ``amount`` of ``resource`` is free (Ray Data kills a finished job's actors
    asynchronously)."""
    import ray

    t0 = time.monotonic()
    while ray.available_resources().get(resource, 0) < amount - 1e-9:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{resource} not free after {timeout:g} s")
        time.sleep(0.5)


def decode_placement(
    items: pa.Table,
    scratch: str,
    gpus: int,
    rates: dict[str, float],
    unit_items: int,
    chunk_seconds: float,
) -> list[dict[str, Any]]:
    """The same items through the three placements, one after the other on one cluster."""
    import functools

    from spear.pipeline.job import ActorStage, UnitJob, run_units, unit_inputs
    from spear.ray_utils import RayConfig
    from spear.record import items_record
    from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter
    from spear.stages.decode import DecodeConfig
    from spear.storage import StorageConfig

    domains = {"wavlm": ("speech", "audio"), "dasheng": ("audio",)}
    n_d = max(1, round(gpus * 0.1))  # the ~90/10 split of GPU time (SPEC section 6)
    n_w = gpus - n_d

    def teacher(name: str, prefixes: list[str], n: int, log: str, **kw: Any) -> ActorStage:
        return ActorStage(
            name=name,
            cls=StubStage,
            kwargs={
                "rates": {p: rates[p] for p in prefixes},
                "domains": domains,
                "log": log,
                "stage": name,
                **kw,
            },
            num_actors=n,
            device="cpu",
            num_cpus=0,
            resources={"stub_gpu": 1},
            decodes=None if name == "fused" else domains[prefixes[0]],
        )

    variants: dict[str, Any] = {
        "per-teacher pools, decode in each actor (`fuse_teachers=false`)": lambda log: [
            teacher("wavlm", ["wavlm"], n_w, log),
            teacher("dasheng", ["dasheng"], n_d, log),
        ],
        "fused actor: decode once, both teachers (the default)": lambda log: [
            teacher("fused", ["wavlm", "dasheng"], gpus, log),
        ],
        "decode stage, int16 audio through the object store (before)": lambda log: [
            ActorStage(
                name="decode",
                cls=StubStage,
                kwargs={
                    "rates": {},
                    "domains": domains,
                    "log": log,
                    "stage": "decode",
                    "pcm_only": True,
                },
                num_actors=1,
                device="cpu",
                num_cpus=1,
            ),
            teacher("wavlm", ["wavlm"], n_w, log, keep=("audio",)),
            teacher("dasheng", ["dasheng"], n_d, log),
        ],
    }
    from spear.units import cut_units

    table = cut_units(items, items_per_unit=unit_items)
    units = int(table["unit"].to_numpy().max()) + 1
    row_bytes = sum(
        len(unit_inputs(table, INPUT_COLUMNS, list(range(units)))(u)) for u in range(units)
    )
    audio_s = float(np.sum(items["duration"]))
    rows = []
    for k, (label, stages) in enumerate(variants.items()):
        log = f"{scratch}/decode-{k}.jsonl"
        job = UnitJob(
            kind="bench",
            out=f"{scratch}/decode-out-{k}",
            unit_prefix="shard",
            columns=INPUT_COLUMNS,
            outputs=lambda u: [f"tokens/{u}.parquet"],
            actors=stages(log),
            writer=TokenShardWriter(_teacher_infos(domains)),
            decode=DecodeConfig(io_threads=1),
            decode_fn=functools.partial(timed_decode, log=log),
            chunk_seconds=chunk_seconds,
        )
        plan = items_record("bench", table, INPUT_COLUMNS, {})
        _wait_free("stub_gpu", gpus)  # the previous variant's actors gone
        t0 = time.perf_counter()
        run = run_units(job, plan, table, StorageConfig(), RayConfig(stall_seconds=300))
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in Path(log).read_text().splitlines()]
        first = (
            min(m["t"] for m in run.progress.timeline if m["shards_done"]) if run.progress else 0
        )
        init = {r["pid"]: r for r in recs if "init_rss" in r}
        calls = [r for r in recs if "out_bytes" in r]
        last: dict[int, dict[str, Any]] = {}
        for r in calls:
            last[r["pid"]] = r
        rows.append(
            {
                "variant": label,
                "wall": wall,
                "steady": _steady(run.progress.timeline if run.progress else []),
                "first": first,
                "decode_cpu_per_h": sum(r["decode_cpu"] for r in recs if "decode_cpu" in r)
                / (audio_s / 3600),
                "decoded_x": sum(r["decoded_s"] for r in recs if "decoded_s" in r) / audio_s,
                "actor_cpu_per_h": sum(r["cpu"] - init[p]["cpu"] for p, r in last.items())
                / (audio_s / 3600),
                "store_per_s": (row_bytes + sum(r["out_bytes"] for r in calls)) / audio_s,
                "peak_rss": max(r["rss"] for r in calls),
                "peak_growth": max(r["rss"] - init[r["pid"]]["init_rss"] for r in calls),
                "gpu_busy": sum(
                    float(
                        np.sum(
                            items["duration"].to_numpy()[
                                np.isin(items["domain"].to_numpy(), domains[p])
                            ]
                        )
                    )
                    / rates[p]
                    for p in rates
                )
                / (wall * gpus),
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


def _report_driver(args: argparse.Namespace, tmp: str) -> None:
    d = driver(args, tmp)
    rows: list[list[str]] = []
    for lv in d["levels"]:
        g = lv["gpus"]
        for r in lv["runs"]:
            st = r["steady"]
            net = max(st["per_shard"] - lv["carry"] / st["rate"], 0.0)
            cores = [lv["carry"] + net * shard_rate(g, h) for h in (2.0, 10.0)]
            pools = "1 pool (fused)" if r["pools"] == 1 else "2 pools"
            rows.append(
                [
                    f"{g} GPUs, {pools}",
                    f"{r['per_call']}" + (" (chosen)" if r["per_call"] == lv["per_call"] else ""),
                    f"{r['slots']:,}",
                    f"{r['shards']:,} in {r['wall']:.0f} s",
                    f"{st['rate']:.1f}",
                    f"{st['cores']:.3f}",
                    f"{st['per_shard'] * 1e3:.2f}",
                    f"{net * 1e3:.2f}",
                    f"{lv['carry']:.3f}",
                    f"{cores[0]:.2f} / {cores[1]:.2f}",
                ]
            )
    _table(
        f"driver, Ray Data: {args.driver_actors} stub actors on 4 nodes, shards of "
        f"{args.unit_items} x {ITEM_SECONDS:g} s at {args.driver_rate:g}x per actor; steady state "
        "of each run (a fifth to four fifths of its shards committed); carrying: "
        f"{args.backlog:,} queued shards of 1 item and every call held, {args.window:g} s",
        [
            "simulated cluster, pools",
            "units per call",
            "call slots (actors x calls in flight)",
            "run",
            "shards/s committed",
            "driver cores",
            "driver CPU ms per shard",
            "ms per shard net of carrying",
            "driver cores carrying (no shard done)",
            "driver cores at this cluster's rate, 2 h / 10 h shards",
        ],
        rows,
    )
    former: list[list[str]] = []
    for label, r in d["like"]:
        st = r["steady"]
        waits = [3 * d["waits"][g] if label.startswith("former") else 0.0 for g in (64, 512)]
        cost = [st["per_shard"] + w for w in waits]
        former.append(
            [
                label,
                f"{r['units']:,} in {r['wall']:.0f} s",
                f"{st['rate']:.1f}",
                f"{st['cores']:.3f}",
                f"{st['per_shard'] * 1e3:.2f}",
                " / ".join(f"{c * 1e3:.1f}" for c in cost),
                f"{cost[1] * shard_rate(512, 10):.2f}",
            ]
        )
    _table(
        f"driver, like for like: one pool of {args.driver_actors} stub actors, two calls in "
        "flight each, steady state",
        [
            "engine",
            "run",
            "shards/s committed",
            "driver cores",
            "driver CPU ms per shard",
            "with the former's ray.wait at 64 / 512 GPUs, ms per shard",
            "driver cores at 512 GPUs, 10 h shards (114/s)",
        ],
        former,
    )
    w = d["waits"]
    print(
        f"\nformer scheduler's ray.wait per completed step: {w[64] * 1e3:.2f} ms at 1,700 "
        f"pending refs (64 GPUs), {w[512] * 1e3:.2f} ms at 13,000 (512 GPUs); counted 3 times "
        "per shard in its cost. Ray Data's cores at a cluster's rate = carrying + net per shard "
        "x the shards/s that cluster finishes (8,000x real time per H100)."
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


def _report_decode(bench: Bench, args: argparse.Namespace, tmp: str) -> None:
    rates = {"wavlm": args.decode_rate, "dasheng": args.decode_rate * 0.63}
    items = write_mix(f"{tmp}/mix", args.decode_minutes, 0.06)
    audio_s = float(np.sum(items["duration"]))
    share = float(np.sum(items["duration"].to_numpy()[items["domain"].to_numpy() == "audio"]))
    rows = decode_placement(
        items, tmp, args.decode_gpus, rates, args.decode_unit_items, args.decode_chunk
    )
    _table(
        f"decode: {items.num_rows} items, {audio_s / 60:.1f} min ({100 * share / audio_s:.0f} % "
        f"audio items, 44.1 kHz FLAC; speech 16 kHz FLAC), {args.decode_gpus} stub GPUs, stub "
        f"WavLM {rates['wavlm']:g}x / Dasheng {rates['dasheng']:g}x per GPU, shards of "
        f"{args.decode_unit_items} items, {args.decode_chunk:g} s decode chunks",
        [
            "placement",
            "wall s",
            "first shard s",
            "steady x real time",
            "GPU busy (whole run)",
            "audio decoded / audio",
            "decode CPU s per audio h",
            "actor CPU s per audio h",
            "object store B per audio s",
            "peak actor RSS MB (growth)",
        ],
        [
            [
                r["variant"],
                f"{r['wall']:.1f}",
                f"{r['first']:.1f}",
                f"{r['steady']:,.0f}",
                f"{100 * r['gpu_busy']:.0f} %",
                f"{r['decoded_x']:.3f}",
                f"{r['decode_cpu_per_h']:.1f}",
                f"{r['actor_cpu_per_h']:.1f}",
                f"{r['store_per_s']:,.0f}",
                f"{r['peak_rss'] / 2**20:.0f} ({r['peak_growth'] / 2**20:.0f})",
            ]
            for r in rows
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
    parts = ["driver", "throughput", "partial", "decode", "plan"]
    ap.add_argument("--part", choices=["all", *parts], default="all")
    ap.add_argument("--actors", default="1,4,16", help="throughput: actor counts")
    ap.add_argument("--driver-actors", type=int, default=16, help="driver: stub actors")
    ap.add_argument("--steady-calls", type=int, default=150, help="driver: calls per run")
    ap.add_argument("--gpus", default="64,512", help="driver: simulated cluster sizes")
    ap.add_argument("--driver-rate", type=float, default=2000.0, help="driver: stub x rt")
    ap.add_argument("--backlog", type=int, default=20_000, help="driver: queued shards")
    ap.add_argument("--window", type=float, default=30.0, help="driver: carrying seconds")
    ap.add_argument("--rate", type=float, default=250.0, help="stub teacher x real time")
    ap.add_argument("--unit-items", type=int, default=100, help="items of 10 s per unit")
    ap.add_argument("--waves", type=int, default=6, help="throughput: units per actor")
    ap.add_argument("--stall", type=float, default=60.0, help="partial: the former's limit")
    ap.add_argument("--plan-items", type=int, default=10_000_000)
    ap.add_argument("--decode-minutes", type=float, default=225.0, help="decode: speech minutes")
    ap.add_argument("--decode-gpus", type=int, default=11, help="decode: stub GPUs")
    ap.add_argument("--decode-rate", type=float, default=100.0, help="decode: stub WavLM x rt")
    ap.add_argument("--decode-unit-items", type=int, default=32, help="decode: items per shard")
    ap.add_argument("--decode-chunk", type=float, default=60.0, help="decode: chunk seconds")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts if args.part == "all" else [args.part]:
            if part == "plan":
                _report_plan(args, tmp)
                continue
            if part == "driver":
                _report_driver(args, tmp)
                continue
            most = max(int(a) for a in args.actors.split(","))
            gpus = {"partial": 2, "decode": args.decode_gpus}
            bench = Bench(gpus.get(part, most), tmp, args.rate, args.unit_items)
            try:
                if part == "decode":
                    _report_decode(bench, args, tmp)
                    continue
                (_report_throughput if part == "throughput" else _report_partial)(bench, args)
            finally:
                bench.close()


if __name__ == "__main__":
    main()
