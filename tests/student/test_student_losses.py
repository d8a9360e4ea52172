"""Frame alignment, per-codebook cross-entropy and the asymmetric dual-domain weights."""

from __future__ import annotations

import math

import torch

from spear.student.config import HeadConfig, default_heads
from spear.student.losses import (
    AUDIO,
    IGNORE,
    SPEECH,
    align_targets,
    codebook_loss,
    dual_domain_loss,
)


def test_align_repeats_25hz_and_pads() -> None:
    codes = torch.arange(6).reshape(1, 3, 2)  # 3 frames at 25 Hz
    out = align_targets(codes, 25.0, 50.0, 8)
    assert out.shape == (1, 8, 2)
    assert out[0, :6, 0].tolist() == [0, 0, 2, 2, 4, 4]
    assert (out[0, 6:] == IGNORE).all()
    assert align_targets(codes, 25.0, 50.0, 5).shape == (1, 5, 2)  # trimmed


def test_align_same_rate_and_concat_for_slower_student() -> None:
    codes = torch.arange(10).reshape(1, 5, 2)
    assert torch.equal(align_targets(codes, 50.0, 50.0, 5), codes)
    out = align_targets(codes, 50.0, 25.0, 3)  # 2 frames -> one of 4 codebooks
    assert out.shape == (1, 3, 4)
    assert out[0, 0].tolist() == [0, 1, 2, 3]
    assert out[0, 2].tolist() == [8, 9, IGNORE, IGNORE]


def test_codebook_loss_sums_frames_means_codebooks_ignores() -> None:
    logits = torch.zeros(1, 3, 2, 4)  # uniform: CE = log 4 per code
    targets = torch.tensor([[[0, 1], [2, IGNORE], [IGNORE, IGNORE]]])
    got = codebook_loss(logits, targets)
    assert math.isclose(float(got[0]), 3 * math.log(4) / 2, rel_tol=1e-6)


def test_dual_domain_weights() -> None:
    heads = default_heads()
    b, t = 4, 5
    logits = {h.name: torch.zeros(b, t, h.num_codebooks, 256) for h in heads}
    targets = {h.name: torch.zeros(b, t, h.num_codebooks, dtype=torch.long) for h in heads}
    domains = torch.tensor([SPEECH, AUDIO, AUDIO, SPEECH])
    out = dual_domain_loss(logits, targets, domains, heads)
    per_item = t * math.log(256)
    want = 4 * 1.0 * per_item + 2 * 0.1 * per_item  # wavlm on all, dasheng 0.1 on audio only
    assert math.isclose(float(out.total), want, rel_tol=1e-5)
    assert math.isclose(float(out.per_teacher["dasheng"]), 2 * per_item, rel_tol=1e-5)
    assert int(out.frames["wavlm"]) == 4 * t and int(out.frames["dasheng"]) == 2 * t


def test_custom_weights() -> None:
    heads = (HeadConfig(name="a", num_codebooks=1, weight_speech=2.0, weight_audio=0.5),)
    logits = {"a": torch.zeros(2, 1, 1, 256)}
    targets = {"a": torch.zeros(2, 1, 1, dtype=torch.long)}
    out = dual_domain_loss(logits, targets, torch.tensor([SPEECH, AUDIO]), heads)
    assert math.isclose(float(out.total), 2.5 * math.log(256), rel_tol=1e-5)
