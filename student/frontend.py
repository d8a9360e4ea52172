"""The student's fbank, computed batched on the model's device from int16 audio.

* :class:`Frontend` - padded int16 audio (B, N) + sample counts -> log-mel (B, T, bins) + frame
  counts, as configured by :class:`spear.student.config.FrontendConfig` (recorded in
  ``student.pt``).
* ``lhotse`` (the default, SPEAR's): lhotse's ``Fbank`` with its defaults (25 ms povey window,
  10 ms shift, DC removal, pre-emphasis 0.97, 20 Hz..Nyquist-400 Hz, ``snip_edges=False``).
  lhotse's torch layer (``Wav2LogFilterBank``) frames a whole batch at once but reflects only
  the batch's longest signal at its end; here every row is reflected at its own ends first (one
  gather), so each utterance gets exactly the features lhotse's ``Fbank`` gives it alone.
  Frames past an utterance's end hold ``pad_value`` (log 1e-10, lhotse's collation).
* ``torchaudio`` (student.pt before version 3): ``torchaudio.compliance.kaldi.fbank`` per
  utterance with ``snip_edges``, high_freq 0, zero padding.

Samples are scaled to [-1, 1) (int16 / 32768) as lhotse's audio loading does; dither is off so
features are a pure function of the audio.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
from torch import Tensor

from spear.student.config import FrontendConfig

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
_WIN = 400
_HOP = 160
_LEFT = (_WIN - _HOP) // 2
"""Samples reflected in front of the signal when snip_edges is off (lhotse: 120)."""


def num_frames(num_samples: int, snip_edges: bool = False) -> int:
    """fbank frames of ``num_samples`` samples."""
    if snip_edges:
        return 0 if num_samples < _WIN else 1 + (num_samples - _WIN) // _HOP
    return (num_samples + _HOP // 2) // _HOP


def _to_float(samples: np.ndarray | Tensor) -> Tensor:
    if isinstance(samples, np.ndarray):  # a fresh float copy: decoded audio is often read-only
        scale = 32768.0 if samples.dtype == np.int16 else 1.0
        return torch.from_numpy(samples.astype(np.float32) / np.float32(scale))
    return samples.float() / 32768.0 if samples.dtype == torch.int16 else samples.float()


def torchaudio_fbank(samples: np.ndarray | Tensor, num_mel_bins: int = NUM_MEL_BINS) -> Tensor:
    """The pre-version-3 frontend, one utterance: samples (N,) -> float32 (frames, bins)."""
    x = _to_float(samples)
    if x.numel() < _WIN:
        return torch.zeros(0, num_mel_bins, device=x.device)
    return kaldi.fbank(
        x[None],
        num_mel_bins=num_mel_bins,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
        sample_frequency=SAMPLE_RATE,
        dither=0.0,
        energy_floor=0.0,
    )


class Frontend:
    """The configured fbank. Not an ``nn.Module``: its constants are no part of the student's
    weights (old checkpoints load unchanged); it follows the input's device."""

    def __init__(self, cfg: FrontendConfig) -> None:
        self.cfg = cfg
        self._layers: dict[torch.device, torch.nn.Module] = {}

    def _layer(self, device: torch.device) -> torch.nn.Module:
        if device not in self._layers:
            from lhotse.features.kaldi.layers import Wav2LogFilterBank

            with warnings.catch_warnings():
                # snip_edges=True on a signal we reflected ourselves: lhotse warns that its
                # frame counts would not match its durations; ours come from num_frames().
                warnings.simplefilter("ignore")
                layer = Wav2LogFilterBank(
                    sampling_rate=SAMPLE_RATE,
                    num_filters=self.cfg.num_mel_bins,
                    low_freq=self.cfg.low_freq,
                    high_freq=self.cfg.high_freq,
                    snip_edges=True,
                )
            self._layers[device] = layer.to(device).eval()
        return self._layers[device]

    def __call__(self, audio: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
        """Padded audio (B, N) (int16, or float in [-1, 1)) + (B,) sample counts -> float32
        features (B, T, bins), T the longest item's frames, + (B,) frame counts."""
        if self.cfg.implementation == "torchaudio":
            feats, lengths = fbank_batch(
                [audio[i, : int(n)] for i, n in enumerate(num_samples)], self.cfg.num_mel_bins
            )
            return feats.to(audio.device), lengths.to(audio.device)
        snip = self.cfg.snip_edges
        x = _to_float(audio)
        n = num_samples.to(x.device).long()
        b = x.shape[0]
        frames = (
            torch.where(n < _WIN, 0, 1 + (n - _WIN) // _HOP) if snip else (n + _HOP // 2) // _HOP
        )
        t = int(frames.max()) if b else 0
        if t == 0:
            return x.new_zeros(b, 0, self.cfg.num_mel_bins), frames
        length = (t - 1) * _HOP + _WIN
        if snip:
            x = torch.nn.functional.pad(x, (0, max(0, length - x.shape[1])))[:, :length]
        else:
            # Each row reflected at its own ends, as lhotse pads a lone utterance:
            # [x[119] .. x[0], x[0] .. x[n-1], x[n-1], x[n-2] ..].
            pos = torch.arange(length, device=x.device)[None, :] - _LEFT
            src = torch.where(pos < 0, -pos - 1, pos)
            src = torch.where(src >= n[:, None], 2 * n[:, None] - 1 - src, src)
            src = src.clamp(min=0).minimum((n[:, None] - 1).clamp(min=0))
            x = torch.gather(x, 1, src)
        with torch.no_grad():
            feats = self._layer(x.device)(x)
        valid = torch.arange(t, device=x.device)[None, :] < frames[:, None]
        return feats.masked_fill(~valid[..., None], self.cfg.pad_value), frames

    def waves(self, audio: Sequence[np.ndarray | Tensor], device: torch.device | str = "cpu"):
        """Utterances of any lengths -> (features, frame counts) on ``device``."""
        padded, lengths = pad_audio(audio)
        return self(padded.to(device), lengths.to(device))


def pad_audio(audio: Sequence[np.ndarray | Tensor]) -> tuple[Tensor, Tensor]:
    """Utterances -> zero-padded (B, N_max) int16 (or float when any is float) + (B,) lengths."""
    ts = [torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a for a in audio]
    lengths = torch.tensor([len(a) for a in ts], dtype=torch.long)
    dtype = torch.int16 if all(a.dtype == torch.int16 for a in ts) else torch.float32
    out = torch.zeros(len(ts), int(lengths.max()) if ts else 0, dtype=dtype)
    for i, a in enumerate(ts):
        out[i, : len(a)] = a.to(dtype)
    return out, lengths


def fbank_batch(
    audio: Sequence[np.ndarray | Tensor], num_mel_bins: int = NUM_MEL_BINS
) -> tuple[Tensor, Tensor]:
    """The torchaudio frontend over utterances of any lengths -> (B, T_max, bins) zero-padded
    features and (B,) frame counts."""
    feats = [torchaudio_fbank(a, num_mel_bins) for a in audio]
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    out = torch.zeros(len(feats), int(lengths.max()) if feats else 0, num_mel_bins)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lengths
