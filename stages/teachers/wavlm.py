"""WavLM (Chen et al. 2022), inference only, stopping at the layer whose output we keep.

Computes what transformers' ``WavLMModel(...).hidden_states[layer]`` computes (index 0 = the
transformer input, index k = output of transformer layer k, before any final LayerNorm), with
three differences that make it batch-safe and fast:

* the waveform is normalised per item over its own valid samples (zero mean, unit variance,
  ``F.layer_norm`` style as in the original unilm code), never over the padded batch;
* layers above ``layer`` are neither built nor run;
* attention is one fused ``scaled_dot_product_attention`` call with the gated relative position
  bias and the key padding mask folded into one additive mask.

Frame count: the CNN encoder's conv chain, ``n -> (n - k) // s + 1`` per conv; for WavLM Large
(receptive field 400 samples, stride 320) that is ``max(0, (n - 400) // 320 + 1)``.

The architecture only: reading checkpoints (transformers, unilm, torchaudio layouts) into it is
:mod:`spear.stages.teachers.weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spear.checkpoints import CheckpointError


@dataclass(kw_only=True, frozen=True)
class WavLMArch:
    """WavLM architecture (defaults: WavLM Large)."""

    conv_layers: tuple[tuple[int, int, int], ...] = (
        ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
    )
    """CNN feature encoder: (channels, kernel, stride) per conv."""
    conv_bias: bool = False
    """Whether the feature encoder's convs have a bias."""
    extractor_norm: Literal["layer", "group"] = "layer"
    """``layer``: LayerNorm after every conv (Large); ``group``: GroupNorm after the first
    (Base)."""
    dim: int = 1024
    """Transformer width."""
    ffn_dim: int = 4096
    """Feed-forward inner width."""
    num_heads: int = 16
    """Attention heads."""
    num_layers: int = 24
    """Transformer layers in the full model (we build at most ``layer`` of them)."""
    pos_conv_kernel: int = 128
    """Kernel of the convolutional positional embedding."""
    pos_conv_groups: int = 16
    """Groups of the convolutional positional embedding."""
    num_buckets: int = 320
    """Relative position buckets."""
    max_distance: int = 800
    """Relative distance (frames) where the log-spaced buckets saturate."""
    layer_norm_first: bool = True
    """Pre-LN transformer (Large, ``do_stable_layer_norm``); False for the post-LN Base models."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the transformer's LayerNorms."""

    def num_frames(self, num_samples: int) -> int:
        """Frames the CNN encoder produces for ``num_samples`` samples."""
        n = num_samples
        for _, k, s in self.conv_layers:
            n = (n - k) // s + 1 if n >= k else 0
        return n


def wavlm_large() -> WavLMArch:
    return WavLMArch()


def wavlm_tiny() -> WavLMArch:
    """Same code, a few narrow layers: for tests and the demo."""
    return WavLMArch(
        conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2,
        dim=64,
        ffn_dim=128,
        num_heads=4,
        num_layers=3,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        num_buckets=32,
        max_distance=64,
    )


def frame_lengths(arch: WavLMArch, num_samples: Tensor) -> Tensor:
    """Vectorised :meth:`WavLMArch.num_frames`. # (B,) -> (B,)"""
    n = num_samples.long()
    for _, k, s in arch.conv_layers:
        n = torch.where(n >= k, torch.div(n - k, s, rounding_mode="floor") + 1, 0)
    return n


def normalize_waveform(wave: Tensor, lengths: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit variance per item over its valid samples; padding stays 0.

    ``eps`` matches ``F.layer_norm`` as used by the original WavLM code. # (B, S) -> (B, S)
    """
    wave = wave.float()
    valid = torch.arange(wave.shape[1], device=wave.device)[None, :] < lengths[:, None]  # (B, S)
    count = lengths.clamp(min=1).to(wave.dtype)[:, None]
    mean = (wave * valid).sum(1, keepdim=True) / count
    centred = (wave - mean) * valid
    var = centred.square().sum(1, keepdim=True) / count
    return centred * torch.rsqrt(var + eps)


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, s: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, k, stride=s, bias=bias)
        self.norm_kind = norm
        self.norm: nn.Module | None = None
        if norm == "layer":
            self.norm = nn.LayerNorm(c_out)
        elif norm == "group":
            # GroupNorm(C, C): per-channel statistics over time, taken over valid frames only.
            self.norm = nn.GroupNorm(c_out, c_out)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:  # (B, C, S) -> (B, C', S')
        x = self.conv(x)
        if self.norm_kind == "layer":
            assert self.norm is not None
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm_kind == "group":
            assert isinstance(self.norm, nn.GroupNorm)
            valid = (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None])[
                :, None, :
            ]  # (B, 1, T)
            count = lengths.clamp(min=1)[:, None, None].to(x.dtype)
            mean = (x * valid).sum(2, keepdim=True) / count
            var = ((x - mean) * valid).square().sum(2, keepdim=True) / count
            x = (x - mean) * torch.rsqrt(var + self.norm.eps)
            x = x * self.norm.weight[None, :, None] + self.norm.bias[None, :, None]
        return F.gelu(x)


class _Attention(nn.Module):
    """Self-attention with WavLM's gated relative position bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.gate = nn.Linear(self.head_dim, 8)
        self.gate_const = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def forward(self, x: Tensor, bias: Tensor, key_mask: Tensor | None) -> Tensor:
        b, t, d = x.shape  # (B, T, D)
        h, hd = self.num_heads, self.head_dim
        # The gate depends on each query position's own input: (B, H, T, 1).
        g = self.gate(x.view(b, t, h, hd).transpose(1, 2)).view(b, h, t, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(g).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.gate_const - 1.0) + 2.0
        q, k, v = self.qkv(x).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        mask = gate * bias  # (B, H, T, T)
        if key_mask is not None:
            mask = mask.masked_fill(key_mask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class _Layer(nn.Module):
    def __init__(self, arch: WavLMArch):
        super().__init__()
        self.pre_ln = arch.layer_norm_first
        self.attn = _Attention(arch.dim, arch.num_heads)
        self.norm1 = nn.LayerNorm(arch.dim, eps=arch.layer_norm_eps)
        self.ff1 = nn.Linear(arch.dim, arch.ffn_dim)
        self.ff2 = nn.Linear(arch.ffn_dim, arch.dim)
        self.norm2 = nn.LayerNorm(arch.dim, eps=arch.layer_norm_eps)

    def forward(self, x: Tensor, bias: Tensor, key_mask: Tensor | None) -> Tensor:
        if self.pre_ln:
            x = x + self.attn(self.norm1(x), bias, key_mask)
            return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))
        x = self.norm1(x + self.attn(x, bias, key_mask))
        return self.norm2(x + self.ff2(F.gelu(self.ff1(x))))


class WavLM(nn.Module):
    """WavLM up to transformer layer ``layer`` (1-based; 0 = the transformer's input)."""

    def __init__(self, arch: WavLMArch, layer: int):
        super().__init__()
        if not 0 <= layer <= arch.num_layers:
            raise CheckpointError(f"WavLM layer {layer} is outside 0..{arch.num_layers}")
        self.arch, self.layer = arch, layer
        convs = []
        c_in = 1
        for i, (c, k, s) in enumerate(arch.conv_layers):
            norm = "layer" if arch.extractor_norm == "layer" else ("group" if i == 0 else None)
            convs.append(_ConvBlock(c_in, c, k, s, arch.conv_bias, norm))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.proj_norm = nn.LayerNorm(c_in, eps=arch.layer_norm_eps)
        self.proj = nn.Linear(c_in, arch.dim)
        k = arch.pos_conv_kernel
        self.pos_conv = nn.Conv1d(
            arch.dim, arch.dim, k, padding=k // 2, groups=arch.pos_conv_groups
        )
        # Post-LN models normalise the transformer input; pre-LN ones end with a LayerNorm we
        # never need, since we stop at an inner layer.
        self.input_norm = (
            None if arch.layer_norm_first else nn.LayerNorm(arch.dim, eps=arch.layer_norm_eps)
        )
        self.rel_bias = nn.Embedding(arch.num_buckets, arch.num_heads)
        self.layers = nn.ModuleList([_Layer(arch) for _ in range(layer)])

    def _buckets(self, t: int, device: torch.device) -> Tensor:
        """Relative-position bucket of (query i, key j), bidirectional, log-spaced far out."""
        pos = torch.arange(t, device=device)
        rel = pos[None, :] - pos[:, None]  # (T, T) key - query
        half = self.arch.num_buckets // 2
        exact = half // 2
        buckets = (rel > 0).long() * half
        dist = rel.abs()
        far = (
            exact
            + (
                torch.log(dist.float().clamp(min=1) / exact)
                / math.log(self.arch.max_distance / exact)
                * (half - exact)
            ).long()
        )
        far = far.clamp(max=half - 1)
        return buckets + torch.where(dist < exact, dist, far)

    def forward(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``wave`` already normalised (see :func:`normalize_waveform`), zero-padded.

        Returns hidden states (B, T, D) and valid frames per item (B,).
        """
        x = wave[:, None, :]  # (B, 1, S)
        n = lengths.long()
        for block, (_, k, s) in zip(self.convs, self.arch.conv_layers, strict=True):
            n = torch.where(n >= k, torch.div(n - k, s, rounding_mode="floor") + 1, 0)
            x = block(x, n)  # (B, C, T')
        frames = n  # (B,)
        x = self.proj(self.proj_norm(x.transpose(1, 2)))  # (B, T, D)
        t = x.shape[1]
        valid = torch.arange(t, device=x.device)[None, :] < frames[:, None]  # (B, T)
        # Zeroing padded frames makes the positional conv see what an unpadded item sees.
        x = x * valid[..., None].to(x.dtype)
        pos = self.pos_conv(x.transpose(1, 2))[..., :t]  # even kernels give T+1 frames: drop last
        x = x + F.gelu(pos).transpose(1, 2)
        if self.input_norm is not None:
            x = self.input_norm(x)
        bias = self.rel_bias(self._buckets(t, x.device)).permute(2, 0, 1)[None]  # (1, H, T, T)
        key_mask = None if bool(valid.all()) else ~valid[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, bias, key_mask)
        return x, frames


def build_wavlm(arch: WavLMArch, layer: int) -> WavLM:
    """A random-initialised :class:`WavLM` in eval mode (weights: ``weights.load_strict``)."""
    return WavLM(arch, layer).eval()
