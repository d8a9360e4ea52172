"""``spear train`` killed mid-run through the CLI and run again: it continues from its last
checkpoint (step, optimiser, scheduler, data position) and every step's loss equals that of an
uninterrupted run, so the resume shows no jump in the loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spear.testing import write_synthetic_output

# Slow (~3 min: three Ray Train runs on 2 cores); the default run trains one in the demo.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 10
SETTINGS = {
    "train.student.preset": "tiny",
    "train.optim.name": "adamw",
    "train.optim.lr": "2e-3",
    "train.optim.warmup_batches": "2",
    "train.mix.inbatch_prob": "0.3",
    "train.mix.noise_prob": "0.0",
    "train.data.batch_seconds": "4.0",
    "train.data.max_seconds": "4.0",
    "train.data.prep_rows": "4",
    "train.data.prep_cpus": "0.5",
    "train.cpus_per_worker": "0.5",
    "train.log_every": "1",
    "train.max_failures": "0",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tokens")
    write_synthetic_output(str(out), 12, (1.0, 1.8), seed=0, items_per_shard=6)
    return str(out)


def command(shards: str, out: Path, address: str) -> list[str]:
    sets = [arg for k, v in SETTINGS.items() for arg in ("--set", f"{k}={v}")]
    return [
        sys.executable,
        "-m",
        "spear.cli.main",
        "train",
        "--shards",
        shards,
        "--out",
        str(out),
        "--max-steps",
        str(STEPS),
        "--checkpoint-every",
        "2",
        "--workers",
        "1",
        "--address",
        address,
        *sets,
    ]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_killed_train_resumes_where_it_stopped(
    ray_cluster: str, shards: str, tmp_path: Path
) -> None:
    ref = subprocess.run(
        command(shards, tmp_path / "ref", ray_cluster), capture_output=True, text=True, timeout=600
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(shards, out, ray_cluster),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Step 5 logged: the step-4 checkpoint was reported before it; half the run is left.
        deadline = time.time() + 400
        while not (out / "metrics/step-000000005.json").exists() and proc.poll() is None:
            assert time.time() < deadline, "no training step was logged"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "student.pt").exists() and not (out / "metrics.jsonl").exists()

    again = subprocess.run(
        command(shards, out, ray_cluster), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"train: {STEPS} steps" in again.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed_at = rows[-1]["start_step"]
    assert 2 <= resumed_at < STEPS, f"it started again at step {resumed_at}"
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    assert (out / "student.pt").exists()
