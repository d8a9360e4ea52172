"""Prediction heads: one per teacher, a linear layer per codebook (SPEC section 4)."""

from __future__ import annotations

from torch import Tensor, nn

from spear.student.config import HeadConfig


class CodebookHead(nn.Module):
    """(B, T, D) -> logits (B, T, C, K). The C per-codebook linear layers are one Linear of
    C*K outputs: same parameters, one matmul."""

    def __init__(self, dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.num_codebooks = cfg.num_codebooks
        self.codebook_size = cfg.codebook_size
        self.proj = nn.Linear(dim, cfg.num_codebooks * cfg.codebook_size)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.proj(x)
        return logits.reshape(*x.shape[:-1], self.num_codebooks, self.codebook_size)
