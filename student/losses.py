"""Token targets and the asymmetric dual-domain loss (SPEC section 4).

* :func:`align_targets` - teacher-rate codes -> student-rate targets: equal rates pass through;
  a teacher at 1/k of the student's rate is repeated k times (Dasheng 25 Hz -> 50 Hz); a teacher
  at k times the student's rate has k frames concatenated (WavLM -> a 25 Hz student: 32
  codebooks). A few frames of length mismatch are trimmed or padded with -100.
* :func:`codebook_loss` - per item: cross-entropy per codebook (ignore -100), mean over
  codebooks, summed over frames. Every frame counts, masked or not.
* :func:`dual_domain_loss` - per teacher, each item's loss times its domain's weight
  (default: WavLM 1.0 on speech and audio, Dasheng 0.1 on audio only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spear.student.config import HeadConfig

IGNORE = -100
SPEECH, AUDIO = 0, 1
"""Domain codes in a batch's ``domains`` tensor (order of :data:`spear.formats.DOMAINS`)."""


def align_targets(
    codes: Tensor, teacher_rate: float, student_rate: float, num_frames: int
) -> Tensor:
    """codes (B, T_teacher, C) long, -100 where absent -> (B, num_frames, C') at the student
    rate."""
    b, t, c = codes.shape
    ratio = student_rate / teacher_rate
    if abs(ratio - round(ratio)) < 1e-6 and round(ratio) >= 1:
        k = round(ratio)
        if k > 1:
            codes = codes.repeat_interleave(k, dim=1)
    else:
        inv = teacher_rate / student_rate
        k = round(inv)
        if abs(inv - k) > 1e-6:
            raise ValueError(
                f"teacher rate {teacher_rate} Hz and student rate {student_rate} Hz "
                "are not integer multiples"
            )
        t_out = (t + k - 1) // k
        codes = F.pad(codes, (0, 0, 0, t_out * k - t), value=IGNORE).reshape(b, t_out, k * c)
    t = codes.shape[1]
    if t >= num_frames:
        return codes[:, :num_frames]
    return F.pad(codes, (0, 0, 0, num_frames - t), value=IGNORE)


def codebook_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (B, T, C, K), targets (B, T, C) -> (B,): sum over frames of the mean over
    codebooks of the cross-entropy; -100 targets contribute 0."""
    b, t, c, k = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(-1, k), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return ce.reshape(b, t * c).sum(dim=1) / c


@dataclass
class LossOutput:
    total: Tensor
    """Scalar: sum over teachers and items of weight * per-item loss (summed over frames)."""
    per_teacher: dict[str, Tensor]
    """Unweighted loss summed over the items the teacher is weighted on (> 0)."""
    frames: dict[str, Tensor]
    """Target frames (any codebook not -100) each teacher's loss sums over, on those items."""


def domain_weights(domains: Tensor, head: HeadConfig) -> Tensor:
    """(B,) domain codes -> (B,) float loss weights of ``head``."""
    return torch.where(
        domains == AUDIO,
        torch.tensor(head.weight_audio, device=domains.device),
        torch.tensor(head.weight_speech, device=domains.device),
    )


def dual_domain_loss(
    logits: dict[str, Tensor],
    targets: dict[str, Tensor],
    domains: Tensor,
    heads: tuple[HeadConfig, ...],
) -> LossOutput:
    """``logits[name]`` (B, T, C, K) against aligned ``targets[name]`` (B, T, C)."""
    total = torch.zeros((), device=domains.device)
    per_teacher: dict[str, Tensor] = {}
    frames: dict[str, Tensor] = {}
    for head in heads:
        if head.name not in targets:
            continue
        w = domain_weights(domains, head)
        item = codebook_loss(logits[head.name], targets[head.name])  # (B,)
        total = total + (w * item).sum()
        on = w > 0
        per_teacher[head.name] = item[on].sum().detach()
        frames[head.name] = ((targets[head.name] != IGNORE).any(-1).sum(-1)[on]).sum()
    return LossOutput(total=total, per_teacher=per_teacher, frames=frames)
