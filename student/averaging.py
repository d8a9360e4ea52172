"""Model averaging as icefall does it (``model_avg`` in ``egs/librispeech/ASR/zipformer/train.py``,
``average_checkpoints_with_averaged_model`` in ``icefall/checkpoint.py``).

Rank 0 keeps a float64 copy of the weights, the running mean of the model at steps ``P, 2P,
..., n`` (``P`` = ``TrainConfig.average_period``): at a step ``n`` divisible by ``P``,
``avg = avg * (1 - P/n) + model * P/n`` (the initial weights get weight 0 at ``n = P``). It is
saved in every training checkpoint as ``model_avg.pt`` (:data:`AVERAGE_FILE`):
``{"step", "period", "model"}``. Two checkpoints' running means give the mean of the model over
the steps between them (:func:`average_between`): what SPEAR's releases ship, what
``spear student average`` writes. Floating-point tensors are averaged; integer buffers and
modules' extra state (Whiten's probability) are taken from the newer model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

AVERAGE_FILE = "model_avg.pt"
"""The running average inside a training checkpoint folder."""


class ModelAverage:
    """The running mean of a model's weights at every ``period``-th step (kept in float64)."""

    def __init__(self, model: nn.Module, period: int, step: int = 0) -> None:
        if period < 1:
            raise ValueError(f"average period must be >= 1, got {period}")
        self.period = period
        self.step = step
        """The last step folded in (0: only the initial weights)."""
        self.state = {k: _f64(v) for k, v in model.state_dict().items()}

    def reset(self, model: nn.Module, step: int) -> None:
        """Start again from ``model``'s weights, as if they had been the model at every
        averaged step up to ``step``."""
        self.state = {k: _f64(v) for k, v in model.state_dict().items()}
        self.step = step - step % self.period

    def update(self, model: nn.Module, step: int) -> bool:
        """Fold ``model``'s weights in when ``step`` (optimiser steps done) is a multiple of
        the period; whether it did."""
        if step <= 0 or step % self.period:
            return False
        weight = self.period / step
        with torch.no_grad():
            for k, cur in model.state_dict().items():
                avg = self.state[k]
                if not isinstance(avg, Tensor):
                    self.state[k] = copy.deepcopy(cur)
                elif avg.is_floating_point():
                    avg.mul_(1.0 - weight).add_(cur.detach().to(avg), alpha=weight)
                else:
                    avg.copy_(cur)
        self.step = step
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "period": self.period, "model": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["period"]) != self.period:
            raise ValueError(
                f"the checkpoint averages every {state['period']} steps, this run every "
                f"{self.period}: set train.average_period to {state['period']}"
            )
        missing = set(self.state) ^ set(state["model"])
        if missing:
            raise ValueError(f"the averaged model's tensors differ: {sorted(missing)[:3]}")
        self.step = int(state["step"])
        for k, v in state["model"].items():
            if isinstance(self.state[k], Tensor):
                self.state[k].copy_(v)
            else:
                self.state[k] = copy.deepcopy(v)


def _f64(t: Any) -> Any:
    if not isinstance(t, Tensor):  # a module's extra state
        return copy.deepcopy(t)
    t = t.detach().clone()
    return t.to(torch.float64) if t.is_floating_point() else t


def average_between(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The mean of the model over the steps in ``(start, end]`` from two running averages
    (:meth:`ModelAverage.state_dict` at two checkpoints; icefall's
    ``average_checkpoints_with_averaged_model``): with ``a, b`` the last averaged steps,
    ``(avg_b * b - avg_a * a) / (b - a)``. ``start`` at step 0 gives ``end``'s own average."""
    if int(start["period"]) != int(end["period"]):
        raise ValueError(f"average periods differ: {start['period']} and {end['period']}")
    a, b = int(start["step"]), int(end["step"])
    if b <= a:
        raise ValueError(
            f"the end checkpoint's average (step {b}) must come after the start's (step {a})"
        )
    out = {}
    for k, vb in end["model"].items():
        if not isinstance(vb, Tensor):
            out[k] = copy.deepcopy(vb)
        elif vb.is_floating_point():
            va = start["model"][k].to(vb)
            # (b * vb - a * va) / (b - a), written so large step counts do not overflow.
            out[k] = (vb + va * (-a / b)) * (b / (b - a))
        else:
            out[k] = vb.clone()
    return out


def averaged_student(
    student: dict[str, Any], weights: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """A ``student.pt`` dict (``student``: the newest checkpoint's) with its weights replaced
    by ``weights`` (in the original dtypes) and ``"averaged": info`` (steps, period) added."""
    model = student["model"]
    missing = set(model) ^ set(weights)
    if missing:
        raise ValueError(f"the averaged weights do not match the student: {sorted(missing)[:3]}")
    out = dict(student)
    out["model"] = {
        k: weights[k].to(model[k]) if isinstance(model[k], Tensor) else model[k] for k in model
    }
    out["averaged"] = dict(info)
    return out
