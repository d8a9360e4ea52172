"""Quality of a quantiser on held-out frames: RRL and codebook usage."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from spear.quantizer.mvq import Quantizer, relative_reconstruction_loss


@dataclass
class CodebookUsage:
    codebook: int
    entropy_bits: float  # of the code distribution; log2(K) is uniform
    perplexity: float  # 2 ** entropy: the effective number of entries
    dead: int  # entries never used


@dataclass
class EvalReport:
    quantizer_id: str
    frames: int
    refine_rounds: int
    rrl: float  # relative reconstruction loss in the quantiser's (normalised) space
    codebooks: list[CodebookUsage] = field(default_factory=list)
    heldout: bool = False  # the frames are the quantiser's own held-out items
    trained_on: str = ""  # teacher, layer and weights, in words (QuantizerInfo.trained_on)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [
            ("held-out frames" if self.heldout else "frames (not held out)") + ":",
            f"quantiser {self.quantizer_id}: {self.frames} frames, "
            f"{self.refine_rounds} refinement rounds, RRL {self.rrl:.4f}",
            *([f"trained on: {self.trained_on}"] if self.trained_on else []),
            f"{'codebook':>8} {'entropy(bits)':>13} {'perplexity':>10} {'dead':>5}",
        ]
        for u in self.codebooks:
            lines.append(
                f"{u.codebook:>8} {u.entropy_bits:>13.3f} {u.perplexity:>10.1f} {u.dead:>5}"
            )
        return "\n".join(lines)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> list[CodebookUsage]:
    """Per-codebook entropy, perplexity and dead entries of codes (N, C)."""
    out = []
    for c in range(codes.shape[1]):
        counts = torch.bincount(codes[:, c].long().cpu(), minlength=codebook_size).double()
        p = counts / counts.sum().clamp_min(1)
        nz = p[p > 0]
        h = float(-(nz * nz.log2()).sum())
        out.append(CodebookUsage(c, h, 2**h, int((counts == 0).sum())))
    return out


def heldout_items(q: Quantizer, available: Iterable[str]) -> set[str]:
    """The items held out from ``q``'s training that are among ``available`` (empty: none)."""
    held = q.info.training.get("heldout_items", [])
    return set(held if isinstance(held, list) else []) & set(available)


def evaluate_rrl(q: Quantizer, x: torch.Tensor, refine_rounds: int) -> float:
    """RRL of frames x (N, dim) in the quantiser's (normalised) space; NaN without frames."""
    if len(x) == 0:
        return float("nan")
    with torch.no_grad():
        xn = q.normalise(x.to(q.centers.device, torch.float32))
        codes = q.encode(x, refine_rounds)
        return relative_reconstruction_loss(xn, q.decode(codes, denormalise=False))


def evaluate(
    q: Quantizer, x: torch.Tensor, refine_rounds: int = 5, *, heldout: bool = False
) -> EvalReport:
    """Encode frames x (N, dim) in the teacher's space and measure RRL and usage; ``heldout``
    records whether x are the quantiser's own held-out items."""
    with torch.no_grad():
        codes = q.encode(x, refine_rounds)
        xn = q.normalise(x.to(q.centers.device, q.centers.dtype))
        rrl = (
            relative_reconstruction_loss(xn, q.decode(codes, denormalise=False))
            if len(x)
            else math.nan
        )
    usage = codebook_usage(codes, q.codebook_size)
    return EvalReport(q.id, len(x), refine_rounds, rrl, usage, heldout)
