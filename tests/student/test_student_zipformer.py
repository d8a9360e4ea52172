"""Zipformer2 encoder: preset sizes, shapes and frame rates, padding invariance."""

from __future__ import annotations

import pytest
import torch

from spear.student.config import ENCODER_PRESETS, PRESET_PARAMS, StudentConfig
from spear.student.model import Student
from spear.student.zipformer import Zipformer2, rel_pos_embedding


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", sorted(PRESET_PARAMS))
def test_preset_parameter_counts(preset: str) -> None:
    with torch.device("meta"):  # no memory, no init time
        encoder = Zipformer2(ENCODER_PRESETS[preset]())
    n = _count(encoder)
    assert abs(n - PRESET_PARAMS[preset]) / PRESET_PARAMS[preset] < 0.05, (preset, n)


def test_tiny_is_small() -> None:
    with torch.device("meta"):
        student = Student(StudentConfig(preset="tiny"))
    assert 1e6 <= _count(student) <= 3e6


def test_shapes_and_frame_rate() -> None:
    torch.manual_seed(0)
    student = Student(StudentConfig(preset="tiny")).eval()
    feats = torch.randn(2, 207, 128)  # 100 Hz
    lengths = torch.tensor([207, 150])
    with torch.no_grad():
        out = student(feats, lengths)
    assert out.encoder_out.shape == (2, (207 - 7) // 2, student.output_dim)
    assert out.lengths.tolist() == [(207 - 7) // 2, (150 - 7) // 2]
    assert out.logits["wavlm"].shape == (2, 100, 16, 256)
    assert out.logits["dasheng"].shape == (2, 100, 8, 256)
    assert out.encoder_out[1, out.lengths[1] :].abs().max() == 0  # padding is zero


def test_padding_does_not_change_valid_frames() -> None:
    torch.manual_seed(0)
    encoder = Zipformer2(ENCODER_PRESETS["tiny"]()).eval()
    short = torch.randn(1, 133, 128)
    batch = torch.randn(2, 260, 128) * 5  # garbage in the padding
    batch[1, :133] = short[0]
    with torch.no_grad():
        alone, alone_len = encoder(short, torch.tensor([133]))
        both, both_len = encoder(batch, torch.tensor([260, 133]))
    n = int(alone_len[0])
    assert int(both_len[1]) == n
    torch.testing.assert_close(both[1, :n], alone[0, :n], atol=1e-4, rtol=1e-4)


def test_relative_position_embedding_independent_of_length() -> None:
    a = rel_pos_embedding(5, 48, torch.device("cpu"), torch.float32)
    b = rel_pos_embedding(9, 48, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(a, b[4:13])  # offsets -4..4
