"""ScaledAdam and Eden."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from spear.student.config import OptimConfig, StudentConfig
from spear.student.model import Student
from spear.student.optim import Eden, ScaledAdam, build_optimizer
from spear.testing import LoopScaledAdam


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


@pytest.mark.parametrize("fused", [False, True])
def test_foreach_scaled_adam_makes_the_per_tensor_update(fused: bool) -> None:
    # The same gradients into both (the loop version is the per-tensor implementation spear had
    # before, kept in spear.testing): after every step the parameters agree to 1e-6 of their
    # size, through clipping (a gradient spike at step 12) and scalars. fused: the GPU layout
    # (whole-group ops); not fused: CPU runs of tensors.
    torch.manual_seed(0)
    model = Student(StudentConfig(preset="tiny"))
    twin = copy.deepcopy(model)
    flat, loop = ScaledAdam(model.parameters(), fused=fused), LoopScaledAdam(twin.parameters())
    params = list(zip(model.parameters(), twin.parameters(), strict=True))
    assert any(p.numel() == 1 for p, _ in params)
    for step in range(15):
        for a, b in params:
            g = torch.randn_like(a) * (1e-2 if step != 12 else 1.0)
            a.grad, b.grad = g.clone(), g.clone()
        flat.step()
        loop.step()
        for a, b in params:
            assert (a - b).abs().max() <= 1e-6 * max(float(b.abs().max()), 1e-3), step
    assert flat.param_groups[0]["num_clipped"] == loop.param_groups[0]["num_clipped"] == 1
    assert flat.param_groups[0]["recent_norms"] == pytest.approx(
        loop.param_groups[0]["recent_norms"], rel=1e-5
    )


def test_foreach_scaled_adam_state_is_the_loops_and_resumes_exactly() -> None:
    torch.manual_seed(0)
    model = Student(StudentConfig(preset="tiny"))
    opt = ScaledAdam(model.parameters())

    def step(o: ScaledAdam, m: torch.nn.Module, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        o.step()

    for i in range(3):
        step(opt, model, i)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
    step(opt, model, 3)
    again = Student(StudentConfig(preset="tiny"))
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    again.load_state_dict(saved["model"])
    opt2 = ScaledAdam(again.parameters())
    opt2.load_state_dict(saved["opt"])
    step(opt2, again, 3)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    # The state layout is the per-tensor one: a training state saved before still loads.
    old = LoopScaledAdam(again.parameters())
    old.load_state_dict(opt2.state_dict())
    assert old.state_dict()["state"].keys() == opt2.state_dict()["state"].keys()


def test_scaled_adam_follows_a_replaced_parameter_storage() -> None:
    model = torch.nn.Linear(4, 3)
    opt = ScaledAdam(model.parameters())
    model.weight.grad = torch.ones(3, 4)
    opt.step()
    model.weight.data = model.weight.data.clone()  # new storage (as .to(device) would give)
    before = model.weight.detach().clone()
    model.weight.grad = torch.ones(3, 4)
    opt.step()
    assert not torch.equal(model.weight.detach(), before)
