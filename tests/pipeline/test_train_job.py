"""``run_train`` on the session's local Ray: 2 CPU workers, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from spear.errors import SpearError
from spear.pipeline.train import run_train
from spear.ray_utils import RayConfig
from spear.storage import StorageConfig
from spear.student.config import (
    HeadConfig,
    MaskConfig,
    MixConfig,
    OptimConfig,
    StudentConfig,
    TrainConfig,
    TrainDataConfig,
)
from spear.student.model import Student
from spear.testing import write_synthetic_output

pytestmark = pytest.mark.integration

HEADS = (
    HeadConfig(name="wavlm", num_codebooks=2, frame_rate=50.0),
    HeadConfig(
        name="dasheng", num_codebooks=1, frame_rate=25.0, weight_speech=0.0, weight_audio=0.1
    ),
)


def _cfg(**kw: object) -> TrainConfig:
    base = TrainConfig(
        student=StudentConfig(preset="tiny", heads=HEADS),
        mask=MaskConfig(),
        mix=MixConfig(inbatch_prob=0.3, noise_prob=0.0, token_mixing=True),
        optim=OptimConfig(name="adamw", lr=2e-3, warmup_batches=2),
        data=TrainDataConfig(batch_seconds=4.0, max_seconds=4.0, prep_rows=4, prep_cpus=0.5),
        max_steps=4,
        num_workers=1,
        cpus_per_worker=0.5,
        checkpoint_every=2,
        log_every=1,
        max_failures=0,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tokens")
    write_synthetic_output(str(out), 12, (1.0, 1.8), seed=0, items_per_shard=6)
    return str(out)


@pytest.mark.slow  # ~2.5 min: two gloo workers on 2 cores (the demo trains one in the default run)
def test_two_workers_to_s3(ray_cluster: str, s3_server: Any, shards: str) -> None:
    # Checkpoints and student.pt go through fsspec to the S3 server; 5 steps cross an epoch.
    out = s3_server.bucket("student-run") + "/run"
    res = run_train(shards, out, _cfg(num_workers=2, max_steps=5), s3_server.storage, RayConfig())
    assert res.steps == 5 and res.metrics["epoch"] >= 1
    assert res.metrics["loss"] > 0 and "loss_wavlm" in res.metrics
    assert res.checkpoint is not None
    student = Student.from_checkpoint(res.student_url, s3_server.storage)
    assert student.cfg.heads == HEADS


@pytest.mark.slow  # three Ray Train runs: ~2-5 min on 2 shared cores
def test_resume_matches_uninterrupted(ray_cluster: str, shards: str, tmp_path: Path) -> None:
    full = run_train(shards, str(tmp_path / "a"), _cfg(max_steps=4), StorageConfig(), RayConfig())
    first = run_train(shards, str(tmp_path / "b"), _cfg(max_steps=2), StorageConfig(), RayConfig())
    assert first.steps == 2
    resumed = run_train(
        shards, str(tmp_path / "b"), _cfg(max_steps=4), StorageConfig(), RayConfig()
    )
    assert resumed.steps == 4 and resumed.metrics["start_step"] == 2  # it did resume
    assert resumed.metrics["loss"] == pytest.approx(full.metrics["loss"], rel=1e-5)


def test_a_job_that_cannot_fit_beside_its_driver_fails_at_once(
    ray_cluster: str, shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `spear submit train` meets on a 2-CPU cluster: the job's driver holds one CPU (its
    # entrypoint), so one worker (1 CPU) and data preparation (1 CPU) can never run together.
    import ray

    @ray.remote(num_cpus=1)
    class Entrypoint:
        def ready(self) -> bool:
            return True

    holder = Entrypoint.remote()  # type: ignore[attr-defined]
    try:
        ray.get(holder.ready.remote())
        deadline = time.monotonic() + 10
        while ray.available_resources().get("CPU", 0.0) > 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)  # the resource view catches up within a heartbeat
        monkeypatch.setattr("spear.pipeline.job.SETTLE_SECONDS", 2.0)
        cfg = _cfg(cpus_per_worker=1.0, data=dataclasses.replace(_cfg().data, prep_cpus=1.0))
        t0 = time.monotonic()
        with pytest.raises(SpearError, match=r"needs 2 CPUs at once .* has 1 free"):
            run_train(shards, str(tmp_path / "o"), cfg, StorageConfig(), RayConfig())
        assert time.monotonic() - t0 < 30  # no Ray Train run was started
    finally:
        ray.kill(holder)


@pytest.mark.slow  # ~1.5 min: one Ray Train run on 2 shared cores
def test_validation_loss_and_accumulation(ray_cluster: str, shards: str, tmp_path: Path) -> None:
    # One shard of two held out; 2 batches per optimiser step; a validation every 2 steps.
    cfg = _cfg(
        max_steps=3,
        accum_steps=2,
        val_every=2,
        checkpoint_every=10,
        data=dataclasses.replace(_cfg().data, val_shards=1, val_batches=2),
    )
    res = run_train(shards, str(tmp_path / "v"), cfg, StorageConfig(), RayConfig())
    assert res.steps == 3
    rows = [
        json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()
    ]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [2, 3] and all(0 < v < 20 for v in val.values())
    assert "val_loss_wavlm" in rows[-1]
    # Two batches of <= 4 s per step: more audio per step than one batch can hold.
    assert max(r["hours"] for r in rows) * 3600 / 3 > cfg.data.batch_seconds


def test_too_few_shards_for_workers_and_validation(shards: str, tmp_path: Path) -> None:
    cfg = _cfg(data=dataclasses.replace(_cfg().data, val_shards=2))
    with pytest.raises(SpearError, match="fewer than the 1 training workers"):
        run_train(shards, str(tmp_path / "o"), cfg, StorageConfig(), RayConfig())
