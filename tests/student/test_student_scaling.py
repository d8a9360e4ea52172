"""The training machinery's parts (spear.student.scaling) and the schedules' config: each does
what icefall's does, and the defaults are icefall's numbers."""

from __future__ import annotations

import math

import pytest
import torch

from spear.configio import from_dict, to_dict
from spear.errors import ConfigError
from spear.student import scaling
from spear.student.config import Schedule, ZipformerConfig, ZipformerMachinery, scheduled
from spear.student.scaling import (
    BALANCER_PROB,
    LIMIT_PROB,
    Balancer,
    BiasNorm,
    Bypass,
    Whiten,
    abs_to_rms,
    limit_param_value,
    penalize_abs_values_gt,
    positive_to_mean,
    scale_grad,
    scaled_linear,
    shared_dropout,
    whitening_limit,
    whitening_metric,
)


@pytest.fixture
def always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every probabilistic part acts on every call."""
    monkeypatch.setattr(scaling, "_draw", lambda: 0.0)


def test_schedule_is_piecewise_linear_and_flat_outside() -> None:
    s = Schedule.of((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0))
    assert s(-5.0) == 0.2 and s(0.0) == 0.2
    assert s(2000.0) == pytest.approx(0.125)
    assert s(4000.0) == pytest.approx(0.05)
    assert s(10000.0) == pytest.approx(0.025)
    assert s(16000.0) == 0.0 and s(1e9) == 0.0
    assert scheduled(0.3, 123.0) == 0.3 and scheduled(s, 2000.0) == pytest.approx(0.125)


def test_schedule_rejects_bad_points() -> None:
    with pytest.raises(ValueError, match="increase"):
        Schedule.of((10.0, 0.1), (5.0, 0.2))
    with pytest.raises(ValueError, match="pairs"):
        Schedule(points=())


def test_machinery_parses_numbers_and_schedules() -> None:
    cfg = from_dict(
        ZipformerMachinery,
        {"dropout": 0.2, "attention_skip": {"points": [[0, 0.3], [1000, 0.0]]}},
    )
    assert cfg.dropout == 0.2
    assert cfg.attention_skip == Schedule.of((0, 0.3), (1000, 0.0))
    assert from_dict(ZipformerMachinery, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="conv_skip"):
        from_dict(ZipformerMachinery, {"conv_skip": {"points": [[0, 1.5]]}})
    with pytest.raises(ValueError, match="layer_skip_end"):
        ZipformerConfig(machinery=ZipformerMachinery(layer_skip_end=0.4))  # x sqrt(8) > 1


def _value(v: object) -> object:
    return v.points if isinstance(v, Schedule) else v


# icefall egs/librispeech/ASR/zipformer: train.py (dropout, warmup_batches, ref_duration),
# zipformer.py (Zipformer2Encoder layer drop, Zipformer2EncoderLayer skip rates, BypassModule
# scale_min, CompactRelPositionalEncoding dropout, get_feature_masks, attention penalty),
# subsampling.py (ConvNeXt layerdrop, ScaleGrad).
ICEFALL_MACHINERY = {
    "batch_seconds": 600.0,
    "dropout": ((0.0, 0.3), (20000.0, 0.1)),
    "pos_emb_dropout": 0.15,
    "layer_skip_start": 0.5,
    "layer_skip_end": 0.035,
    "layer_skip_batches": 4000.0,
    "attention_skip": ((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0)),
    "conv_skip": ((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0)),
    "ff_skip": ((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0)),
    "const_attention": ((0.0, 0.25), (4000.0, 0.025)),
    "pos_emb_skip": ((0.0, 0.5), (4000.0, 0.0)),
    "convnext_skip": ((0.0, 0.2), (20000.0, 0.015)),
    "bypass_floor": ((0.0, 0.9), (20000.0, 0.2)),
    "feature_mask_prob": 0.125,
    "balancers": True,
    "whiteners": True,
    "attention_score_limit": 25.0,
    "attention_score_penalty": 1e-4,
    "embed_grad_scale": 0.2,
    "near_identity_init": True,
}


def test_machinery_defaults_are_icefalls() -> None:
    cfg = ZipformerMachinery()
    got = {k: _value(getattr(cfg, k)) for k in ICEFALL_MACHINERY}
    assert got == ICEFALL_MACHINERY
    assert cfg.batch_count(1.0) == 6.0  # one hour = six 600 s reference batches
    # scaling.py constants
    assert LIMIT_PROB == 0.6
    assert _value(BALANCER_PROB) == ((0.0, 0.5), (8000.0, 0.125))
    assert _value(whitening_limit(7.5)) == ((0.0, 7.5), (20000.0, 15.0))
    assert (BiasNorm.LOG_SCALE_INIT, BiasNorm.LOG_SCALE_LIMITS) == (1.0, (-1.5, 1.5))


def test_balancer_limit_conversions_are_icefalls() -> None:
    # icefall: rms = 1.25331413732 x mean |x|; mean/std = 0.8139535143 x atanh(2p - 1)
    assert abs_to_rms(1.0) == pytest.approx(1.25331413732)
    for p in (0.05, 0.3, 0.45, 0.7, 0.95):
        assert positive_to_mean(p) == pytest.approx(0.8139535143 * math.atanh(2 * p - 1))
    assert positive_to_mean(0.5) == pytest.approx(0.0) and positive_to_mean(1.0) > 9


def test_limit_param_value_flips_outward_gradients(always: None) -> None:
    x = torch.tensor([0.1, 0.5, 1.5, 0.1, 1.5], requires_grad=True)
    y = limit_param_value(x, 0.2, 1.0, training=True)
    assert torch.equal(y, x)
    y.backward(torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0]))
    # below lo: +1 would lower it -> flipped; above hi: -1 would raise it -> flipped; the rest
    # already point inwards (or x is in range) and stay.
    assert x.grad is not None
    assert x.grad.tolist() == [-1.0, 1.0, 1.0, -1.0, 1.0]
    assert limit_param_value(x, 0.2, 1.0, training=False) is x


def test_scale_grad_and_score_penalty() -> None:
    x = torch.tensor([-30.0, -1.0, 2.0, 26.0], requires_grad=True)
    (scale_grad(x, 0.2) * 3).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, torch.full((4,), 0.6))
    x.grad = None
    y = penalize_abs_values_gt(x, 25.0, 1e-2)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([1 - 1e-2, 1.0, 1.0, 1 + 1e-2]))


def test_shared_dropout_shares_the_mask_over_time() -> None:
    torch.manual_seed(0)
    x = torch.ones(16, 50, 32)
    y = shared_dropout(x, 0.3, dim=1, training=True)
    assert torch.equal(y, y[:, :1].expand_as(y))  # same mask at every frame
    assert y.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.05)
    assert shared_dropout(x, 0.3, dim=1, training=False) is x


@pytest.mark.parametrize("scale", [0.05, 0.1, 0.5])
def test_scaled_linear_init(scale: float) -> None:
    torch.manual_seed(0)
    layer = scaled_linear(256, 128, scale)
    bound = layer.weight.abs().max().item() * math.sqrt(256)  # torch: U(+-1/sqrt(fan_in))
    assert bound == pytest.approx(scale, rel=0.01)
    assert layer.bias is not None and layer.bias.abs().max().item() <= 0.1 * scale
    assert layer.bias.abs().max().item() > 0.09 * scale


def _balancer_grad(x: torch.Tensor, bal: Balancer, grad: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    y = bal(x, 0.0)
    assert torch.equal(y, x)
    y.backward(grad)
    assert x.grad is not None
    return x.grad


def test_balancer_pushes_sign_and_magnitude_into_range(always: None) -> None:
    torch.manual_seed(0)
    n = 4000
    x = torch.stack(
        [
            torch.randn(n),  # fine: half positive, |x| ~ 0.8
            torch.randn(n) - 2.0,  # mostly negative
            torch.randn(n) * 0.01,  # far too small
            torch.randn(n) * 50.0,  # far too large
        ],
        dim=1,
    )  # (N, C=4)
    grad = torch.randn(n, 4)
    bal = Balancer(min_positive=0.3, max_positive=0.7, min_abs=0.2, max_abs=5.0).train()
    delta = _balancer_grad(x, bal, grad) - grad
    assert torch.equal(delta[:, 0], torch.zeros(n))  # inside every limit: untouched
    # Descent follows -grad: a more negative gradient raises the values.
    assert delta[:, 1].mean() < 0
    assert (delta[:, 2] * x[:, 2].sign()).mean() < 0  # magnitudes grow
    assert (delta[:, 3] * x[:, 3].sign()).mean() > 0  # magnitudes shrink
    # the correction is grad_scale (0.04) relative to the gradient
    assert delta[:, 1].abs().mean() < 0.1 * grad[:, 1].abs().mean()


def test_balancer_is_off_in_eval_and_when_disabled() -> None:
    x = torch.randn(10, 4, requires_grad=True)
    assert Balancer().eval()(x, 0.0) is x
    assert Balancer(enabled=False).train()(x, 0.0) is x


def test_whitening_metric() -> None:
    torch.manual_seed(0)
    white = torch.randn(20000, 16)
    assert whitening_metric(white, 1).item() == pytest.approx(1.0, abs=0.01)
    rank1 = torch.randn(20000, 1) * torch.randn(1, 16)
    assert whitening_metric(rank1, 1).item() == pytest.approx(16.0, rel=1e-3)
    # groups must also share one trace: two white groups at different scales are not white
    mixed = torch.cat([torch.randn(20000, 8), 3 * torch.randn(20000, 8)], dim=1)
    assert whitening_metric(mixed, 2).item() > 1.5


def test_whiten_acts_only_on_non_white_input(always: None) -> None:
    torch.manual_seed(0)
    w = Whiten(1, 5.0, grad_scale=0.1).train()
    white = torch.randn(500, 16, requires_grad=True)
    grad = torch.randn(500, 16)
    w(white, 0.0).backward(grad)
    assert white.grad is not None and torch.equal(white.grad, grad)
    assert w.prob == 0.025  # passed: check rarely
    skewed = (torch.randn(500, 16) + 4.0 * torch.randn(500, 1) * torch.randn(1, 16)).detach()
    before = whitening_metric(skewed, 1).item()
    x = skewed.clone().requires_grad_(True)
    w(x, 0.0).backward(torch.zeros(500, 16) + 1e-3 * grad)
    assert x.grad is not None and not torch.equal(x.grad, 1e-3 * grad)
    assert w.prob == 0.25  # violated: check often
    penalty = x.grad - 1e-3 * grad
    assert penalty.norm().item() == pytest.approx(0.1 * (1e-3 * grad).norm().item(), rel=1e-4)
    after = whitening_metric(skewed - 10.0 * penalty / penalty.norm(), 1).item()
    assert after < before
    state = w.state_dict()
    fresh = Whiten(1, 5.0)
    fresh.load_state_dict(state)
    assert fresh.prob == 0.25  # kept in checkpoints


def test_bias_norm_starts_at_e_and_keeps_log_scale_in_range(always: None) -> None:
    torch.manual_seed(0)
    norm = BiasNorm(8).train()
    assert norm.log_scale.item() == 1.0 and norm.bias.abs().max().item() < 1e-3
    x = torch.randn(4, 8)
    rms = norm(x).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full((4,), math.e), rtol=1e-3)
    with torch.no_grad():
        norm.log_scale.fill_(2.0)
    norm(x).sum().neg().backward()  # a loss that wants a larger scale
    assert norm.log_scale.grad is not None and norm.log_scale.grad.item() > 0  # flipped


def test_bypass_floor_and_skip(always: None) -> None:
    torch.manual_seed(0)
    orig, new = torch.zeros(3, 5, 4), torch.ones(3, 5, 4)
    b = Bypass(4, floor=Schedule.of((0.0, 0.9), (20000.0, 0.2))).train()
    out = b(orig, new, 0.0)
    assert torch.allclose(out, torch.full_like(out, 0.5))  # the forward uses the raw scale
    out.sum().neg().backward()  # wants the scale larger: stays as is
    out = b(orig, new, 0.0)
    assert b.scale.grad is not None and (b.scale.grad < 0).all()
    b.scale.grad = None
    out.sum().backward()  # wants it smaller, but 0.5 < floor 0.9: flipped to push it up
    assert (b.scale.grad < 0).all()
    skip = Bypass(4, floor=0.0, skip=0.999).train()
    assert torch.equal(skip(orig, new, 0.0), orig)  # every utterance skips the module
    assert torch.equal(skip.eval()(orig, new, 0.0), torch.full_like(orig, 0.5))
