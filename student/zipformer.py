"""Zipformer2 encoder (icefall's ``zipformer.py`` and ``subsampling.py``, written again; SPEC
section 4).

Shapes are batch-first: ``(B, T, C)``. Padding is ``pad_mask`` (B, T), True on padded frames.

Kept from icefall: Conv2d subsampling with a ConvNeXt block to 50 Hz ((T-7)//2), stacks at
downsampling 1,2,4,8,4,2,1 joined by learned bypasses, the layer layout (three feed-forwards,
shared attention weights feeding non-linear attention and two value attentions, two convolution
modules, mid and final bypass, BiasNorm), SwooshL/SwooshR, compact relative position embedding,
channel truncation/zero-padding between stacks of different widths. Parameter counts match
icefall's module sizes. The training machinery (``ZipformerConfig.machinery``, parts in
:mod:`spear.student.scaling`) is icefall's too: layer/module skipping and constant attention
on schedules of the batch count, bypass floors, dropout shared over time, two-level feature
masks per utterance, near-identity initial scales, Balancer, Whiten, ScaleGrad and the
attention-score penalty. The output stays at 50 Hz (no output downsampling), as SPEAR's student
does.

Training needs ``batch_count`` (the schedules' position, see
:meth:`spear.student.config.ZipformerMachinery.batch_count`), passed to ``forward``; eval mode
ignores it and is deterministic: it computes what training computes with every random part off.

Padding is respected exactly: valid output frames do not depend on what the padded input frames
hold or how long the batch is (downsampling pads with the last *valid* frame, convolutions see
zeros past the end, attention masks padded keys). ``tests/student/test_student_zipformer.py``
checks it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spear.student.config import (
    Schedule,
    Scheduled,
    ZipformerConfig,
    ZipformerMachinery,
    scheduled,
)
from spear.student.scaling import (
    Balancer,
    BiasNorm,
    Bypass,
    Whiten,
    _draw,
    penalize_abs_values_gt,
    scale_grad,
    scale_init,
    scaled_linear,
    shared_dropout,
    whitening_limit,
)

ATTENTION_PENALTY_PROB = 0.1
"""Training calls on which the attention-score penalty is applied (icefall's)."""
FF_OUT_SCALE, BRANCH_OUT_SCALE, POS_PROJ_SCALE, CONVNEXT_OUT_SCALE = 0.1, 0.05, 0.05, 0.01
"""icefall's initial scales: feed-forward output; attention/non-linear attention/conv output;
position projection; ConvNeXt output."""


def swoosh_l(x: Tensor) -> Tensor:
    return F.softplus(x - 4.0) - 0.08 * x - 0.035


def swoosh_r(x: Tensor) -> Tensor:
    return F.softplus(x - 1.0) - 0.08 * x - 0.313261687


def make_pad_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True on padding."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def keep_mask(x: Tensor, p: float) -> Tensor | None:
    """(B, 1, ...) 0/1 per utterance, broadcasting over x; 0 with probability p (a skipped
    module for that utterance). None when p is 0."""
    if p == 0.0:
        return None
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return (torch.rand(shape, device=x.device) >= p).to(x.dtype)


def _masked(x: Tensor, keep: Tensor | None) -> Tensor:
    return x if keep is None else x * keep


def rel_pos_embedding(t: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Embeddings of relative offsets -(t-1)..(t-1): (2t-1, dim).

    icefall's CompactRelPositionalEncoding: offsets are log-compressed, then squashed by atan,
    so near offsets stay distinct and far ones saturate; an offset's embedding does not depend
    on ``t`` (needed for padding invariance).
    """
    x = torch.arange(-(t - 1), t, device=device, dtype=torch.float32)
    comp = math.sqrt(dim)
    x = comp * x.sign() * ((x.abs() + comp).log() - math.log(comp))
    x_atan = (x / (dim / (2 * math.pi))).atan()
    freqs = torch.arange(1, dim // 2 + 1, device=device, dtype=torch.float32)
    angles = x_atan[:, None] * freqs[None, :]
    pe = torch.cat([angles.cos(), angles.sin()], dim=-1)
    pe[:, -1] = 1.0  # a constant channel lets heads learn an offset-independent bias
    return pe.to(dtype)


def layer_skip_schedule(cfg: ZipformerConfig, stack: int, layer: int) -> Scheduled:
    """icefall's layer-drop warm-up: stack i of n warms up over [i+1, i+2] x W / (n+1)
    batches, its layers one after another, each from ``layer_skip_start`` to ``layer_skip_end``
    x sqrt(downsampling)."""
    m = cfg.machinery
    n, layers = len(cfg.downsampling), cfg.num_layers[stack]
    begin = m.layer_skip_batches * (stack + 1) / (n + 1)
    delta = m.layer_skip_batches / (n + 1) / layers
    end_rate = m.layer_skip_end * math.sqrt(cfg.downsampling[stack])
    if delta == 0.0:
        return end_rate
    a = begin + layer * delta
    return Schedule(points=((a, m.layer_skip_start), (a + delta, end_rate)))


def feature_mask_draws(b: int, p: float, device: torch.device) -> Tensor:
    """(B, 2) 0/1 per utterance: column 0 keeps the lower masked band (dropped with p), column 1
    the upper band (dropped when column 0 is, or with p again)."""
    keep = torch.rand(b, 2, device=device) >= p
    return torch.stack([keep[:, 0], keep[:, 0] & keep[:, 1]], dim=1).float()


def stack_feature_mask(draws: Tensor, dim: int, unmasked: int, dtype: torch.dtype) -> Tensor:
    """(B, 2) draws -> (B, 1, dim): 1 below ``unmasked``, column 0 up to the midpoint of the
    rest, column 1 above it (icefall's two-level mask)."""
    mid = unmasked + (dim - unmasked) // 2
    b = draws.shape[0]
    mask = torch.ones(b, 1, dim, device=draws.device, dtype=dtype)
    mask[:, :, unmasked:mid] = draws[:, None, 0:1].to(dtype)
    mask[:, :, mid:] = draws[:, None, 1:2].to(dtype)
    return mask


class RelPosAttentionWeights(nn.Module):
    """Attention weights (B, H, T, T) from content (q.k) and relative position (p.pos) scores;
    computed once per layer and shared by three attention modules."""

    def __init__(self, cfg: ZipformerConfig, dim: int, heads: int, q_dim: int, p_dim: int) -> None:
        super().__init__()
        m = cfg.machinery
        self.heads, self.q_dim, self.p_dim = heads, q_dim, p_dim
        # Near-identity: the projection's scale stands in for 1/sqrt(q_dim) (split between q
        # and k); under ScaledAdam that changes the dynamics of the position part too.
        init = m.near_identity_init
        self.in_proj = scaled_linear(dim, (2 * q_dim + p_dim) * heads, q_dim**-0.25 if init else 1)
        self.linear_pos = scaled_linear(
            cfg.pos_dim, heads * p_dim, POS_PROJ_SCALE if init else 1.0, bias=False
        )
        self.score_scale = 1.0 if init else q_dim**-0.5
        self.balance_keys = Balancer(
            min_positive=0.4,
            max_positive=0.6,
            min_abs=0.0,
            max_abs=100.0,
            prob=0.025,
            enabled=m.balancers,
        )
        self.whiten_keys = Whiten(
            heads, whitening_limit(3.0), grad_scale=0.025, enabled=m.whiteners
        )
        self.pos_emb_skip = m.pos_emb_skip
        self.score_limit, self.score_penalty = m.attention_score_limit, m.attention_score_penalty

    def forward(
        self, x: Tensor, pos_emb: Tensor, pad_mask: Tensor, bc: float, frames: float
    ) -> Tensor:
        b, t, _ = x.shape
        h, qd, pd = self.heads, self.q_dim, self.p_dim
        proj = self.in_proj(x)
        q = proj[..., : h * qd].reshape(b, t, h, qd).transpose(1, 2)
        k = self.whiten_keys(self.balance_keys(proj[..., h * qd : 2 * h * qd], bc), bc)
        k = k.reshape(b, t, h, qd).transpose(1, 2)
        p = proj[..., 2 * h * qd :].reshape(b, t, h, pd).transpose(1, 2)  # (B, H, T, pd)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, T)
        if self.score_scale != 1.0:
            scores = scores * self.score_scale
        if not self.training or _draw() >= scheduled(self.pos_emb_skip, bc):
            pos = self.linear_pos(pos_emb).reshape(2 * t - 1, h, pd).permute(1, 2, 0)
            pos_full = torch.matmul(p, pos).contiguous()  # (B, H, T, 2T-1), col = offset + T-1
            # Row i needs columns (T-1-i)..(2T-2-i): a strided view, no (B,H,T,T) index.
            s = pos_full.stride()
            scores = scores + pos_full.as_strided(
                (b, h, t, t), (s[0], s[1], s[2] - 1, s[3]), pos_full.storage_offset() + t - 1
            )
        else:  # keep linear_pos in the graph: DDP without find_unused_parameters needs it
            scores = scores + 0.0 * self.linear_pos.weight.sum()
        scores = scores.float()
        if self.training and self.score_limit > 0 and _draw() < ATTENTION_PENALTY_PROB:
            scores = penalize_abs_values_gt(scores, self.score_limit, self.score_penalty / frames)
        scores = scores.masked_fill(pad_mask[:, None, None, :], -1e4)
        return scores.softmax(dim=-1).to(x.dtype)


class ValueAttention(nn.Module):
    """Applies shared attention weights to its own values (icefall's SelfAttention)."""

    def __init__(self, cfg: ZipformerConfig, dim: int, heads: int) -> None:
        super().__init__()
        m = cfg.machinery
        self.heads, self.v_dim = heads, cfg.value_head_dim
        self.in_proj = nn.Linear(dim, heads * self.v_dim)
        self.out_proj = scaled_linear(heads * self.v_dim, dim, _out(m, BRANCH_OUT_SCALE))
        self.whiten = Whiten(1, whitening_limit(7.5, 3.0), enabled=m.whiteners)

    def forward(self, x: Tensor, weights: Tensor, bc: float) -> Tensor:
        b, t, _ = x.shape
        v = self.in_proj(x).reshape(b, t, self.heads, self.v_dim).transpose(1, 2)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, -1)
        return self.whiten(self.out_proj(out), bc)


def _out(m: ZipformerMachinery, scale: float) -> float:
    return scale if m.near_identity_init else 1.0


class NonlinAttention(nn.Module):
    """tanh-gated values mixed by one head's attention weights, then gated again."""

    def __init__(self, cfg: ZipformerConfig, dim: int, hidden: int) -> None:
        super().__init__()
        m = cfg.machinery
        self.in_proj = nn.Linear(dim, 3 * hidden)
        self.out_proj = scaled_linear(hidden, dim, _out(m, BRANCH_OUT_SCALE))
        self.balancer = Balancer(
            min_positive=Schedule.of((0.0, 0.25), (20000.0, 0.05)),
            max_positive=Schedule.of((0.0, 0.75), (20000.0, 0.95)),
            min_abs=0.5,
            max_abs=5.0,
            enabled=m.balancers,
        )
        self.whiten1 = Whiten(1, whitening_limit(5.0), enabled=m.whiteners)
        self.whiten2 = Whiten(1, whitening_limit(5.0, 3.0), enabled=m.whiteners)

    def forward(self, x: Tensor, weights: Tensor, bc: float) -> Tensor:
        s, v, y = self.in_proj(x).chunk(3, dim=-1)
        s = self.balancer(s, bc).tanh()
        v = torch.matmul(weights, self.whiten1(v, bc) * s)  # weights: (B, T, T)
        return self.whiten2(self.out_proj(v * y), bc)


class ConvModule(nn.Module):
    """GLU-style gate -> depthwise conv over time -> SwooshR -> projection."""

    def __init__(self, cfg: ZipformerConfig, dim: int, kernel: int) -> None:
        super().__init__()
        m = cfg.machinery
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.out_proj = scaled_linear(dim, dim, _out(m, BRANCH_OUT_SCALE))
        self.balancer1 = Balancer(
            min_positive=Schedule.of((0.0, 0.05), (8000.0, 0.025)),
            max_positive=1.0,
            min_abs=1.5,
            max_abs=Schedule.of((0.0, 5.0), (8000.0, 10.0)),
            enabled=m.balancers,
        )
        self.balancer2 = Balancer(
            1,
            min_positive=Schedule.of((0.0, 0.1), (8000.0, 0.05)),
            max_positive=1.0,
            min_abs=Schedule.of((0.0, 0.2), (20000.0, 0.5)),
            max_abs=10.0,
            enabled=m.balancers,
        )
        self.whiten = Whiten(1, whitening_limit(7.5), channel_dim=1, enabled=m.whiteners)

    def forward(self, x: Tensor, pad_mask: Tensor, bc: float) -> Tensor:
        x, gate = self.in_proj(x).chunk(2, dim=-1)
        x = (x * self.balancer1(gate, bc).sigmoid()).masked_fill(pad_mask[..., None], 0.0)
        x = self.depthwise(x.transpose(1, 2))  # (B, C, T)
        x = self.whiten(self.balancer2(x, bc), bc).transpose(1, 2)
        return self.out_proj(swoosh_r(x))


class FeedForward(nn.Module):
    def __init__(self, cfg: ZipformerConfig, dim: int, hidden: int) -> None:
        super().__init__()
        m = cfg.machinery
        self.in_proj = nn.Linear(dim, hidden)
        self.out_proj = scaled_linear(hidden, dim, _out(m, FF_OUT_SCALE))
        self.dropout = m.dropout
        self.hidden_balancer = Balancer(
            min_positive=0.3, max_positive=1.0, min_abs=0.75, max_abs=5.0, enabled=m.balancers
        )
        self.out_whiten = Whiten(1, whitening_limit(7.5), enabled=m.whiteners)

    def forward(self, x: Tensor, bc: float) -> Tensor:
        x = swoosh_l(self.hidden_balancer(self.in_proj(x), bc))
        # One mask per (utterance, channel), shared over time (icefall's Dropout3).
        x = shared_dropout(x, scheduled(self.dropout, bc), dim=1, training=self.training)
        return self.out_whiten(self.out_proj(x), bc)


class ZipformerLayer(nn.Module):
    """One Zipformer2 layer: FF, non-linear attention, attention, conv, FF, mid bypass,
    attention, conv, FF, BiasNorm, bypass; each module but the first FF can be skipped per
    utterance on a schedule."""

    def __init__(self, cfg: ZipformerConfig, stack: int, index: int) -> None:
        super().__init__()
        m = cfg.machinery
        d, f, h = cfg.encoder_dims[stack], cfg.feedforward_dims[stack], cfg.num_heads[stack]
        k = cfg.cnn_kernels[stack]
        self.attn_weights = RelPosAttentionWeights(cfg, d, h, cfg.query_head_dim, cfg.pos_head_dim)
        self.ff1 = FeedForward(cfg, d, f * 3 // 4)
        self.ff2 = FeedForward(cfg, d, f)
        self.ff3 = FeedForward(cfg, d, f * 5 // 4)
        self.nonlin_attn = NonlinAttention(cfg, d, 3 * d // 4)
        self.attn1 = ValueAttention(cfg, d, h)
        self.attn2 = ValueAttention(cfg, d, h)
        self.conv1 = ConvModule(cfg, d, k)
        self.conv2 = ConvModule(cfg, d, k)
        self.norm = BiasNorm(d)
        self.bypass_mid = Bypass(d, m.bypass_floor)
        self.bypass = Bypass(d, m.bypass_floor, skip=layer_skip_schedule(cfg, stack, index))
        self.attention_skip, self.conv_skip = m.attention_skip, m.conv_skip
        self.ff_skip, self.const_attention = m.ff_skip, m.const_attention
        on = m.balancers
        self.balancer_na = Balancer(
            min_positive=0.3,
            max_positive=0.7,
            min_abs=Schedule.of((0.0, 0.004), (4000.0, 0.02)),
            prob=0.05,
            enabled=on,
        )
        self.balancer_ff2 = Balancer(
            min_positive=0.3,
            max_positive=0.7,
            min_abs=Schedule.of((0.0, 0.0), (4000.0, 0.1)),
            max_abs=2.0,
            prob=0.05,
            enabled=on,
        )
        self.balancer_ff3 = Balancer(
            min_positive=0.3,
            max_positive=0.7,
            min_abs=Schedule.of((0.0, 0.0), (4000.0, 0.2)),
            max_abs=4.0,
            prob=0.05,
            enabled=on,
        )
        self.balancer1 = Balancer(
            min_positive=0.45, max_positive=0.55, min_abs=0.2, max_abs=4.0, enabled=on
        )
        self.balancer2 = Balancer(
            min_positive=0.45, max_positive=0.55, min_abs=0.1, max_abs=4.0, enabled=on
        )
        self.whiten = Whiten(1, whitening_limit(4.0, 3.0), enabled=m.whiteners)

    def forward(
        self, x: Tensor, pos_emb: Tensor, pad_mask: Tensor, bc: float, frames: float
    ) -> Tensor:
        orig = x
        w = self.attn_weights(x, pos_emb, pad_mask, bc, frames)  # (B, H, T, T)
        train = self.training

        def rate(value: Scheduled) -> float:
            return scheduled(value, bc) if train else 0.0

        x = x + self.ff1(x, bc)
        attn_keep = keep_mask(x, rate(self.attention_skip))  # one mask for all three
        w0 = w[:, 0]
        if train and _draw() < scheduled(self.const_attention, bc):
            # Uniform weights over the valid frames: pushes the module to also work as an
            # average over time.
            valid = (~pad_mask).to(w.dtype)[:, None, :]  # (B, 1, T)
            w0 = (valid / valid.sum(-1, keepdim=True)).expand_as(w0)
        na = self.balancer_na(self.nonlin_attn(x, w0, bc), bc)
        x = x + _masked(na, attn_keep)
        x = x + _masked(self.attn1(x, w, bc), attn_keep)
        x = x + _masked(self.conv1(x, pad_mask, bc), keep_mask(x, rate(self.conv_skip)))
        ff2 = self.balancer_ff2(self.ff2(x, bc), bc)
        x = x + _masked(ff2, keep_mask(x, rate(self.ff_skip)))
        x = self.bypass_mid(orig, x, bc)
        x = x + _masked(self.attn2(x, w, bc), attn_keep)
        x = x + _masked(self.conv2(x, pad_mask, bc), keep_mask(x, rate(self.conv_skip)))
        ff3 = self.balancer_ff3(self.ff3(x, bc), bc)
        x = x + _masked(ff3, keep_mask(x, rate(self.ff_skip)))
        x = self.norm(self.balancer1(x, bc))
        x = self.bypass(orig, x, bc)
        return self.whiten(self.balancer2(x, bc), bc)


def pad_with_last(x: Tensor, lengths: Tensor, t_out: int) -> Tensor:
    """(B, T, C) -> (B, t_out, C) where every frame at or past an item's length repeats its last
    valid frame: what an unpadded item would see, so batching does not change results."""
    b, t, _c = x.shape
    if t_out > t:
        x = F.pad(x, (0, 0, 0, t_out - t))
    last = x[torch.arange(b, device=x.device), (lengths - 1).clamp_min(0)]  # (B, C)
    valid = ~make_pad_mask(lengths, t_out)
    return torch.where(valid[..., None], x[:, :t_out], last[:, None, :])


class ZipformerStack(nn.Module):
    """Layers at one frame rate; with ``ds`` > 1, a learned weighted-average downsample before
    and a repeat-upsample plus bypass after (icefall's DownsampledZipformer2Encoder)."""

    def __init__(self, cfg: ZipformerConfig, stack: int) -> None:
        super().__init__()
        m = cfg.machinery
        self.ds = cfg.downsampling[stack]
        self.pos_dim = cfg.pos_dim
        self.dim = cfg.encoder_dims[stack]
        self.unmasked = cfg.unmasked_dims[stack]
        self.pos_emb_dropout = m.pos_emb_dropout
        self.layers = nn.ModuleList(
            ZipformerLayer(cfg, stack, i) for i in range(cfg.num_layers[stack])
        )
        if self.ds > 1:
            self.downsample_bias = nn.Parameter(torch.zeros(self.ds))
            self.out_combiner = Bypass(self.dim, m.bypass_floor)

    def forward(
        self, x: Tensor, lengths: Tensor, bc: float, draws: Tensor | None, frames: float
    ) -> Tensor:
        orig = x
        b, t, c = x.shape
        if self.ds > 1:
            t_ds = (t + self.ds - 1) // self.ds
            x = pad_with_last(x, lengths, t_ds * self.ds).reshape(b, t_ds, self.ds, c)
            w = self.downsample_bias.softmax(dim=0).to(x.dtype)
            x = torch.einsum("btkc,k->btc", x, w)
            lengths = (lengths + self.ds - 1) // self.ds
        pad_mask = make_pad_mask(lengths, x.shape[1])
        pos_emb = rel_pos_embedding(x.shape[1], self.pos_dim, x.device, x.dtype)
        pos_emb = F.dropout(pos_emb, self.pos_emb_dropout, training=self.training)
        fmask = None
        if draws is not None and self.unmasked < self.dim:
            # Utterances lose their channels above `unmasked` (in two bands), so the low
            # channels (what narrower stacks read) learn to carry the information alone.
            fmask = stack_feature_mask(draws, self.dim, self.unmasked, x.dtype)
            x = x * fmask
        for layer in self.layers:
            x = layer(x, pos_emb, pad_mask, bc, frames)
            if fmask is not None:
                x = x * fmask
        if self.ds > 1:
            x = x.repeat_interleave(self.ds, dim=1)[:, :t]
            x = self.out_combiner(orig, x, bc)
        return x


class ConvNeXt(nn.Module):
    def __init__(self, cfg: ZipformerConfig, channels: int, hidden_ratio: int = 3) -> None:
        super().__init__()
        m = cfg.machinery
        kernel = 7
        self.depthwise = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.pointwise1 = nn.Conv2d(channels, hidden_ratio * channels, 1)
        self.pointwise2 = nn.Conv2d(hidden_ratio * channels, channels, 1)
        scale_init(self.pointwise2, _out(m, CONVNEXT_OUT_SCALE))
        self.skip = m.convnext_skip
        self.hidden_balancer = Balancer(
            1, min_positive=0.3, max_positive=1.0, min_abs=0.75, max_abs=5.0, enabled=m.balancers
        )
        self.out_balancer = Balancer(
            1, min_positive=0.4, max_positive=0.6, min_abs=1.0, max_abs=6.0, enabled=m.balancers
        )
        self.out_whiten = Whiten(1, 5.0, channel_dim=1, enabled=m.whiteners)

    def forward(self, x: Tensor, bc: float) -> Tensor:  # (B, C, T, F)
        y = self.hidden_balancer(self.pointwise1(self.depthwise(x)), bc)
        y = self.pointwise2(swoosh_l(y))
        if self.training:
            y = _masked(y, keep_mask(y, scheduled(self.skip, bc)))
        return self.out_whiten(self.out_balancer(x + y, bc), bc)


class Conv2dSubsampling(nn.Module):
    """(B, T, F) at 100 Hz -> (B, (T-7)//2, D) at 50 Hz: three convs (frequency /4), ConvNeXt,
    linear projection over (channels x frequency), BiasNorm, dropout shared over time."""

    def __init__(self, cfg: ZipformerConfig) -> None:
        super().__init__()
        m = cfg.machinery
        c1, c2, c3 = cfg.embed_channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=(0, 1))
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=(1, 2))
        self.balancers = nn.ModuleList(
            Balancer(1, max_abs=a, enabled=m.balancers) for a in (1.0, 4.0, 4.0)
        )
        self.grad_scale = m.embed_grad_scale
        self.convnext = ConvNeXt(cfg, c3)
        out_width = (((cfg.num_features - 1) // 2) - 1) // 2
        self.out = nn.Linear(out_width * c3, cfg.encoder_dims[0])
        self.out_whiten = Whiten(
            1, Schedule.of((0.0, 4.0), (20000.0, 8.0)), grad_scale=0.02, enabled=m.whiteners
        )
        self.out_norm = BiasNorm(cfg.encoder_dims[0])
        self.dropout = m.dropout

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        return ((lengths - 7) // 2).clamp_min(0)

    def forward(self, x: Tensor, lengths: Tensor, bc: float) -> tuple[Tensor, Tensor]:
        x = x.masked_fill(make_pad_mask(lengths, x.shape[1])[..., None], 0.0)
        x = self.conv1(x[:, None])
        if self.training and self.grad_scale != 1.0:
            x = scale_grad(x, self.grad_scale)  # the first conv learns slower
        bal1, bal2, bal3 = self.balancers
        x = swoosh_r(bal1(x, bc))
        x = swoosh_r(bal2(self.conv2(x), bc))
        x = swoosh_r(bal3(self.conv3(x), bc))  # (B, C3, T', F')
        out_lengths = self.output_lengths(lengths)
        # The ConvNeXt's 7-frame kernel would read conv outputs of padded input: zero them,
        # as an unpadded item's zero padding would be.
        pad = make_pad_mask(out_lengths, x.shape[2])
        x = self.convnext(x.masked_fill(pad[:, None, :, None], 0.0), bc)
        b, c, t, f = x.shape
        x = self.out(x.permute(0, 2, 1, 3).reshape(b, t, c * f))
        x = self.out_norm(self.out_whiten(x, bc))
        x = shared_dropout(x, scheduled(self.dropout, bc), dim=1, training=self.training)
        return x, out_lengths


def convert_channels(x: Tensor, dim: int) -> Tensor:
    """Truncate or zero-pad the channel dimension to ``dim`` (between stacks of other width)."""
    c = x.shape[-1]
    if dim == c:
        return x
    if dim < c:
        return x[..., :dim]
    return F.pad(x, (0, dim - c))


class Zipformer2(nn.Module):
    """fbank (B, T, F) + lengths -> (B, (T-7)//2, max(encoder_dims)) at 50 Hz + lengths."""

    def __init__(self, cfg: ZipformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Conv2dSubsampling(cfg)
        self.stacks = nn.ModuleList(ZipformerStack(cfg, i) for i in range(len(cfg.downsampling)))
        self.dims = cfg.encoder_dims

    @property
    def output_dim(self) -> int:
        return self.cfg.output_dim

    def forward(
        self, x: Tensor, lengths: Tensor, batch_count: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """``batch_count``: the schedules' position (needed in training, ignored in eval)."""
        m = self.cfg.machinery
        if self.training and batch_count is None:
            raise ValueError(
                "Zipformer2 in training mode needs batch_count (the schedules' position); "
                "call .eval() for inference"
            )
        bc = float(batch_count) if self.training and batch_count is not None else 0.0
        x, lengths = self.embed(x, lengths, bc)
        draws = None
        frames = 1.0
        if self.training:
            if m.feature_mask_prob > 0:
                draws = feature_mask_draws(x.shape[0], m.feature_mask_prob, x.device)
            if m.attention_score_limit > 0:
                frames = max(float(lengths.sum()), 1.0)  # the loss is per output frame
        outputs = []
        for stack, dim in zip(self.stacks, self.dims, strict=True):
            x = stack(convert_channels(x, dim), lengths, bc, draws, frames)
            outputs.append(x)
        # Full-width output: channels the last (narrow) stacks lack come from the most recent
        # stack that had them (icefall's get_full_dim_output).
        parts = [outputs[-1]]
        have = outputs[-1].shape[-1]
        for out in reversed(outputs[:-1]):
            if out.shape[-1] > have:
                parts.append(out[..., have:])
                have = out.shape[-1]
        x = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return x.masked_fill(make_pad_mask(lengths, x.shape[1])[..., None], 0.0), lengths
