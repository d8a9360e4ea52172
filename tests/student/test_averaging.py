"""Model averaging as icefall does it: the running mean of the model at every P-th step, and
the mean over a span from two running means."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spear.student.averaging import ModelAverage, average_between, averaged_student
from spear.student.config import StudentConfig
from spear.student.model import Student


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.prob = 0.25

    def get_extra_state(self) -> dict[str, float]:  # as Whiten keeps its probability
        return {"prob": self.prob}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.prob = state["prob"]


def _set(net: Net, step: int) -> dict[str, torch.Tensor]:
    """Weights that differ at every step (what an optimiser would leave)."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        net.count.fill_(step)  # type: ignore[operator]
    net.prob = step / 100
    return {
        k: v.detach().clone().double() if isinstance(v, torch.Tensor) else v
        for k, v in net.state_dict().items()
    }


def test_running_average_is_the_mean_of_the_model_at_every_period_th_step() -> None:
    net, period = Net(), 3
    avg = ModelAverage(net, period)
    seen = []
    for step in range(1, 13):
        state = _set(net, step)
        folded = avg.update(net, step)
        assert folded == (step % period == 0)
        if folded:
            seen.append(state)
    assert avg.step == 12 and len(seen) == 4
    for k in ("lin.weight", "lin.bias"):
        want = torch.stack([s[k] for s in seen]).mean(0)
        torch.testing.assert_close(avg.state[k], want, rtol=1e-12, atol=1e-12)
        assert avg.state[k].dtype == torch.float64
    assert int(avg.state["count"]) == 12  # integer buffers: the newest model's
    assert avg.state["_extra_state"] == {"prob": 0.12}  # extra state too


def test_a_students_average_loads_as_a_student() -> None:
    student = Student(StudentConfig(preset="tiny"))
    avg = ModelAverage(student, 1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    avg.update(student, 1)
    state = averaged_student(student.checkpoint_dict(), avg.state, {"to_step": 1})
    loaded = Student.from_state(state)
    w = "encoder.embed.conv1.weight"
    torch.testing.assert_close(loaded.state_dict()[w], student.state_dict()[w])


def test_average_between_two_checkpoints_is_the_mean_over_the_span() -> None:
    net, period = Net(), 2
    avg = ModelAverage(net, period)
    states, saved = {}, {}
    for step in range(1, 21):
        states[step] = _set(net, step)
        avg.update(net, step)
        if step in (8, 20):
            saved[step] = {
                "step": avg.step,
                "period": avg.period,
                "model": copy.deepcopy(avg.state),
            }
    got = average_between(saved[8], saved[20])
    span = [states[s] for s in range(10, 21, 2)]  # the averaged steps in (8, 20]
    for k in ("lin.weight", "lin.bias"):
        torch.testing.assert_close(got[k], torch.stack([s[k] for s in span]).mean(0))
    with pytest.raises(ValueError, match="must come after"):
        average_between(saved[20], saved[8])
    with pytest.raises(ValueError, match="periods differ"):
        average_between(saved[8] | {"period": 4}, saved[20])


def test_state_round_trip_reset_and_period_check() -> None:
    net = Net()
    avg = ModelAverage(net, 2)
    for step in range(1, 7):
        _set(net, step)
        avg.update(net, step)
    other = ModelAverage(Net(), 2)
    other.load_state_dict(avg.state_dict())
    assert other.step == 6
    torch.testing.assert_close(other.state["lin.weight"], avg.state["lin.weight"])
    with pytest.raises(ValueError, match="average_period to 2"):
        ModelAverage(Net(), 5).load_state_dict(avg.state_dict())
    current = _set(net, 99)
    other.reset(net, 7)
    assert other.step == 6  # the last averaged step at or before 7
    torch.testing.assert_close(other.state["lin.weight"], current["lin.weight"])


def test_averaged_student_keeps_dtypes_and_records_the_span() -> None:
    net = Net()
    base = {"format": "x", "model": net.state_dict(), "trained_on": {"token_run": "r"}}
    weights = {k: v.double() + 1 for k, v in net.state_dict().items() if k != "_extra_state"}
    weights["_extra_state"] = {"prob": 0.5}
    out = averaged_student(base, weights, {"from_step": 0, "to_step": 4})
    assert out["model"]["lin.weight"].dtype == torch.float32
    torch.testing.assert_close(out["model"]["lin.bias"], net.lin.bias.detach() + 1)
    assert out["averaged"] == {"from_step": 0, "to_step": 4}
    assert out["model"]["_extra_state"] == {"prob": 0.25}  # the checkpoint's own
    assert out["trained_on"] == {"token_run": "r"}
    with pytest.raises(ValueError, match="do not match"):
        averaged_student(base, {"lin.weight": weights["lin.weight"]}, {})
