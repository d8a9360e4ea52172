"""What a run records besides weights: its tokens (a resume onto others is refused), rank 0's
rows with the training time, TensorBoard event files (local and through fsspec), checkpoint
extras."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import fsspec
import pytest
import torch
from torch import nn

from spear.errors import SpearError
from spear.storage import StorageConfig
from spear.student.averaging import ModelAverage
from spear.student.runlog import (
    RankZeroLog,
    RunClock,
    TrainedOn,
    restore_extras,
    save_extras,
)
from spear.testing import read_tensorboard_scalars

ON = TrainedOn(token_run="tokenize-aaaa", quantizers={"wavlm": "q1", "dasheng": "q2"}, shards="s")


def test_resume_onto_other_tokens_is_refused_in_one_line() -> None:
    same_run_elsewhere = TrainedOn.from_dict(ON.as_dict() | {"shards": "s3://copy"})
    ON.check_resume(same_run_elsewhere, "OUT")  # a copy of the run is the same run
    other_run = TrainedOn(token_run="tokenize-bbbb", quantizers=ON.quantizers)
    with pytest.raises(SpearError, match=r"OUT was trained on token run tokenize-aaaa") as err:
        other_run.check_resume(ON, "OUT")
    assert "\n" not in str(err.value) and "tokenize-bbbb" in str(err.value)
    other_q = TrainedOn(token_run=ON.token_run, quantizers={"wavlm": "q9", "dasheng": "q2"})
    with pytest.raises(SpearError, match="wavlm=q9"):
        other_q.check_resume(ON, "OUT")


def test_clock_adds_the_time_of_earlier_runs() -> None:
    clock = RunClock(before=100.0)
    time.sleep(0.05)
    assert 100.04 < clock.elapsed() < 101.0  # seconds of training, not the wall clock


def _rows(log: RankZeroLog) -> None:
    for step in (1, 2, 3):
        log.row({"step": step, "loss": 5.0 - step, "loss_wavlm": 4.0, "lr": 0.01}, step)
        if step == 2:
            log.checkpointed()  # a new event file after each checkpoint
    log.close()


def test_rows_and_tensorboard_on_a_local_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    log = RankZeroLog(str(out / "metrics"), str(out), StorageConfig(), 0, tensorboard=True)
    _rows(log)
    rows = [json.loads(p.read_text()) for p in sorted((out / "metrics").glob("step-*.json"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(abs(r["time"] - time.time()) < 60 for r in rows)  # the wall clock
    scalars = read_tensorboard_scalars(str(out / "tensorboard"))
    assert scalars["loss/loss"] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert scalars["loss/loss_wavlm"][-1] == (3, 4.0)
    assert scalars["schedule/lr"][0] == (1, pytest.approx(0.01))
    assert len(list((out / "tensorboard").iterdir())) == 2  # rotated at the checkpoint


def test_tensorboard_through_fsspec(tmp_path: Path) -> None:
    out = "memory://spear-tb-test/run"
    log = RankZeroLog(out + "/metrics", out, StorageConfig(), 0, tensorboard=True)
    _rows(log)
    fs = fsspec.filesystem("memory")
    local = tmp_path / "tb"
    local.mkdir()
    for path in fs.ls("/spear-tb-test/run/tensorboard", detail=False):
        (local / os.path.basename(path)).write_bytes(fs.cat_file(path))
    assert [s for s, _ in read_tensorboard_scalars(str(local))["loss/loss"]] == [1, 2, 3]
    fs.rm("/spear-tb-test", recursive=True)


def test_checkpoint_extras_round_trip_and_refusal(tmp_path: Path) -> None:
    net = nn.Linear(2, 2)
    avg = ModelAverage(net, 1)
    avg.update(net, 1)
    save_extras(str(tmp_path), avg, ON, {"step": 1, "hours": 0.1, "elapsed": 3.0})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["trained_on"]["token_run"] == ON.token_run and meta["average_step"] == 1
    fresh = ModelAverage(nn.Linear(2, 2), 1)
    restore_extras(str(tmp_path), fresh, ON, net, 1, torch.device("cpu"))
    assert fresh.step == 1
    torch.testing.assert_close(fresh.state["weight"], avg.state["weight"])
    other = TrainedOn(token_run="tokenize-cccc", quantizers=ON.quantizers)
    with pytest.raises(SpearError, match="the checkpoint was trained on"):
        restore_extras(str(tmp_path), fresh, other, net, 1, torch.device("cpu"))
    (tmp_path / "model_avg.pt").unlink()  # a checkpoint from before averaging
    restore_extras(str(tmp_path), fresh, ON, net, 5, torch.device("cpu"))
    assert fresh.step == 5
    torch.testing.assert_close(fresh.state["weight"], net.weight.detach().double())
