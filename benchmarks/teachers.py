"""Teacher throughput: audio-seconds per second, x real time and MFU, per teacher, batch, length.

    uv run python benchmarks/teachers.py                      # tiny + real size, 10/20/30 s
    uv run python benchmarks/teachers.py --teachers wavlm-tiny,dasheng-tiny --batch-sizes 1,8
    uv run python benchmarks/teachers.py --teachers wavlm,dasheng --seconds 10 --batch-sizes 1 \
        --repeats 1 --warmup 0                                # one short real-size batch on CPU

Random-initialised models (throughput does not depend on the weights). Each cell times
:func:`spear.stages.teachers.run_teacher` (normalisation, padding, host->device copy, model,
device->host copy) on ``batch`` items of ``seconds`` of int16 noise, best of ``--repeats`` after
``--warmup`` untimed runs. On CUDA the model runs under bf16 autocast (``--dtype``); on CPU in
float32 with all of this process's threads.

MFU = achieved FLOP/s / peak FLOP/s, achieved = x real time x model FLOPs per audio second:
SPEC section 6's anchors (WavLM Large to layer 21: 36.5 GFLOP/s; Dasheng 1.2B: 58 GFLOP/s), or
for other presets an analytic count (2 FLOPs per multiply-add of every matmul/conv, attention
included). ``--peak-tflops`` defaults to 989 (H100 SXM bf16 dense) on CUDA; on CPU no MFU.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
from rates import device_name, record  # benchmarks/rates.py

from spear.stages.teachers import TEACHERS, TeacherConfig, load_teacher, run_teacher


def analytic_gflops_per_second(name: str, seconds: float) -> float:
    """Model GFLOPs per audio second of ``name`` at its default layer, for items of ``seconds``."""
    spec = TEACHERS[name]
    arch = spec.arch()
    n = int(seconds * spec.sample_rate)
    if spec.family == "wavlm":
        flops, length, c_in = 0.0, n, 1
        for c, k, s in arch.conv_layers:
            length = (length - k) // s + 1
            flops += 2 * c_in * c * k * length
            c_in = c
        t, d = length, arch.dim
        flops += 2 * t * c_in * d  # projection
        flops += 2 * t * d * (d // arch.pos_conv_groups) * arch.pos_conv_kernel
        per_layer = 2 * t * (4 * d * d + 2 * d * arch.ffn_dim) + 4 * t * t * d
        flops += spec.layer * per_layer
    else:
        t = spec.num_frames(n)
        d = arch.embed_dim
        chunk = min(t, arch.target_length // arch.patch_frames)
        flops = 2 * t * arch.n_mels * arch.patch_frames * d
        flops += arch.depth * (
            2 * t * (4 * d * d + 2 * d * int(d * arch.mlp_ratio)) + 4 * t * chunk * d
        )
    return flops / seconds / 1e9


def bench(
    name: str, batch: int, seconds: float, dtype: str, repeats: int, warmup: int, compile: bool
) -> float:
    cfg = TeacherConfig(name=name, dtype=dtype, compile=compile, batch_seconds=batch * seconds + 1)  # type: ignore[arg-type]
    teacher = load_teacher(cfg)
    rng = np.random.default_rng(0)
    n = int(seconds * teacher.spec.sample_rate)
    waves = [(rng.standard_normal(n) * 3000).astype(np.int16) for _ in range(batch)]
    sync = torch.cuda.synchronize if teacher.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        run_teacher(teacher, waves)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run_teacher(teacher, waves)
        sync()
        best = min(best, time.perf_counter() - t0)
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return batch * seconds / best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teachers", default="wavlm-tiny,dasheng-tiny,wavlm,dasheng")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--seconds", default="10,20,30", help="utterance lengths")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    peak = args.peak_tflops or (989.0 if cuda else None)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    mode = args.dtype if cuda else "float32"
    print(f"device: {device}; dtype: {mode}; compile: {args.compile}; torch {torch.__version__}")
    header = f"{'teacher':<14}{'batch':>6}{'sec':>6}{'audio s/s':>12}{'x RT':>10}{'GFLOP/s':>10}"
    header += f"{'TFLOP/s':>10}{'MFU':>8}"
    print(header)
    print("-" * len(header))
    rows: list[dict[str, Any]] = []
    for name in args.teachers.split(","):
        spec = TEACHERS[name]
        for seconds in (float(s) for s in args.seconds.split(",")):
            gflops = spec.gflops_per_second or analytic_gflops_per_second(name, seconds)
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                try:
                    rate = bench(
                        name, batch, seconds, args.dtype, args.repeats, args.warmup, args.compile
                    )
                except torch.cuda.OutOfMemoryError:
                    print(f"{name:<14}{batch:>6}{seconds:>6.0f}  out of memory")
                    torch.cuda.empty_cache()
                    continue
                tflops = rate * gflops / 1e3
                mfu = f"{100 * tflops / peak:>7.1f}%" if peak else f"{'-':>8}"
                print(
                    f"{name:<14}{batch:>6}{seconds:>6.0f}{rate:>12.1f}{rate:>9.0f}x{gflops:>10.2f}"
                    f"{tflops:>10.2f}{mfu}",
                    flush=True,
                )
                rows.append({"teacher": name, "batch": batch, "seconds": seconds, "rate": rate})
    # The planner's teacher rates: the best cell of each real-size teacher on a GPU.
    for family in ("wavlm", "dasheng"):
        best = [r["rate"] for r in rows if r["teacher"] == family]
        if cuda and best:
            record(family, max(best), device=device_name(), command=" ".join(sys.argv))


if __name__ == "__main__":
    main()
