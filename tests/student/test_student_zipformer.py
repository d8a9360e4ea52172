"""Zipformer2 encoder: preset sizes, shapes and frame rates, padding invariance, and the
training machinery as icefall has it (schedules, limits, initial scales, masks)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from spear.student import scaling, zipformer
from spear.student.config import (
    ENCODER_PRESETS,
    PRESET_PARAMS,
    HeadConfig,
    MaskConfig,
    OptimConfig,
    Schedule,
    StudentConfig,
    ZipformerConfig,
    ZipformerMachinery,
)
from spear.student.model import Student, train_step
from spear.student.optim import build_optimizer
from spear.student.scaling import Balancer, Whiten
from spear.student.synthetic import collate, synth_items
from spear.student.zipformer import (
    Zipformer2,
    feature_mask_draws,
    layer_skip_schedule,
    rel_pos_embedding,
    stack_feature_mask,
)


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


# --- training machinery ---------------------------------------------------------------------

EXACT_PARAMS = {"base": 93_283_217, "large": 326_940_080, "xlarge": 596_956_594}
"""icefall's module sizes at these layouts (the machinery adds no parameters)."""


@pytest.mark.parametrize("preset", sorted(EXACT_PARAMS))
def test_preset_parameter_counts_exact(preset: str) -> None:
    with torch.device("meta"):
        encoder = Zipformer2(ENCODER_PRESETS[preset]())
    assert _count(encoder) == EXACT_PARAMS[preset]


def _no_randomness() -> ZipformerMachinery:
    return ZipformerMachinery(
        dropout=0.0,
        pos_emb_dropout=0.0,
        layer_skip_start=0.0,
        layer_skip_end=0.0,
        attention_skip=0.0,
        conv_skip=0.0,
        ff_skip=0.0,
        const_attention=0.0,
        pos_emb_skip=0.0,
        convnext_skip=0.0,
        feature_mask_prob=0.0,
    )


def _tiny(**machinery: object) -> ZipformerConfig:
    base = ENCODER_PRESETS["tiny"]()
    return dataclasses.replace(base, machinery=dataclasses.replace(base.machinery, **machinery))


def test_eval_is_deterministic_and_training_without_randomness() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ENCODER_PRESETS["tiny"](), machinery=_no_randomness())
    encoder = Zipformer2(cfg)
    feats, lens = torch.randn(2, 160, 128), torch.tensor([160, 121])
    encoder.eval()
    with torch.no_grad():
        a, _ = encoder(feats, lens)
        b, _ = encoder(feats, lens, batch_count=123.0)  # ignored in eval
    encoder.train()  # Balancer, Whiten, limits, penalty still run: they are gradient-only
    c, _ = encoder(feats, lens, batch_count=0.0)
    assert torch.equal(a, b) and torch.equal(a, c.detach())


def test_training_needs_the_batch_count() -> None:
    encoder = Zipformer2(ENCODER_PRESETS["tiny"]()).train()
    with pytest.raises(ValueError, match="batch_count"):
        encoder(torch.randn(1, 60, 128), torch.tensor([60]))


@pytest.mark.parametrize("draw", [0.0, 0.999])
def test_every_parameter_gets_a_gradient(monkeypatch: pytest.MonkeyPatch, draw: float) -> None:
    # draw 0: every random decision fires (position scores skipped, constant attention,
    # balancers, whiteners, penalty); with DDP (no find_unused_parameters) every parameter
    # must still be in the graph. draw 0.999: none fires.
    monkeypatch.setattr(scaling, "_draw", lambda: draw)
    monkeypatch.setattr(zipformer, "_draw", lambda: draw)
    torch.manual_seed(0)
    cfg = _tiny(attention_score_limit=1e-3)  # so the penalty has something to do
    encoder = Zipformer2(cfg).train()
    out, lens = encoder(torch.randn(2, 120, 128), torch.tensor([120, 90]), batch_count=0.0)
    (out.pow(2).sum() / lens.sum()).backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_layer_skip_schedule_is_icefalls() -> None:
    # Zipformer2Encoder: stack i of 7 warms up over [i+1, i+2] x 4000 / 8, layers in turn,
    # 0.5 -> 0.035 x sqrt(downsampling).
    cfg = ENCODER_PRESETS["large"]()  # layers 1,2,2,3,1,1,1
    s00 = layer_skip_schedule(cfg, 0, 0)
    assert isinstance(s00, Schedule) and s00.points == ((500.0, 0.5), (1000.0, 0.035))
    s3 = [layer_skip_schedule(cfg, 3, j) for j in range(3)]
    end = 0.035 * math.sqrt(8)
    for j, s in enumerate(s3):
        assert isinstance(s, Schedule)
        (a, y0), (b, y1) = s.points
        assert (a, b) == pytest.approx((2000 + j * 500 / 3, 2000 + (j + 1) * 500 / 3))
        assert (y0, y1) == pytest.approx((0.5, end))
    assert s3[0](0.0) == 0.5 and s3[2](1e9) == pytest.approx(end)  # skipped until warm-up


def _limits(m: torch.nn.Module) -> dict[str, object]:
    def v(x: object) -> object:
        return x.points if isinstance(x, Schedule) else x

    if isinstance(m, Balancer):
        return {
            "positive": (v(m.min_positive), v(m.max_positive)),
            "abs": (v(m.min_abs), v(m.max_abs)),
            "prob": v(m.prob),
            "grad_scale": m.grad_scale,
        }
    assert isinstance(m, Whiten)
    return {
        "groups": m.num_groups,
        "limit": v(m.limit),
        "prob": (m.min_prob, m.max_prob),
        "grad_scale": m.grad_scale,
    }


def _w(start: float, ratio: float = 2.0) -> tuple[tuple[float, float], ...]:
    return ((0.0, start), (20000.0, ratio * start))


DEFAULT_P = ((0.0, 0.5), (8000.0, 0.125))
WP = (0.025, 0.25)
# icefall zipformer.py / subsampling.py, module by module.
ICEFALL_LIMITS: dict[str, dict[str, object]] = {
    "attn_weights.balance_keys": {
        "positive": (0.4, 0.6),
        "abs": (0.0, 100.0),
        "prob": 0.025,
        "grad_scale": 0.04,
    },
    "attn_weights.whiten_keys": {"groups": 4, "limit": _w(3.0), "prob": WP, "grad_scale": 0.025},
    "attn1.whiten": {"groups": 1, "limit": _w(7.5, 3.0), "prob": WP, "grad_scale": 0.01},
    "ff2.hidden_balancer": {
        "positive": (0.3, 1.0),
        "abs": (0.75, 5.0),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "ff2.out_whiten": {"groups": 1, "limit": _w(7.5), "prob": WP, "grad_scale": 0.01},
    "nonlin_attn.balancer": {
        "positive": (((0.0, 0.25), (20000.0, 0.05)), ((0.0, 0.75), (20000.0, 0.95))),
        "abs": (0.5, 5.0),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "nonlin_attn.whiten1": {"groups": 1, "limit": _w(5.0), "prob": WP, "grad_scale": 0.01},
    "nonlin_attn.whiten2": {"groups": 1, "limit": _w(5.0, 3.0), "prob": WP, "grad_scale": 0.01},
    "conv1.balancer1": {
        "positive": (((0.0, 0.05), (8000.0, 0.025)), 1.0),
        "abs": (1.5, ((0.0, 5.0), (8000.0, 10.0))),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "conv1.balancer2": {
        "positive": (((0.0, 0.1), (8000.0, 0.05)), 1.0),
        "abs": (((0.0, 0.2), (20000.0, 0.5)), 10.0),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "conv1.whiten": {"groups": 1, "limit": _w(7.5), "prob": WP, "grad_scale": 0.01},
    "balancer_na": {
        "positive": (0.3, 0.7),
        "abs": (((0.0, 0.004), (4000.0, 0.02)), 100.0),
        "prob": 0.05,
        "grad_scale": 0.04,
    },
    "balancer_ff2": {
        "positive": (0.3, 0.7),
        "abs": (((0.0, 0.0), (4000.0, 0.1)), 2.0),
        "prob": 0.05,
        "grad_scale": 0.04,
    },
    "balancer_ff3": {
        "positive": (0.3, 0.7),
        "abs": (((0.0, 0.0), (4000.0, 0.2)), 4.0),
        "prob": 0.05,
        "grad_scale": 0.04,
    },
    "balancer1": {
        "positive": (0.45, 0.55),
        "abs": (0.2, 4.0),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "balancer2": {
        "positive": (0.45, 0.55),
        "abs": (0.1, 4.0),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "whiten": {"groups": 1, "limit": _w(4.0, 3.0), "prob": WP, "grad_scale": 0.01},
}
ICEFALL_EMBED_LIMITS: dict[str, dict[str, object]] = {
    **{
        f"balancers.{i}": {
            "positive": (0.05, 0.95),
            "abs": (0.2, a),
            "prob": DEFAULT_P,
            "grad_scale": 0.04,
        }
        for i, a in enumerate((1.0, 4.0, 4.0))
    },
    "convnext.hidden_balancer": {
        "positive": (0.3, 1.0),
        "abs": (0.75, 5.0),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "convnext.out_balancer": {
        "positive": (0.4, 0.6),
        "abs": (1.0, 6.0),
        "prob": DEFAULT_P,
        "grad_scale": 0.04,
    },
    "convnext.out_whiten": {"groups": 1, "limit": 5.0, "prob": WP, "grad_scale": 0.01},
    "out_whiten": {"groups": 1, "limit": _w(4.0), "prob": WP, "grad_scale": 0.02},
}


def test_balancer_and_whiten_settings_are_icefalls() -> None:
    encoder = Zipformer2(ENCODER_PRESETS["tiny"]())  # 4 heads
    layer = encoder.stacks[0].layers[0]
    found = {n: _limits(m) for n, m in layer.named_modules() if isinstance(m, Balancer | Whiten)}
    for name, want in ICEFALL_LIMITS.items():
        assert found[name] == want, name
    # the other FFs, attention and conv modules are configured like the ones checked
    assert len(found) == 25
    embed = {
        n: _limits(m) for n, m in encoder.embed.named_modules() if isinstance(m, Balancer | Whiten)
    }
    assert embed == ICEFALL_EMBED_LIMITS


def _bound(w: torch.Tensor) -> float:
    """max |w| x sqrt(fan_in): 1 for torch's default init (U(+-1/sqrt(fan_in)))."""
    fan_in = w[0].numel()
    return float(w.detach().abs().max()) * math.sqrt(fan_in)


def test_initial_scales_are_icefalls() -> None:
    torch.manual_seed(0)
    cfg = ENCODER_PRESETS["tiny"]()
    layer = Zipformer2(cfg).stacks[2].layers[0]  # dim 96
    want = {
        "attn_weights.in_proj": cfg.query_head_dim**-0.25,
        "attn_weights.linear_pos": 0.05,
        "attn1.out_proj": 0.05,
        "attn2.out_proj": 0.05,
        "nonlin_attn.out_proj": 0.05,
        "conv1.out_proj": 0.05,
        "ff1.out_proj": 0.1,
        "ff3.out_proj": 0.1,
        "attn1.in_proj": 1.0,  # input projections keep torch's init
        "ff1.in_proj": 1.0,
    }
    for name, scale in want.items():
        w = layer.get_submodule(name).weight
        assert _bound(w) == pytest.approx(scale, rel=0.1), name
    pw2 = Zipformer2(cfg).embed.convnext.pointwise2.weight
    assert _bound(pw2) == pytest.approx(0.01, rel=0.1)
    for m in (layer.norm, layer.bypass, layer.bypass_mid):
        params = dict(m.named_parameters())
        if "log_scale" in params:
            assert params["log_scale"].item() == 1.0
        else:
            assert torch.equal(params["scale"], torch.full_like(params["scale"], 0.5))
    plain = Zipformer2(_tiny(near_identity_init=False)).stacks[2].layers[0]
    assert _bound(plain.attn1.out_proj.weight) == pytest.approx(1.0, rel=0.1)


def test_feature_masks_are_per_utterance_two_level_and_shared() -> None:
    torch.manual_seed(0)
    draws = feature_mask_draws(20000, 0.125, torch.device("cpu"))
    assert (draws[:, 1] <= draws[:, 0]).all()  # the upper band is dropped whenever the lower is
    assert (1 - draws[:, 0]).mean().item() == pytest.approx(0.125, abs=0.01)
    assert (1 - draws[:, 1]).mean().item() == pytest.approx(1 - 0.875**2, abs=0.01)
    d = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    mask = stack_feature_mask(d, 10, 4, torch.float32)  # unmasked 4, midpoint 4 + 6 // 2 = 7
    assert mask.shape == (3, 1, 10)  # one value per utterance and channel, for every frame
    assert mask[0].sum() == 10
    assert mask[1, 0].tolist() == [1.0] * 7 + [0.0] * 3
    assert mask[2, 0].tolist() == [1.0] * 4 + [0.0] * 6


def test_train_step_sets_the_schedules_from_hours_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    heads = (HeadConfig(name="wavlm", num_codebooks=2),)
    model = Student(StudentConfig(preset="tiny", heads=heads))
    seen: list[float | None] = []
    inner = model.encoder.forward

    def spy(x: torch.Tensor, lengths: torch.Tensor, batch_count: float | None = None) -> object:
        seen.append(batch_count)
        return inner(x, lengths, batch_count)

    monkeypatch.setattr(model.encoder, "forward", spy)
    opt, sched = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3))
    batch = collate(synth_items(1, (1.0, 1.2), 0, 2, 1), {"wavlm": 2})
    g = torch.Generator().manual_seed(0)
    train_step(model, batch, opt, sched, step=9, hours=2.5, mask=MaskConfig(), generator=g)
    assert seen == [2.5 * 3600 / 600]


def test_batch_level_decisions_respect_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    # Training with constant attention and the position-score skip forced on (and the
    # per-utterance random parts off): valid frames still ignore the padding.
    monkeypatch.setattr(scaling, "_draw", lambda: 0.0)
    monkeypatch.setattr(zipformer, "_draw", lambda: 0.0)
    torch.manual_seed(0)
    # torch's init: branches start large, so what the attention sees shows in the output
    m = dataclasses.replace(
        _no_randomness(), const_attention=0.5, pos_emb_skip=0.5, near_identity_init=False
    )
    encoder = Zipformer2(dataclasses.replace(ENCODER_PRESETS["tiny"](), machinery=m)).train()
    short = torch.randn(1, 133, 128)
    batch = torch.randn(2, 260, 128) * 5
    batch[1, :133] = short[0]
    alone, alone_len = encoder(short, torch.tensor([133]), batch_count=0.0)
    both, _ = encoder(batch, torch.tensor([260, 133]), batch_count=0.0)
    n = int(alone_len[0])
    torch.testing.assert_close(both[1, :n], alone[0, :n], atol=1e-4, rtol=1e-4)
    encoder.eval()
    with torch.no_grad():
        plain, _ = encoder(short, torch.tensor([133]))
    assert not torch.allclose(plain[0, :n], alone[0, :n].detach(), atol=1e-2)  # it did act
