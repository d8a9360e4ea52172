"""Student training throughput and whether data loading keeps up.

    uv run python benchmarks/student.py [--presets tiny,base] [--batch-seconds 30] [--steps 4]
                                        [--threads 1] [--device cpu|cuda] [--peak-tflops 989]

Two measurements, one process (no Ray, so the numbers are per worker / per core):

* **train step** - :func:`spear.student.model.train_step` (masking, forward, both heads'
  losses, backward, ScaledAdam + Eden) on batches of ``--batch-seconds`` of synthetic audio in
  ~10 s items: step time, audio seconds per second per worker, student frames (50 Hz tokens)
  per second, and model FLOPs per step (counted by torch's FlopCounterMode on forward +
  backward); on CUDA also MFU against ``--peak-tflops`` (H100 SXM dense bf16: 989).
* **data prep** - :func:`spear.student.data.prepare_batch` (decode a WAV, 20 % in-batch mixing
  with token mixing, 128-bin fbank) plus :func:`collate_rows`, on one core: audio seconds
  prepared per second. ``cores needed`` = train audio-s/s / prep audio-s/s is how many data
  CPUs one training worker needs so that loading is not the bottleneck.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import FlopCounterMode

from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig
from spear.student.config import (
    MaskConfig,
    MixConfig,
    OptimConfig,
    StudentConfig,
    TrainDataConfig,
)
from spear.student.data import collate_rows, iter_rows, prepare_batch
from spear.student.model import Batch, Student, compute_loss, train_step
from spear.student.optim import build_optimizer
from spear.student.synthetic import collate, synth_items
from spear.testing import write_synthetic_output


def _batch(seconds: float, seed: int) -> Batch:
    n = max(1, round(seconds / 10.0))
    return collate(synth_items(n, (9.0, 11.0), seed), {"wavlm": 16, "dasheng": 8})


def bench_train(
    preset: str, batch_seconds: float, steps: int, device: torch.device, peak: float
) -> dict[str, str]:
    torch.manual_seed(0)
    model = Student(StudentConfig(preset=preset)).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt, sched = build_optimizer(model, OptimConfig())
    batch = _batch(batch_seconds, 0).to(device)
    gen = torch.Generator().manual_seed(0)
    amp = torch.bfloat16 if device.type == "cuda" else None
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=amp) if amp else torch.enable_grad():
            loss, _, _ = compute_loss(model, batch, MaskConfig(), gen, batch_count=0.0)
        loss.backward()
    flops = counter.get_total_flops()
    opt.zero_grad()
    train_step(
        model,
        batch,
        opt,
        sched,
        step=0,
        hours=0.0,
        mask=MaskConfig(),
        generator=gen,
        autocast_dtype=amp,
    )  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    frames = 0
    for i in range(steps):
        s = train_step(
            model,
            batch,
            opt,
            sched,
            step=i + 1,
            hours=0.0,
            mask=MaskConfig(),
            generator=gen,
            autocast_dtype=amp,
        )
        frames += s.frames
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    row = {
        "preset": preset,
        "params": f"{params / 1e6:.1f}M",
        "batch s": f"{batch.seconds:.0f}",
        "step s": f"{dt:.2f}",
        "audio s/s": f"{batch.seconds / dt:.1f}",
        "tokens/s": f"{frames / steps / dt:.0f}",
        "GFLOP/step": f"{flops / 1e9:.0f}",
    }
    if device.type == "cuda":
        row["MFU"] = f"{flops / dt / (peak * 1e12):.1%}"
    return row


def bench_prep(rows_per_call: int = 16, calls: int = 3) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        write_synthetic_output(
            d,
            rows_per_call * calls,
            (8.0, 12.0),
            seed=1,
            wavlm_codebooks=16,
            dasheng_codebooks=8,
            items_per_shard=rows_per_call * calls,
        )
        table = pq.read_table(f"{d}/tokens/shard-0.parquet").to_pydict()
        cols = {k: np.asarray(v, dtype=object) for k, v in table.items()}
        seconds = 0.0
        t0 = time.perf_counter()
        for c in range(calls):
            part = {k: v[c * rows_per_call : (c + 1) * rows_per_call] for k, v in cols.items()}
            out = prepare_batch(
                part,
                teachers={"wavlm": 16, "dasheng": 8},
                rates={"wavlm": 50.0, "dasheng": 25.0},
                data=TrainDataConfig(),
                mix=MixConfig(inbatch_prob=0.2, noise_prob=0.0, token_mixing=True),
                decode=DecodeConfig(io_threads=1),
                storage=StorageConfig(),
                seed=0,
            )
            collate_rows(list(iter_rows([out])), {"wavlm": 16, "dasheng": 8})
            seconds += float(np.sum(out["num_samples"])) / 16000
        dt = time.perf_counter() - t0
    return {"stage": "prepare_batch + collate (1 core)", "audio s/s": f"{seconds / dt:.0f}"}


def _table(rows: list[dict[str, str]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(r.get(k, "")) for r in rows)) for k in keys}
    lines = [" | ".join(k.ljust(width[k]) for k in keys)]
    lines.append("-+-".join("-" * width[k] for k in keys))
    lines += [" | ".join(r.get(k, "").ljust(width[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", default="tiny,base")
    ap.add_argument("--batch-seconds", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train = [
        bench_train(p, args.batch_seconds, args.steps, device, args.peak_tflops)
        for p in args.presets.split(",")
    ]
    prep = bench_prep()
    print(f"train step on {device} ({args.threads} CPU thread(s)), torch {torch.__version__}")
    print(_table(train))
    print()
    print(_table([prep]))
    prep_rate = float(prep["audio s/s"])
    print()
    print(
        _table(
            [
                {
                    "preset": r["preset"],
                    "data cores per worker": f"{float(r['audio s/s']) / prep_rate:.3f}",
                }
                for r in train
            ]
        )
    )


if __name__ == "__main__":
    main()
