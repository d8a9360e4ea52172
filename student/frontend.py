"""128-bin Kaldi-compatible log-mel fbank at 100 Hz (25 ms window, 10 ms shift) on 16 kHz int16.

Samples are scaled to [-1, 1) before the fbank, as lhotse (and so icefall) does; dither is off so
features are a pure function of the audio. Kaldi's ``snip_edges``: N samples give
``1 + (N - 400) // 160`` frames, 0 below 400 samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
from torch import Tensor

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
_WIN = 400
_HOP = 160


def num_frames(num_samples: int) -> int:
    """fbank frames of ``num_samples`` samples."""
    return 0 if num_samples < _WIN else 1 + (num_samples - _WIN) // _HOP


def fbank(samples: np.ndarray | Tensor, num_mel_bins: int = NUM_MEL_BINS) -> Tensor:
    """One utterance: int16 (or float in [-1, 1)) samples (N,) -> float32 (frames, bins)."""
    if isinstance(samples, np.ndarray):  # a fresh float copy: decoded audio is often read-only
        scale = 32768.0 if samples.dtype == np.int16 else 1.0
        x = torch.from_numpy(samples.astype(np.float32) / np.float32(scale))
    else:
        x = samples.float() / 32768.0 if samples.dtype == torch.int16 else samples.float()
    if x.numel() < _WIN:
        return torch.zeros(0, num_mel_bins)
    return kaldi.fbank(
        x[None],
        num_mel_bins=num_mel_bins,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
        sample_frequency=SAMPLE_RATE,
        dither=0.0,
        energy_floor=0.0,
    )


def fbank_batch(
    audio: Sequence[np.ndarray | Tensor], num_mel_bins: int = NUM_MEL_BINS
) -> tuple[Tensor, Tensor]:
    """Utterances of any lengths -> (B, T_max, bins) zero-padded features and (B,) frame counts."""
    feats = [fbank(a, num_mel_bins) for a in audio]
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    out = torch.zeros(len(feats), int(lengths.max()) if feats else 0, num_mel_bins)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lengths


def fbank_batch_padded(audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Padded int16 (B, N) + sample counts (B,) -> features (B, T, bins) + frame counts."""
    return fbank_batch([audio[i, : int(n)] for i, n in enumerate(lengths)])
