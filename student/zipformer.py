"""Zipformer2 encoder (icefall's ``zipformer.py``, written again; SPEC section 4).

Shapes are batch-first: ``(B, T, C)``. Padding is ``pad_mask`` (B, T), True on padded frames.

Kept from icefall: Conv2d subsampling with a ConvNeXt block to 50 Hz ((T-7)//2), stacks at
downsampling 1,2,4,8,4,2,1 joined by learned bypasses, the layer layout (three feed-forwards,
shared attention weights feeding non-linear attention and two value attentions, two convolution
modules, mid and final bypass, BiasNorm), SwooshL/SwooshR, compact relative position embedding,
channel truncation/zero-padding between stacks of different widths and training-time feature
masks above the unmasked dims. Parameter counts match icefall's module sizes.

Simplified: no Balancer/Whiten (they only shape gradients), plain ``nn.Linear`` (ScaledLinear
differs only in initial scale), scheduled dropout/bypass values are constants, attention scores
carry an explicit 1/sqrt(d) instead of icefall's pre-scaled projection init. The output stays at
50 Hz (no output downsampling), as SPEAR's student does.

Padding is respected exactly: valid output frames do not depend on what the padded input frames
hold or how long the batch is (downsampling pads with the last *valid* frame, convolutions see
zeros past the end, attention masks padded keys). ``tests/student/test_zipformer.py`` checks it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spear.student.config import ZipformerConfig


def swoosh_l(x: Tensor) -> Tensor:
    return F.softplus(x - 4.0) - 0.08 * x - 0.035


def swoosh_r(x: Tensor) -> Tensor:
    return F.softplus(x - 1.0) - 0.08 * x - 0.313261687


class SwooshR(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return swoosh_r(x)


class BiasNorm(nn.Module):
    """x / rms(x - bias) * exp(log_scale): LayerNorm without removing the mean, so a channel
    can carry a large constant without it being normalised away (icefall's argument)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: Tensor) -> Tensor:
        rms = (x - self.bias).pow(2).mean(-1, keepdim=True).add(1e-8).rsqrt()
        return x * rms * self.log_scale.exp()


class Bypass(nn.Module):
    """orig + scale * (new - orig), a learned per-channel residual gate kept in [lo, 1]."""

    def __init__(self, dim: int, lo: float = 0.2) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.5))
        self.lo = lo

    def forward(self, orig: Tensor, new: Tensor) -> Tensor:
        return orig + (new - orig) * self.scale.clamp(self.lo, 1.0)


def make_pad_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True on padding."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


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


class RelPosAttentionWeights(nn.Module):
    """Attention weights (B, H, T, T) from content (q.k) and relative position (p.pos) scores;
    computed once per layer and shared by three attention modules."""

    def __init__(self, dim: int, pos_dim: int, heads: int, q_dim: int, p_dim: int) -> None:
        super().__init__()
        self.heads, self.q_dim, self.p_dim = heads, q_dim, p_dim
        self.in_proj = nn.Linear(dim, (2 * q_dim + p_dim) * heads)
        self.linear_pos = nn.Linear(pos_dim, heads * p_dim, bias=False)

    def forward(self, x: Tensor, pos_emb: Tensor, pad_mask: Tensor) -> Tensor:
        b, t, _ = x.shape
        h, qd, pd = self.heads, self.q_dim, self.p_dim
        proj = self.in_proj(x)
        q = proj[..., : h * qd].reshape(b, t, h, qd).transpose(1, 2)
        k = proj[..., h * qd : 2 * h * qd].reshape(b, t, h, qd).transpose(1, 2)
        p = proj[..., 2 * h * qd :].reshape(b, t, h, pd).transpose(1, 2)  # (B, H, T, pd)
        scores = torch.matmul(q, k.transpose(-1, -2)) * qd**-0.5  # (B, H, T, T)
        pos = self.linear_pos(pos_emb).reshape(2 * t - 1, h, pd).permute(1, 2, 0)  # (H, pd, 2T-1)
        pos_full = torch.matmul(p, pos).contiguous()  # (B, H, T, 2T-1), column = offset + T-1
        # Row i needs columns (T-1-i)..(2T-2-i): a strided view, no index tensor of (B,H,T,T).
        s = pos_full.stride()
        pos_scores = pos_full.as_strided(
            (b, h, t, t), (s[0], s[1], s[2] - 1, s[3]), pos_full.storage_offset() + t - 1
        )
        scores = (scores + pos_scores).float()
        scores = scores.masked_fill(pad_mask[:, None, None, :], -1e4)
        return scores.softmax(dim=-1).to(x.dtype)


class ValueAttention(nn.Module):
    """Applies shared attention weights to its own values (icefall's SelfAttention)."""

    def __init__(self, dim: int, heads: int, v_dim: int) -> None:
        super().__init__()
        self.heads, self.v_dim = heads, v_dim
        self.in_proj = nn.Linear(dim, heads * v_dim)
        self.out_proj = nn.Linear(heads * v_dim, dim)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        b, t, _ = x.shape
        v = self.in_proj(x).reshape(b, t, self.heads, self.v_dim).transpose(1, 2)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, -1)
        return self.out_proj(out)


class NonlinAttention(nn.Module):
    """tanh-gated values mixed by one head's attention weights, then gated again."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim, 3 * hidden)
        self.out_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        s, v, y = self.in_proj(x).chunk(3, dim=-1)
        v = torch.matmul(weights, v * s.tanh())  # weights: (B, T, T)
        return self.out_proj(v * y)


class ConvModule(nn.Module):
    """GLU-style gate -> depthwise conv over time -> SwooshR -> projection."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        x, gate = self.in_proj(x).chunk(2, dim=-1)
        x = (x * gate.sigmoid()).masked_fill(pad_mask[..., None], 0.0)
        x = self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        return self.out_proj(swoosh_r(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim, hidden)
        self.out_proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.dropout(swoosh_l(self.in_proj(x))))


class ZipformerLayer(nn.Module):
    """One Zipformer2 layer: FF, non-linear attention, attention, conv, FF, mid bypass,
    attention, conv, FF, BiasNorm, bypass."""

    def __init__(self, cfg: ZipformerConfig, stack: int) -> None:
        super().__init__()
        d, f, h = cfg.encoder_dims[stack], cfg.feedforward_dims[stack], cfg.num_heads[stack]
        k = cfg.cnn_kernels[stack]
        self.attn_weights = RelPosAttentionWeights(
            d, cfg.pos_dim, h, cfg.query_head_dim, cfg.pos_head_dim
        )
        self.ff1 = FeedForward(d, f * 3 // 4, cfg.dropout)
        self.ff2 = FeedForward(d, f, cfg.dropout)
        self.ff3 = FeedForward(d, f * 5 // 4, cfg.dropout)
        self.nonlin_attn = NonlinAttention(d, 3 * d // 4)
        self.attn1 = ValueAttention(d, h, cfg.value_head_dim)
        self.attn2 = ValueAttention(d, h, cfg.value_head_dim)
        self.conv1 = ConvModule(d, k)
        self.conv2 = ConvModule(d, k)
        self.norm = BiasNorm(d)
        self.bypass_mid = Bypass(d, lo=0.0)
        self.bypass = Bypass(d, lo=0.2)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, pos_emb: Tensor, pad_mask: Tensor) -> Tensor:
        orig = x
        w = self.attn_weights(x, pos_emb, pad_mask)  # (B, H, T, T)
        drop = self.dropout
        x = x + drop(self.ff1(x))
        x = x + drop(self.nonlin_attn(x, w[:, 0]))
        x = x + drop(self.attn1(x, w))
        x = x + drop(self.conv1(x, pad_mask))
        x = x + drop(self.ff2(x))
        x = self.bypass_mid(orig, x)
        x = x + drop(self.attn2(x, w))
        x = x + drop(self.conv2(x, pad_mask))
        x = x + drop(self.ff3(x))
        return self.bypass(orig, self.norm(x))


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
        self.ds = cfg.downsampling[stack]
        self.pos_dim = cfg.pos_dim
        self.dim = cfg.encoder_dims[stack]
        self.unmasked = cfg.unmasked_dims[stack]
        self.feature_mask_prob = cfg.feature_mask_prob
        self.layers = nn.ModuleList(
            ZipformerLayer(cfg, stack) for _ in range(cfg.num_layers[stack])
        )
        if self.ds > 1:
            self.downsample_bias = nn.Parameter(torch.zeros(self.ds))
            self.out_combiner = Bypass(self.dim, lo=0.0)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
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
        fmask = self._feature_mask(b, x.shape[1], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, pos_emb, pad_mask)
            if fmask is not None:
                x = x * fmask
        if self.ds > 1:
            x = x.repeat_interleave(self.ds, dim=1)[:, :t]
            x = self.out_combiner(orig, x)
        return x

    def _feature_mask(
        self, b: int, t: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor | None:
        # Random frames lose their channels above `unmasked` in training, so the low channels
        # (what the next, narrower stacks read) learn to carry the information on their own.
        if not self.training or self.feature_mask_prob == 0.0 or self.unmasked >= self.dim:
            return None
        keep = (torch.rand(b, t, 1, device=device) >= self.feature_mask_prob).to(dtype)
        mask = torch.ones(b, t, self.dim, device=device, dtype=dtype)
        mask[..., self.unmasked :] = keep
        return mask


class ConvNeXt(nn.Module):
    def __init__(self, channels: int, hidden_ratio: int = 3, kernel: int = 7) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.pointwise1 = nn.Conv2d(channels, hidden_ratio * channels, 1)
        self.pointwise2 = nn.Conv2d(hidden_ratio * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, F)
        return x + self.pointwise2(swoosh_l(self.pointwise1(self.depthwise(x))))


class Conv2dSubsampling(nn.Module):
    """(B, T, F) at 100 Hz -> (B, (T-7)//2, D) at 50 Hz: three convs (frequency /4), ConvNeXt,
    linear projection over (channels x frequency), BiasNorm."""

    def __init__(
        self,
        num_features: int,
        out_dim: int,
        dropout: float,
        channels: tuple[int, int, int] = (8, 32, 128),
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=(0, 1)),
            SwooshR(),
            nn.Conv2d(c1, c2, 3, stride=2),
            SwooshR(),
            nn.Conv2d(c2, c3, 3, stride=(1, 2)),
            SwooshR(),
        )
        self.convnext = ConvNeXt(c3)
        out_width = (((num_features - 1) // 2) - 1) // 2
        self.out = nn.Linear(out_width * c3, out_dim)
        self.out_norm = BiasNorm(out_dim)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        return ((lengths - 7) // 2).clamp_min(0)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = x.masked_fill(make_pad_mask(lengths, x.shape[1])[..., None], 0.0)
        x = self.conv(x[:, None])  # (B, 128, T', F')
        out_lengths = self.output_lengths(lengths)
        # The ConvNeXt's 7-frame kernel would read conv outputs of padded input: zero them,
        # as an unpadded item's zero padding would be.
        pad = make_pad_mask(out_lengths, x.shape[2])
        x = self.convnext(x.masked_fill(pad[:, None, :, None], 0.0))
        b, c, t, f = x.shape
        x = self.out(x.permute(0, 2, 1, 3).reshape(b, t, c * f))
        return self.dropout(self.out_norm(x)), out_lengths


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
        self.embed = Conv2dSubsampling(
            cfg.num_features, cfg.encoder_dims[0], cfg.dropout, cfg.embed_channels
        )
        self.stacks = nn.ModuleList(ZipformerStack(cfg, i) for i in range(len(cfg.downsampling)))
        self.dims = cfg.encoder_dims

    @property
    def output_dim(self) -> int:
        return self.cfg.output_dim

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.embed(x, lengths)
        outputs = []
        for stack, dim in zip(self.stacks, self.dims, strict=True):
            x = stack(convert_channels(x, dim), lengths)
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
