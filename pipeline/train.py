"""``spear train``: the driver of student pre-training on Ray Train.

Steps:
1. Open the token shards through the contract (:func:`spear.shards.index.open_run`: the index,
   every shard's metadata checked, one set of quantisers), check that the student's heads
   match the shards' teachers (names, codebooks, rates), start/join Ray, check that the
   workers and data preparation fit the cluster.
2. The training workers run :func:`spear.student.recipe.train_loop`: each plans its epoch over
   the indexed shards (:func:`spear.student.data.plan_epoch`, order a function of (seed,
   epoch)) and has Ray CPU tasks decode and mix its batches ahead of training
   (:func:`spear.student.data.prepare_batch`); the fbank is computed on the worker's device.
   The last ``data.val_shards`` shards are held out for the validation loss.
3. Checkpoints go to ``OUT/train/`` (any fsspec URL); re-running the same command resumes from
   the latest one. ``FailureConfig`` retries worker failures from the latest checkpoint.
   ``OUT/plan.json`` is the run record (``spear/record.py``): the token run, the quantisers and
   the student config; a resume onto other shards, quantisers or student config is refused
   before Ray starts, naming what differs.
4. While it runs: one live line on the driver (:class:`TrainConsole`), fed by rank 0's
   ``ray.train.report`` through a Ray Train callback on the controller and a Ray queue;
   ``OUT/metrics/step-*.json`` and ``OUT/tensorboard/`` from rank 0.
5. At the end: ``OUT/student.pt`` (loads with ``Student.from_checkpoint``), ``OUT/student-avg.pt``
   (the running average over the whole run, :mod:`spear.student.averaging`) and
   ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from spear.errors import SpearError
from spear.pipeline.progress import fmt_seconds
from spear.pipeline.resources import Demand, fit_now
from spear.ray_utils import RayConfig, init_ray
from spear.record import RunRecord, check_record
from spear.shards.index import TokenRun, open_run
from spear.stages.decode import DecodeConfig
from spear.storage import (
    StorageConfig,
    check_url,
    filesystem,
    join,
    protocol_of,
    read_bytes,
    write_atomic,
)
from spear.student.averaging import AVERAGE_FILE, average_between, averaged_student
from spear.student.config import TrainConfig
from spear.student.model import STUDENT_FILE, Student
from spear.student.recipe import (
    METRICS_DIR,
    METRICS_FILE,
    check_heads,
    heads_from_shards,
    train_loop,
)
from spear.student.runlog import META_FILE, TrainedOn

log = logging.getLogger(__name__)

RUN_NAME = "train"
"""Checkpoints go to ``OUT/train/checkpoint_*``."""
PLAN_FILE = "plan.json"
"""``OUT/plan.json``: the run record (what the run trains on and with which settings)."""
AVERAGE_STUDENT = "student-avg.pt"
"""``OUT/student-avg.pt``: the running average of the whole run."""
CONSOLE_EVERY = 30.0
"""Seconds between progress lines when stderr is not a terminal."""


@dataclass
class TrainResult:
    steps: int
    metrics: dict[str, Any]
    """The last reported metrics."""
    checkpoint: str | None
    """The latest checkpoint folder (URL)."""
    student_url: str
    """``OUT/student.pt``."""
    average_url: str | None = None
    """``OUT/student-avg.pt`` (None when the checkpoint holds no running average)."""


def _pyarrow_fs(url: str, storage: StorageConfig) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) for Ray: fsspec's view wrapped, so every fsspec URL
    and our S3 endpoint settings work; plain local paths use Ray's default."""
    if protocol_of(url) == "file":
        return os.path.abspath(url.removeprefix("file://")), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    # s3fs refuses multipart writes (checkpoints) with blocks under 5 MB.
    storage = dataclasses.replace(storage, block_size=max(storage.block_size, 8 << 20))
    fs, path = filesystem(url, storage)
    return path, PyFileSystem(FSSpecHandler(fs))


def _merge_metrics(out_url: str, storage: StorageConfig) -> None:
    """``OUT/metrics/step-*.json`` (every run and resume) -> ``OUT/metrics.jsonl``, by step."""
    fs, path = filesystem(join(out_url, METRICS_DIR), storage)
    if not fs.exists(path):
        return
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
    blobs = fs.cat(names) if names else {}
    lines = [blobs[k].decode().strip() for k in sorted(blobs)]
    write_atomic(join(out_url, METRICS_FILE), ("\n".join(lines) + "\n").encode(), storage)


def split_shards(files: list[str], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(training shards, held-out validation shards: the index's last ``data.val_shards``);
    one clear error when too few are left to give every worker a shard."""
    n_val = cfg.data.val_shards
    train, val = files[: len(files) - n_val], files[len(files) - n_val :]
    if len(train) < cfg.num_workers:
        raise SpearError(
            f"{len(files)} token shards, {n_val} held out for validation: fewer than the "
            f"{cfg.num_workers} training workers (each reads its own shards); lower "
            "train.data.val_shards or train.num_workers"
        )
    return train, val


# ---------------------------------------------------------------- what the run trains on


def trained_on(run: TokenRun, shards_url: str) -> TrainedOn:
    """The token run id (the first shard's ``run_id`` metadata; every shard of one tokenize
    run carries the same) and the quantiser ids (checked equal over all shards by
    :func:`open_run`)."""
    import pyarrow.parquet as pq

    from spear.formats import read_metadata

    fs, path = filesystem(run.url(run.entries[0]), run.storage)
    with fs.open(path, "rb") as f:
        meta = read_metadata(pq.ParquetFile(f).schema_arrow)
    return TrainedOn(
        token_run=str(meta.get("run_id") or ""),
        quantizers={t.prefix: t.quantizer_id for t in run.teachers},
        shards=shards_url,
    )


def _has_checkpoint(out_url: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(join(out_url, RUN_NAME), storage)
    return fs.exists(path) and bool(fs.glob(path.rstrip("/") + "/checkpoint_*"))


def train_record(
    cfg: TrainConfig, on: TrainedOn, *, shards: int, items: int, audio_hours: float
) -> RunRecord:
    """The training run's record (``spear/record.py``): the token run it reads (its id, the
    tokenize run's content digest), the quantisers and the student config decide the outputs;
    the whole train config and where the shards were read are recorded only (a resume may
    train longer, on more workers, or from a copy of the shards)."""
    from spear.configio import to_dict

    return RunRecord(
        "train",
        {"quantizers": dict(on.quantizers), "student": to_dict(cfg.student)},
        on.token_run,
        "token run",
        items,
        shards,
        {"trained_on": on.as_dict(), "audio_hours": audio_hours, "train": to_dict(cfg)},
    )


def check_train_record(out_url: str, record: RunRecord, storage: StorageConfig) -> None:
    """Write ``OUT/plan.json``; a run whose OUT already holds checkpoints of another record
    (other tokens, quantisers or student config) is refused naming what differs (one line,
    before Ray starts). Without checkpoints the old record is replaced (nothing was trained)."""
    made = _has_checkpoint(out_url, storage)
    check_record(out_url, record, storage, made=made, path=PLAN_FILE)


# ---------------------------------------------------------------- the live line


def console_text(m: dict[str, Any], prev: dict[str, Any] | None) -> str:
    """One progress line from rank 0's reported metrics (``prev``: the report before, for
    rates over the whole cluster; without it rank 0's own rate x workers is shown)."""
    step, total = int(m.get("step", 0)), int(m.get("max_steps", 0))
    heads = sorted(k for k in m if k.startswith("loss_"))
    parts = [f"step {step:,}/{total:,}" if total else f"step {step:,}"]
    if isinstance(m.get("loss"), (int, float)):
        per = ", ".join(f"{k[5:]} {m[k]:.3f}" for k in heads)
        parts.append(f"loss {m['loss']:.4f}" + (f" ({per})" if per else ""))
    hours, elapsed = float(m.get("hours", 0.0)), float(m.get("elapsed", 0.0))
    rate = step_time = None
    if prev is not None and float(prev.get("elapsed", 0.0)) < elapsed:
        dt = elapsed - float(prev["elapsed"])
        rate = (hours - float(prev.get("hours", 0.0))) / dt
        steps = step - int(prev.get("step", 0))
        step_time = dt / steps if steps > 0 else None
    if rate is None and isinstance(m.get("audio_s_per_s"), (int, float)):
        rate = float(m["audio_s_per_s"]) * int(m.get("workers", 1)) / 3600
    if step_time is None and isinstance(m.get("step_time"), (int, float)):
        step_time = float(m["step_time"])
    if rate is not None:
        parts.append(f"{rate:.3g} audio h/s")
    sched = f"{hours:,.2f} h seen"
    if isinstance(m.get("schedule_batch"), (int, float)):
        sched += f", schedule batch {m['schedule_batch']:,.0f}"
    if isinstance(m.get("eden_lr_batches"), (int, float)):
        sched += (
            f", Eden {step:,}/{m['eden_lr_batches']:,.0f} steps "
            f"{hours:,.2f}/{m.get('eden_lr_hours', 0):,.0f} h"
        )
    parts.append(sched)
    eta = (total - step) * step_time if total and step_time is not None else float("inf")
    parts.append(f"elapsed {fmt_seconds(elapsed)}, ETA {fmt_seconds(eta)}")
    return " | ".join(parts)


class TrainConsole:
    """The driver's live view of a training run: a rich line on a terminal, an INFO line every
    ``every`` seconds otherwise. ``show`` takes rank 0's reported metrics."""

    def __init__(self, max_steps: int, workers: int, every: float = CONSOLE_EVERY) -> None:
        from spear.console import live

        self.max_steps, self.workers, self.every = max_steps, workers, every
        self.prev: dict[str, Any] | None = None
        self.last_text = ""
        self.shown = 0
        self._last_log = float("-inf")
        self._last_logged = ""
        self._live: Any = None
        self._task: Any = None
        self._tty = live() and sys.stderr.isatty()

    @staticmethod
    def disabled() -> bool:
        return os.environ.get("RAY_TRAIN_V2_ENABLED", "1").lower() in ("0", "false")

    def __enter__(self) -> TrainConsole:
        if self._tty:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._live = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.fields[line]}"),
                console=Console(stderr=True),
            )
            self._live.start()
            self._task = self._live.add_task("train", total=self.max_steps, line="starting")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
        elif self.last_text and self._last_logged != self.last_text:
            log.info("train: %s", self.last_text)

    def show(self, metrics: dict[str, Any]) -> None:
        m = {"workers": self.workers, "max_steps": self.max_steps} | metrics
        self.last_text = console_text(m, self.prev)
        self.prev, self.shown = m, self.shown + 1
        if self._live is not None:
            self._live.update(self._task, completed=int(m.get("step", 0)), line=self.last_text)
            return
        now = time.monotonic()
        if now - self._last_log >= self.every:
            self._last_log = now
            self._last_logged = self.last_text
            log.info("train: %s", self.last_text)


def _reports_callback(queue: Any) -> Any:
    """A Ray Train callback (it runs on the controller) that puts rank 0's reported metrics
    on ``queue`` for the driver."""
    from ray.train import UserCallback

    class ToDriver(UserCallback):
        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            if metrics and metrics[0]:
                queue.put_nowait(dict(metrics[0]))

    return ToDriver()


class _Watch:
    """Feeds a :class:`TrainConsole` from the callback's queue on a driver thread while
    ``trainer.fit()`` blocks the main one."""

    def __init__(self, console: TrainConsole) -> None:
        from ray.util.queue import Queue

        self.console = console
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spear-train-console", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.queue.shutdown()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor is gone (shutdown): nothing more to show
                log.debug("train console queue closed", exc_info=True)
                return
            self.console.show(item)


# ---------------------------------------------------------------- averaging


def checkpoint_folders(out_url: str, storage: StorageConfig) -> list[tuple[int, str]]:
    """(step, URL) of the checkpoints under ``OUT/train/`` that record their step (in
    ``meta.json``), by step."""
    fs, path = filesystem(join(out_url, RUN_NAME), storage)
    if not fs.exists(path):
        return []
    metas = fs.glob(path.rstrip("/") + f"/checkpoint_*/{META_FILE}")
    found = []
    for meta in metas:
        step = int(json.loads(fs.cat_file(meta))["step"])
        folder = meta.rsplit("/", 1)[0].rsplit("/", 1)[1]
        found.append((step, join(out_url, RUN_NAME, folder)))
    return sorted(found)


def _load(url: str, storage: StorageConfig) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(
        io.BytesIO(read_bytes(url, storage)), map_location="cpu", weights_only=True
    )
    return state


def average_run(
    out_url: str, storage: StorageConfig, start: int = 0, end: int | None = None
) -> tuple[dict[str, Any], str]:
    """A ``student.pt`` dict of the model averaged over steps ``(start, end]`` of the run at
    ``out_url`` (icefall's ``--use-averaged-model``), from the running averages saved in its
    checkpoints: ``end`` (default the latest) must be a kept checkpoint, and so must ``start``
    unless it is 0 (then the whole run's average). Returns the dict and a one-line summary."""
    found = checkpoint_folders(out_url, storage)
    if not found:
        raise SpearError(f"no training checkpoints with a step record under {out_url}/{RUN_NAME}")
    steps = {s: u for s, u in found}
    end = found[-1][0] if end is None else end
    if end not in steps:
        raise SpearError(f"no checkpoint at step {end} (kept: {sorted(steps)})")
    if start and start not in steps:
        raise SpearError(f"no checkpoint at step {start} to average from (kept: {sorted(steps)})")
    if start >= end:
        raise SpearError(f"the average must start before it ends (steps {start} and {end})")
    try:
        end_avg = _load(join(steps[end], AVERAGE_FILE), storage)
    except FileNotFoundError:
        raise SpearError(f"{steps[end]} holds no running average ({AVERAGE_FILE})") from None
    if start:
        start_avg = _load(join(steps[start], AVERAGE_FILE), storage)
    else:
        start_avg = {"step": 0, "period": end_avg["period"], "model": end_avg["model"]}
    try:
        weights = average_between(start_avg, end_avg) if start else end_avg["model"]
    except ValueError as err:
        raise SpearError(str(err)) from None
    base = _load(join(steps[end], STUDENT_FILE), storage)
    info = {"from_step": int(start_avg["step"]), "to_step": int(end_avg["step"])}
    state = averaged_student(base, weights, info | {"period": int(end_avg["period"])})
    Student.from_state(state)  # it loads
    text = (
        f"steps {info['from_step']}-{info['to_step']} (every {end_avg['period']}) "
        f"of checkpoint step {end}"
    )
    return state, text


def save_state(state: dict[str, Any], url: str, storage: StorageConfig) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(url, buf.getvalue(), storage)


def in_loop_probe(cfg: TrainConfig, storage: StorageConfig, decode: DecodeConfig) -> Any:
    """What rank 0 calls to build its in-loop probe (None without ``probe_every``): a picklable
    partial of :class:`spear.probe.InLoopProbe`, so the recipe needs no import of the probe's
    teachers."""
    if not cfg.probe_every:
        return None
    if not cfg.probe_labels:
        raise SpearError("train.probe_every needs train.probe_labels (a labelled manifest)")
    import functools

    from spear.probe import InLoopProbe, ProbeConfig

    pcfg = ProbeConfig(label_column=cfg.probe_label_column, steps=cfg.probe_steps, seed=cfg.seed)
    return functools.partial(
        InLoopProbe, cfg.probe_labels, pcfg, storage, cfg.probe_teacher, decode
    )


def _fit(
    files: list[str],
    val_files: list[str],
    cfg: TrainConfig,
    decode: DecodeConfig,
    storage: StorageConfig,
    use_gpu: bool,
    storage_path: str,
    storage_fs: Any,
    out_url: str,
    on: TrainedOn,
    callbacks: list[Any],
) -> Any:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "teachers": {h.name: h.num_codebooks for h in cfg.student.heads},
            "rates": {h.name: h.frame_rate for h in cfg.student.heads},
            "files": files,
            "val_files": val_files,
            "decode": decode,
            "metrics_url": join(out_url, METRICS_DIR),
            "out_url": out_url,
            "storage": storage,
            "trained_on": on.as_dict(),
            "probe": in_loop_probe(cfg, storage, decode),
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    try:
        return trainer.fit()
    except Exception as err:
        # Ray wraps worker errors (V1 and V2 define their own TrainingFailedError); the user
        # needs one line: the worker's own SpearError when there is one.
        if type(err).__name__ != "TrainingFailedError":
            raise
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, SpearError):
            cause = cause.__cause__
        raise SpearError(f"training failed: {cause or err}") from err


def _check_extras(cfg: TrainConfig, out_url: str, storage: StorageConfig) -> None:
    """``init_from`` and ``probe_labels`` fail in one line before Ray starts."""
    from spear.probe import read_labels
    from spear.student.recipe import build_student

    if cfg.init_from and not _has_checkpoint(out_url, storage):
        build_student(cfg, storage, resuming=False)  # loads and checks the encoder's shape
    if cfg.probe_every and cfg.probe_labels:
        read_labels(cfg.probe_labels, cfg.probe_label_column, storage)


def run_train(
    shards_url: str,
    out_url: str,
    cfg: TrainConfig,
    storage: StorageConfig,
    ray_cfg: RayConfig,
    decode: DecodeConfig | None = None,
) -> TrainResult:
    """Train (or resume training) the student on the token shards at ``shards_url``;
    checkpoints and the final ``student.pt`` go to ``out_url``. ``decode``: how the shards'
    audio is decoded (the config's ``decode`` section, as for the tokenize run)."""
    decode = decode or DecodeConfig()
    check_url(shards_url)
    check_url(out_url)
    storage = storage.resolved()
    run = open_run(shards_url, storage)
    if not run.entries:
        raise SpearError(f"{shards_url!r} holds no token shards")
    files, teachers = run.urls(), run.teachers
    heads = heads_from_shards(cfg.student, teachers)
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, heads=heads))
    check_heads(cfg.student, teachers)
    train_files, val_files = split_shards(files, cfg)
    on = trained_on(run, shards_url)
    _check_extras(cfg, out_url, storage)
    hours = sum(e.audio_seconds for e in run.entries) / 3600
    record = train_record(cfg, on, shards=len(run.entries), items=run.num_rows, audio_hours=hours)
    check_train_record(out_url, record, storage)
    init_ray(ray_cfg, out_url)
    import ray

    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    # The training workers hold their CPUs (and GPUs) for the whole run; data preparation
    # needs at least one more task's worth, or it never runs: Ray Data waits forever for it.
    fit_now(
        lambda _: [
            Demand("train workers", cfg.num_workers, cfg.cpus_per_worker, 1.0 if use_gpu else 0.0),
            Demand("data preparation", 1, cfg.data.prep_cpus),
        ],
        autoscaling=ray_cfg.autoscaling,
    )
    storage_path, storage_fs = _pyarrow_fs(out_url, storage)
    console = TrainConsole(cfg.max_steps, cfg.num_workers)
    if console.disabled():
        # Ray Train V1's RunConfig takes Tune callbacks only: no live line, said once.
        log.warning("train: no live progress line with RAY_TRAIN_V2_ENABLED=0 (Ray Train V1)")
    with console, _Watch(console) as watch:
        result = _fit(
            train_files,
            val_files,
            cfg,
            decode,
            storage,
            use_gpu,
            storage_path,
            storage_fs,
            out_url,
            on,
            [] if console.disabled() else [_reports_callback(watch.queue)],
        )
    _merge_metrics(out_url, storage)
    ckpt = result.checkpoint
    student_url = join(out_url, STUDENT_FILE)
    average_url = None
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            with open(os.path.join(folder, STUDENT_FILE), "rb") as f:
                data = f.read()
            # Checked to load; written as is (it carries what the run trained on).
            Student.from_state(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
            write_atomic(student_url, data, storage)
            if os.path.exists(os.path.join(folder, AVERAGE_FILE)):
                state, text = average_run(out_url, storage)
                average_url = join(out_url, AVERAGE_STUDENT)
                save_state(state, average_url, storage)
                log.info("train: averaged student (%s): %s", text, average_url)
    metrics = dict(result.metrics or {})
    return TrainResult(
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint=None if ckpt is None else str(ckpt.path),
        student_url=student_url,
        average_url=average_url,
    )
