"""ScaledAdam and Eden."""

from __future__ import annotations

import io
import math

import pytest
import torch

from spear.student.config import OptimConfig
from spear.student.optim import Eden, ScaledAdam, build_optimizer


def test_eden_shape() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = Eden(opt, lr_batches=100, lr_hours=10, warmup_batches=10)
    assert sched.get_last_lr()[0] == pytest.approx(0.5)  # warm-up starts at half
    sched.set_progress(100, 0.0)
    assert sched.get_last_lr()[0] == pytest.approx(2**-0.25)
    sched.set_progress(100, 10.0)
    assert sched.get_last_lr()[0] == pytest.approx(2**-0.5)
    sched.set_progress(10_000, 1000.0)
    assert sched.get_last_lr()[0] < 0.05


def test_scaled_adam_updates_relative_to_param_size() -> None:
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(64, 64) * 10)
    small = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    opt = ScaledAdam([big, small], lr=0.01)
    before = [big.detach().clone(), small.detach().clone()]
    (big.sum() + small.sum()).backward()
    opt.step()
    rel = [
        float((p.detach() - b).norm() / b.norm()) for p, b in zip((big, small), before, strict=True)
    ]
    assert rel[0] == pytest.approx(rel[1], rel=0.05)


def test_scaled_adam_minimises_and_round_trips_state() -> None:
    torch.manual_seed(0)
    target = torch.randn(8, 8)
    w = torch.nn.Parameter(torch.randn(8, 8))
    s = torch.nn.Parameter(torch.tensor(1.5))  # scalars move at 0.1 x lr
    opt = ScaledAdam([w, s], lr=0.05)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = (w - target).pow(2).mean() + (s - 1.0) ** 2
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 1e-3 * first
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    opt2 = ScaledAdam([w, s], lr=0.05)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert opt2.param_groups[0]["recent_norms"] == opt.param_groups[0]["recent_norms"]
    assert all(math.isfinite(x) for x in opt.param_groups[0]["recent_norms"])


def test_build_adamw() -> None:
    model = torch.nn.Linear(3, 3)
    opt, sched = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, warmup_batches=0))
    assert isinstance(opt, torch.optim.AdamW)
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)
