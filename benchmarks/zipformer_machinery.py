"""What Balancer and Whiten cost per training step (they change gradients only).

    uv run python benchmarks/zipformer_machinery.py [--preset tiny] [--batch-seconds 20]
                                                    [--steps 12] [--threads 1]

Four students with the same weights - machinery as configured by default, without Balancers,
without Whiten modules, without both - each run :func:`spear.student.model.train_step`
(masking, forward, losses, backward, ScaledAdam) on the same synthetic batch, round-robin so
that load on a shared machine hits all alike. Both modules act at random (Balancer with
probability 0.5 falling to 0.125 by batch 8000; Whiten 0.25 after a violation, 0.025 after a
pass), so each is timed at schedule batch count 0 and 20000 (``hours`` 0 and 3333) over
``--steps`` steps after two warm-up steps. Times are process CPU seconds (with one thread,
what the step itself used; wall time on a shared machine mostly measures the neighbours). The
variants run back to back within each step, so the cost column is the median over steps of
the paired ratio to "neither" (drifting load cancels); the interquartile range of those
ratios says how far to trust it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from spear.student.config import ENCODER_PRESETS, MaskConfig, OptimConfig, StudentConfig
from spear.student.model import Student, train_step
from spear.student.optim import build_optimizer
from spear.student.synthetic import collate, synth_items

VARIANTS = {
    "both": {},
    "no balancers": {"balancers": False},
    "no whiten": {"whiteners": False},
    "neither": {"balancers": False, "whiteners": False},
}


def _student(preset: str, machinery: dict[str, bool]) -> Student:
    enc = ENCODER_PRESETS[preset]()
    enc = dataclasses.replace(enc, machinery=dataclasses.replace(enc.machinery, **machinery))
    torch.manual_seed(0)
    return Student(StudentConfig(encoder=enc))


def bench(preset: str, batch_seconds: float, steps: int, hours: float) -> dict[str, list[float]]:
    n = max(1, round(batch_seconds / 10.0))
    batch = collate(synth_items(n, (9.0, 11.0), 0), {"wavlm": 16, "dasheng": 8})
    runs = {}
    for name, machinery in VARIANTS.items():
        model = _student(preset, machinery)
        opt, sched = build_optimizer(model, OptimConfig())
        runs[name] = (model, opt, sched, torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(steps + 2):
        for name, (model, opt, sched, gen) in runs.items():
            torch.manual_seed(step)  # the same random decisions in every variant
            t0 = time.process_time()
            train_step(
                model, batch, opt, sched, step=step, hours=hours, mask=MaskConfig(), generator=gen
            )
            if step >= 2:
                times[name].append(time.process_time() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-seconds", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"preset {args.preset}, batch {args.batch_seconds:g} s, {args.steps} steps, "
        f"{args.threads} thread(s), torch {torch.__version__}"
    )
    print("| batch count | variant | step CPU s (median) | cost vs neither (median) | IQR |")
    print("|---|---|---|---|---|")
    for batch_count in (0.0, 20000.0):
        hours = batch_count * 600.0 / 3600.0  # the default batch_seconds
        times = bench(args.preset, args.batch_seconds, args.steps, hours)
        for name, ts in times.items():
            ratios = [100 * (t / b - 1) for t, b in zip(ts, times["neither"], strict=True)]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(
                f"| {batch_count:g} | {name} | {statistics.median(ts):.3f} | "
                f"{statistics.median(ratios):+.1f} % | {q1:+.1f} .. {q3:+.1f} % |"
            )


if __name__ == "__main__":
    main()
