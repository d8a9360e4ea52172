"""A learnable synthetic corpus for tests and benchmarks: no teacher needed.

Audio is white noise under a random piecewise-constant loudness envelope (a new level every
``segment`` seconds) and a random spectral tilt per item. Tokens are a deterministic function of
the audio: per teacher frame, the frame's level in dB quantised to ``levels`` steps, offset per
codebook (codebook c holds ``(level + c) % codebook_size``), with the token shard contract's
WavLM (50 Hz, 400-sample window) and Dasheng (25 Hz, 640-sample hop) frame counts. A student can
learn them from fbank; shuffled, they carry no information. :func:`spear.testing.
write_synthetic_output` writes them as a real tokenize output.
"""

from __future__ import annotations

import numpy as np
import torch

from spear.shards.schema import dasheng_num_frames, wavlm_num_frames
from spear.student.config import FrontendConfig
from spear.student.frontend import Frontend
from spear.student.losses import AUDIO, IGNORE, SPEECH
from spear.student.model import Batch

SAMPLE_RATE = 16_000


def synth_audio(seconds: float, rng: np.random.Generator, segment: float = 0.12) -> np.ndarray:
    n = round(seconds * SAMPLE_RATE)
    seg = round(segment * SAMPLE_RATE)
    levels_db = rng.uniform(-40.0, 0.0, size=n // seg + 1)
    env = np.repeat(10.0 ** (levels_db / 20.0), seg)[:n]
    white = rng.standard_normal(n)
    tilt = rng.uniform(-0.9, 0.9)
    coloured = white.copy()
    coloured[1:] += tilt * white[:-1]
    return np.clip(coloured * env * 8000.0, -32768, 32767).astype(np.int16)


def level_codes(
    audio: np.ndarray,
    frames: int,
    hop: int,
    win: int,
    num_codebooks: int,
    levels: int = 8,
    codebook_size: int = 256,
) -> np.ndarray:
    """uint8 (frames, C): quantised dB level of each window, offset per codebook."""
    x = audio.astype(np.float64) / 32768.0
    out = np.zeros((frames, num_codebooks), dtype=np.uint8)
    for i in range(frames):
        w = x[i * hop : i * hop + win]
        db = 10 * np.log10(np.mean(w**2) + 1e-10) if len(w) else -100.0
        level = int(np.clip((db + 60.0) / 60.0 * levels, 0, levels - 1))
        out[i] = (level + np.arange(num_codebooks)) % codebook_size
    return out


def synth_items(
    n: int,
    seconds: tuple[float, float],
    seed: int,
    wavlm_codebooks: int = 16,
    dasheng_codebooks: int = 8,
) -> list[dict[str, object]]:
    """Items ``{"audio", "domain", "wavlm", "dasheng"}``; every other item is audio-domain and
    carries Dasheng codes, speech items have ``dasheng`` None."""
    rng = np.random.default_rng(seed)
    items: list[dict[str, object]] = []
    for i in range(n):
        audio = synth_audio(float(rng.uniform(*seconds)), rng)
        domain = "audio" if i % 2 else "speech"
        items.append(
            {
                "audio": audio,
                "domain": domain,
                "wavlm": level_codes(
                    audio, wavlm_num_frames(len(audio)), 320, 400, wavlm_codebooks
                ),
                "dasheng": level_codes(
                    audio, dasheng_num_frames(len(audio)), 640, 640, dasheng_codebooks
                )
                if domain == "audio"
                else None,
            }
        )
    return items


def pad_codes(codes: list[np.ndarray | None], num_codebooks: int) -> torch.Tensor:
    """uint8 (T_i, C) or None per item -> long (B, T_max, C), -100 where absent."""
    t = max((len(c) for c in codes if c is not None), default=0)
    out = torch.full((len(codes), t, num_codebooks), IGNORE, dtype=torch.long)
    for i, c in enumerate(codes):
        if c is not None:
            out[i, : len(c)] = torch.from_numpy(c.astype(np.int64))
    return out


def collate(items: list[dict[str, object]], heads: dict[str, int]) -> Batch:
    """Items -> a :class:`Batch` (the default frontend's fbank computed here). ``heads`` maps
    prefix -> codebooks."""
    audio = [np.asarray(it["audio"]) for it in items]
    feats, lens = Frontend(FrontendConfig()).waves(audio)
    domains = torch.tensor([AUDIO if it["domain"] == "audio" else SPEECH for it in items])
    targets = {
        name: pad_codes([it.get(name) for it in items], c)  # type: ignore[misc]
        for name, c in heads.items()
    }
    return Batch(
        feats=feats,
        feat_lens=lens,
        domains=domains,
        targets=targets,
        num_samples=torch.tensor([len(a) for a in audio]),
    )
