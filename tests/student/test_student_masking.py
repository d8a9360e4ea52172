"""Span masking: coverage near its exact expected value; channel masks; the mask embedding."""

from __future__ import annotations

import torch

from spear.student.config import MaskConfig
from spear.student.masking import apply_masks, draw_masks, expected_coverage, span_mask


def test_time_coverage_matches_expected() -> None:
    g = torch.Generator().manual_seed(0)
    length = 800
    got = torch.stack([span_mask(length, 0.65, 10, g) for _ in range(400)]).float().mean()
    want = expected_coverage(length, 0.65, 10)
    assert 0.4 < want < 0.55  # wav2vec2's overlapping spans cover ~half at p=0.65
    assert abs(float(got) - want) < 0.01


def test_channel_coverage_matches_expected() -> None:
    g = torch.Generator().manual_seed(1)
    got = torch.stack([span_mask(128, 0.25, 20, g) for _ in range(2000)]).float().mean()
    want = expected_coverage(128, 0.25, 20)
    assert abs(float(got) - want) < 0.01


def test_spans_are_contiguous_and_within_length() -> None:
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([300, 45, 5])
    time, chan = draw_masks(lengths, 128, MaskConfig(), g)
    assert time.shape == (3, 300) and chan.shape == (3, 128)
    assert not time[1, 45:].any() and not time[2].any()  # shorter than a span: no mask
    runs = torch.diff(time[0].int(), prepend=torch.zeros(1, dtype=torch.int32))
    starts = torch.nonzero(runs == 1).flatten()
    ends = torch.nonzero(runs == -1).flatten()
    assert all(int(e - s) >= 10 for s, e in zip(starts, ends, strict=False))


def test_apply_masks() -> None:
    feats = torch.randn(1, 4, 6)
    time = torch.tensor([[False, True, False, False]])
    chan = torch.tensor([[False, False, True, False, False, False]])
    emb = torch.arange(6.0)
    out = apply_masks(feats, time, chan, emb)
    assert torch.equal(out[0, 1, [0, 1, 3, 4, 5]], emb[[0, 1, 3, 4, 5]])
    assert out[0, :, 2].abs().max() == 0
    assert torch.equal(out[0, 0, 3:], feats[0, 0, 3:])
