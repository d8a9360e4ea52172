"""The resumable-job skeleton of embed, tokenize and features: plan, units, workers that commit.

A job turns the items of a manifest into fixed output **units** (token shards, embedding
shards, feature parts) and owns, here, everything such a job needs besides its stage cores:

1. **Plan** (:class:`Plan`, :func:`check_plan`): what decides the outputs (settings, teacher
   and quantiser digests, and the *content* digest of the job's items, never the manifest's
   URL) goes to ``_work/plan.json``. A re-run into the same ``--out`` must plan the same, or it
   is refused with the differing keys; a copy of the manifest at another URL is the same run.
2. **Units** (:func:`cut_units`): items sorted by the job's order and cut into units of at
   most ``items_per_unit`` items and ``max_unit_seconds`` of audio (bounded memory per unit),
   numbered from 0. Each unit travels through Ray Data as **one row** holding its items as an
   Arrow IPC stream, so its items stay together and a unit completes as soon as its row has
   passed every stage (Ray Data may cut blocks anywhere, but never inside a row).
3. **Stages** (:func:`map_units`, :func:`unit_actor`): the stage cores are batch functions over
   items; these wrappers run them on a unit's items inside Ray tasks and actors.
4. **Commit** (:func:`write_units`, ``pipeline/commit.py``): the last stage, a Ray task, builds
   the unit's files and commits them itself; only the unit's small entry (counts, digests,
   busy seconds) reaches the driver. The driver's work and memory are O(units), independent of
   items per unit and of bytes.
5. **Resources** (:func:`actor_resources`, :func:`check_fits`): one rule for CPU/GPU shares of
   every actor pool, and a sizing check that fails at once instead of waiting forever.
6. **Driving** (:func:`drive`): iterates the entries, feeds progress, and ends a stalled run
   (no unit finished for ``stall_seconds``) with a clear error.

A job describes itself as a :class:`UnitJob` (its actor stages and unit writer) and calls
:func:`run_units` with its plan; what it does with the entries (an index, a report) is its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.credentials import redact
from spear.errors import SpearError
from spear.formats import table_digest
from spear.pipeline.commit import (
    clean_attempts,
    committed_names,
    read_entries,
    recover,
)
from spear.pipeline.progress import Progress
from spear.ray_utils import RayConfig, free_resources, init_ray
from spear.stages.decode import DecodeConfig, decode_batch
from spear.storage import StorageConfig, exists, forget_listings, join, read_bytes, write_atomic

log = logging.getLogger(__name__)

PLAN = "_work/plan.json"
PLAN_VERSION = 2


# ---------------------------------------------------------------------------------------------
# Plan and units


def cut_units(
    table: pa.Table, *, items_per_unit: int, max_unit_seconds: float | None = None
) -> pa.Table:
    """``table`` (already in the job's order) with a ``unit`` column: consecutive runs of at
    most ``items_per_unit`` items and (when given) ``max_unit_seconds`` of ``duration``."""
    n = table.num_rows
    if max_unit_seconds is None:
        unit = np.arange(n, dtype=np.int64) // items_per_unit
    else:
        # A greedy cut needs a pass over the items; 10^7 durations take ~1 s in this loop's
        # vectorised form: cumulative sums restarted at each cut.
        dur = table["duration"].to_numpy()
        unit = np.empty(n, dtype=np.int64)
        u, start = 0, 0
        csum = np.cumsum(dur)
        while start < n:
            base = csum[start - 1] if start else 0.0
            by_secs = int(np.searchsorted(csum, base + max_unit_seconds, side="right"))
            stop = min(start + items_per_unit, max(by_secs, start + 1), n)
            unit[start:stop] = u
            u, start = u + 1, stop
    return table.append_column("unit", pa.array(unit.astype(np.int32)))


@dataclass
class Plan:
    """What decides a job's outputs, written to ``_work/plan.json`` and checked on resume."""

    kind: str
    """The job: ``tokenize``, ``embed`` or ``features``."""
    decides: dict[str, Any]
    """Settings and digests that decide which items go in which unit and what they get."""
    items: int
    units: int
    digest: str
    """Content digest of the job's items (their order and unit cut included)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Recorded, never compared: where the manifest was read from, and similar."""

    @property
    def run_id(self) -> str:
        """Digest of everything that decides the outputs (items and settings): the id the
        outputs carry, equal for a resumed run, new for any other."""
        d = {k: v for k, v in self.as_dict().items() if k != "info"}
        text = json.dumps(d, sort_keys=True, default=str).encode()
        return f"{self.kind}-{hashlib.blake2b(text, digest_size=8).hexdigest()}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "kind": self.kind,
            "items": self.items,
            "units": self.units,
            "digest": self.digest,
            "decides": self.decides,
            "info": self.info,
        }


def make_plan(
    kind: str,
    table: pa.Table,
    digest_columns: tuple[str, ...],
    decides: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> Plan:
    """The plan of ``table`` (with its ``unit`` column) and the job's deciding settings."""
    units = int(table["unit"][-1].as_py()) + 1 if table.num_rows else 0
    digest = table_digest(table, (*digest_columns, "unit"))
    return Plan(kind, decides, table.num_rows, units, digest, info or {})


def sorted_units(
    table: pa.Table, *, items_per_unit: int, what: str, max_unit_seconds: float | None = None
) -> pa.Table:
    """``table`` sorted by ``item_id`` and cut into units (:func:`cut_units`); a repeated item
    id (two rows that would be one item twice) is an error naming ``what``."""
    table = table.sort_by("item_id")
    ids = table["item_id"].combine_chunks()
    if len(ids) > 1 and pc.any(pc.equal(ids[1:], ids[:-1])).as_py():
        raise SpearError(f"{what} repeats item ids")
    return cut_units(table, items_per_unit=items_per_unit, max_unit_seconds=max_unit_seconds)


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [f"{path}: {old!r} there, {new!r} now"]


def check_plan(out: str, plan: Plan, committed: int, storage: StorageConfig) -> None:
    """Refuse a run whose plan differs from the one that committed units into ``out``.

    With nothing committed yet, the plan is (re)written: a corrected retry may change it."""
    url = join(out, PLAN)
    new = redact(plan.as_dict())  # the info may hold a signed URL
    if committed and exists(url, storage):
        old = json.loads(read_bytes(url, storage))
        if old.get("version") != PLAN_VERSION:
            raise SpearError(
                f"{out!r} was written by another spear version (plan version "
                f"{old.get('version')}); use another --out"
            )
        keys = ("kind", "items", "units", "digest", "decides")
        diffs = _diff({k: old.get(k) for k in keys}, {k: new[k] for k in keys})
        if diffs:
            what = "; ".join(
                d.replace("digest:", "items (manifest content):", 1) for d in diffs[:3]
            )
            raise SpearError(
                f"{out!r} holds {old.get('kind')} outputs of another run ({what}"
                f"{'; ...' if len(diffs) > 3 else ''}); use another --out"
            )
        return
    if committed:
        raise SpearError(
            f"{out!r} holds committed outputs but no {PLAN}: cannot tell what made them; "
            "use another --out"
        )
    write_atomic(url, json.dumps(new, indent=1, sort_keys=True).encode(), storage)


# ---------------------------------------------------------------------------------------------
# A unit as one row: its items as an Arrow IPC stream


def pack(batch: dict[str, Any]) -> bytes:
    """A batch of items (numpy columns; bytes and str in object arrays) -> Arrow IPC bytes."""
    cols = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype == object and len(v) and isinstance(v[0], (bytes, bytearray, memoryview)):
            cols[k] = pa.array([bytes(x) for x in v], type=pa.large_binary())
        elif v.dtype == object:
            cols[k] = pa.array([str(x) for x in v], type=pa.string())
        else:
            cols[k] = pa.array(v)
    return _ipc(pa.table(cols))


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def unpack(data: bytes) -> dict[str, np.ndarray]:
    """:func:`pack`'s inverse: numpy columns, bytes and str as object arrays."""
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def unit_inputs(
    table: pa.Table, columns: Sequence[str], units: list[int]
) -> Callable[[int], bytes]:
    """unit -> its items' ``columns`` as Arrow IPC bytes (what :func:`unpack` reads); ``table``
    is sorted by unit (:func:`cut_units`)."""
    unit_col = table["unit"].to_numpy()
    starts = np.searchsorted(unit_col, units, side="left")
    stops = np.searchsorted(unit_col, units, side="right")
    bounds = {u: (int(a), int(b - a)) for u, a, b in zip(units, starts, stops, strict=True)}
    cols = list(columns)
    return lambda u: _ipc(table.slice(*bounds[u]).select(cols))


def unit_rows(table: pa.Table, columns: Sequence[str], units: list[int]) -> Iterator[pa.Table]:
    """One single-row table (``unit``, ``data``) per unit of ``units``, in order."""
    data = unit_inputs(table, columns, units)
    for u in units:
        yield pa.table(
            {"unit": pa.array([u], pa.int32()), "data": pa.array([data(u)], pa.large_binary())}
        )


class UnitActor:
    """Base of :func:`unit_actor`'s classes: builds the stage once, runs it on units."""

    stage_cls: Any = None

    def __init__(self, **kwargs: Any):
        self.stage = self.stage_cls(**kwargs)

    def run(self, data: bytes) -> bytes:
        """One unit's items (:func:`pack` bytes) through the stage."""
        return pack(self.stage(unpack(data)))


def unit_actor(stage_cls: type) -> type:
    """An actor class that runs ``stage_cls`` (a batch-of-items callable) on units; named
    ``<Stage>Units`` so Ray's actor table says which."""
    return type(
        f"{stage_cls.__name__}Units", (UnitActor,), {"stage_cls": stage_cls, "__module__": __name__}
    )


# ---------------------------------------------------------------------------------------------
# Resources


def actor_resources(
    device: str,
    num_gpus: float,
    gpus_in_cluster: bool,
    num_cpus: float | None,
    cpu_share: float,
) -> dict[str, float]:
    """CPU/GPU shares of one actor: the one rule every job's actor pools follow.

    ``device="cuda"`` always asks for GPUs (an autoscaler then adds GPU nodes); ``auto`` asks
    only when the cluster has GPUs now (a CPU-only laptop or CI cluster); ``cpu`` never.
    ``num_cpus=None`` means 1 CPU beside a GPU, and ``cpu_share`` (see :func:`cpu_share`) for
    an actor that computes on CPUs."""
    gpu = device == "cuda" or (device == "auto" and gpus_in_cluster)
    cpus = num_cpus if num_cpus is not None else (1.0 if gpu else cpu_share)
    return {"num_cpus": cpus, "num_gpus": num_gpus if gpu else 0.0}


def cpu_share(cluster_cpus: float, actors: int, task_cpus: float) -> float:
    """CPUs per CPU-computing actor when the config leaves it open: what the cluster has beside
    one of each task (decode, write), split evenly over the actors, at most 1 (2 CPUs, two
    teachers: 0.375 each, so a decode and a write still run)."""
    return max(0.125, min(1.0, (cluster_cpus - task_cpus) / max(actors, 1)))


@dataclass(frozen=True)
class Demand:
    """What one stage of a job holds at once: ``count`` x (``num_cpus``, ``num_gpus``)."""

    stage: str
    count: int
    num_cpus: float
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


def check_fits(
    demands: list[Demand], cluster: dict[str, float], *, autoscaling: bool, free: bool = False
) -> None:
    """Fail at once, with a sizing message, when the stages cannot all run on ``cluster``
    (its total resources, or with ``free`` those free now).

    All of a job's actor pools (and its CPU tasks, given as demands too) must fit at once:
    otherwise Ray waits forever for resources that never come. On an autoscaling cluster the
    resources of now say nothing of what it will add; there the stall timeout of :func:`drive`
    is the guard."""
    if autoscaling:
        return
    has = "free" if free else "in all"
    held = " (a submitted job's driver holds one)" if free else ""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    need_cpu = sum(d.count * d.num_cpus for d in demands)
    need_gpu = sum(d.count * d.num_gpus for d in demands)
    parts = ", ".join(
        f"{d.stage} {d.count} x {d.num_cpus:g} CPU"
        + (f" + {d.num_gpus:g} GPU" if d.num_gpus else "")
        for d in demands
    )
    if need_gpu > gpus:
        raise SpearError(
            f"the job needs {need_gpu:g} GPUs ({parts}) but the cluster has {gpus:g} {has}: use a "
            "cluster with GPUs, device=cpu for the teachers, or set ray.autoscaling=true if "
            "the cluster adds GPU nodes on demand"
        )
    for key in sorted({k for d in demands for k in d.resources}):
        need = sum(d.count * d.resources.get(key, 0.0) for d in demands)
        if need > cluster.get(key, 0.0):
            raise SpearError(
                f"the job needs {need:g} of resource {key!r} but the cluster has "
                f"{cluster.get(key, 0.0):g} {has}: use fewer actors or a cluster that offers it"
            )
    if need_cpu > cpus:
        raise SpearError(
            f"the job needs {need_cpu:g} CPUs at once ({parts}) but the cluster has {cpus:g} "
            f"{has}{held}: use fewer actors or workers, fewer CPUs per actor or task, a larger "
            "cluster, or set ray.autoscaling=true if the cluster adds nodes on demand"
        )


SETTLE_SECONDS = 20.0
"""How long a job waits for resources that are held now but fit the cluster: the actors of a
job that just ended (Ray releases them asynchronously) or a neighbour's short task."""


def fit_now(
    size: Callable[[float], list[Demand]], *, autoscaling: bool
) -> tuple[dict[str, float], float]:
    """Size a job against the cluster: ``size(cpus)`` gives its demands when it may use
    ``cpus`` CPUs. Checks them against the cluster's resources, then against those free now,
    waiting up to :data:`SETTLE_SECONDS` for held ones; CPUs that stay held (a submitted job's
    driver holds one) are left out and the rest shared. Returns the free resources and the CPUs
    the job was sized for. A job that can never run fails with a sizing message instead of
    waiting forever."""
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    cpus = total.get("CPU", 0.0)
    check_fits(size(cpus), total, autoscaling=autoscaling)
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        free = free_resources()
        try:
            check_fits(size(cpus), free, autoscaling=autoscaling, free=True)
            return free, cpus
        except SpearError:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            if free.get("CPU", 0.0) >= cpus:
                raise
        cpus = free.get("CPU", 0.0)
        check_fits(size(cpus), free, autoscaling=autoscaling, free=True)
        return free, cpus


# ---------------------------------------------------------------------------------------------
# A whole unit job


def decode_timed(
    batch: dict[str, np.ndarray], cfg: DecodeConfig, storage: StorageConfig
) -> dict[str, np.ndarray]:
    """:func:`spear.stages.decode.decode_batch` plus ``decode_seconds`` per row (the unit's
    decode time spread over its rows, for the report's per-stage throughput)."""
    t0 = time.perf_counter()
    out = decode_batch(batch, cfg, storage)
    n = len(out["item_id"])
    out["decode_seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    return out


@dataclass(frozen=True)
class ActorStage:
    """One actor pool of a unit job: ``cls(**kwargs)`` maps a batch of a unit's items."""

    name: str
    cls: type
    kwargs: dict[str, Any]
    num_actors: int = 1
    device: str = "auto"
    num_gpus: float = 1.0
    num_cpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per actor (an accelerator type, a node label resource)."""


@dataclass(frozen=True)
class UnitJob:
    """What a job plugs into the skeleton."""

    kind: str
    """``tokenize``, ``embed ...``, ``features``: progress and error messages."""
    out: str
    unit_prefix: str
    """Units are named ``{unit_prefix}-NNNNN``."""
    columns: tuple[str, ...]
    """The item columns a unit carries into the stages (the plan digests them too)."""
    outputs: Callable[[str], list[str]]
    """Files (relative to ``out``) a committed unit of this name must have published."""
    actors: list[ActorStage]
    writer: Callable[[int, dict[str, np.ndarray]], tuple[dict[str, bytes], dict[str, Any]]]
    decode: DecodeConfig
    decode_cpus: float = 1.0
    decode_memory: int = 512 * 2**20
    """Bytes Ray reserves per decode task: a unit's int16 audio and the decoder's buffers."""
    prepare: Callable[..., dict[str, Any]] = decode_timed
    """The CPU task stage before the actors: decoding, by default (``prepare(items, cfg=decode,
    storage=...)``); benchmarks put a stub here."""
    write_cpus: float = 0.25
    """CPU share of a write task (Parquet encoding, a few object-store puts)."""
    progress_seconds: float = 30.0

    def name(self, unit: int) -> str:
        return f"{self.unit_prefix}-{unit:05d}"


@dataclass
class UnitRun:
    """The outcome of :func:`run_units`."""

    entries: list[dict[str, Any]]
    """Every unit's commit entry, in unit order (earlier runs' included)."""
    done_before: int
    """Units an earlier run had committed."""
    progress: Progress | None
    """This run's progress record (None when nothing was left to do)."""


def run_units(
    job: UnitJob, plan: Plan, table: pa.Table, storage: StorageConfig, ray_cfg: RayConfig
) -> UnitRun:
    """Check ``plan`` against ``job.out``, recover a killed run's leftovers, run the units not
    yet committed (``table``: the plan's items with their ``unit`` column), and return every
    unit's entry."""
    out = job.out
    check_plan(out, plan, len(committed_names(out, storage)), storage)
    done = recover(out, storage, job.outputs)
    names = [job.name(u) for u in range(plan.units)]
    todo = [u for u, n in enumerate(names) if n not in done]
    new: list[dict[str, Any]] = []
    progress = None
    if todo:
        new, progress = _schedule(job, table, todo, storage, ray_cfg)
    entries = read_entries(out, [n for n in names if n in done], storage)
    entries |= {e["name"]: e for e in new}
    missing = [n for n in names if n not in entries]
    if missing:
        raise SpearError(f"{job.kind}: units {missing[:5]} did not finish; re-run the same command")
    clean_attempts(out, storage)
    return UnitRun([entries[n] for n in names], len(names) - len(todo), progress)


def _pending(table: pa.Table, todo: list[int]) -> tuple[int, float]:
    mask = np.isin(table["unit"].to_numpy(), todo)
    return int(mask.sum()), float(np.sum(table["duration"].to_numpy()[mask])) / 3600


def _schedule(
    job: UnitJob,
    table: pa.Table,
    todo: list[int],
    storage: StorageConfig,
    ray_cfg: RayConfig,
) -> tuple[list[dict[str, Any]], Progress]:
    """Size the job against the cluster, then run its units (``pipeline/scheduler.py``)."""
    init_ray(ray_cfg, job.out)
    import ray

    from spear.pipeline.scheduler import DEPTH, run_scheduled

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    # One decode and one write task must always fit beside the actor pools.
    tasks = job.decode_cpus + job.write_cpus

    def sized(cpus: float) -> tuple[list[Demand], list[Any]]:
        share = cpu_share(cpus, sum(a.num_actors for a in job.actors), tasks)
        demands = [Demand("decode", 1, job.decode_cpus), Demand("write", 1, job.write_cpus)]
        pools = []
        for a in job.actors:
            res = actor_resources(a.device, a.num_gpus, gpus, a.num_cpus, share)
            demands.append(
                Demand(a.name, a.num_actors, res["num_cpus"], res["num_gpus"], a.resources)
            )
            options = res | ({"resources": dict(a.resources)} if a.resources else {})
            pools.append((a.name, unit_actor(a.cls), a.kwargs, a.num_actors, options))
        return demands, pools

    cluster, cpus = fit_now(lambda c: sized(c)[0], autoscaling=ray_cfg.autoscaling)
    _, pools = sized(cpus)
    first = job.actors[0].num_actors if job.actors else 1
    decode_slots = max(1, int(cluster.get("CPU", 1.0) // max(job.decode_cpus, 0.01)))
    progress = Progress(job.kind, *_pending(table, todo), len(todo), job.progress_seconds)
    try:
        entries = run_scheduled(
            todo,
            unit_inputs(table, job.columns, todo),
            prepare=job.prepare,
            prepare_kwargs={"cfg": job.decode, "storage": storage.resolved()},
            prepare_options={
                "num_cpus": job.decode_cpus,
                "memory": job.decode_memory,
                "max_retries": 3,
            },
            pools=pools,
            writer=job.writer,
            write_options={"num_cpus": job.write_cpus, "max_retries": 3},
            out=job.out,
            storage=storage.resolved(),
            progress=progress,
            stall_seconds=ray_cfg.stall_seconds,
            # Enough prepared units to keep the first pool's queues full, and every CPU busy.
            prepare_slots=max(decode_slots, DEPTH * first) + 1,
        )
    finally:
        forget_listings(job.out, storage)  # the workers wrote there
    return entries, progress
