"""spear.hear: the HEAR 2021 API over a student.pt, and the HEAR validator on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import spear.hear as hear
from spear.student.config import StudentConfig
from spear.student.model import Student


@pytest.fixture(scope="module")
def student_pt(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hear") / "student.pt"
    Student(StudentConfig(preset="tiny")).save(str(path))
    return str(path)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _audio(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, int(seconds * 16000), generator=g) * 2 - 1


def test_timestamp_and_scene_embeddings(student_pt: str) -> None:
    model = hear.load_model(student_pt)
    assert model.sample_rate == 16000 and not model.student.training
    assert model.scene_embedding_size == model.timestamp_embedding_size == 96
    audio = _audio(3, 1.5)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    student = Student.from_checkpoint(student_pt)
    frames = (int(student.frontend.waves([audio[0]])[1][0]) - 7) // 2
    assert emb.shape == (3, frames, 96) and ts.shape == (3, frames)
    np.testing.assert_allclose(np.diff(ts.numpy()), 20.0)
    assert ts[0, 0] == 35.0 and ts.max() <= 1500  # SPEAR's front end: fbank frame 3's centre
    # The frames are the student's own output on the same audio.
    feats, lengths = student.frontend.waves([audio[1]])
    with torch.no_grad():
        out, _ = student.encode(feats, lengths)
    torch.testing.assert_close(emb[1], out[0], atol=1e-5, rtol=0)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 96) and scene.dtype == torch.float32
    torch.testing.assert_close(scene, emb.mean(1), atol=1e-5, rtol=0)
    assert not torch.allclose(scene[0], scene[1])


def test_one_layer_and_short_clips(student_pt: str) -> None:
    model = hear.load_model(student_pt, layer=2)
    audio = _audio(2, 0.5, seed=1)
    emb, _ = hear.get_timestamp_embeddings(audio, model)
    student = Student.from_checkpoint(student_pt)
    feats, lengths = student.frontend.waves(list(audio))
    with torch.no_grad():
        _, _, hidden = student.encode(feats, lengths, layers=True)
    torch.testing.assert_close(emb[:, :, :96], hidden[2], atol=1e-5, rtol=0)
    tiny_clip = hear.get_scene_embeddings(_audio(1, 0.01), model)  # padded to one frame
    assert torch.isfinite(tiny_clip).all()
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(16000), model)


def test_hear_validator_accepts_the_module(student_pt: str, capsys) -> None:
    """hearvalidator needs TensorFlow and declares Python < 3.9 (its last release); install it
    beside spear as docs/student.md says, or this test is skipped."""
    validate = pytest.importorskip("hearvalidator.validate")
    validate.ValidateModel("spear.hear", student_pt, "cpu")()
    out = capsys.readouterr().out
    assert "Checking get_scene_embeddings" in out and "Received embedding of shape" in out


def test_hear_embeddings_come_from_the_checkpoint(student_pt: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    Student(StudentConfig(preset="tiny")).save(str(other))
    audio = _audio(1, 1.0)
    a = hear.get_scene_embeddings(audio, hear.load_model(student_pt))
    b = hear.get_scene_embeddings(audio, hear.load_model(str(other)))
    assert not torch.allclose(a, b)
