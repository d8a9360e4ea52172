"""The student's fbank: lhotse's Fbank, batched; the legacy torchaudio one for old files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lhotse import Fbank, FbankConfig

from spear.errors import ConfigError
from spear.student.config import LOG_EPS, FrontendConfig, legacy_frontend
from spear.student.frontend import Frontend, fbank_batch, num_frames, pad_audio


def _waves(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Lengths on and off the 160-sample hop, one shorter than a window, one of 2 s.
    lengths = (16000, 15999, 14641, 32000, 400, 1234, 161)
    out = []
    for n in lengths:
        tone = np.sin(np.arange(n) * rng.uniform(0.01, 0.5)) * rng.uniform(500, 8000)
        out.append(np.clip(tone + rng.standard_normal(n) * 300, -32768, 32767).astype(np.int16))
    return out


def test_matches_lhotse_fbank_per_utterance_in_one_padded_batch() -> None:
    waves = _waves()
    feats, lengths = Frontend(FrontendConfig()).waves(waves)
    lhotse_fbank = Fbank(FbankConfig(num_mel_bins=128))  # SPEAR's front end
    assert feats.shape == (len(waves), max(lengths), 128)
    for i, w in enumerate(waves):
        want = lhotse_fbank.extract(w.astype(np.float32) / 32768.0, 16000)
        assert int(lengths[i]) == len(want) == num_frames(len(w))
        got = feats[i, : lengths[i]].numpy()
        assert np.abs(got - want).max() <= 1e-4
        # Frames past the item's end hold log(1e-10), as lhotse's collation pads.
        assert torch.all(feats[i, lengths[i] :] == LOG_EPS)


def test_same_features_alone_or_in_a_batch_and_from_float_input() -> None:
    waves = _waves(1)
    fe = Frontend(FrontendConfig())
    batch, lengths = fe.waves(waves)
    for i, w in enumerate(waves[:3]):
        alone, n = fe.waves([w])
        torch.testing.assert_close(alone[0, : n[0]], batch[i, : lengths[i]], rtol=0, atol=1e-5)
    padded, n = pad_audio(waves)
    f32, _ = fe(padded.float() / 32768.0, n)
    torch.testing.assert_close(f32, batch)


def test_legacy_frontend_is_torchaudios_kaldi_fbank() -> None:
    waves = _waves(2)[:4]
    padded, n = pad_audio(waves)
    feats, lengths = Frontend(legacy_frontend())(padded, n)
    want, want_len = fbank_batch(waves)
    assert torch.equal(lengths, want_len)
    torch.testing.assert_close(feats, want)
    assert int(lengths[0]) == num_frames(16000, snip_edges=True) == 98


def test_frontend_config_checks() -> None:
    with pytest.raises(ConfigError, match="old checkpoints"):
        FrontendConfig(implementation="torchaudio")
    with pytest.raises(ConfigError, match="num_mel_bins"):
        FrontendConfig(num_mel_bins=0)
