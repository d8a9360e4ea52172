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

Checkpoint layouts read by :func:`load_wavlm`: a transformers model folder (or hub id), the
original unilm ``WavLM-Large.pt`` (``{'cfg', 'model'}``) and a torchaudio ``wavlm_model`` state
dict. All are converted to the transformers key names first, then to ours.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spear.checkpoints import (
    CheckpointError,
    load_weights,
    read_json,
    require_family,
    weights_in_dir,
)


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


# --- checkpoint layouts -------------------------------------------------------------------------


def _safe_eval_layers(text: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``conv_feature_layers`` string (lists, tuples, ints, + and *) safely."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise CheckpointError(f"unsupported conv_feature_layers expression: {text!r}")

    try:
        value = ev(ast.parse(text, mode="eval").body)
    except SyntaxError:
        raise CheckpointError(f"bad conv_feature_layers {text!r}") from None
    return [tuple(v) for v in value]


def arch_from_hf_config(cfg: dict[str, Any]) -> WavLMArch:
    """transformers ``config.json`` -> :class:`WavLMArch`."""
    try:
        return WavLMArch(
            conv_layers=tuple(
                zip(cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"], strict=True)
            ),
            conv_bias=bool(cfg.get("conv_bias", False)),
            extractor_norm=cfg.get("feat_extract_norm", "group"),
            dim=int(cfg["hidden_size"]),
            ffn_dim=int(cfg["intermediate_size"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_layers=int(cfg["num_hidden_layers"]),
            pos_conv_kernel=int(cfg["num_conv_pos_embeddings"]),
            pos_conv_groups=int(cfg["num_conv_pos_embedding_groups"]),
            num_buckets=int(cfg.get("num_buckets", 320)),
            max_distance=int(cfg.get("max_bucket_distance", 800)),
            layer_norm_first=bool(cfg.get("do_stable_layer_norm", False)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"not a WavLM config.json: {err}") from None


def arch_from_unilm_cfg(cfg: dict[str, Any]) -> WavLMArch:
    """The original unilm checkpoint's ``cfg`` dict -> :class:`WavLMArch`."""
    if not cfg.get("relative_position_embedding", True) or not cfg.get("gru_rel_pos", True):
        raise CheckpointError(
            "only WavLM checkpoints with gated relative position bias are supported"
        )
    mode = cfg.get("extractor_mode", "default")
    try:
        layers = cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
        return WavLMArch(
            conv_layers=tuple(_safe_eval_layers(layers) if isinstance(layers, str) else layers),
            conv_bias=bool(cfg.get("conv_bias", False)),
            extractor_norm="layer" if mode == "layer_norm" else "group",
            dim=int(cfg["encoder_embed_dim"]),
            ffn_dim=int(cfg["encoder_ffn_embed_dim"]),
            num_heads=int(cfg["encoder_attention_heads"]),
            num_layers=int(cfg["encoder_layers"]),
            pos_conv_kernel=int(cfg.get("conv_pos", 128)),
            pos_conv_groups=int(cfg.get("conv_pos_groups", 16)),
            num_buckets=int(cfg.get("num_buckets", 320)),
            max_distance=int(cfg.get("max_distance", 800)),
            layer_norm_first=bool(cfg.get("layer_norm_first", False)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"not a WavLM unilm cfg: {err}") from None


_UNILM_LAYER = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.out_proj",
    "self_attn.grep_linear": "attention.gru_rel_pos_linear",
    "self_attn.grep_a": "attention.gru_rel_pos_const",
    "self_attn.relative_attention_bias": "attention.rel_attn_embed",
    "self_attn_layer_norm": "layer_norm",
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
}


def unilm_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original unilm/fairseq WavLM keys -> transformers ``WavLMModel`` keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        new: str | None = None
        if key.startswith("feature_extractor.conv_layers."):
            i, rest = parts[2], ".".join(parts[3:])
            if rest.startswith("0."):  # the conv
                new = f"feature_extractor.conv_layers.{i}.conv.{parts[-1]}"
            elif rest.startswith("2.1.") or rest.startswith("2."):  # LayerNorm / GroupNorm
                new = f"feature_extractor.conv_layers.{i}.layer_norm.{parts[-1]}"
        elif parts[0] == "layer_norm":
            new = f"feature_projection.layer_norm.{parts[-1]}"
        elif parts[0] == "post_extract_proj":
            new = f"feature_projection.projection.{parts[-1]}"
        elif key.startswith("encoder.pos_conv.0."):
            new = f"encoder.pos_conv_embed.conv.{parts[-1]}"
        elif key.startswith("encoder.layer_norm."):
            new = key
        elif key.startswith("encoder.layers."):
            i, rest = parts[2], ".".join(parts[3:-1])
            if rest in _UNILM_LAYER:
                new = f"encoder.layers.{i}.{_UNILM_LAYER[rest]}.{parts[-1]}"
            elif parts[3:] == ["self_attn", "grep_a"]:  # a bare parameter, no .weight suffix
                new = f"encoder.layers.{i}.attention.gru_rel_pos_const"
        if new is not None:
            out[new] = value
    return out


def torchaudio_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchaudio ``wavlm_model`` keys -> transformers ``WavLMModel`` keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("feature_extractor."):
            out[key] = value
        elif key.startswith("encoder.feature_projection."):
            out[key.removeprefix("encoder.")] = value
        elif key.startswith("encoder.transformer."):
            rest = key.removeprefix("encoder.transformer.")
            if ".attention.attention.in_proj_" in rest:
                prefix, kind = rest.split(".attention.attention.in_proj_")
                q, k, v = value.chunk(3, dim=0)
                for name, part in (("q", q), ("k", k), ("v", v)):
                    out[f"encoder.{prefix}.attention.{name}_proj.{kind}"] = part
            else:
                out["encoder." + rest.replace(".attention.attention.", ".attention.")] = value
    return out


def _fold_weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """``weight_norm(dim=2)``: w = g * v / ||v||, the norm taken over all dims but 2."""
    return g * v / v.norm(dim=(0, 1), keepdim=True)


def hf_to_ours(state: dict[str, Tensor], arch: WavLMArch, layer: int) -> dict[str, Tensor]:
    """transformers keys -> :class:`WavLM` keys, dropping layers above ``layer``."""
    state = {k.removeprefix("wavlm."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    for i in range(len(arch.conv_layers)):
        src = f"feature_extractor.conv_layers.{i}."
        for name in ("conv.weight", "conv.bias", "layer_norm.weight", "layer_norm.bias"):
            if src + name in state:
                out[f"convs.{i}.{name.replace('layer_norm', 'norm')}"] = state[src + name]
    for name in ("weight", "bias"):
        out[f"proj_norm.{name}"] = state.get(f"feature_projection.layer_norm.{name}")  # type: ignore[assignment]
        out[f"proj.{name}"] = state.get(f"feature_projection.projection.{name}")  # type: ignore[assignment]
        if not arch.layer_norm_first:
            out[f"input_norm.{name}"] = state.get(f"encoder.layer_norm.{name}")  # type: ignore[assignment]
    pc = "encoder.pos_conv_embed.conv."
    if pc + "weight_g" in state:
        out["pos_conv.weight"] = _fold_weight_norm(state[pc + "weight_g"], state[pc + "weight_v"])
    elif pc + "parametrizations.weight.original0" in state:
        out["pos_conv.weight"] = _fold_weight_norm(
            state[pc + "parametrizations.weight.original0"],
            state[pc + "parametrizations.weight.original1"],
        )
    elif pc + "weight" in state:
        out["pos_conv.weight"] = state[pc + "weight"]
    out["pos_conv.bias"] = state.get(pc + "bias")  # type: ignore[assignment]
    out["rel_bias.weight"] = state.get("encoder.layers.0.attention.rel_attn_embed.weight")  # type: ignore[assignment]
    for i in range(layer):
        src = f"encoder.layers.{i}."
        a = src + "attention."
        try:
            out[f"layers.{i}.attn.qkv.weight"] = torch.cat(
                [state[a + f"{p}_proj.weight"] for p in "qkv"]
            )
            out[f"layers.{i}.attn.qkv.bias"] = torch.cat(
                [state[a + f"{p}_proj.bias"] for p in "qkv"]
            )
        except KeyError as err:
            raise CheckpointError(f"WavLM checkpoint lacks {err.args[0]!r}") from None
        pairs = {
            "attn.out": "attention.out_proj",
            "attn.gate": "attention.gru_rel_pos_linear",
            "norm1": "layer_norm",
            "ff1": "feed_forward.intermediate_dense",
            "ff2": "feed_forward.output_dense",
            "norm2": "final_layer_norm",
        }
        for ours, theirs in pairs.items():
            for name in ("weight", "bias"):
                out[f"layers.{i}.{ours}.{name}"] = state.get(src + f"{theirs}.{name}")  # type: ignore[assignment]
        out[f"layers.{i}.attn.gate_const"] = state.get(a + "gru_rel_pos_const")  # type: ignore[assignment]
    missing = sorted(k for k, v in out.items() if v is None)
    if missing:
        raise CheckpointError(f"WavLM checkpoint lacks weights for {missing[:5]}")
    return out


def arch_from_state(state: dict[str, Tensor], default: WavLMArch) -> WavLMArch:
    """Infer sizes from a transformers-keyed state dict without a config (torchaudio layout).

    Strides, ``max_distance`` and pre/post-LN are not in the weights: they come from ``default``.
    """
    state = {k.removeprefix("wavlm."): v for k, v in state.items()}
    try:
        convs = []
        i = 0
        while f"feature_extractor.conv_layers.{i}.conv.weight" in state:
            c, _, k = state[f"feature_extractor.conv_layers.{i}.conv.weight"].shape
            stride = default.conv_layers[i][2] if i < len(default.conv_layers) else 2
            convs.append((int(c), int(k), stride))
            i += 1
        n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
        pc = "encoder.pos_conv_embed.conv."
        v = state.get(pc + "weight_v", state.get(pc + "parametrizations.weight.original1"))
        if v is None:
            v = state[pc + "weight"]
        dim = int(state["feature_projection.projection.weight"].shape[0])
        return WavLMArch(
            conv_layers=tuple(convs),
            conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
            extractor_norm=(
                "layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in state else "group"
            ),
            dim=dim,
            ffn_dim=int(state["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0]),
            num_heads=int(state["encoder.layers.0.attention.gru_rel_pos_const"].shape[1]),
            num_layers=n_layers,
            pos_conv_kernel=int(v.shape[2]),
            pos_conv_groups=dim // int(v.shape[1]),
            num_buckets=int(state["encoder.layers.0.attention.rel_attn_embed.weight"].shape[0]),
            max_distance=default.max_distance,
            layer_norm_first=default.layer_norm_first,
            layer_norm_eps=default.layer_norm_eps,
        )
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(
            f"cannot infer the WavLM architecture from the weights: {err}"
        ) from None


def read_wavlm_checkpoint(
    path: Path, default_arch: WavLMArch
) -> tuple[WavLMArch, dict[str, Tensor], str]:
    """Read any supported layout into (arch, transformers-keyed state, layout name).

    Architecture comes from the checkpoint's own config where it has one (transformers
    ``config.json``, unilm ``cfg``); for a bare state dict (torchaudio) sizes are read from the
    weights' shapes and the rest from ``default_arch``.
    """
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{str(path)!r} is a folder without config.json")
        hf_cfg = read_json(cfg_file)
        require_family(path, "WavLM", (), hf_cfg)
        weights = weights_in_dir(path)
        require_family(path, "WavLM", weights)
        return arch_from_hf_config(hf_cfg), weights, "transformers"
    obj = load_weights(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict")
    inner = obj.get("model")
    require_family(path, "WavLM", inner if isinstance(inner, dict) else obj)
    if "model" in obj and "cfg" in obj:
        cfg = obj["cfg"]
        if not isinstance(cfg, dict):
            raise CheckpointError("unilm checkpoint's 'cfg' is not a plain dict")
        cfg = cfg.get("model", cfg) if isinstance(cfg.get("model"), dict) else cfg
        return arch_from_unilm_cfg(cfg), unilm_to_hf(obj["model"]), "unilm"
    state = obj.get("state_dict", obj)
    if any(k.startswith("encoder.transformer.") for k in state):
        hf = torchaudio_to_hf(state)
        return arch_from_state(hf, default_arch), hf, "torchaudio"
    if any(k.startswith(("encoder.layers.", "wavlm.encoder.layers.")) for k in state):
        return arch_from_state(state, default_arch), state, "transformers"
    raise CheckpointError(
        f"{str(path)!r} is not a WavLM checkpoint layout spear knows "
        "(transformers folder, unilm {'cfg','model'}, torchaudio state dict)"
    )


def build_wavlm(arch: WavLMArch, layer: int, state: dict[str, Tensor] | None = None) -> WavLM:
    """A :class:`WavLM` in eval mode; random init when ``state`` is None."""
    model = WavLM(arch, layer)
    if state is not None:
        ours = hf_to_ours(state, arch, layer)
        expected = model.state_dict()
        for k, v in ours.items():
            if k in expected and tuple(expected[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"WavLM weight {k!r} has shape {tuple(v.shape)}, the architecture expects "
                    f"{tuple(expected[k].shape)}"
                )
        missing, unexpected = model.load_state_dict(ours, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"WavLM weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model.eval()
