"""Decode stage: one manifest segment -> 16 kHz mono int16 samples.

(Implementation in progress: see the foundation issue.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, frozen=True)
class DecodeConfig:
    """How audio is decoded and resampled."""

    sample_rate: int = 16_000
    """Output sample rate (the teachers and the student expect 16 kHz)."""
    resampler: Literal["soxr", "torchaudio"] = "soxr"
    """Resampling library; see benchmarks/decode.py for the measured comparison."""
    min_seconds: float = 0.1
    """Segments shorter than this after decoding are quarantined as too short."""
