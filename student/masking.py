"""wav2vec2-style span masking on the fbank (SPEC section 4).

Time: an utterance of T frames gets ``floor(p * T / span + u)`` spans (u ~ U[0, 1), so the
expected count is p * T / span), their starts drawn without replacement from the T - span + 1
positions; masked frames become a learned embedding (:class:`spear.student.model.Student`).
Spans overlap, so the covered fraction is below p: :func:`expected_coverage` computes it
exactly (~0.47 for p 0.65, span 10, long utterances). Channels: the same over mel bins, set to
0 on every frame. Masks are drawn with an explicit ``torch.Generator`` so a resumed run repeats
them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spear.student.config import MaskConfig


def span_mask(length: int, prob: float, span: int, generator: torch.Generator) -> Tensor:
    """(length,) bool: spans of ``span`` items covering ~``prob`` of them before overlap."""
    mask = torch.zeros(length, dtype=torch.bool)
    if length < span or prob <= 0.0:
        return mask
    u = float(torch.rand((), generator=generator))
    positions = length - span + 1
    count = min(int(prob * length / span + u), positions)
    if count == 0:
        return mask
    starts = torch.randperm(positions, generator=generator)[:count]
    idx = (starts[:, None] + torch.arange(span)[None, :]).reshape(-1)
    mask[idx] = True
    return mask


def expected_coverage(length: int, prob: float, span: int) -> float:
    """Exact expected fraction of frames :func:`span_mask` covers."""
    if length < span or prob <= 0.0:
        return 0.0
    positions = length - span + 1
    x = prob * length / span
    lo = int(x)
    out = 0.0
    for count, weight in ((lo, 1.0 - (x - lo)), (lo + 1, x - lo)):
        count = min(count, positions)
        if weight == 0.0 or count == 0:
            continue
        covered = 0.0
        for t in range(length):
            # starts that cover frame t: max(0, t-span+1) .. min(t, positions-1)
            w = min(t, positions - 1) - max(0, t - span + 1) + 1
            # P(no start among those w of the positions) when `count` are drawn without replacement
            if positions - w < count:
                p_none = 0.0
            else:
                p_none = math.exp(
                    math.lgamma(positions - w + 1)
                    - math.lgamma(positions - w - count + 1)
                    - math.lgamma(positions + 1)
                    + math.lgamma(positions - count + 1)
                )
            covered += 1.0 - p_none
        out += weight * covered / length
    return out


def draw_masks(
    lengths: Tensor, num_bins: int, cfg: MaskConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Masks for a batch: time (B, T_max) over each item's valid frames, channel (B, bins)."""
    t_max = int(lengths.max()) if len(lengths) else 0
    time = torch.zeros(len(lengths), t_max, dtype=torch.bool)
    chan = torch.zeros(len(lengths), num_bins, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        time[i, :n] = span_mask(n, cfg.time_prob, cfg.time_span, generator)
        chan[i] = span_mask(num_bins, cfg.channel_prob, cfg.channel_span, generator)
    return time, chan


def apply_masks(
    feats: Tensor, time_mask: Tensor, channel_mask: Tensor, embedding: Tensor
) -> Tensor:
    """feats (B, T, F): masked frames -> ``embedding`` (F,), then masked bins -> 0."""
    x = torch.where(time_mask[..., None], embedding.to(feats.dtype), feats)
    return x.masked_fill(channel_mask[:, None, :], 0.0)
