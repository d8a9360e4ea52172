"""Mixing: overlap and SNR as configured, clean targets, token replacement rate r/(1+r)."""

from __future__ import annotations

import numpy as np
import pytest

from spear.student.config import MixConfig
from spear.student.mixing import mix_batch, overlay, replacement_prob, token_mix


def _noise(n: int, seed: int, scale: float = 3000.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.int16)


def test_overlay_snr_and_overlap() -> None:
    rng = np.random.default_rng(0)
    primary, other = _noise(32000, 1), _noise(48000, 2, 500.0)
    res = overlay(primary, other, 3.0, (0.2, 0.5), rng)
    assert res is not None
    mixed, start, length, _ostart = res
    assert 0.2 * 32000 - 1 <= length <= 0.5 * 32000 + 1
    added = mixed.astype(np.float64) - primary
    assert np.all(added[:start] == 0) and np.all(added[start + length :] == 0)
    p = np.mean(primary[start : start + length].astype(np.float64) ** 2)
    snr = 10 * np.log10(p / np.mean(added[start : start + length] ** 2))
    assert abs(snr - 3.0) < 0.1


def test_replacement_rate_matches() -> None:
    rng = np.random.default_rng(0)
    frames, c = 2000, 16
    primary = np.zeros((frames, c), dtype=np.uint8)
    partner = np.ones((frames, c), dtype=np.uint8)
    for snr in (-5.0, 0.0, 5.0):
        out = token_mix(
            primary,
            partner,
            frame_samples=320.0,
            start=320 * 500,
            length=320 * 1000,
            partner_start=0,
            snr_db=snr,
            rng=rng,
        )
        inside = out[500:1500]
        assert (out[:500] == 0).all() and (out[1500:] == 0).all()
        p = replacement_prob(snr)
        n = inside.size
        assert abs(inside.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert replacement_prob(0.0) == pytest.approx(0.5)


def test_token_mix_aligns_partner_frames() -> None:
    primary = np.zeros((100, 1), dtype=np.uint8)
    partner = np.arange(100, dtype=np.uint8)[:, None]
    out = token_mix(
        primary,
        partner,
        frame_samples=640.0,
        start=640 * 10,
        length=640 * 5,
        partner_start=640 * 30,
        snr_db=-60.0,  # replace (almost) surely
        rng=np.random.default_rng(0),
    )
    assert out[10:15, 0].tolist() == [30, 31, 32, 33, 34]


def test_mix_batch_keeps_clean_targets_without_token_mixing() -> None:
    audio = [_noise(16000, i) for i in range(6)]
    codes = [{"wavlm": np.full((50, 2), i, dtype=np.uint8), "dasheng": None} for i in range(6)]
    cfg = MixConfig(inbatch_prob=1.0, noise_prob=0.0, token_mixing=False)
    mixed, targets, records = mix_batch(
        audio, codes, {"wavlm": 50.0}, cfg, np.random.default_rng(0)
    )
    assert all(
        r is not None and r.kind == "inbatch" and r.partner != i for i, r in enumerate(records)
    )
    assert all(np.array_equal(t["wavlm"], c["wavlm"]) for t, c in zip(targets, codes, strict=True))
    assert any(not np.array_equal(m, a) for m, a in zip(mixed, audio, strict=True))

    cfg = MixConfig(inbatch_prob=1.0, noise_prob=0.0, token_mixing=True)
    _, targets, records = mix_batch(audio, codes, {"wavlm": 50.0}, cfg, np.random.default_rng(0))
    changed = [
        not np.array_equal(t["wavlm"], c["wavlm"]) for t, c in zip(targets, codes, strict=True)
    ]
    assert any(changed)
    for i, (t, r) in enumerate(zip(targets, records, strict=True)):
        assert r is not None
        assert set(np.unique(t["wavlm"]).tolist()) <= {i, r.partner}


def test_noise_mixing() -> None:
    audio = [_noise(16000, i) for i in range(3)]
    codes = [{"wavlm": np.zeros((50, 2), dtype=np.uint8)} for _ in range(3)]
    cfg = MixConfig(inbatch_prob=0.0, noise_prob=1.0, noise_snr=(10.0, 10.0))
    _, _, records = mix_batch(
        audio, codes, {"wavlm": 50.0}, cfg, np.random.default_rng(0), noise=[_noise(8000, 9)]
    )
    assert all(r is not None and r.kind == "noise" and r.snr_db == 10.0 for r in records)
