"""The GPU check in one command: teachers, MVQ encode, the fused tokenize actor and the student
train step at real size on one GPU, as x real time and MFU, written as rates for `spear plan`.

    make bench-gpu                                       # = uv run python benchmarks/gpu.py
    uv run python benchmarks/gpu.py --cpu-test --rates-out /tmp/rates   # tiny presets, CPU
    uv run python benchmarks/gpu.py --sizes cpu-real     # real sizes, small batches, on CPU

Every model is random-initialised and built offline (no hub download; throughput does not depend
on the weights). Parts, in order; each prints a line when done, then a table per part:

1. **teacher** (``wavlm``, ``dasheng``): WavLM Large to layer 21 and Dasheng 1.2B through
   :func:`spear.stages.teachers.run_teacher` (normalisation, padding, host->device copy, model
   under bf16 autocast in inference mode, device->host copy) on one batch of int16 noise:
   x real time, and MFU from the registry's ``gflops_per_second`` (SPEC section 6; an analytic
   count for the tiny presets) against the device's peak (``spear.rates.PEAK_TFLOPS`` by
   device name, or ``--peak-tflops``).
2. **mvq** (``mvq.wavlm``, ``mvq.dasheng``): that teacher's quantiser at SPEC's sizes (16 x 256
   on 1024-d, 8 x 256 on 1536-d; random centres as in ``benchmarks/pipeline.py``, saved and
   read back through ``spear.stages.quantizers.load_quantizer``) encoding part 1's embeddings,
   already on the device, with 5 refinement rounds: x real time = vectors/s / frame rate.
3. **tokenize** (``tokenize.wavlm``, ``tokenize.dasheng``): the fused actor's pure path,
   :func:`spear.stages.tokenize.tokenize_batch`, with that teacher and quantiser at the
   actor's default ``batch_seconds``, in process (no Ray): int16 bytes in, uint8 codes out.
4. **student** (``student.base``, ``student.large``): :func:`spear.student.model.train_step`
   (masking, forward, both heads' losses, backward, ScaledAdam + Eden) under bf16 autocast on
   a ~300 s batch of synthetic audio (SPEC: 300-400 s per GPU), with the encoder's schedules
   at their steady state (skip rates after warm-up): step time, audio s/s, MFU from the FLOPs
   torch's FlopCounterMode counts on one forward + backward.

Timings are the best of ``--repeats`` after ``--warmup`` untimed runs, with
``torch.cuda.synchronize()`` before and after each. The sizes are chosen so that the whole check
fits 8 minutes on one H100/H200, model builds included (expected ~3-4 minutes; not yet run on a
GPU); ``--budget-seconds`` (480) skips, and says so, any part that would start after it, and a
part that runs out of memory is reported and skipped. Each figure is written as soon as it is
measured, through ``benchmarks/rates.py:record``, into the shipped rates
(``spear/measured_rates/<device>.json``) or ``--rates-out DIR`` (on a borrowed machine:
``--rates-out $OUT``, then copy the file in). Exit status 1 when a part was not measured.
Without CUDA (or with ``--cpu-test``) the same code runs the tiny presets (wavlm-tiny,
dasheng-tiny, student tiny) on CPU in seconds as a test; its rates name the device "(tiny
presets)" and go to ``--rates-out`` or a temporary folder, never into the shipped files.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rates import RATES_DIR, device_name, record  # benchmarks/rates.py
from teachers import analytic_gflops_per_second  # benchmarks/teachers.py
from torch.utils.flop_counter import FlopCounterMode

from spear.pipeline.quantize import save_quantizer
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.rates import peak_tflops
from spear.stages.quantizers import load_quantizer
from spear.stages.teachers import TEACHERS, LoadedTeacher, TeacherConfig, load_teacher, run_teacher
from spear.stages.tokenize import tokenize_batch
from spear.storage import StorageConfig
from spear.student.config import MaskConfig, OptimConfig, StudentConfig
from spear.student.model import Student, compute_loss, train_step
from spear.student.optim import build_optimizer
from spear.student.synthetic import collate, synth_items

CODEBOOKS = {"wavlm": 16, "dasheng": 8}  # SPEC section 2, 256 entries each
REFINE_ROUNDS = 5
STEADY_HOURS = 10_000.0  # past every schedule of ZipformerMachinery (50k batches of 600 s)
SAMPLE_RATE = 16_000


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: models and batch sizes."""

    wavlm: str
    dasheng: str
    students: tuple[str, ...]
    wavlm_batch: tuple[int, float]
    """(items, seconds each) of the teacher batch, run as one forward pass; tokenize uses the
    same items (speech domain), cut by the actor's own batch_seconds."""
    dasheng_batch: tuple[int, float]
    """The same for Dasheng (audio-domain items)."""
    student_seconds: float
    """Audio seconds per student batch (~10 s items)."""
    warmup: int
    repeats: int


SIZES = {
    "gpu": Sizes("wavlm", "dasheng", ("base", "large"), (32, 20.0), (48, 10.0), 300.0, 2, 5),
    "cpu-real": Sizes("wavlm", "dasheng", ("base", "large"), (1, 10.0), (1, 10.0), 20.0, 1, 1),
    "tiny": Sizes("wavlm-tiny", "dasheng-tiny", ("tiny",), (2, 2.0), (2, 2.0), 20.0, 1, 2),
}


@dataclasses.dataclass
class Bench:
    """The run's device, peak and timing settings, and what it measured."""

    device: torch.device
    peak: float | None
    """Peak TFLOP/s for MFU (None: no MFU, e.g. on CPU)."""
    warmup: int
    repeats: int
    label: str
    """The device as the rates file names it."""
    out_dir: Path
    command: str
    rows: dict[str, list[dict[str, str]]] = dataclasses.field(default_factory=dict)
    path: Path | None = None
    """The rates file, once a figure is written (each as soon as it is measured)."""

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def best(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(best seconds of ``repeats`` timed calls after ``warmup`` untimed ones, last output)."""
        out = None
        for _ in range(self.warmup):
            out = fn()
        best = float("inf")
        for _ in range(max(1, self.repeats)):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best, out

    def mfu(self, flops_per_second: float) -> str:
        return "-" if self.peak is None else f"{flops_per_second / (self.peak * 1e12):.1%}"

    def add(self, part: str, name: str, rate: float, row: dict[str, str]) -> None:
        self.rows.setdefault(part, []).append({"name": name, **row})
        self.path = record(
            name, rate, device=self.label, command=self.command, directory=self.out_dir
        )
        print(f"  {part:<9}{name:<18}" + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def noise(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 3000).astype(np.int16) for _ in range(n)
    ]


def audio_batch(waves: list[np.ndarray], domain: str) -> dict[str, np.ndarray]:
    """An audio batch as the decode stage hands it to a tokenize actor."""
    n = len(waves)

    def col(values: list[Any]) -> np.ndarray:
        out = np.empty(n, dtype=object)
        out[:] = values
        return out

    return {
        "item_id": col([f"bench-{i:05d}" for i in range(n)]),
        "url": col([f"bench://{i}.flac" for i in range(n)]),
        "domain": col([domain] * n),
        "num_samples": np.array([len(w) for w in waves], dtype=np.int64),
        "audio": col([w.tobytes() for w in waves]),
        "error_type": col([""] * n),
        "error": col([""] * n),
    }


def bench_teacher(b: Bench, family: str, name: str, batch: tuple[int, float]) -> tuple[Any, ...]:
    """Part 1; returns (the loaded teacher, its embeddings of the batch)."""
    items, seconds = batch
    t0 = time.perf_counter()
    teacher = load_teacher(
        TeacherConfig(
            name=name,
            dtype="bfloat16",
            device="cuda" if b.device.type == "cuda" else "cpu",
            batch_seconds=items * seconds + 1,
        )
    )
    build = time.perf_counter() - t0
    waves = noise(items, seconds)
    t, embs = b.best(lambda: run_teacher(teacher, waves))
    rate = items * seconds / t
    spec = TEACHERS[name]
    gflops = spec.gflops_per_second or analytic_gflops_per_second(name, seconds)
    b.add(
        "teacher",
        family,
        rate,
        {
            "model": name,
            "batch": f"{items} x {seconds:g} s",
            "build s": f"{build:.1f}",
            "call s": f"{t:.3f}",
            "x RT": f"{rate:,.1f}",
            "GFLOP/audio s": f"{gflops:.2f}",
            "TFLOP/s": f"{rate * gflops / 1e3:.2f}",
            "MFU": b.mfu(rate * gflops * 1e9),
        },
    )
    return teacher, embs


def make_quantizer(teacher: LoadedTeacher, family: str, folder: str, device: torch.device) -> Any:
    """A random quantiser at SPEC's size, saved and read back the way an actor loads one."""
    spec = teacher.spec
    torch.manual_seed(0)
    info = QuantizerInfo(
        dim=spec.dim,
        num_codebooks=CODEBOOKS[family],
        codebook_size=256,
        teacher=spec.name,
        layer=teacher.layer,
    )
    q = Quantizer(info)
    with torch.no_grad():
        q.centers.normal_()
    url = save_quantizer(q, f"{folder}/{family}", StorageConfig())
    return load_quantizer(url, StorageConfig(), str(device)).eval()


def bench_mvq(b: Bench, family: str, q: Any, embs: list[np.ndarray], frame_rate: float) -> None:
    """Part 2: the encode alone, input already on the device."""
    x = torch.from_numpy(np.concatenate(embs)).to(b.device)
    t, codes = b.best(lambda: q.encode(x, REFINE_ROUNDS))
    if tuple(codes.shape) != (len(x), q.num_codebooks):
        raise RuntimeError(f"mvq.{family}: codes of shape {tuple(codes.shape)}")
    vps = len(x) / t
    b.add(
        "mvq",
        f"mvq.{family}",
        vps / frame_rate,
        {
            "codebooks": f"{q.num_codebooks} x {q.codebook_size} on {q.dim}-d",
            "vectors": f"{len(x):,}",
            "call s": f"{t:.3f}",
            "vectors/s": f"{vps:,.0f}",
            "x RT": f"{vps / frame_rate:,.1f}",
        },
    )


def bench_tokenize(
    b: Bench, family: str, teacher: LoadedTeacher, q: Any, batch: tuple[int, float]
) -> None:
    """Part 3: the fused actor's pure path on an audio batch, end to end."""
    items, seconds = batch
    domain, domains = (
        ("speech", ("speech", "audio")) if family == "wavlm" else ("audio", ("audio",))
    )
    # The actor cuts its batch by the configured batch_seconds (default), not part 1's one pass.
    actor = dataclasses.replace(
        teacher,
        config=dataclasses.replace(teacher.config, batch_seconds=TeacherConfig().batch_seconds),
    )
    data = audio_batch(noise(items, seconds, seed=1), domain)

    def call() -> dict[str, Any]:
        return tokenize_batch(
            actor,
            q,
            data,
            prefix=family,
            domains=domains,
            refine_rounds=REFINE_ROUNDS,
            keep_audio=(),
        )

    t, out = b.best(call)
    frames = out[f"{family}_frames"]
    if (frames <= 0).any() or any(out["error_type"]):
        raise RuntimeError(f"tokenize.{family}: rows without codes: {out['error'][:3]}")
    nbytes = sum(len(c) for c in out[f"{family}_codes"])
    rate = items * seconds / t
    b.add(
        "tokenize",
        f"tokenize.{family}",
        rate,
        {
            "batch": f"{items} x {seconds:g} s",
            "batch_seconds": f"{actor.config.batch_seconds:g}",
            "call s": f"{t:.3f}",
            "x RT": f"{rate:,.1f}",
            "code B/audio s": f"{nbytes / (items * seconds):,.0f}",
        },
    )


def bench_student(b: Bench, preset: str, seconds: float) -> None:
    """Part 4: optimiser steps of one preset on one synthetic batch."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Student(StudentConfig(preset=preset)).to(b.device)
    opt, sched = build_optimizer(model, OptimConfig())
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    n = max(2, round(seconds / 10.0))  # both domains, so both heads train
    batch = collate(synth_items(n, (9.0, 11.0), seed=0), dict(CODEBOOKS)).to(b.device)
    amp = torch.bfloat16 if b.device.type == "cuda" else None
    gen = torch.Generator().manual_seed(0)
    mask = MaskConfig()
    count = model.encoder.cfg.machinery.batch_count(STEADY_HOURS)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(b.device.type, dtype=amp) if amp else torch.enable_grad():
            loss, _, _ = compute_loss(model, batch, mask, gen, batch_count=count)
        loss.backward()
    flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    step = [0]

    def one() -> Any:
        s = train_step(
            model,
            batch,
            opt,
            sched,
            step=step[0],
            hours=STEADY_HOURS,
            mask=mask,
            generator=gen,
            autocast_dtype=amp,
        )
        step[0] += 1
        return s

    t, stats = b.best(one)
    if not np.isfinite(stats.loss):
        raise RuntimeError(f"student.{preset}: loss {stats.loss}")
    rate = batch.seconds / t
    b.add(
        "student",
        f"student.{preset}",
        rate,
        {
            "params": f"{params / 1e6:.1f}M",
            "batch": f"{batch.seconds:.0f} s",
            "build s": f"{build:.1f}",
            "step s": f"{t:.3f}",
            "audio s/s": f"{rate:,.1f}",
            "GFLOP/audio s": f"{flops / 1e9 / batch.seconds:.1f}",
            "TFLOP/s": f"{flops / t / 1e12:.2f}",
            "MFU": b.mfu(flops / t),
        },
    )


def table(rows: list[dict[str, str]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(r.get(k, "")) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(width[k]) for k in keys).rstrip()]
    lines.append("  ".join("-" * width[k] for k in keys))
    lines += ["  ".join(r.get(k, "").ljust(width[k]) for k in keys).rstrip() for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--cpu-test",
        action="store_true",
        help="tiny presets on CPU (the default "
        "without CUDA); rates go to --rates-out or a temporary folder",
    )
    p.add_argument(
        "--sizes", choices=sorted(SIZES), default=None, help="gpu (default on CUDA), cpu-real, tiny"
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--only", default="wavlm,dasheng,student", help="parts to run")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default by sizes)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default by sizes)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default: spear.rates.PEAK_TFLOPS by device name)",
    )
    p.add_argument("--budget-seconds", type=float, default=480.0)
    p.add_argument(
        "--rates-out",
        type=Path,
        default=None,
        help=f"folder for the rates file (default {RATES_DIR})",
    )
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    test = args.cpu_test or (not cuda and args.sizes is None)
    device = torch.device("cpu" if test else args.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is visible")
    sizes = SIZES["tiny" if test else args.sizes or ("gpu" if device.type == "cuda" else "tiny")]
    only = set(args.only.split(","))
    if only - {"wavlm", "dasheng", "student"}:
        p.error(f"--only takes wavlm, dasheng, student; got {args.only}")
    peak, peak_from = args.peak_tflops, "--peak-tflops"
    name = device_name()
    if peak is None and device.type == "cuda":
        found = peak_tflops(name)
        if found is not None:
            peak, peak_from = found[0], f"{found[1]} bf16 dense"
    tiny = sizes is SIZES["tiny"]
    label = f"{name} (tiny presets)" if tiny else name
    out_dir = args.rates_out
    if out_dir is None:  # tiny-model figures must never reach the shipped rates
        out_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-")) if tiny else RATES_DIR
    b = Bench(
        device,
        peak,
        sizes.warmup if args.warmup is None else args.warmup,
        sizes.repeats if args.repeats is None else args.repeats,
        label,
        out_dir,
        " ".join(["benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    print(
        f"device: {label}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        + (f"peak {peak:g} TFLOP/s ({peak_from})" if peak else "no peak: no MFU")
        + f"; warm-up {b.warmup}, best of {b.repeats}",
        flush=True,
    )
    start = time.perf_counter()
    failed: list[str] = []

    def attempt(part: str, fn: Callable[[], None]) -> None:
        """Run one part unless past the budget; out of memory fails that part, not the run."""
        if time.perf_counter() - start > args.budget_seconds:
            failed.append(f"{part} (past --budget-seconds)")
            print(f"  skipped {part}: past --budget-seconds {args.budget_seconds:g}", flush=True)
            return
        try:
            fn()
        except torch.OutOfMemoryError as err:
            failed.append(f"{part} (out of memory)")
            print(f"  {part}: out of memory ({str(err).splitlines()[0]})", flush=True)
        b.free()

    def teacher_chain(family: str, folder: str) -> None:
        batch = sizes.wavlm_batch if family == "wavlm" else sizes.dasheng_batch
        teacher, embs = bench_teacher(b, family, getattr(sizes, family), batch)
        q = make_quantizer(teacher, family, folder, device)
        bench_mvq(b, family, q, embs, teacher.spec.frame_rate)
        del embs
        bench_tokenize(b, family, teacher, q, batch)

    with tempfile.TemporaryDirectory() as folder:
        for family in ("wavlm", "dasheng"):
            if family in only:
                attempt(family, functools.partial(teacher_chain, family, folder))
    for preset in sizes.students if "student" in only else ():
        part = functools.partial(bench_student, b, preset, sizes.student_seconds)
        attempt(f"student.{preset}", part)
    total = time.perf_counter() - start

    titles = {
        "teacher": "Teachers (run_teacher, bf16 autocast on CUDA)",
        "mvq": f"MVQ encode alone ({REFINE_ROUNDS} refinement rounds)",
        "tokenize": "Fused tokenize actor (tokenize_batch, no Ray)",
        "student": "Student train step (bf16 autocast on CUDA, steady-state schedules)",
    }
    for kind, rows in b.rows.items():
        print(f"\n{titles[kind]}\n{table(rows)}")
    print(
        f"\ntotal {total:.1f} s (budget {args.budget_seconds:g} s)"
        + (f"; not measured: {', '.join(failed)}" if failed else "")
    )
    print(f"rates: {b.path or 'none measured'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
