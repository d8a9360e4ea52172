"""A learnable synthetic corpus for tests and benchmarks: no teacher needed.

Audio is white noise under a random piecewise-constant loudness envelope (a new level every
``segment`` seconds) and a random spectral tilt per item. Tokens are a deterministic function of
the audio: per teacher frame, the frame's level in dB quantised to ``levels`` steps, offset per
codebook (codebook c holds ``(level + c) % codebook_size``), at the WavLM (50 Hz, 400-sample
window) and Dasheng (25 Hz, 640-sample hop) frame formulas. A student can learn them from fbank;
shuffled, they carry no information.
"""

from __future__ import annotations

import numpy as np
import torch

from spear.formats import TokenTeacherInfo
from spear.student.frontend import fbank_batch
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


def wavlm_frames(num_samples: int) -> int:
    return 0 if num_samples < 400 else 1 + (num_samples - 400) // 320


def dasheng_frames(num_samples: int) -> int:
    return (num_samples + 639) // 640


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
                "wavlm": level_codes(audio, wavlm_frames(len(audio)), 320, 400, wavlm_codebooks),
                "dasheng": level_codes(
                    audio, dasheng_frames(len(audio)), 640, 640, dasheng_codebooks
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
    """Items -> a :class:`Batch` (fbank computed here). ``heads`` maps prefix -> codebooks."""
    audio = [np.asarray(it["audio"]) for it in items]
    feats, lens = fbank_batch(audio)
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


def write_token_output(
    out_dir: str,
    n_items: int,
    seconds: tuple[float, float],
    seed: int = 0,
    wavlm_codebooks: int = 2,
    dasheng_codebooks: int = 1,
    items_per_shard: int = 8,
) -> list[TokenTeacherInfo]:
    """A tokenize-like output on local disk: ``out_dir/audio/*.wav`` and token shards
    ``out_dir/tokens/shard-N.parquet`` with learnable synthetic codes (see :func:`synth_items`).
    Returns the teachers recorded in the shards."""
    import os

    import pyarrow as pa
    import soundfile as sf

    from spear.formats import codes_to_bytes, parquet_bytes, token_shard_metadata

    teachers = [
        TokenTeacherInfo(
            prefix="wavlm",
            teacher="wavlm-synthetic",
            family="wavlm",
            layer=21,
            frame_rate=50.0,
            num_codebooks=wavlm_codebooks,
            codebook_size=256,
            quantizer_id="synthetic-wavlm",
            checkpoint_sha256=None,
            domains=("speech", "audio"),
        ),
        TokenTeacherInfo(
            prefix="dasheng",
            teacher="dasheng-synthetic",
            family="dasheng",
            layer=-1,
            frame_rate=25.0,
            num_codebooks=dasheng_codebooks,
            codebook_size=256,
            quantizer_id="synthetic-dasheng",
            checkpoint_sha256=None,
            domains=("audio",),
        ),
    ]
    schema, _ = token_shard_metadata(teachers)
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "tokens"), exist_ok=True)
    items = synth_items(n_items, seconds, seed, wavlm_codebooks, dasheng_codebooks)
    rows = []
    for i, it in enumerate(items):
        audio = np.asarray(it["audio"])
        path = os.path.join(out_dir, "audio", f"item-{i:04d}.wav")
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        dasheng = it["dasheng"]
        rows.append(
            {
                "item_id": f"item-{i:04d}",
                "source": "synthetic",
                "domain": it["domain"],
                "url": path,
                "start": 0.0,
                "duration": len(audio) / SAMPLE_RATE,
                "num_samples": len(audio),
                "wavlm_frames": len(it["wavlm"]),  # type: ignore[arg-type]
                "wavlm_codes": codes_to_bytes(it["wavlm"]),  # type: ignore[arg-type]
                "dasheng_frames": None if dasheng is None else len(dasheng),  # type: ignore[arg-type]
                "dasheng_codes": None if dasheng is None else codes_to_bytes(dasheng),  # type: ignore[arg-type]
            }
        )
    for s in range(0, len(rows), items_per_shard):
        table = pa.Table.from_pylist(rows[s : s + items_per_shard], schema=schema)
        with open(
            os.path.join(out_dir, "tokens", f"shard-{s // items_per_shard}.parquet"), "wb"
        ) as f:
            f.write(parquet_bytes(table))
    return teachers
