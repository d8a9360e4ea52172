"""The recipe's initial student (spear.student.recipe.build_student): new, or continued
pre-training from a student.pt or a SPEAR release folder (``train.init_from``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spear.errors import SpearError
from spear.storage import StorageConfig
from spear.student.config import StudentConfig, TrainConfig
from spear.student.model import Student
from spear.student.recipe import build_student

SPEAR_TINY = Path(__file__).parent / "data" / "spear_tiny"


def _encoder_equal(a: Student, b: Student) -> bool:
    theirs = dict(b.named_parameters())
    return all(
        torch.equal(p, theirs[n]) for n, p in a.named_parameters() if not n.startswith("heads.")
    )


def test_init_from_student_pt_takes_encoder_keeps_new_heads(tmp_path: Path) -> None:
    storage = StorageConfig()
    torch.manual_seed(123)
    initial = Student(StudentConfig(preset="tiny"))
    initial.save(str(tmp_path / "student.pt"))
    cfg = TrainConfig(student=StudentConfig(preset="tiny"), seed=7)
    fresh = build_student(cfg, storage, resuming=False)
    cfg_init = TrainConfig(student=cfg.student, seed=7, init_from=str(tmp_path / "student.pt"))
    started = build_student(cfg_init, storage, resuming=False)
    assert started.training
    assert _encoder_equal(started, initial) and not _encoder_equal(fresh, initial)
    for name, head in started.heads.items():  # the heads are the seed's new ones
        for p, q in zip(head.parameters(), fresh.heads[name].parameters(), strict=True):
            assert torch.equal(p, q)
    # A resumed run ignores init_from: its checkpoint is loaded over the new student.
    resumed = build_student(cfg_init, storage, resuming=True)
    assert _encoder_equal(resumed, fresh)


def test_init_from_spear_release_folder() -> None:
    release = Student.from_hf(str(SPEAR_TINY))
    cfg = TrainConfig(student=StudentConfig(encoder=release.encoder.cfg), init_from=str(SPEAR_TINY))
    started = build_student(cfg, StorageConfig(), resuming=False)
    assert _encoder_equal(started, release)


def test_init_from_mismatch_and_missing_fail_in_one_line(tmp_path: Path) -> None:
    tiny = StudentConfig(preset="tiny")
    with pytest.raises(SpearError, match="encoder differs"):
        build_student(TrainConfig(student=tiny, init_from=str(SPEAR_TINY)), StorageConfig(), False)
    with pytest.raises(SpearError, match="no student checkpoint"):
        build_student(
            TrainConfig(student=tiny, init_from=str(tmp_path / "nope.pt")), StorageConfig(), False
        )
