"""Mixing for robustness (SPEC section 4): pure numpy on int16 audio + uint8 codes.

Each item, with probability ``inbatch_prob``, gets another item of its batch overlaid, or with
probability ``noise_prob`` a noise clip. The mixed-in signal covers a fraction
``U(overlap)`` of the primary at a random offset, scaled so that primary power / mixed-in power
over the overlap is the drawn SNR. Targets stay the clean primary's, except with
``token_mixing`` (in-batch only; noise has no tokens): inside the overlap each target code
(per frame and codebook) is replaced by the mixed-in item's code at the same time with
probability r/(1+r), r = 10^(-SNR/10), i.e. in proportion to the mixed-in item's share of the
power. Partners are taken from the batch's *clean* audio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from spear.student.config import MixConfig

SAMPLE_RATE = 16_000

Codes = dict[str, np.ndarray | None]
"""Per teacher prefix: uint8 (frames, C), or None where the teacher did not run on the item."""


@dataclass(frozen=True)
class MixRecord:
    """What was overlaid on one item (for logs and tests)."""

    kind: Literal["inbatch", "noise"]
    partner: int
    """Batch index (in-batch) or noise clip index."""
    start: int
    """First sample of the overlap in the primary."""
    length: int
    """Overlap in samples."""
    partner_start: int
    """Where in the partner the overlaid part starts."""
    snr_db: float


def replacement_prob(snr_db: float) -> float:
    """r/(1+r) with r = 10^(-SNR/10), the mixed-in/primary power ratio."""
    r = 10.0 ** (-snr_db / 10.0)
    return r / (1.0 + r)


def token_mix(
    primary: np.ndarray,
    partner: np.ndarray,
    *,
    frame_samples: float,
    start: int,
    length: int,
    partner_start: int,
    snr_db: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """primary/partner codes (frames, C) at one teacher's rate -> mixed codes (copy).

    Primary frame i (at sample i * frame_samples) inside [start, start + length) takes the
    partner's frame at the same time, i.e. partner frame round(i - (start - partner_start) /
    frame_samples), where that exists."""
    out = primary.copy()
    first = math.ceil(start / frame_samples)
    stop = min(math.ceil((start + length) / frame_samples), len(primary))
    if stop <= first:
        return out
    frames = np.arange(first, stop)
    src = np.rint(frames - (start - partner_start) / frame_samples).astype(np.int64)
    ok = (src >= 0) & (src < len(partner))
    frames, src = frames[ok], src[ok]
    replace = rng.random((len(frames), primary.shape[1])) < replacement_prob(snr_db)
    out[frames] = np.where(replace, partner[src], primary[frames])
    return out


def overlay(
    primary: np.ndarray,
    other: np.ndarray,
    snr_db: float,
    overlap: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, int, int, int] | None:
    """int16 primary + part of int16 ``other`` at ``snr_db`` -> (mixed int16, start, length,
    other's start); None when either side is silent or too short."""
    n, m = len(primary), len(other)
    length = min(round(rng.uniform(*overlap) * n), m)
    if length < 1:
        return None
    start = int(rng.integers(0, n - length + 1))
    other_start = int(rng.integers(0, m - length + 1))
    p = primary.astype(np.float32)
    seg = other[other_start : other_start + length].astype(np.float32)
    p_power = float(np.mean(p[start : start + length] ** 2)) or float(np.mean(p**2))
    o_power = float(np.mean(seg**2))
    if p_power == 0.0 or o_power == 0.0:
        return None
    gain = math.sqrt(p_power * 10.0 ** (-snr_db / 10.0) / o_power)
    p[start : start + length] += gain * seg
    mixed = np.clip(np.rint(p), -32768, 32767).astype(np.int16)
    return mixed, start, length, other_start


def mix_batch(
    audio: Sequence[np.ndarray],
    codes: Sequence[Codes],
    rates: dict[str, float],
    cfg: MixConfig,
    rng: np.random.Generator,
    noise: Sequence[np.ndarray] = (),
) -> tuple[list[np.ndarray], list[Codes], list[MixRecord | None]]:
    """A batch of int16 audio + codes -> (mixed audio, targets, what was done per item).

    ``rates`` maps each teacher prefix to its token rate (Hz) for token mixing."""
    out_audio = list(audio)
    out_codes = [dict(c) for c in codes]
    records: list[MixRecord | None] = [None] * len(audio)
    for i in range(len(audio)):
        u = rng.random()
        if u < cfg.inbatch_prob and len(audio) > 1:
            j = int(rng.integers(0, len(audio) - 1))
            j += j >= i  # any item but i
            snr = float(rng.uniform(*cfg.inbatch_snr))
            res = overlay(audio[i], audio[j], snr, cfg.overlap, rng)
            if res is None:
                continue
            out_audio[i], start, length, pstart = res
            records[i] = MixRecord("inbatch", j, start, length, pstart, snr)
            if cfg.token_mixing:
                for name, rate in rates.items():
                    mine, theirs = codes[i].get(name), codes[j].get(name)
                    if mine is None or theirs is None:
                        continue
                    out_codes[i][name] = token_mix(
                        mine,
                        theirs,
                        frame_samples=SAMPLE_RATE / rate,
                        start=start,
                        length=length,
                        partner_start=pstart,
                        snr_db=snr,
                        rng=rng,
                    )
        elif u < cfg.inbatch_prob + cfg.noise_prob and len(noise) > 0:
            k = int(rng.integers(0, len(noise)))
            snr = float(rng.uniform(*cfg.noise_snr))
            res = overlay(audio[i], noise[k], snr, cfg.overlap, rng)
            if res is None:
                continue
            out_audio[i], start, length, pstart = res
            records[i] = MixRecord("noise", k, start, length, pstart, snr)
    return out_audio, out_codes, records
