"""Student training throughput, the data path before/after features moved to the device, the
optimiser against icefall's, and the cost of a resume.

    uv run python benchmarks/student.py [--presets tiny,base] [--batch-seconds 30] [--steps 3]
        [--threads 1] [--device cpu|cuda] [--peak-tflops 989]
        [--icefall-optim PATH] [--optim-presets tiny,base] [--resume-items 240]

One process, no Ray (numbers per worker / per core), every before/after pair side by side:

* **train step** - :func:`spear.student.model.train_step` (fbank on the device, masking,
  forward, both heads' losses, backward, ScaledAdam + Eden) on batches of ``--batch-seconds``
  of synthetic audio in ~10 s items: step time, audio s/s per worker, 50 Hz tokens/s, model
  FLOPs per step (FlopCounterMode, forward + backward); on CUDA also MFU against
  ``--peak-tflops`` (H100 SXM dense bf16: 989).
* **data prep** (process CPU seconds per audio second, 1 thread) - *before*: what the data
  CPUs did until now, decode a WAV + 20 % in-batch/token mixing + torchaudio's fbank per item,
  rows carrying float32 fbank; *after*: :func:`spear.student.data.prepare_batch` (decode + mix),
  rows carrying int16 audio; plus the fbank that moved (:class:`spear.student.frontend.Frontend`,
  lhotse's, batched) on ``--device``. **Bytes per audio second** into the object store: the
  rows' payload (features or audio + codes) over their audio seconds.
* **optimiser** - aten ops per step (counted with ``TorchDispatchMode``) and step time on the
  student's parameters with random gradients: the per-tensor loop (``spear.testing.
  LoopScaledAdam``, before), spear's foreach ScaledAdam (after) as it runs on CPU (runs of
  tensors of <= 2^20 elements) and in its GPU layout (``fused``: whole-group ops, the aten ops
  a GPU would launch), and icefall's ScaledAdam loaded
  from ``--icefall-optim`` (``egs/librispeech/ASR/zipformer/optim.py`` of k2-fsa/icefall, put
  in a scratch folder at run time, never into the package; without it that column is skipped
  with a loud line).
* **resume** - seconds until the first batch after a resume at 80 % of an epoch of
  ``--resume-items`` synthetic items: *before*, the interrupted epoch's stream is re-prepared
  (decode, mix, fbank, collate) up to the resume point; *after*, the plan is walked
  (:func:`spear.student.data.plan_epoch`) and only the next batch is prepared.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from spear.shards.index import open_run
from spear.stages.decode import DecodeConfig
from spear.storage import StorageConfig
from spear.student.config import (
    FrontendConfig,
    MaskConfig,
    MixConfig,
    OptimConfig,
    StudentConfig,
    TrainDataConfig,
)
from spear.student.data import (
    ShardRows,
    collate_rows,
    iter_rows,
    plan_epoch,
    prepare_batch,
    stream_batches,
)
from spear.student.frontend import Frontend, pad_audio, torchaudio_fbank
from spear.student.model import AudioBatch, Student, compute_loss, train_step
from spear.student.optim import ScaledAdam, build_optimizer
from spear.student.synthetic import collate, synth_items
from spear.testing import LoopScaledAdam, write_synthetic_output

HEADS = {"wavlm": 16, "dasheng": 8}


def _batch(seconds: float, seed: int) -> AudioBatch:
    """int16 audio, as the data workers now ship it (the fbank is part of the step)."""
    n = max(1, round(seconds / 10.0))
    items = synth_items(n, (9.0, 11.0), seed)
    feats = collate(items, HEADS)
    audio, lengths = pad_audio([np.asarray(it["audio"]) for it in items])
    return AudioBatch(
        audio=audio, num_samples=lengths, domains=feats.domains, targets=feats.targets
    )


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
            feats = model.features(batch)
            loss, _, _ = compute_loss(model, feats, MaskConfig(), gen, batch_count=0.0)
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


def _shards(folder: str, n: int, seconds: tuple[float, float]) -> list[str]:
    write_synthetic_output(
        folder, n, seconds, seed=1, wavlm_codebooks=16, dasheng_codebooks=8, items_per_shard=48
    )
    return open_run(folder, StorageConfig()).urls()


def _prep_kwargs(data: TrainDataConfig) -> dict[str, Any]:
    return {
        "teachers": HEADS,
        "rates": {"wavlm": 50.0, "dasheng": 25.0},
        "data": data,
        "mix": MixConfig(inbatch_prob=0.2, noise_prob=0.0, token_mixing=True),
        "decode": DecodeConfig(io_threads=1),
        "storage": StorageConfig(),
        "seed": 0,
    }


def _before_rows(rows: dict[str, Any], data: TrainDataConfig) -> dict[str, Any]:
    """The data CPUs' work until now: decode + mix (as prepare_batch) and then torchaudio's fbank
    per item, the rows carrying float32 fbank instead of audio."""
    out = prepare_batch(rows, **_prep_kwargs(data))
    feats = [
        torchaudio_fbank(np.frombuffer(a, dtype="<i2")).numpy().astype("<f4").tobytes()
        for a in out["audio"]
    ]
    out["fbank"] = np.empty(len(feats), dtype=object)
    out["fbank"][:] = feats
    del out["audio"]
    return out


def _before_collate(out: dict[str, Any]) -> torch.Tensor:
    """The old collation: float32 fbank rows padded into a batch (the codes as today)."""
    feats = [
        torch.from_numpy(np.frombuffer(f, "<f4").reshape(-1, 128).copy()) for f in out["fbank"]
    ]
    rows = list(iter_rows([{k: v for k, v in out.items() if k != "fbank"}]))
    for r in rows:
        r["audio"], r["num_samples"] = b"", 0
    collate_rows(rows, HEADS)
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)


def _payload(out: dict[str, Any], column: str) -> int:
    codes = sum(len(c) for t in HEADS for c in out[f"{t}_codes"])
    return sum(len(x) for x in out[column]) + codes


def bench_prep(
    device: torch.device, calls: int = 3, rows_per_call: int = 16
) -> list[dict[str, str]]:
    data = TrainDataConfig()
    rows_out = []
    with tempfile.TemporaryDirectory() as d:
        urls = _shards(d, rows_per_call * calls, (8.0, 12.0))
        table = pq.read_table(urls[0]).to_pydict()
        cols = {k: np.asarray(v, dtype=object) for k, v in table.items()}
        parts = [
            {k: v[c * rows_per_call : (c + 1) * rows_per_call] for k, v in cols.items()}
            for c in range(calls)
        ]
        fe = Frontend(FrontendConfig())
        for name, fn, column in (
            ("before: decode+mix+fbank (CPU)", lambda p: _before_rows(p, data), "fbank"),
            ("after: decode+mix (CPU)", lambda p: prepare_batch(p, **_prep_kwargs(data)), "audio"),
        ):
            seconds = 0.0
            size = 0
            t0 = time.process_time()
            for part in parts:
                out = fn(part)
                seconds += float(np.sum(out["num_samples"])) / 16000
                size += _payload(out, column)
            cpu = time.process_time() - t0
            rows_out.append(
                {
                    "data prep": name,
                    "CPU-s per audio-s": f"{cpu / seconds:.5f}",
                    "audio-s per CPU-s": f"{seconds / cpu:.0f}",
                    "bytes per audio-s": f"{size / seconds:,.0f}",
                }
            )
        # The fbank that moved, batched on the training device (its share of a step).
        batch = collate_rows(
            list(iter_rows([prepare_batch(parts[0], **_prep_kwargs(data))])), HEADS
        ).to(device)
        fe(batch.audio, batch.num_samples)  # warm-up
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        reps = 5
        for _ in range(reps):
            fe(batch.audio, batch.num_samples)
        _sync(device)
        wall, cpu = (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps
        rows_out.append(
            {
                "data prep": f"after: lhotse fbank, batched on {device.type}",
                "CPU-s per audio-s": f"{cpu / batch.seconds:.5f}",
                "audio-s per CPU-s": f"{batch.seconds / wall:.0f} per wall-s",
                "bytes per audio-s": "(on the device)",
            }
        )
    return rows_out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _load_icefall(path: str | None) -> Any:
    if not path or not os.path.exists(path):
        print(
            "!! icefall's optim.py not given (--icefall-optim PATH: k2-fsa/icefall "
            "egs/librispeech/ASR/zipformer/optim.py in a scratch folder): its column is SKIPPED"
        )
        return None
    spec = importlib.util.spec_from_file_location("icefall_optim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ScaledAdam


def bench_optim(
    preset: str, device: torch.device, icefall: Any, steps: int = 3
) -> list[dict[str, str]]:
    torch.manual_seed(0)
    base = Student(StudentConfig(preset=preset)).to(device)
    out = []
    makers: list[tuple[str, Any]] = [
        ("before: per-tensor loop", lambda m: LoopScaledAdam(m.parameters())),
        ("after: foreach (CPU default: runs)", lambda m: ScaledAdam(m.parameters())),
        ("after: foreach fused (GPU layout)", lambda m: ScaledAdam(m.parameters(), fused=True)),
    ]
    if icefall is not None:
        makers.append(
            ("icefall ScaledAdam", lambda m: icefall(m.named_parameters(), clipping_scale=2.0))
        )
    for name, make in makers:
        model = copy.deepcopy(base)
        opt = make(model)
        g = torch.Generator(device=device).manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
        opt.step()  # state created
        with _CountOps() as counter:
            opt.step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        _sync(device)
        out.append(
            {
                "preset": preset,
                "optimiser": name,
                "aten ops/step": f"{counter.ops:,}",
                "step ms": f"{(time.perf_counter() - t0) / steps * 1000:.1f}",
            }
        )
    return out


def bench_resume(items: int, at: float = 0.8) -> list[dict[str, str]]:
    data = TrainDataConfig(batch_seconds=60.0)
    kwargs = _prep_kwargs(data)
    out = []
    with tempfile.TemporaryDirectory() as d:
        urls = _shards(d, items, (8.0, 12.0))
        reader = ShardRows(urls, list(HEADS), StorageConfig())
        n = sum(1 for _ in plan_epoch(len(urls), reader.light, data, seed=0, epoch=0))
        skip = int(n * at)
        # Before: the stream is re-prepared from the epoch's start; batches before the
        # resume point are prepared and collated, then dropped.
        t0 = time.perf_counter()
        reader = ShardRows(urls, list(HEADS), StorageConfig())
        plan = plan_epoch(len(urls), reader.light, data, planned=reader.planned, seed=0, epoch=0)
        for i, refs in enumerate(plan):
            batch = _before_collate(_before_rows(reader.rows(refs), data))
            if i == skip:
                break
        before = time.perf_counter() - t0
        # After: walk the plan, prepare only the next batch (and compute its fbank).
        t0 = time.perf_counter()
        reader = ShardRows(urls, list(HEADS), StorageConfig())
        plan = plan_epoch(len(urls), reader.light, data, planned=reader.planned, seed=0, epoch=0)
        stream = stream_batches(
            plan, reader, lambda r: prepare_batch(r, **kwargs), HEADS, skip=skip, prefetch=1
        )
        _, audio_batch = next(stream)
        Frontend(FrontendConfig())(audio_batch.audio, audio_batch.num_samples)
        after = time.perf_counter() - t0
        del batch
    for name, secs in (("before: replay the epoch", before), ("after: walk the plan", after)):
        out.append(
            {
                "resume": name,
                "at batch": f"{skip} of {n}",
                "s to first batch": f"{secs:.2f}",
            }
        )
    return out


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
    ap.add_argument("--icefall-optim", default=None)
    ap.add_argument("--optim-presets", default="tiny,base")
    ap.add_argument("--resume-items", type=int, default=240)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    icefall = _load_icefall(args.icefall_optim)
    print(f"{device} ({args.threads} CPU thread(s)), torch {torch.__version__}")
    train = [
        bench_train(p, args.batch_seconds, args.steps, device, args.peak_tflops)
        for p in args.presets.split(",")
        if p
    ]
    if train:
        print(_table(train))
        print()
    prep = bench_prep(device)
    print(_table(prep))
    print()
    optim = [r for p in args.optim_presets.split(",") if p for r in bench_optim(p, device, icefall)]
    print(_table(optim))
    print()
    print(_table(bench_resume(args.resume_items)))
    if train:
        rate = float(prep[1]["audio-s per CPU-s"])
        print()
        print(
            _table(
                [
                    {
                        "preset": r["preset"],
                        "data cores per worker (after)": f"{float(r['audio s/s']) / rate:.3f}",
                    }
                    for r in train
                ]
            )
        )


if __name__ == "__main__":
    main()
