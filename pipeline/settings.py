"""Settings of the embed and features jobs (sections ``embed`` and ``features`` of the config).

Plain dataclasses with no heavy imports, so ``spear.config`` can hold every job's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spear.errors import ConfigError

Format = Literal["parquet", "numpy"]


@dataclass(kw_only=True, frozen=True)
class EmbedConfig:
    """Which items ``spear embed`` runs a teacher on."""

    domain: Literal["auto", "speech", "audio", "all"] = "auto"
    """Items of this domain; ``auto``: speech for WavLM teachers, audio for Dasheng ones."""
    hours: float | None = None
    """Keep a seeded sample of about this many hours (None: no limit)."""
    fraction: float | None = None
    """Keep a seeded fraction of the items (None: all)."""
    seed: int = 0
    """Seed of the sample."""
    items_per_shard: int = 256
    """Items per output shard; also the resume unit."""

    def __post_init__(self) -> None:
        if self.hours is not None and self.hours <= 0:
            raise ConfigError("embed hours must be positive")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError("embed fraction must be in (0, 1]")
        if self.items_per_shard < 1:
            raise ConfigError("embed items_per_shard must be >= 1")


@dataclass(kw_only=True, frozen=True)
class FeaturesConfig:
    """``spear features``: output format, part size and how the student runs."""

    format: Format = "parquet"
    """``parquet`` (one embedding-shard-like file per part) or ``numpy`` (one ``.npy`` per item)."""
    items_per_part: int = 256
    """Items per output part (the resume unit)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: CUDA when the actor sees a GPU."""
    num_actors: int = 1
    """Student actors."""
    num_gpus: float = 1.0
    """GPU share per actor (ignored without GPUs)."""
    num_cpus: float | None = None
    """CPU share per actor; None: 1 beside a GPU, else what the cluster has beside decode."""
    layers: str | None = None
    """``all`` or ``N,M`` (0-based encoder layers): write those layers' 50 Hz states, each item
    ``(frames, len(layers), dim)``, instead of the final output (``spear.student.hidden``)."""

    def __post_init__(self) -> None:
        if self.format not in ("parquet", "numpy"):
            raise ConfigError(f"features format must be parquet or numpy, got {self.format!r}")
        if self.items_per_part < 1 or self.num_actors < 1:
            raise ConfigError("features items_per_part and num_actors must be >= 1")
