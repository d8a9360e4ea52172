"""``run_train`` on the session's local Ray: 2 CPU workers, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from spear.errors import SpearError
from spear.pipeline.train import (
    average_run,
    check_train_record,
    console_text,
    run_train,
    train_record,
)
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
from spear.student.runlog import TrainedOn
from spear.testing import read_tensorboard_scalars, write_synthetic_output

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
        monkeypatch.setattr("spear.pipeline.resources.SETTLE_SECONDS", 2.0)
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


def test_console_line_says_step_losses_rate_schedule_and_eta() -> None:
    prev = {"step": 10, "hours": 1.0, "elapsed": 100.0}
    m = {
        "step": 20,
        "max_steps": 120,
        "loss": 4.56789,
        "loss_wavlm": 4.1,
        "loss_dasheng": 0.5,
        "hours": 2.0,
        "elapsed": 150.0,
        "schedule_batch": 12.0,
        "eden_lr_batches": 7500.0,
        "eden_lr_hours": 75000.0,
    }
    text = console_text(m, prev)
    assert text.startswith("step 20/120 | loss 4.5679 (dasheng 0.500, wavlm 4.100)")
    assert "0.02 audio h/s" in text  # 1 h in 50 s, over the cluster
    assert "schedule batch 12" in text and "Eden 20/7,500 steps 2.00/75,000 h" in text
    assert text.endswith("elapsed 0:02:30, ETA 0:08:20")  # 100 steps left at 5 s
    first = console_text(m | {"audio_s_per_s": 36.0, "workers": 2, "step_time": 1.0}, None)
    assert "0.02 audio h/s" in first and "ETA 0:01:40" in first  # rank 0's rate x workers


def _record(on: TrainedOn, cfg: TrainConfig | None = None) -> Any:
    return train_record(cfg or _cfg(), on, shards=2, items=12, audio_hours=0.01)


def test_record_refuses_other_tokens_once_a_checkpoint_exists(tmp_path: Path) -> None:
    out, storage = str(tmp_path / "o"), StorageConfig()
    a = TrainedOn(token_run="tokenize-a", quantizers={"wavlm": "q1"}, shards="x")
    b = TrainedOn(token_run="tokenize-b", quantizers={"wavlm": "q1"}, shards="y")
    check_train_record(out, _record(a), storage)
    check_train_record(out, _record(b), storage)  # nothing trained yet: replaced
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["info"]["trained_on"]["shards"] == "y"
    (tmp_path / "o" / "train" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    with pytest.raises(SpearError, match="token run: 'tokenize-b' there, 'tokenize-a' now"):
        check_train_record(out, _record(a), storage)


def test_resume_onto_other_shards_quantisers_or_student_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    out, storage = str(tmp_path / "o"), StorageConfig()
    on = TrainedOn(token_run="tokenize-a", quantizers={"wavlm": "q1", "dasheng": "q2"})
    check_train_record(out, _record(on), storage)
    (tmp_path / "o" / "train" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    # The same tokens read from a copy, a longer run on more workers: the same run.
    copy = dataclasses.replace(on, shards="s3://elsewhere/tokens")
    check_train_record(out, _record(copy, _cfg(max_steps=40, num_workers=2)), storage)

    def refused(record: Any) -> str:
        with pytest.raises(SpearError) as e:
            check_train_record(out, record, storage)
        text = str(e.value)
        assert text.startswith(f"'{out}' holds train outputs of another run (")
        assert text.endswith("; use another --out")
        return text

    other_q = dataclasses.replace(on, quantizers={"wavlm": "q9", "dasheng": "q2"})
    assert "(quantizers.wavlm: 'q1' there, 'q9' now)" in refused(_record(other_q))
    wavlm_only = dataclasses.replace(on, quantizers={"wavlm": "q1"})
    assert "quantizers.dasheng: 'q2' there, (none) now" in refused(_record(wavlm_only))
    small = _cfg(student=StudentConfig(preset="base", heads=HEADS))
    assert "student.preset: 'tiny' there, 'base' now" in refused(_record(on, small))
    fewer = train_record(_cfg(), on, shards=1, items=6, audio_hours=0.005)
    assert "(items: 12 there, 6 now; units: 2 there, 1 now)" in refused(fewer)


@pytest.mark.slow  # one Ray Train run of 4 steps (~1-2 min on 2 shared cores)
def test_a_run_shows_progress_records_its_tokens_logs_and_averages(
    ray_cluster: str,
    shards: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("spear.pipeline.train.CONSOLE_EVERY", 0.0)
    caplog.set_level(logging.INFO, logger="spear.pipeline.train")
    out = tmp_path / "run"
    cfg = _cfg(average_period=1, keep_checkpoints=3)
    res = run_train(shards, str(out), cfg, StorageConfig(), RayConfig())
    assert res.steps == 4
    # The driver's live line, fed by rank 0's reports through the controller's callback.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    assert any(t.startswith("train: step 4/4 | loss ") and "ETA 0:00:00" in t for t in lines)
    assert any("wavlm" in t and "audio h/s" in t and "schedule batch" in t for t in lines)
    # What it trained on: the plan, student.pt, each checkpoint.
    plan = json.loads((out / "plan.json").read_text())
    assert plan["info"]["trained_on"]["token_run"] == "synthetic-0"
    state = torch.load(out / "student.pt", weights_only=True)
    assert state["trained_on"] == plan["info"]["trained_on"]
    assert set(state["trained_on"]["quantizers"]) == {"wavlm", "dasheng"}
    # TensorBoard from rank 0: every logged step.
    scalars = read_tensorboard_scalars(str(out / "tensorboard"))
    assert [s for s, _ in scalars["loss/loss"]] == [1, 2, 3, 4]
    assert "loss/loss_wavlm" in scalars and "schedule/lr" in scalars
    # Elapsed is seconds of training, not the wall clock.
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["elapsed"] < 3600 and rows[-1]["time"] > 1e9
    assert all(r["dropped"] == 0 for r in rows)  # every rank's dropped rows, summed
    # The running average: the whole run's, and over steps (2, 4] from two checkpoints.
    assert res.average_url is not None
    avg = Student.from_checkpoint(res.average_url)
    last = Student.from_checkpoint(res.student_url)
    assert torch.load(res.average_url, weights_only=True)["averaged"]["to_step"] == 4
    w = "encoder.embed.conv1.weight"
    assert not torch.equal(avg.state_dict()[w], last.state_dict()[w])
    span, text = average_run(str(out), StorageConfig(), start=2)
    assert span["averaged"]["from_step"] == 2 and "steps 2-4" in text
    # A resume onto another token run is refused at once, before Ray work.
    other = tmp_path / "other-tokens"
    write_synthetic_output(str(other), 12, (1.0, 1.8), seed=1, items_per_shard=6)
    t0 = time.monotonic()
    with pytest.raises(SpearError, match=r"token run: 'synthetic-0' there, 'synthetic-1' now"):
        run_train(str(other), str(out), _cfg(max_steps=6), StorageConfig(), RayConfig())
    assert time.monotonic() - t0 < 10


def test_spear_train_on_other_tokens_is_refused_before_ray(
    shards: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spear.cli.main import run

    out = tmp_path / "run"
    earlier = TrainedOn(token_run="tokenize-earlier", quantizers={"wavlm": "q0"})
    check_train_record(str(out), _record(earlier), StorageConfig())
    (out / "train" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    t0 = time.monotonic()
    assert run(["train", "--shards", shards, "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the heads' warnings
    assert err.startswith(f"error: '{out}' holds train outputs of another run")
    assert "token run: 'tokenize-earlier' there, 'synthetic-0' now" in err
    assert time.monotonic() - t0 < 10  # refused before any Ray work


@pytest.mark.slow  # one Ray Train run of 3 steps with probes (~1-2 min on 2 shared cores)
def test_probes_in_the_loop_and_init_from(ray_cluster: str, shards: str, tmp_path: Path) -> None:
    import csv

    import numpy as np
    import soundfile as sf

    from spear.report.train import render_train

    rows = []
    rng = np.random.default_rng(0)
    for kind in ("tone", "noise"):
        for i in range(4):
            t = np.arange(8000) / 16000
            x = (
                np.sin(2 * np.pi * rng.uniform(200, 400) * t)
                if kind == "tone"
                else rng.normal(size=t.size)
            )
            path = tmp_path / f"{kind}-{i}.wav"
            sf.write(path, (0.3 * x / np.abs(x).max() * 32767).astype(np.int16), 16000)
            rows.append({"url": str(path), "label": kind})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["url", "label"])
        w.writeheader()
        w.writerows(rows)
    torch.manual_seed(99)
    initial = Student(StudentConfig(preset="tiny", heads=HEADS))
    initial.save(str(tmp_path / "initial.pt"))
    out = tmp_path / "run"
    cfg = _cfg(
        max_steps=3,
        probe_every=2,
        probe_labels=str(tmp_path / "labels.csv"),
        probe_steps=50,
        init_from=str(tmp_path / "initial.pt"),
    )
    res = run_train(shards, str(out), cfg, StorageConfig(), RayConfig())
    assert res.steps == 3
    plan = json.loads((out / "plan.json").read_text())
    assert plan["info"]["train"]["init_from"] == str(tmp_path / "initial.pt")
    # Probes at step 2 and at the end, per layer; none at step 1.
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    probed = {r["step"]: r for r in metrics if "probe_out" in r}
    assert sorted(probed) == [2, 3] and 1 in {r["step"] for r in metrics}
    assert all(0.0 <= probed[3][f"probe_{i}"] <= 1.0 for i in range(7))
    assert probed[3]["probe_chance"] == pytest.approx(0.5)
    assert "Linear probes" in render_train(str(out), metrics)
    scalars = read_tensorboard_scalars(str(out / "tensorboard"))
    assert any("probe_out" in k for k in scalars)
    # The encoder started from initial.pt: 3 small steps away from it, far from a new one.
    final = Student.from_checkpoint(res.student_url).state_dict()
    w = "encoder.embed.conv1.weight"
    start = initial.state_dict()[w]
    assert (final[w] - start).abs().max() < (
        Student(StudentConfig(preset="tiny", heads=HEADS)).state_dict()[w] - start
    ).abs().max()
