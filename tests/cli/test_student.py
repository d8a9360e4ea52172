"""``spear student average``: a student averaged over a span of a run's checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from spear.cli.main import run
from spear.student.averaging import ModelAverage
from spear.student.config import StudentConfig
from spear.student.model import STUDENT_FILE, Student
from spear.student.runlog import TrainedOn, save_extras

ON = TrainedOn(token_run="tokenize-a", quantizers={"wavlm": "q"})


def _run_with_checkpoints(out: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoint folders as the recipe's rank 0 writes them at steps 2, 4 and 6 (weights
    that change every step, averaged every step); the weights at every step."""
    torch.manual_seed(0)
    student = Student(StudentConfig(preset="tiny"))
    avg = ModelAverage(student, 1)
    weights = {}
    for step in range(1, 7):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        weights[step] = {k: v.clone() for k, v in student.state_dict().items() if "extra" not in k}
        avg.update(student, step)
        if step % 2 == 0:
            folder = out / "train" / f"checkpoint_2026-01-01_00-00-0{step}.000000"
            folder.mkdir(parents=True)
            torch.save(student.checkpoint_dict(), folder / STUDENT_FILE)
            save_extras(str(folder), avg, ON, {"step": step, "hours": 0.0, "elapsed": 1.0})
    return weights


def test_average_over_a_span_of_checkpoints(tmp_path: Path, capsys) -> None:
    weights = _run_with_checkpoints(tmp_path / "run")
    assert run(["student", "average", str(tmp_path / "run"), "--start", "2", "--end", "6"]) == 0
    written = tmp_path / "run" / "student-avg-2-6.pt"
    assert str(written) in capsys.readouterr().out
    got = Student.from_checkpoint(str(written)).state_dict()
    for k in ("encoder.embed.conv1.weight", "heads.wavlm.proj.weight"):
        want = torch.stack([weights[s][k] for s in (3, 4, 5, 6)]).mean(0)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    out = tmp_path / "whole.pt"
    assert run(["student", "average", str(tmp_path / "run"), "-o", str(out)]) == 0
    whole = Student.from_checkpoint(str(out)).state_dict()["encoder.embed.conv1.weight"]
    want = torch.stack([weights[s]["encoder.embed.conv1.weight"] for s in range(1, 7)]).mean(0)
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-6)
    assert torch.load(out, weights_only=True)["averaged"]["from_step"] == 0


def test_average_errors_are_one_line(tmp_path: Path, capsys) -> None:
    _run_with_checkpoints(tmp_path / "run")
    assert run(["student", "average", str(tmp_path / "run"), "--start", "3"]) == 2
    assert "no checkpoint at step 3 to average from (kept: [2, 4, 6])" in capsys.readouterr().err
    assert run(["student", "average", str(tmp_path / "run"), "--start", "6"]) == 2
    assert "must start before it ends" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert run(["student", "average", str(tmp_path / "empty")]) == 2
    assert "no training checkpoints" in capsys.readouterr().err
