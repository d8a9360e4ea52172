"""The student's training recipe on each Ray Train worker: setup, train, checkpoint.

One recipe, not a framework (``pipeline/train.py`` is the driver that starts it):

* :func:`heads_from_shards`, :func:`check_heads` - the heads take their shapes from the shards'
  teachers; a head without tokens is an error.
* :func:`train_loop` - each worker (``TorchTrainer``, gloo on CPU, NCCL on GPU): DDP student,
  ScaledAdam + Eden (or AdamW), batches of ``batch_seconds`` audio from length buckets
  (:func:`spear.student.data.plan_epoch`: this worker's order, a function of (seed, epoch)),
  decoded and mixed by Ray CPU tasks ahead of training, fbank on the worker's device,
  ``accum_steps`` batches per optimiser step, bf16/fp16 autocast on GPU. Workers agree every
  step on whether all still have a batch (DDP needs equal step counts) and on the audio
  seconds seen (Eden's "hours").
* Every ``checkpoint_every`` steps: ``student.pt`` + ``train_state.pt`` (rank 0) and
  ``rng-<rank>.pt`` (every rank) reported as one ``ray.train.Checkpoint``; a resumed run
  recomputes the interrupted epoch's plan and starts preparing at the first batch not trained
  on (nothing of the batches before it is read, decoded or fbank-ed).
* Every ``val_every`` steps (and at the end) rank 0 evaluates the loss on the first
  ``data.val_batches`` batches of the held-out shards (no masking, no mixing) and adds
  ``val_loss``/``val_loss_<teacher>`` to that step's metrics.

* Every ``probe_every`` steps (and at the end) rank 0 runs the linear probes of
  :mod:`spear.probe` (built by the driver) on ``probe_labels`` and adds ``probe_<layer>``
  accuracies to the metrics.
* :func:`build_student` - the initial student: new, or with ``init_from``'s encoder (a
  ``student.pt`` or a SPEAR release folder) and new heads; a resumed run loads its checkpoint
  over it instead.

Logs (rank 0, every ``log_every`` steps): step, loss, loss per teacher, lr, audio hours seen,
audio seconds/s per worker, tokens/s, and the fraction of time spent waiting for data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from spear.errors import SpearError
from spear.shards.schema import TokenTeacherInfo
from spear.student.averaging import ModelAverage
from spear.student.checkpointing import (
    TrainPosition,
    load_train_state,
    rng_state,
    set_rng_state,
    train_state_dict,
)
from spear.student.config import HeadConfig, MixConfig, Precision, StudentConfig, TrainConfig
from spear.student.data import ShardRows, plan_epoch, prepare_batch, stream_batches
from spear.student.model import (
    STUDENT_FILE,
    AudioBatch,
    StepStats,
    Student,
    compute_loss,
    train_step,
    unwrap,
)
from spear.student.optim import build_optimizer
from spear.student.runlog import (
    RankZeroLog,
    RunClock,
    TrainedOn,
    restore_extras,
    save_extras,
    schedule_position,
)

log = logging.getLogger(__name__)

METRICS_DIR = "metrics"
METRICS_FILE = "metrics.jsonl"


def heads_from_shards(
    cfg: StudentConfig, teachers: list[TokenTeacherInfo]
) -> tuple[HeadConfig, ...]:
    """The configured heads with their shapes (C, K, frame rate) taken from the shards' tokens:
    the loss weights are the recipe's, the codebook shapes the data's. A head whose teacher the
    shards lack is dropped with a warning (a WavLM-only tokenize run trains a WavLM-only
    student); none left is an error."""
    found = {t.prefix: t for t in teachers}
    heads = []
    for h in cfg.heads:
        t = found.get(h.name)
        if t is None:
            log.warning("train: the shards carry no %r tokens; training without that head", h.name)
            continue
        shape = (t.num_codebooks, t.codebook_size, t.frame_rate)
        if shape != (h.num_codebooks, h.codebook_size, h.frame_rate):
            log.warning(
                "train: head %r set to the shards' %dx%d codes at %g Hz (configured %dx%d at %g)",
                h.name,
                *shape,
                h.num_codebooks,
                h.codebook_size,
                h.frame_rate,
            )
        heads.append(
            dataclasses.replace(
                h,
                num_codebooks=t.num_codebooks,
                codebook_size=t.codebook_size,
                frame_rate=t.frame_rate,
            )
        )
    if not heads:
        raise SpearError(
            f"the shards carry tokens of {sorted(found)}, the student's heads are "
            f"{[h.name for h in cfg.heads]}: nothing to train; set train.student.heads"
        )
    return tuple(heads)


def check_heads(cfg: StudentConfig, teachers: list[TokenTeacherInfo]) -> None:
    """Fail with one line when a head has no matching tokens in the shards."""
    found = {t.prefix: t for t in teachers}
    for h in cfg.heads:
        t = found.get(h.name)
        if t is None:
            raise SpearError(
                f"the student has a {h.name!r} head but the shards carry tokens of "
                f"{sorted(found)}; set train.student.heads to match"
            )
        if (t.num_codebooks, t.codebook_size) != (h.num_codebooks, h.codebook_size):
            raise SpearError(
                f"head {h.name!r}: {h.num_codebooks}x{h.codebook_size} codes, the shards hold "
                f"{t.num_codebooks}x{t.codebook_size}"
            )
        if abs(t.frame_rate - h.frame_rate) > 1e-6:
            raise SpearError(
                f"head {h.name!r}: frame rate {h.frame_rate} Hz, the shards' is {t.frame_rate} Hz"
            )


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def _all_reduce(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


class _Data:
    """This worker's data: the epoch plans over the training shards, decode/mix in Ray CPU
    tasks (``prepare_batch``), and the held-out validation batches."""

    def __init__(self, config: dict[str, Any], rank: int, world: int) -> None:
        import ray

        self.cfg: TrainConfig = config["cfg"]
        self.teachers: dict[str, int] = config["teachers"]
        self.rank, self.world = rank, world
        self.files: list[str] = config["files"]
        self.val_files: list[str] = config.get("val_files", [])
        self.storage = config["storage"]
        kwargs = {
            "teachers": self.teachers,
            "rates": config["rates"],
            "data": self.cfg.data,
            "decode": config["decode"],
            "storage": self.storage,
            "seed": self.cfg.seed,
        }
        task: Any = ray.remote(num_cpus=self.cfg.data.prep_cpus)(prepare_batch)  # type: ignore[arg-type]
        self.prepare = lambda rows, mix=self.cfg.mix: task.remote(rows, mix=mix, **kwargs)
        self.resolve = ray.get
        self._val: list[AudioBatch] | None = None
        self.dropped: Counter[str] = Counter()
        """Training rows this worker's readers dropped (a file changed since its manifest,
        ...), by reason, over the whole run so far; the metric ``dropped`` sums every rank's.
        Each drop is also a warning naming the item and the reason."""

    def epoch(self, epoch: int, skip: int, stats: dict[str, float]) -> Iterator[tuple[int, Any]]:
        """(plan index, batch) from index ``skip`` of ``epoch``; ``stats['wait']`` accumulates
        seconds spent waiting for data."""
        reader = ShardRows(self.files, list(self.teachers), self.storage)
        reader.dropped = self.dropped  # one count over every epoch
        d = self.cfg.data
        plan = plan_epoch(
            len(self.files),
            reader.light,
            d,
            planned=reader.planned,
            seed=self.cfg.seed,
            epoch=epoch,
            rank=self.rank,
            world=self.world,
        )
        it = stream_batches(
            plan,
            reader,
            self.prepare,
            self.teachers,
            skip=skip,
            prep_rows=d.prep_rows,
            prefetch=d.prefetch_batches,
            resolve=self.resolve,
        )
        while True:
            t0 = time.perf_counter()
            nxt = next(it, None)
            stats["wait"] += time.perf_counter() - t0
            if nxt is None:
                return
            yield nxt

    def validation(self) -> list[AudioBatch]:
        """The held-out batches: the first ``val_batches`` of the validation shards' epoch-0
        plan, unweighted and unmixed; prepared once, kept on the host."""
        if self._val is None:
            d = dataclasses.replace(self.cfg.data, source_weights={}, domain_weights={})
            reader = ShardRows(self.val_files, list(self.teachers), self.storage)
            plan = plan_epoch(
                len(self.val_files),
                reader.light,
                d,
                planned=reader.planned,
                seed=self.cfg.seed,
                epoch=0,
            )
            clean = MixConfig(inbatch_prob=0.0, noise_prob=0.0)
            it = stream_batches(
                plan,
                reader,
                lambda rows: self.prepare(rows, clean),
                self.teachers,
                prep_rows=d.prep_rows,
                prefetch=d.prefetch_batches,
                resolve=self.resolve,
            )
            self._val = [b for _, b in itertools.islice(it, d.val_batches)]
        return self._val


def validation_loss(
    model: torch.nn.Module,
    batches: list[AudioBatch],
    device: torch.device,
    precision: torch.dtype | None,
) -> dict[str, float]:
    """Loss per student frame (and per teacher target frame) over ``batches``: eval mode, no
    masking."""
    student = unwrap(model)
    was_training = student.training
    student.eval()
    total = frames = 0.0
    per: dict[str, float] = {}
    per_frames: dict[str, float] = {}
    ctx = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for b in batches:
            loss, parts, n = compute_loss(student, student.features(b.to(device)), None, None)
            total += float(loss) * float(n)
            frames += float(n)
            for k, v in parts.per_teacher.items():
                per[k] = per.get(k, 0.0) + float(v)
                per_frames[k] = per_frames.get(k, 0.0) + float(parts.frames[k])
    student.train(was_training)
    out = {"val_loss": total / max(frames, 1.0)}
    out |= {f"val_loss_{k}": v / per_frames[k] for k, v in per.items() if per_frames[k] > 0}
    return out


def load_initial(url: str, storage: Any) -> Student:
    """The student whose encoder ``init_from`` names: a SPEAR release folder (``config.json``
    + safetensors) or a ``student.pt`` / training checkpoint folder."""
    from spear.storage import filesystem
    from spear.student.hf import import_spear

    fs, path = filesystem(url, storage)
    if fs.isdir(path) and fs.exists(path.rstrip("/") + "/config.json"):
        return import_spear(url, storage)
    return Student.from_checkpoint(url, storage)


def build_student(cfg: TrainConfig, storage: Any, resuming: bool) -> Student:
    """The run's initial student (``cfg.seed`` seeds the new weights): its encoder from
    ``cfg.init_from`` unless the run resumes (its checkpoint wins)."""
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts them)
    student = Student(cfg.student)
    if cfg.init_from and not resuming:
        student.init_encoder_from(load_initial(cfg.init_from, storage))
        log.info("train: encoder initialised from %s (new heads)", cfg.init_from)
    return student.train()


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    model: torch.nn.Module = build_student(cfg, config["storage"], checkpoint is not None)
    model = ray.train.torch.prepare_model(model)
    opt, sched = build_optimizer(model, cfg.optim)
    precision = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # dropout differs per rank
    progress = TrainPosition(extra={"epoch": 0})
    trained_on = TrainedOn.from_dict(config["trained_on"]) if config.get("trained_on") else None
    average = ModelAverage(unwrap(model), cfg.average_period) if rank == 0 else None

    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            progress = _restore(folder, model, opt, sched, generator, scaler, rank, device)
            restore_extras(folder, average, trained_on, unwrap(model), progress.step, device)
        if rank == 0:
            log.info("resumed from %s at step %d", checkpoint.path, progress.step)
    clock = RunClock(float(progress.extra.get("elapsed", 0.0)))
    record = (
        RankZeroLog(
            config["metrics_url"],
            config["out_url"],
            config["storage"],
            progress.step,
            cfg.tensorboard,
        )
        if rank == 0
        else None
    )

    data = _Data(config, rank, world)
    # The probe comes built by the driver (spear.pipeline.train): it may load a teacher, which
    # the student layer never imports itself.
    make_probe = config.get("probe")
    if cfg.probe_every and make_probe is None:
        raise SpearError("train.probe_every is set but the driver passed no probe")
    probe = make_probe() if rank == 0 and make_probe is not None else None
    grad_clip = cfg.optim.grad_clip if cfg.optim.name == "adamw" else 0.0
    window: dict[str, float] = {"wait": 0.0, "seconds": 0.0, "frames": 0.0, "steps": 0.0}
    window_start = time.perf_counter()
    last: StepStats | None = None
    metrics: dict[str, Any] = {}
    start_step = progress.step
    epoch = int(progress.extra.get("epoch", 0))
    skip = progress.batches
    done = progress.step >= cfg.max_steps
    while not done:
        consumed = skip
        epoch_start = progress.step
        batches = data.epoch(epoch, skip, window)
        while True:
            group = []  # accum_steps batches, one optimiser step
            for _, (index, b) in zip(range(cfg.accum_steps), batches, strict=False):
                group.append(b)
                consumed = index + 1
            full = len(group) == cfg.accum_steps
            have, seconds = _all_reduce(
                [1.0 if full else 0.0, sum(b.seconds for b in group)], world, device
            )
            if have < world:  # someone ran out: the epoch ends for all (equal DDP steps)
                break
            last = train_step(
                model,
                [b.to(device) for b in group],
                opt,
                sched,
                step=progress.step,
                hours=progress.hours,
                mask=cfg.mask,
                generator=generator,
                grad_clip=grad_clip,
                autocast_dtype=precision,
                scaler=scaler,
            )
            progress.step += 1
            progress.hours += seconds / 3600.0
            progress.batches = consumed
            if average is not None:
                average.update(unwrap(model), progress.step)
            window["seconds"] += last.seconds
            window["frames"] += last.frames
            window["steps"] += 1
            done = progress.step >= cfg.max_steps
            val_now = bool(data.val_files) and (progress.step % cfg.val_every == 0 or done)
            # Every rank agrees on log_now (ray.train.report is collective); rank 0 probes.
            probe_now = bool(cfg.probe_every) and (progress.step % cfg.probe_every == 0 or done)
            log_now = progress.step % cfg.log_every == 0 or done or val_now or probe_now
            ckpt_now = progress.step % cfg.checkpoint_every == 0 or done
            if log_now or ckpt_now:
                metrics = _metrics(last, progress, window, time.perf_counter() - window_start)
                metrics["epoch"] = epoch
                metrics["start_step"] = start_step
                # Every rank's rows (a collective: every rank agrees on log_now).
                (metrics["dropped"],) = _all_reduce(
                    [float(sum(data.dropped.values()))], world, device
                )
                if val_now and rank == 0:
                    metrics |= validation_loss(model, data.validation(), device, precision)
                if probe_now and probe is not None:
                    metrics |= probe.metrics(unwrap(model))
                metrics |= schedule_position(cfg, progress.hours, clock.elapsed())
                if record is not None and log_now:
                    log.info("train %s", _format(metrics))
                    record.row(metrics, progress.step)
                window = dict.fromkeys(window, 0.0)
                window_start = time.perf_counter()
            if ckpt_now:
                progress.extra["epoch"] = epoch
                progress.extra["elapsed"] = clock.elapsed()
                _report_checkpoint(
                    metrics,
                    model,
                    opt,
                    sched,
                    progress,
                    generator,
                    scaler,
                    rank,
                    average,
                    trained_on,
                )
                if record is not None:
                    record.checkpointed()
            elif log_now:
                ray.train.report(metrics)
            if done:
                break
        if done:
            break
        if progress.step == epoch_start and skip == 0:
            raise SpearError(
                "an epoch without a training step: every item was filtered out or failed, or a "
                "worker's shards hold fewer than accum_steps batches"
            )
        epoch += 1
        skip = 0
        progress.batches = 0
    if rank == 0 and last is None and progress.step >= cfg.max_steps:
        log.info("nothing to do: the checkpoint is at step %d >= max_steps", progress.step)
    if record is not None:
        record.close()


def _metrics(
    last: StepStats, progress: TrainPosition, window: dict[str, float], elapsed: float
) -> dict[str, Any]:
    steps = max(window["steps"], 1.0)
    elapsed = max(elapsed, 1e-9)
    out: dict[str, Any] = {
        "step": progress.step,
        "loss": last.loss,
        "lr": last.lr,
        "hours": progress.hours,
        "audio_s_per_s": window["seconds"] / elapsed,
        "tokens_per_s": window["frames"] / elapsed,
        "data_wait": window["wait"] / elapsed,
        "step_time": elapsed / steps,
    }
    for k, v in last.per_teacher.items():
        out[f"loss_{k}"] = v
    return out


def _format(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _report_checkpoint(
    metrics: dict[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    progress: TrainPosition,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    rank: int,
    average: ModelAverage | None = None,
    trained_on: TrainedOn | None = None,
) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        # Each rank's RNG (masks, dropout) so every worker repeats its own next step.
        torch.save(rng_state(generator), os.path.join(folder, f"rng-{rank}.pt"))
        if rank == 0:
            torch.save(student_state(model, trained_on), os.path.join(folder, STUDENT_FILE))
            torch.save(
                train_state_dict(opt, sched, progress, generator, scaler),
                os.path.join(folder, "train_state.pt"),
            )
            meta = {"step": progress.step, "hours": progress.hours}
            save_extras(folder, average, trained_on, meta | {"elapsed": progress.extra["elapsed"]})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def student_state(model: torch.nn.Module, trained_on: TrainedOn | None) -> dict[str, Any]:
    """``student.pt``'s dict with what the run trains on (an extra key; loading ignores it)."""
    state = unwrap(model).checkpoint_dict()
    if trained_on is not None:
        state["trained_on"] = trained_on.as_dict()
    return state


def _restore(
    folder: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    rank: int,
    device: torch.device,
) -> TrainPosition:
    student = torch.load(os.path.join(folder, STUDENT_FILE), map_location=device, weights_only=True)
    unwrap(model).load_state_dict(student["model"])
    state = torch.load(
        os.path.join(folder, "train_state.pt"), map_location="cpu", weights_only=True
    )
    progress = load_train_state(state, opt, sched, generator, scaler)
    rng_file = os.path.join(folder, f"rng-{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True), generator)
    return progress
