"""The resumable-job skeleton of embed, tokenize and features: units, workers that commit.

A job turns the items of a manifest into fixed output **units** (token shards, embedding
shards, feature parts). Its pieces live in one module each; this one drives them with Ray Data:

1. **Run record** (``spear/record.py``): what decides the outputs (settings, teacher and
   quantiser digests, and the *content* digest of the job's items, never the manifest's URL)
   goes to ``_work/plan.json``. A re-run into the same ``--out`` must record the same, or it is
   refused naming what differs; a copy of the manifest at another URL is the same run.
2. **Units** (``spear/units.py``): items sorted by the job's order and cut into units of at
   most ``items_per_unit`` items and ``max_unit_seconds`` of audio, numbered from 0. Each unit
   is **one row** of a Ray Data dataset holding its items' manifest columns as an Arrow IPC
   stream (no audio): its items stay together, and a unit completes as soon as its row (with
   the other units of its call) has passed every stage. A unit writer splits its items into
   output rows and quarantine rows with ``spear.units.split_quarantine``.
3. **Stages** (:class:`UnitActor`, :func:`unit_actor`): Ray Data's streaming executor runs one
   ``map_batches`` stage per actor pool (a callable class, an autoscaling
   ``ActorPoolStrategy``). A call takes one block of units: up to 8 token shards
   (``spear.units.units_per_call``), since Ray Data's driver cost is per call and a 512-GPU
   cluster's shard rate needs it shared; one embedding shard or feature part. The actor
   decodes the items it runs on itself, in chunks, the next chunk on a thread while the stage
   computes: decoded audio never enters the object store, only the stage's outputs (codes,
   embeddings) leave the actor.
4. **Commit** (:func:`commit_sink`, ``spear/commit.py``): a Ray Data ``Datasink`` whose
   write tasks build each unit's files and run the commit protocol under the unit's planned
   name (exclusive commit, then publish); a retried or duplicated write loses the race and
   returns the winner's entry. Only the unit's small entry (counts, digests, busy seconds)
   reaches the driver, through a small actor it polls for the progress line. The driver's
   work and memory are O(units), independent of items per unit and of bytes.
5. **Resources** (``pipeline/resources.py``): one rule for CPU/GPU shares of every actor
   pool, a sizing check against each pool's minimum (one actor) that fails at once instead of
   waiting forever, and pools that start with what fits now (saying so once) and grow to
   their size when resources free up.
6. **Driving** (:func:`run_units`): feeds progress from the entries and ends a stalled run (no
   unit finished for ``stall_seconds``) with a clear error.

A job describes itself as a :class:`UnitJob` (its actor stages and unit writer) and calls
:func:`run_units` with its record; what it does with the entries (an index, a report) is its
own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from spear.commit import (
    clean_attempts,
    commit_unit,
    committed_names,
    read_entries,
    recover,
)
from spear.errors import SpearError
from spear.pipeline.progress import Progress
from spear.pipeline.resources import Demand, actor_resources, cpu_share, fit_now, pool_sizes
from spear.ray_utils import RayConfig, init_ray
from spear.record import RunRecord, check_record
from spear.stages.decode import DecodeConfig, decode_batch
from spear.storage import StorageConfig, forget_listings, join, write_atomic
from spear.units import units_per_call

log = logging.getLogger(__name__)

PROGRESS = "_work/progress"
"""One timeline per invocation of a job (the report's timeline covers a resumed run whole)."""


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
    is sorted by unit (:func:`spear.units.cut_units`)."""
    unit_col = table["unit"].to_numpy()
    starts = np.searchsorted(unit_col, units, side="left")
    stops = np.searchsorted(unit_col, units, side="right")
    bounds = {u: (int(a), int(b - a)) for u, a, b in zip(units, starts, stops, strict=True)}
    cols = list(columns)
    return lambda u: _ipc(table.slice(*bounds[u]).select(cols))


def unit_rows(
    table: pa.Table, columns: Sequence[str], units: list[int], per_call: int = 1
) -> Iterator[pa.Table]:
    """Tables (``unit``, ``data``) of ``per_call`` units each (the last may have fewer), in
    order: each becomes one Ray Data block, which one actor call takes whole."""
    data = unit_inputs(table, columns, units)
    for k in range(0, len(units), per_call):
        group = units[k : k + per_call]
        yield pa.table(
            {
                "unit": pa.array(group, pa.int32()),
                "data": pa.array([data(u) for u in group], pa.large_binary()),
            }
        )


def decode_rows(
    items: dict[str, np.ndarray],
    decode: Callable[..., dict[str, np.ndarray]],
    decode_kwargs: dict[str, Any],
    domains: tuple[str, ...] | None,
) -> dict[str, np.ndarray]:
    """``items`` with the decode columns (``audio``, ``num_samples``, ``error_type``,
    ``error``, ``decode_seconds``) filled for the rows of ``domains`` (None: all) that no
    earlier stage found bad; other rows keep what they had (no audio). An earlier stage's
    decode of the same row leaves the same ``num_samples``; ``decode_seconds`` adds up."""
    n = len(items["item_id"])
    items = dict(items)
    for key in ("error_type", "error"):
        if key not in items:
            items[key] = np.array([""] * n, dtype=object)
    items.setdefault("num_samples", np.zeros(n, dtype=np.int64))
    items.setdefault("decode_seconds", np.zeros(n))
    audio = np.empty(n, dtype=object)
    audio[:] = [b""] * n
    items["audio"] = audio
    err = items["error_type"]
    sel = np.array(
        [
            i
            for i in range(n)
            if str(err[i]) == "" and (domains is None or str(items["domain"][i]) in domains)
        ],
        dtype=np.int64,
    )
    if not len(sel):
        return items
    keep = ("audio", "num_samples", "error_type", "error", "decode_seconds")
    sub = {k: v[sel] for k, v in items.items() if k not in keep}
    got = decode(sub, **decode_kwargs)
    for name in ("audio", "num_samples", "error_type", "error"):
        col = items[name].copy()
        col[sel] = got[name]
        items[name] = col
    secs = items["decode_seconds"].astype(np.float64)  # a copy: the input may be read-only
    secs[sel] += got.get("decode_seconds", 0.0)
    items["decode_seconds"] = secs
    return items


def _chunks(durations: np.ndarray, seconds: float) -> list[tuple[int, int]]:
    """Consecutive (start, stop) row ranges of at most ``seconds`` of audio (one row at least)."""
    out, start, acc = [], 0, 0.0
    for i, d in enumerate(durations):
        if i > start and acc + float(d) > seconds:
            out.append((start, i))
            start, acc = i, 0.0
        acc += float(d)
    if start < len(durations):
        out.append((start, len(durations)))
    return out


class UnitActor:
    """Base of :func:`unit_actor`'s classes: Ray Data's callable class for one actor stage.

    It builds the stage once per actor (the teacher's weights load here) and runs it on whole
    units: each unit's items are decoded *here*, in chunks of ``chunk_seconds`` of audio, the
    next chunk on a background thread while the stage computes the current one (libsndfile,
    soxr and the range reads release the GIL). So decoded audio never enters the object store
    and an actor holds at most two chunks of it, whatever the unit's size; what leaves the actor
    is the unit's items with the stage's outputs (codes, embeddings), without audio."""

    stage_cls: Any = None

    def __init__(
        self,
        kwargs: dict[str, Any] | None = None,
        *,
        decode: Callable[..., dict[str, np.ndarray]] | None = None,
        decode_kwargs: dict[str, Any] | None = None,
        decodes: tuple[str, ...] | None = None,
        chunk_seconds: float = 1800.0,
        **stage_kwargs: Any,
    ):
        """``kwargs`` (or ``stage_kwargs``) build the stage; ``decode=None``: units arrive
        decoded."""
        from concurrent.futures import ThreadPoolExecutor

        self.stage = self.stage_cls(**(kwargs or {}), **stage_kwargs)
        self.decode = decode
        self.decode_kwargs = decode_kwargs or {}
        self.decodes = decodes
        self.chunk_seconds = chunk_seconds
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="decode-ahead")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = np.empty(len(batch["unit"]), dtype=object)
        data[:] = self.run_many([bytes(d) for d in batch["data"]])
        return {"unit": np.asarray(batch["unit"]), "data": data}

    def run(self, data: bytes) -> bytes:
        """One unit's items (:func:`pack` bytes) decoded and through the stage."""
        return self.run_many([data])[0]

    def run_many(self, units: list[bytes]) -> list[bytes]:
        """Units of one call, in turn: their chunks form one sequence, so the first chunk of
        the next unit is decoded while the stage computes the last of this one."""
        items = [unpack(d) for d in units]
        bounds = [
            (i, a, b)
            for i, it in enumerate(items)
            for a, b in _chunks(
                it["duration"] if "duration" in it else np.ones(len(it["item_id"])),
                self.chunk_seconds,
            )
        ]

        def decoded(k: int) -> dict[str, np.ndarray]:
            i, a, b = bounds[k]
            part = {key: v[a:b] for key, v in items[i].items()}
            if self.decode is None:
                return part
            return decode_rows(part, self.decode, self.decode_kwargs, self.decodes)

        parts: list[list[dict[str, np.ndarray]]] = [[] for _ in items]
        ahead = self.pool.submit(decoded, 0) if bounds else None
        for k, (i, _, _) in enumerate(bounds):
            assert ahead is not None
            chunk = ahead.result()
            ahead = self.pool.submit(decoded, k + 1) if k + 1 < len(bounds) else None
            out = self.stage(chunk)
            out.pop("audio", None)
            parts[i].append(out)
        return [
            pack({key: np.concatenate([p[key] for p in ps]) for key in ps[0]}) if ps else pack(it)
            for it, ps in zip(items, parts, strict=True)
        ]


def unit_actor(stage_cls: type) -> type:
    """A Ray Data callable class that runs ``stage_cls`` (a batch-of-items callable) on units;
    named ``<Stage>Units`` so Ray's actor table says which."""
    return type(
        f"{stage_cls.__name__}Units", (UnitActor,), {"stage_cls": stage_cls, "__module__": __name__}
    )


# ---------------------------------------------------------------------------------------------
# A whole unit job


def decode_timed(
    batch: dict[str, np.ndarray], cfg: DecodeConfig, storage: StorageConfig
) -> dict[str, np.ndarray]:
    """:func:`spear.stages.decode.decode_batch` plus ``decode_seconds`` per row (the batch's
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
    """The pool's largest size; it starts with what fits the cluster (at least one)."""
    device: str = "auto"
    num_gpus: float = 1.0
    num_cpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per actor (an accelerator type, a node label resource)."""
    decodes: tuple[str, ...] | None = None
    """Domains of the items this stage's actors decode and run on (None: every item)."""


@dataclass(frozen=True)
class UnitJob:
    """What a job plugs into the skeleton."""

    kind: str
    """``tokenize``, ``embed ...``, ``features``: progress and error messages."""
    out: str
    unit_prefix: str
    """Units are named ``{unit_prefix}-NNNNN``."""
    columns: tuple[str, ...]
    """The item columns a unit carries into the stages (the plan digests those its job names)."""
    outputs: Callable[[str], list[str]]
    """Files (relative to ``out``) a committed unit of this name must have published."""
    actors: list[ActorStage]
    writer: Callable[[int, dict[str, np.ndarray]], tuple[dict[str, bytes], dict[str, Any]]]
    decode: DecodeConfig
    decode_fn: Callable[..., dict[str, Any]] = decode_timed
    """How an actor decodes a chunk of items (``decode_fn(items, cfg=decode, storage=...)``);
    benchmarks put a stub here."""
    chunk_seconds: float = 1800.0
    """Audio an actor decodes at once (and one more chunk ahead): 30 min, 58 MB of int16."""
    write_cpus: float = 0.25
    """CPU share of a write task (Parquet encoding, a few object-store puts)."""
    progress_seconds: float = 30.0
    layout: str = ""
    """Which layout of actor pools runs (e.g. teachers fused or one pool per teacher): said
    once in the console's start-up line."""
    max_units_per_call: int = 1
    """The most units one actor call takes when the job chooses
    (:func:`spear.units.units_per_call`); ``ray.units_per_call`` overrides it."""

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
    job: UnitJob, record: RunRecord, table: pa.Table, storage: StorageConfig, ray_cfg: RayConfig
) -> UnitRun:
    """Check ``record`` against ``job.out``, recover a killed run's leftovers, run the units
    not yet committed (``table``: the record's items with their ``unit`` column), and return
    every unit's entry."""
    out = job.out
    check_record(out, record, storage, made=bool(committed_names(out, storage)))
    done = recover(out, storage, job.outputs)
    names = [job.name(u) for u in range(record.units or 0)]
    todo = [u for u, n in enumerate(names) if n not in done]
    new: dict[str, dict[str, Any]] = {}
    progress = None
    if todo:
        new, progress = _run_dataset(job, table, todo, storage, ray_cfg)
    # Units of earlier runs, and any whose entry this run's feed missed (a write task retried
    # after its commit): read from their commit files.
    entries = read_entries(out, [n for n in names if n not in new], storage) | new
    missing = [n for n in names if n not in entries]
    if missing:
        raise SpearError(f"{job.kind}: units {missing[:5]} did not finish; re-run the same command")
    clean_attempts(out, storage)
    return UnitRun([entries[n] for n in names], len(names) - len(todo), progress)


def _pending(table: pa.Table, todo: list[int]) -> tuple[int, float]:
    mask = np.isin(table["unit"].to_numpy(), todo)
    return int(mask.sum()), float(np.sum(table["duration"].to_numpy()[mask])) / 3600


class EntryFeed:
    """A small actor the write tasks hand each committed entry to; the driver takes them
    about once a second for the progress line (the entries also stay in the commit files)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)

    def take(self) -> list[dict[str, Any]]:
        out, self.entries = self.entries, []
        return out


def write_unit(
    unit: int,
    data: bytes,
    writer: Callable[[int, dict[str, Any]], tuple[dict[str, bytes], dict[str, Any]]],
    out: str,
    storage: StorageConfig,
) -> dict[str, Any]:
    """``writer`` builds the unit's files and entry; the commit protocol makes them final.
    Returns the committed entry (all the driver ever receives of a unit)."""
    t0 = time.perf_counter()
    files, entry = writer(unit, unpack(data))
    name = entry.pop("name")
    committed = commit_unit(out, name, files, entry | {"unit": unit}, storage)
    return committed | {"write_seconds": round(time.perf_counter() - t0, 4)}


def commit_sink(job: UnitJob, storage: StorageConfig, feed: Any) -> Any:
    """The job's Ray Data ``Datasink``: each write task runs the commit protocol
    (``spear/commit.py``) on the units of its blocks, under their planned names, and hands
    each committed entry to ``feed``. A task Ray retries (its worker died) or a duplicate loses
    the exclusive commit and returns the winner's entry: every unit ends committed once."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class CommitSink(Datasink[list[dict[str, Any]]]):
        def __init__(self) -> None:
            self.entries: list[dict[str, Any]] = []

        def write(self, blocks: Any, ctx: Any) -> list[dict[str, Any]]:
            done = []
            for block in blocks:
                batch = BlockAccessor.for_block(block).to_batch_format("numpy")
                for unit, data in zip(batch["unit"], batch["data"], strict=True):
                    entry = write_unit(int(unit), bytes(data), job.writer, job.out, storage)
                    feed.add.remote(entry)
                    done.append(entry)
            return done

        def on_write_complete(self, write_result: Any) -> None:
            self.entries = [e for r in write_result.write_returns for e in r]

        def get_name(self) -> str:
            return f"Commit({job.unit_prefix})"

    return CommitSink()


def _run_dataset(
    job: UnitJob,
    table: pa.Table,
    todo: list[int],
    storage: StorageConfig,
    ray_cfg: RayConfig,
) -> tuple[dict[str, dict[str, Any]], Progress]:
    """Size the job against the cluster, then stream its units through Ray Data: a dataset of
    the units' item lists, one ``map_batches`` actor pool per stage, the commit sink."""
    init_ray(ray_cfg, job.out)
    import ray
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    asked = [a.num_actors for a in job.actors]

    def sized(cpus: float) -> list[Demand]:
        # Sized against each pool's minimum (one actor) and one write task; CPU-computing
        # actors share what the cluster has beside the write task.
        share = cpu_share(cpus, sum(asked), job.write_cpus)
        demands = [Demand("write", 1, job.write_cpus)]
        for a in job.actors:
            res = actor_resources(a.device, a.num_gpus, gpus, a.num_cpus, share)
            demands.append(Demand(a.name, 1, res["num_cpus"], res["num_gpus"], a.resources))
        return demands

    free, cpus = fit_now(sized, autoscaling=ray_cfg.autoscaling)
    demands = sized(cpus)
    left = dict(free)
    left["CPU"] = left.get("CPU", 0.0) - job.write_cpus
    sizes = asked if ray_cfg.autoscaling else pool_sizes(demands[1:], asked, left)
    short = [
        f"{n} of {a.num_actors} {a.name} actors"
        for a, n in zip(job.actors, sizes, strict=True)
        if n < a.num_actors
    ]
    if short:
        log.warning(
            "%s: the cluster has room for %s now; running with those (a pool grows to its "
            "size when resources free up)",
            job.kind,
            ", ".join(short),
        )
    per_call = units_per_call(len(todo), max(asked), ray_cfg.units_per_call, job.max_units_per_call)
    ds: Any = ray.data.from_arrow(list(unit_rows(table, job.columns, todo, per_call)))
    decode_kwargs = {"cfg": job.decode, "storage": storage.resolved()}
    for a, d, n in zip(job.actors, demands[1:], sizes, strict=True):
        ds = ds.map_batches(
            unit_actor(a.cls),
            fn_constructor_kwargs={
                "kwargs": a.kwargs,
                "decode": job.decode_fn,
                "decode_kwargs": decode_kwargs,
                "decodes": a.decodes,
                "chunk_seconds": job.chunk_seconds,
            },
            batch_size=per_call,  # one block, one call
            batch_format="numpy",
            compute=ActorPoolStrategy(
                min_size=1,
                max_size=a.num_actors,
                initial_size=min(n, a.num_actors),
                # One unit running, one waiting: the actor never idles between units.
                max_tasks_in_flight_per_actor=2,
            ),
            num_cpus=d.num_cpus,
            num_gpus=d.num_gpus or None,
            resources=dict(a.resources) or None,
        )
    feed: Any = ray.remote(EntryFeed).options(num_cpus=0).remote()
    sink = commit_sink(job, storage.resolved(), feed)
    progress = Progress(
        job.kind, *_pending(table, todo), len(todo), job.progress_seconds, job.unit_prefix
    )
    failed: list[BaseException] = []

    def execute() -> None:
        try:
            ds.write_datasink(sink, ray_remote_args={"num_cpus": job.write_cpus, "max_retries": 3})
        except BaseException as err:  # handed to the driver's thread, which raises it
            failed.append(err)

    entries: dict[str, dict[str, Any]] = {}

    def take() -> None:
        for e in ray.get(feed.take.remote()):
            if e["name"] not in entries:
                entries[e["name"]] = e
                progress.add(e)

    runner = threading.Thread(target=execute, name="ray-data", daemon=True)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record = join(job.out, PROGRESS, f"{started.replace(':', '')}-{uuid.uuid4().hex[:6]}.json")

    def save() -> None:
        # This invocation's timeline, kept where a resumed run's report finds it (a killed
        # invocation's up to its last save).
        rec = {"started": started, "wall_seconds": round(time.time() - progress.t0, 3)}
        rec |= {"shards_done": progress.units, "timeline": progress.timeline}
        write_atomic(record, json.dumps(rec).encode(), storage)

    saved = time.monotonic()
    try:
        with progress:
            progress.status(
                f"starting{f' ({job.layout})' if job.layout else ''}: "
                + ", ".join(
                    f"{n} {a.name} actor{'s' * (n > 1)}"
                    for a, n in zip(job.actors, sizes, strict=True)
                )
                + " loading"
                + (f"; {per_call} {job.unit_prefix}s per call" if per_call > 1 else "")
            )
            runner.start()
            last = time.monotonic()
            while runner.is_alive():
                runner.join(timeout=1.0)
                before = len(entries)
                take()
                if len(entries) > before:
                    last = time.monotonic()
                    if last - saved >= job.progress_seconds:
                        save()
                        saved = last
                elif time.monotonic() - last > ray_cfg.stall_seconds:
                    raise SpearError(
                        f"{job.kind}: no unit finished in {ray_cfg.stall_seconds:g} s; the "
                        "cluster may lack the resources the job asks for (see `ray status`), "
                        "or raise the stall limit (ray.stall_seconds)"
                    )
            take()
            if failed:
                raise failed[0]
            for e in sink.entries:  # entries the feed missed (a lost actor call)
                if e["name"] not in entries:
                    entries[e["name"]] = e
                    progress.add(e)
        save()
    finally:
        ray.kill(feed)
        forget_listings(job.out, storage)  # the workers wrote there
    return entries, progress
