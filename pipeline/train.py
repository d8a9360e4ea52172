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
4. At the end: ``OUT/student.pt`` (loads with ``Student.from_checkpoint``) and
   ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from spear.errors import SpearError
from spear.pipeline.job import Demand, fit_now
from spear.ray_utils import RayConfig, init_ray
from spear.shards.index import open_run
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig, check_url, filesystem, join, protocol_of, write_atomic
from spear.student.config import TrainConfig
from spear.student.model import STUDENT_FILE, Student
from spear.student.recipe import (
    METRICS_DIR,
    METRICS_FILE,
    check_heads,
    heads_from_shards,
    train_loop,
)

log = logging.getLogger(__name__)

RUN_NAME = "train"
"""Checkpoints go to ``OUT/train/checkpoint_*``."""


@dataclass
class TrainResult:
    steps: int
    metrics: dict[str, Any]
    """The last reported metrics."""
    checkpoint: str | None
    """The latest checkpoint folder (URL)."""
    student_url: str
    """``OUT/student.pt``."""


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
            "storage": storage,
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
    result = _fit(
        train_files, val_files, cfg, decode, storage, use_gpu, storage_path, storage_fs, out_url
    )
    _merge_metrics(out_url, storage)
    ckpt = result.checkpoint
    student_url = join(out_url, STUDENT_FILE)
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            Student.from_state(
                torch.load(
                    os.path.join(folder, STUDENT_FILE), map_location="cpu", weights_only=True
                )
            ).save(student_url, storage)
    metrics = dict(result.metrics or {})
    return TrainResult(
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint=None if ckpt is None else str(ckpt.path),
        student_url=student_url,
    )
