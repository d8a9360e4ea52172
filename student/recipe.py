"""The student's training recipe on each Ray Train worker: setup, train, checkpoint.

One recipe, not a framework (``pipeline/train.py`` is the driver that starts it):

* :func:`heads_from_shards`, :func:`check_heads` - the heads take their shapes from the shards'
  teachers; a head without tokens is an error.
* :func:`train_loop` - each worker (``TorchTrainer``, gloo on CPU, NCCL on GPU): DDP student,
  ScaledAdam + Eden (or AdamW), batches of ``batch_seconds`` audio from length buckets,
  bf16/fp16 autocast on GPU. Workers agree every step on whether all still have a batch (DDP
  needs equal step counts) and on the audio seconds seen (Eden's "hours").
* Every ``checkpoint_every`` steps: ``student.pt`` + ``train_state.pt`` (rank 0) and
  ``rng-<rank>.pt`` (every rank) reported as one ``ray.train.Checkpoint``; a resumed run replays
  the interrupted epoch's data stream and skips the batches already trained on.

Logs (rank 0, every ``log_every`` steps): step, loss, loss per teacher, lr, audio hours seen,
audio seconds/s per worker, tokens/s, and the fraction of time spent waiting for data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from spear.errors import SpearError
from spear.shards.schema import TokenTeacherInfo
from spear.student.averaging import ModelAverage
from spear.student.checkpointing import (
    Progress,
    load_train_state,
    rng_state,
    set_rng_state,
    train_state_dict,
)
from spear.student.config import HeadConfig, Precision, StudentConfig, TrainConfig
from spear.student.data import bucket_batches, collate_rows, iter_rows
from spear.student.model import STUDENT_FILE, StepStats, Student, train_step, unwrap
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


def _batches(
    shard: Any, teachers: dict[str, int], cfg: TrainConfig, stats: dict[str, float]
) -> Iterator[Any]:
    """One epoch of collated batches from this worker's stream; ``stats['wait']`` accumulates
    seconds spent waiting for data."""
    rows = iter_rows(
        shard.iter_batches(batch_size=cfg.data.prep_rows, batch_format="numpy", prefetch_batches=4)
    )
    it = bucket_batches(rows, cfg.data)
    while True:
        t0 = time.perf_counter()
        group = next(it, None)
        if group is None:
            return
        batch = collate_rows(group, teachers)
        stats["wait"] += time.perf_counter() - t0
        yield batch


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    teachers: dict[str, int] = config["teachers"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts them)
    model: torch.nn.Module = Student(cfg.student)
    model = ray.train.torch.prepare_model(model)
    opt, sched = build_optimizer(model, cfg.optim)
    precision = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # dropout differs per rank
    progress = Progress(extra={"epoch": 0})
    trained_on = TrainedOn.from_dict(config["trained_on"]) if config.get("trained_on") else None
    average = ModelAverage(unwrap(model), cfg.average_period) if rank == 0 else None

    checkpoint = ray.train.get_checkpoint()
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

    shard = ray.train.get_dataset_shard("train")
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
        consumed = 0
        batches = _batches(shard, teachers, cfg, window)
        while True:
            batch = next(batches, None)
            if batch is not None and consumed < skip:
                consumed += 1  # already trained on before the restart
                continue
            have, seconds = _all_reduce(
                [0.0 if batch is None else 1.0, 0.0 if batch is None else batch.seconds],
                world,
                device,
            )
            if have < world:  # someone ran out: the epoch ends for all (equal DDP steps)
                break
            assert batch is not None
            last = train_step(
                model,
                batch.to(device),
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
            consumed += 1
            progress.step += 1
            progress.hours += seconds / 3600.0
            progress.batches = consumed
            if average is not None:
                average.update(unwrap(model), progress.step)
            window["seconds"] += batch.seconds
            window["frames"] += last.frames
            window["steps"] += 1
            done = progress.step >= cfg.max_steps
            log_now = progress.step % cfg.log_every == 0 or done
            ckpt_now = progress.step % cfg.checkpoint_every == 0 or done
            if log_now or ckpt_now:
                metrics = _metrics(last, progress, window, time.perf_counter() - window_start)
                metrics["epoch"] = epoch
                metrics["start_step"] = start_step
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
        if progress.batches == 0 and skip == 0:
            raise SpearError("no training batches: every item was filtered out or failed")
        epoch += 1
        skip = 0
        progress.batches = 0
    if rank == 0 and last is None and progress.step >= cfg.max_steps:
        log.info("nothing to do: the checkpoint is at step %d >= max_steps", progress.step)
    if record is not None:
        record.close()


def _metrics(
    last: StepStats, progress: Progress, window: dict[str, float], elapsed: float
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
    progress: Progress,
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
) -> Progress:
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
