"""Manifest stage (implementation follows)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class ManifestConfig:
    """Listing, probing and segmenting."""

    speech_segment_seconds: float = 30.0
