"""End-to-end tokenize throughput: the Ray pipeline against a single-process loop, same run.

    uv run python benchmarks/pipeline.py                        # tiny teachers, ~0.24 h of audio
    uv run python benchmarks/pipeline.py --speech 50 --audio 8 --teachers wavlm,dasheng-base

The second is the production teacher sizes (WavLM large to layer 21, Dasheng base) on an
11-minute corpus (~22 min in all on 2 cores). With the tiny teachers the loop's work is ~35 s, so
the pipeline's fixed start-up (worker processes importing torch and building the teachers, ~10 s
on 2 cores; printed as "first shard committed") weighs on the ratio; with real teacher sizes the
work dominates.

Both sides do the same work on the same items: decode (range read, libsndfile, soxr, int16),
teacher forward, MVQ encode at 5 refinement rounds, codes to bytes. The loop runs in this
process with all its threads; the pipeline is ``spear.pipeline.tokenize.run_tokenize`` on a
local Ray with this machine's cores (Ray start-up excluded, job planning and shard writing
included). Quantisers are random at SPEC's sizes (WavLM 16 x 256, Dasheng 8 x 256), so token
bytes are real-sized; an untrained quantiser uses its codes less evenly than a trained one, so
the compressed bytes per second here are a lower bound of what trained ones give (at most
1,000 B/s before compression).

The projection for SPEC's 197k hours takes per-GPU teacher rates (x real time) from
``--wavlm-rate`` / ``--dasheng-rate``; their defaults are SPEC section 6's arithmetic at 40 %
MFU on an H100 (not measured here: no GPU on this machine), and are labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from rates import device_name, record  # benchmarks/rates.py

from spear.formats.manifest import read_manifest
from spear.pipeline.manifest import build_manifest
from spear.pipeline.quantize import save_quantizer
from spear.pipeline.tokenize import run_tokenize
from spear.quantizer.config import QuantizerEncodeConfig
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.ray_utils import RayConfig
from spear.shards.schema import codes_to_bytes
from spear.stages.decode import DecodeConfig, decode_segment
from spear.stages.manifest import ManifestConfig, SourceConfig
from spear.stages.quantizers import load_quantizer
from spear.stages.teachers import TEACHERS, TeacherConfig, load_teacher, run_teacher
from spear.stages.tokenize import DashengTokenizeConfig, TokenizeConfig, TokenizeTeacherConfig
from spear.storage import StorageConfig
from spear.synth import write_speech_like

PAPER_HOURS = {"speech": 185_000.0, "audio": 12_200.0}  # SPEC section 5 (197k h in all)
SPEC_RATES = {"wavlm": 10_000.0, "dasheng": 6_300.0}  # SPEC section 6: 40 % MFU, H100 bf16


def make_quantizer(path: str, teacher: str, codebooks: int) -> str:
    spec = TEACHERS[teacher]
    torch.manual_seed(0)
    q = Quantizer(
        QuantizerInfo(
            dim=spec.dim,
            num_codebooks=codebooks,
            codebook_size=256,
            teacher=teacher,
            layer=spec.layer,
        )
    )
    with torch.no_grad():
        q.centers.normal_()
    save_quantizer(q, path, StorageConfig())
    return path


def single_process(
    manifest: str, teachers: dict[str, str], quantizers: dict[str, str], domains: dict[str, tuple]
) -> tuple[float, int]:
    """The same work in one loop: decode every item, then each teacher + encode in batches."""
    storage, dcfg = StorageConfig(), DecodeConfig()
    rows = read_manifest(manifest, storage).to_pylist()
    t0 = time.perf_counter()
    waves = [decode_segment(r["url"], r["start"], r["duration"], dcfg, storage) for r in rows]
    nbytes = 0
    for prefix, name in teachers.items():
        model = load_teacher(TeacherConfig(name=name))
        q = load_quantizer(quantizers[prefix], storage)
        sel = [w for w, r in zip(waves, rows, strict=True) if r["domain"] in domains[prefix]]
        for start in range(0, len(sel), 64):
            embs = run_teacher(model, sel[start : start + 64])
            for e in embs:
                nbytes += len(codes_to_bytes(q.encode(torch.from_numpy(e), 5).numpy()))
    return time.perf_counter() - t0, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speech", type=int, default=60, help="speech files (4-16 s, 16 kHz FLAC)")
    ap.add_argument("--audio", type=int, default=12, help="audio files (10-30 s, 44.1 kHz WAV)")
    ap.add_argument("--teachers", default="wavlm-tiny,dasheng-tiny", help="wavlm,dasheng names")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--gpus", type=int, default=64, help="GPUs for the 197k-hour projection")
    ap.add_argument("--wavlm-rate", type=float, default=None, help="per-GPU x real time")
    ap.add_argument("--dasheng-rate", type=float, default=None, help="per-GPU x real time")
    args = ap.parse_args()
    wname, dname = args.teachers.split(",")
    teachers = {"wavlm": wname, "dasheng": dname}
    domains = {"wavlm": ("speech", "audio"), "dasheng": ("audio",)}

    with tempfile.TemporaryDirectory() as tmp:
        write_speech_like(f"{tmp}/c/speech", args.speech, seconds=(4, 16), seed=1)
        write_speech_like(
            f"{tmp}/c/audio", args.audio, seconds=(10, 30), seed=2, sample_rate=44100, fmt="WAV"
        )
        ray_cfg = RayConfig(num_cpus=args.num_cpus)
        sources = [
            SourceConfig(url=f"{tmp}/c/speech", domain="speech", name="speech"),
            SourceConfig(url=f"{tmp}/c/audio", domain="audio", name="audio"),
        ]
        build_manifest(sources, f"{tmp}/m", ManifestConfig(), StorageConfig(), ray_cfg)
        quantizers = {
            "wavlm": make_quantizer(f"{tmp}/qw", wname, 16),
            "dasheng": make_quantizer(f"{tmp}/qd", dname, 8),
        }
        hours = float(np.sum(read_manifest(f"{tmp}/m", StorageConfig())["duration"])) / 3600

        loop_s, loop_bytes = single_process(f"{tmp}/m", teachers, quantizers, domains)

        tcfg = TokenizeConfig(
            items_per_shard=32,
            wavlm=TokenizeTeacherConfig(quantizer=quantizers["wavlm"]),
            dasheng=DashengTokenizeConfig(quantizer=quantizers["dasheng"]),
        )
        # The WavLM actor is the bottleneck and the Dasheng one mostly idles: let WavLM's
        # torch use every core (the loop gets them all too).
        tconf = {
            # Random weights (allow_random): the benchmark measures the machinery's speed.
            p: TeacherConfig(
                name=n, cpu_threads=args.num_cpus if p == "wavlm" else 0, allow_random=True
            )
            for p, n in teachers.items()
        }
        t0 = time.perf_counter()
        s = run_tokenize(
            f"{tmp}/m",
            f"{tmp}/t",
            tconf,
            tcfg,
            QuantizerEncodeConfig(),
            DecodeConfig(),
            StorageConfig(),
            ray_cfg,
        )
        ray_s = time.perf_counter() - t0
        with open(f"{tmp}/t/report.json") as f:
            report = json.load(f)
        index = pq.read_table(f"{tmp}/t/index.parquet")
        token_bytes = int(np.sum(index["bytes"]))
        raw = loop_bytes / (hours * 3600)

    print(
        f"\n{hours:.3f} h of audio, {s.items} items, teachers {wname} + {dname}, "
        f"{args.num_cpus} CPUs, torch threads {torch.get_num_threads()}\n"
    )
    print("| run | wall s | x real time |")
    print("|---|---|---|")
    print(f"| single-process loop | {loop_s:.1f} | {hours * 3600 / loop_s:.1f} |")
    print(f"| Ray pipeline (run_tokenize) | {ray_s:.1f} | {hours * 3600 / ray_s:.1f} |")
    print(f"| ratio pipeline / loop | {loop_s / ray_s:.2f}x | |")
    print("\nper-stage busy time in the pipeline (report.json):")
    for name, st in report["stages"].items():
        print(f"  {name}: {st['busy_seconds']} s busy, {st['rate_x_realtime']}x real time")
    first = next((p["t"] for p in report.get("timeline", []) if p["shards_done"] > 0), None)
    if first is not None:
        print(f"  first shard committed {first:.1f} s after the Ray Data pipeline started")
    print("\n| token bytes | B per audio second | bound |")
    print("|---|---|---|")
    print(f"| raw codes | {raw:.0f} | 1000 |")
    print(
        f"| Parquet shards (zstd, with ids and urls) | {token_bytes / (hours * 3600):.0f} | 1000 |"
    )

    rates = {
        "wavlm": (args.wavlm_rate, "given") if args.wavlm_rate else (SPEC_RATES["wavlm"], "SPEC"),
        "dasheng": (args.dasheng_rate, "given")
        if args.dasheng_rate
        else (SPEC_RATES["dasheng"], "SPEC"),
    }
    total_h = sum(PAPER_HOURS.values())
    gpu_h = {
        "wavlm": total_h / rates["wavlm"][0],
        "dasheng": PAPER_HOURS["audio"] / rates["dasheng"][0],
    }
    out_tb = token_bytes / (hours * 3600) * total_h * 3600 / 1e12
    print(
        f"\nprojection for {total_h:,.0f} h (speech {PAPER_HOURS['speech']:,.0f}, audio "
        f"{PAPER_HOURS['audio']:,.0f}) on {args.gpus} GPUs:"
    )
    print("| teacher | rate per GPU (x real time) | source | GPU-hours |")
    print("|---|---|---|---|")
    for p in ("wavlm", "dasheng"):
        print(f"| {p} | {rates[p][0]:,.0f} | {rates[p][1]} | {gpu_h[p]:.1f} |")
    wall = sum(gpu_h.values()) / args.gpus
    print(f"| total | | | {sum(gpu_h.values()):.1f} GPU-h, {wall:.2f} h wall on {args.gpus} GPUs |")
    record(
        "token_bytes",
        token_bytes / (hours * 3600),
        device=device_name(),
        command=" ".join(sys.argv),
    )
    print(f"\noutput at the measured {token_bytes / (hours * 3600):.0f} B/s: {out_tb:.2f} TB")


if __name__ == "__main__":
    main()
