"""Decode + resample throughput (x real time per core) and resampler quality, soxr vs torchaudio.

    uv run python benchmarks/decode.py [--seconds 30] [--repeats 5]

One process, one thread (torch.set_num_threads(1); soxr and libsndfile are single-threaded): the
figure is per core,
which is how Ray schedules the decode stage. Each source is a speech-like signal (harmonics with
a moving pitch + noise, so codecs work as on real audio) written to a local file; each timing
is the best of ``--repeats`` runs of :func:`spear.stages.decode.decode_segment` on a
``--seconds`` segment from the middle of a file twice that long (range read + seek included).

Quality: a 1 kHz sine's SNR after resampling to 16 kHz, the level of a 7 kHz tone (passband
droop) and of 8.5 kHz and 10 kHz tones (aliases: above 16 kHz's Nyquist, they must vanish).

MP3 range reads (``--mp3-reads``, nothing else runs): bytes fetched from an S3 API server (moto,
on loopback) per decoded second, for every 30 s segment of a ``--mp3-minutes`` MP3, decoded from
the top of the file (before: libsndfile's seek reads every frame up to the position) and from
the manifest's seek point (after: a frame index built at probe time). Bytes are counted where
s3fs fetches a range (``S3File._fetch_range``), with the storage's default 1 MiB blocks.

    uv run python benchmarks/decode.py --mp3-reads [--mp3-minutes 20]

The manifest probe rate (files/s against the S3 server) is its own claim: benchmarks/probe.py.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import soundfile as sf
import torch
from rates import device_name, record  # benchmarks/rates.py

from spear.stages.decode import (
    RESAMPLERS,
    DecodeConfig,
    SeekPoint,
    decode_segment,
    resample,
)
from spear.stages.manifest import ManifestConfig, probe_files
from spear.storage import StorageConfig, write_atomic

# (label, sample rate, channels, soundfile format, subtype)
SOURCES: list[tuple[str, int, int, str, str | None]] = [
    ("16k WAV", 16000, 1, "WAV", "PCM_16"),
    ("16k FLAC", 16000, 1, "FLAC", "PCM_16"),
    ("44.1k FLAC", 44100, 1, "FLAC", "PCM_16"),
    ("44.1k FLAC st", 44100, 2, "FLAC", "PCM_16"),
    ("48k WAV", 48000, 1, "WAV", "PCM_16"),
    ("48k OGG st", 48000, 2, "OGG", "VORBIS"),
    ("44.1k MP3", 44100, 1, "MP3", "MPEG_LAYER_III"),
]


def speech_like(seconds: float, sr: int, channels: int, seed: int = 0) -> np.ndarray:
    """float32 (frames, channels): voiced harmonics under a moving pitch, an envelope, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    f0 = 140 * (1 + 0.2 * np.sin(2 * np.pi * 1.3 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30) if k * 140 * 1.2 < sr / 2)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * t) ** 2
    cols = [0.15 * voiced * env + rng.normal(0, 0.03, t.shape) for _ in range(channels)]
    return np.clip(np.stack(cols, axis=1), -0.99, 0.99).astype(np.float32)


def encode_chunked(audio: np.ndarray, sr: int, fmt: str, subtype: str | None) -> bytes:
    """Like spear.synth.encode, in 1 s writes: libsndfile 1.2.2's Vorbis encoder segfaults on a
    single write of ~60 s of 48 kHz audio."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, audio.shape[1], subtype, format=fmt) as f:
        for i in range(0, len(audio), sr):
            f.write(audio[i : i + sr])
    return buf.getvalue()


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: imports, torchaudio's kernel, file cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_throughput(seconds: float, repeats: int) -> list[tuple[str, float, float, float]]:
    """(source, decode-only xRT, soxr xRT, torchaudio xRT) per source."""
    rows = []
    storage = StorageConfig()
    with tempfile.TemporaryDirectory() as tmp:
        for label, sr, ch, fmt, subtype in SOURCES:
            path = os.path.join(tmp, f"{label.replace(' ', '_')}.{fmt.lower()}")
            with open(path, "wb") as f:
                f.write(encode_chunked(speech_like(2 * seconds, sr, ch), sr, fmt, subtype))
            start = seconds / 2

            def decode_only(path: str = path, sr: int = sr, start: float = start) -> None:
                with sf.SoundFile(path) as snd:
                    snd.seek(round(start * sr))
                    snd.read(round(seconds * sr), dtype="float32", always_2d=True)

            xrt = [seconds / best_of(decode_only, repeats)]
            for r in RESAMPLERS:
                cfg = DecodeConfig(resampler=r)

                def full(path: str = path, cfg: DecodeConfig = cfg, start: float = start) -> None:
                    decode_segment(path, start, seconds, cfg, storage)

                xrt.append(seconds / best_of(full, repeats))
            rows.append((label, xrt[0], xrt[1], xrt[2]))
    return rows


def bench_resample_only(seconds: float, repeats: int) -> list[tuple[str, float, float]]:
    """(rate pair, soxr xRT, torchaudio xRT) for the resampler alone on float32 mono."""
    rows = []
    for sr in (8000, 22050, 44100, 48000):
        x = speech_like(seconds, sr, 1)[:, 0].copy()
        xrt = []
        for r in RESAMPLERS:

            def run(x: np.ndarray = x, sr: int = sr, r: str = r) -> None:
                resample(x, sr, 16000, r)

            xrt.append(seconds / best_of(run, repeats))
        rows.append((f"{sr / 1000:g}k -> 16k", xrt[0], xrt[1]))
    return rows


def tone_level_db(freq: float, sr: int, resampler: str) -> float:
    t = np.arange(2 * sr) / sr
    y = resample((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, 16000, resampler)
    y = y[2000:-2000]  # away from the edges
    return float(20 * np.log10(np.sqrt(np.mean(y**2)) / (0.5 / np.sqrt(2)) + 1e-15))


def sine_snr_db(sr: int, resampler: str, freq: float = 1000.0) -> float:
    """SNR of a resampled sine against the exact sine at 16 kHz (in float, before int16)."""
    n = 2 * sr
    x = (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)
    y = resample(x, sr, 16000, resampler).astype(np.float64)
    ref = 0.5 * np.sin(2 * np.pi * freq * np.arange(len(y)) / 16000)
    mid = slice(2000, -2000)
    return float(10 * np.log10(np.sum(ref[mid] ** 2) / np.sum((y[mid] - ref[mid]) ** 2)))


def bench_quality() -> list[tuple[str, str, float, float, float, float]]:
    """(rate pair, resampler, 1 kHz SNR, 7 kHz level, 8.5 kHz level, 10 kHz level)."""
    rows: list[tuple[str, str, float, float, float, float]] = []
    for sr in (8000, 44100, 48000):
        for r in RESAMPLERS:
            levels = [
                tone_level_db(f, sr, r) if f < sr / 2 else float("nan") for f in (7000, 8500, 10000)
            ]
            l7, l85, l10 = levels
            rows.append((f"{sr / 1000:g}k -> 16k", r, sine_snr_db(sr, r), l7, l85, l10))
    return rows


def bench_mp3_reads(minutes: float) -> None:
    """Print bytes fetched per decoded second for each segment of a long MP3 on S3, before
    (from the top) and after (from the manifest's seek point)."""
    import logging

    import boto3
    import s3fs.core
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench"
        )
        storage = StorageConfig(endpoint_url=endpoint, region="us-east-1")
        sr = 44100
        buf = io.BytesIO()  # a minute at a time: the whole signal in float64 would be GBs
        with sf.SoundFile(buf, "w", sr, 1, "MPEG_LAYER_III", format="MP3") as f:
            for minute in range(math.ceil(minutes)):
                f.write(speech_like(min(60.0, minutes * 60 - 60 * minute), sr, 1, seed=minute))
        data = buf.getvalue()
        url = "s3://bench/long.mp3"
        write_atomic(url, data, storage)

        fetched = [0]
        real_fetch = s3fs.core.S3File._fetch_range

        def counting(self: object, start: int, end: int) -> bytes:
            fetched[0] += end - start
            return bytes(real_fetch(self, start, end))

        s3fs.core.S3File._fetch_range = counting
        t0 = time.perf_counter()
        res = probe_files([(url, -1, "speech")], "bench", ManifestConfig(), storage)
        probe_bytes, probe_s = fetched[0], time.perf_counter() - t0
        assert not res.quarantine, res.quarantine
        cfg = DecodeConfig(io_threads=1)
        print(
            f"MP3 {minutes:g} min, 44.1 kHz mono VBR, {len(data) / 1e6:.1f} MB on S3 (moto), "
            f"{len(res.rows)} segments of {res.rows[0]['duration']:.0f} s; 1 MiB blocks"
        )
        print(
            f"probe (length count + frame index): {probe_bytes / 1e6:.1f} MB read "
            f"({probe_bytes / len(data):.1f}x the file), {probe_s:.1f} s"
        )
        print(
            f"{'segment start':>14}{'before MB':>11}{'B/s before':>12}{'after MB':>10}"
            f"{'B/s after':>11}{'s before':>10}{'s after':>9}"
        )
        totals: dict[str, list[float]] = {"before": [0.0, 0.0], "after": [0.0, 0.0]}
        decoded = 0.0
        for r in res.rows:
            line = []
            for how in ("before", "after"):
                seek = None
                if how == "after":
                    header = (r["seek_header_offset"], r["seek_header_bytes"])
                    seek = SeekPoint(r["seek_offset"], r["seek_sample"], header)
                fetched[0] = 0
                t0 = time.perf_counter()
                y = decode_segment(
                    url,
                    r["start"],
                    r["duration"],
                    cfg,
                    storage,
                    version=r["file_version"],
                    seek=seek,
                )
                took = time.perf_counter() - t0
                line.append((fetched[0], took, len(y)))
                totals[how][0] += fetched[0]
                totals[how][1] += took
            assert line[0][2] == line[1][2]
            decoded += r["duration"]
            (b0, t_0, _), (b1, t_1, _) = line
            print(
                f"{r['start']:>13.0f}s{b0 / 1e6:>11.2f}{b0 / r['duration']:>12,.0f}"
                f"{b1 / 1e6:>10.2f}{b1 / r['duration']:>11,.0f}{t_0:>10.2f}{t_1:>9.2f}"
            )
        (n0, s0), (n1, s1) = totals["before"], totals["after"]
        print(
            f"{'all':>14}{n0 / 1e6:>11.1f}{n0 / decoded:>12,.0f}{n1 / 1e6:>10.1f}"
            f"{n1 / decoded:>11,.0f}{s0:>10.1f}{s1:>9.1f}"
        )
        print(
            f"reads over the whole file: before {n0 / len(data):.1f}x its size, after "
            f"{n1 / len(data):.2f}x; file bytes per audio second {len(data) / decoded:,.0f}"
        )
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="segment length decoded")
    ap.add_argument("--repeats", type=int, default=5, help="timings per cell (best is kept)")
    ap.add_argument("--mp3-reads", action="store_true", help="only the MP3 range-read table")
    ap.add_argument("--mp3-minutes", type=float, default=20.0, help="length of that MP3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mp3_reads:
        bench_mp3_reads(args.mp3_minutes)
        return

    print(
        f"decode + resample to 16 kHz mono int16, {args.seconds:g} s segments, x real time / core"
    )
    print(f"{'source':<15}{'decode only':>12}{'+soxr':>10}{'+torchaudio':>13}{'soxr/ta':>9}")
    soxr_rates = []
    for label, dec, sx, ta in bench_throughput(args.seconds, args.repeats):
        print(f"{label:<15}{dec:>12,.0f}{sx:>10,.0f}{ta:>13,.0f}{sx / ta:>9.1f}")
        soxr_rates.append(sx)
    # The planner's decode figure: the slowest source (a mixed corpus is bounded by it).
    record("decode", min(soxr_rates), device=device_name(), command=" ".join(sys.argv))

    print("\nresampler alone, float32 mono, x real time / core")
    print(f"{'rates':<15}{'soxr HQ':>10}{'torchaudio':>12}{'soxr/ta':>9}")
    for pair, sx, ta in bench_resample_only(args.seconds, args.repeats):
        print(f"{pair:<15}{sx:>10,.0f}{ta:>12,.0f}{sx / ta:>9.1f}")

    print("\nquality: 1 kHz sine SNR (dB); tone levels after resampling (dB, 0 = unchanged)")
    print(f"{'rates':<15}{'resampler':<12}{'SNR 1k':>8}{'7 kHz':>9}{'8.5 kHz':>9}{'10 kHz':>9}")
    for pair, r, snr, l7, l85, l10 in bench_quality():
        print(f"{pair:<15}{r:<12}{snr:>8.1f}{l7:>9.2f}{l85:>9.1f}{l10:>9.1f}")


if __name__ == "__main__":
    main()
