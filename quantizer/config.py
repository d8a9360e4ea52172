"""Typed settings of the MVQ quantiser: training, data split and encoding.

They live under the ``quantizer`` section of :class:`spear.config.SpearConfig`::

    quantizer:
      train:
        num_codebooks: 16
        phase_steps: 35000
      encode:
        refine_rounds: 5
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spear.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class QuantizerTrainConfig:
    """The two-phase MVQ training recipe (SPEC section 2)."""

    num_codebooks: int = 16
    """C: codebooks of the final quantiser (a power of two; 16 for WavLM, 8 for Dasheng)."""
    codebook_size: int = 256
    """K: entries per final codebook. Phase one trains 2C codebooks of sqrt(K) entries."""
    phase_steps: int = 35_000
    """Optimiser steps in each of the two phases (SPEAR: 35k + 35k)."""
    batch_size: int = 1024
    """Frames per minibatch."""
    lr: float = 5e-3
    """Adam learning rate of phase one; phase two starts at half of it."""
    lr_halvings: int = 4
    """The learning rate halves this many times in each phase, at equal intervals (as the
    reference trainer does)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    entropy_weight: float = 0.01
    """Weight of the term pushing codebook usage (from the logits) towards uniform."""
    train_refine_rounds: int = 2
    """Refinement rounds used to choose the target indexes during training."""
    normalise: bool = True
    """Normalise embeddings by per-dimension mean/std of the training set (on for WavLM,
    off for Dasheng); the stats are stored with the quantiser."""
    norm_frames: int = 200_000
    """At most this many training frames estimate the normalisation stats."""
    seed: int = 0
    """Seed of initialisation, data order and the held-out split."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:1``, or ``auto`` (CUDA when available)."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    log_every: int = 100
    """Print a progress line (step, loss, held-out RRL) every this many steps."""
    teacher: str = ""
    """Teacher name stored with the quantiser; default: from the embedding shards' metadata."""
    layer: int = -1
    """Teacher layer stored with the quantiser; default (-1): from the shards' metadata."""

    def __post_init__(self) -> None:
        c, k = self.num_codebooks, self.codebook_size
        if c < 1 or c & (c - 1):
            raise ConfigError(f"num_codebooks must be a power of two, got {c}")
        root = round(k**0.5)
        if k > 256 or root * root != k or root < 2:
            raise ConfigError(f"codebook_size must be a square <= 256 (e.g. 256), got {k}")
        if self.phase_steps < 1 or self.batch_size < 2:
            raise ConfigError("phase_steps must be >= 1 and batch_size >= 2")


@dataclass(kw_only=True, frozen=True)
class QuantizerDataConfig:
    """How embedding shards become training and held-out frames."""

    heldout_fraction: float = 0.05
    """Fraction of frames held out for validation (whole items, chosen by seed)."""
    max_heldout_frames: int = 10_000
    """Cap on held-out frames."""
    min_heldout_items: int = 4
    """Hold out at least this many items (at most a quarter of them) when there are frames to
    hold out, whatever the fraction says: the RRL of one item says little."""
    shuffle_frames: int = 200_000
    """Frames in the shuffle buffer of the training stream."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.min_heldout_items < 0:
            raise ConfigError(f"min_heldout_items must be >= 0, got {self.min_heldout_items}")


@dataclass(kw_only=True, frozen=True)
class QuantizerEncodeConfig:
    """Encoding embeddings to codes."""

    refine_rounds: int = 5
    """Joint refinement rounds after the argmax start, 0..5 (reference default 5)."""
    batch_size: int = 0
    """Vectors per internal chunk; 0 picks by device (64 on CPU, 4096 on CUDA)."""

    def __post_init__(self) -> None:
        if not 0 <= self.refine_rounds <= 5:
            raise ConfigError(f"refine_rounds must be in 0..5, got {self.refine_rounds}")


@dataclass(kw_only=True, frozen=True)
class QuantizerConfig:
    """Everything about the MVQ quantiser."""

    train: QuantizerTrainConfig = field(default_factory=QuantizerTrainConfig)
    """Training recipe."""
    data: QuantizerDataConfig = field(default_factory=QuantizerDataConfig)
    """Training data and held-out split."""
    encode: QuantizerEncodeConfig = field(default_factory=QuantizerEncodeConfig)
    """Encoding settings."""
