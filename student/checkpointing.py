"""Training state: everything a resumed run needs to repeat the next step exactly.

A training checkpoint folder holds ``student.pt`` (the standalone model, see
:mod:`spear.student.model`) and ``train_state.pt``: optimiser, schedule, step, hours seen, the
mask generator's and torch's RNG states (CPU and CUDA), numpy's global state and the data
position (the epoch and the batches of its plan consumed: the plan is a function of (seed,
epoch), so that is all a resumed run needs to start at the next batch). Both load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spear.configio import from_dict
from spear.student.config import StudentConfig
from spear.student.model import STUDENT_FILE, unwrap
from spear.student.optim import Eden

TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_VERSION = 1


@dataclass
class TrainPosition:
    """Where a training run stands (saved in every checkpoint, restored on resume)."""

    step: int = 0
    """Optimiser steps done."""
    hours: float = 0.0
    """Audio hours seen (over all workers)."""
    batches: int = 0
    """Batches of the epoch's plan this worker consumed (the data position)."""
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "mask": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": list(np.random.get_state()[1].tolist()),  # type: ignore[index]
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["mask"])
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_state_dict(
    optimizer: torch.optim.Optimizer,
    scheduler: Eden,
    progress: TrainPosition,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    return {
        "version": TRAIN_STATE_VERSION,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": progress.step,
        "hours": progress.hours,
        "batches": progress.batches,
        "extra": progress.extra,
        "rng": rng_state(generator),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def load_train_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Eden,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainPosition:
    if state.get("version") != TRAIN_STATE_VERSION:
        raise ValueError(
            f"train state version {state.get('version')} is not {TRAIN_STATE_VERSION} (written by "
            "another spear version; start a new run from its student.pt)"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], generator)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return TrainPosition(
        step=int(state["step"]),
        hours=float(state["hours"]),
        batches=int(state["batches"]),
        extra=dict(state.get("extra") or {}),
    )


def save_folder(
    folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Eden,
    progress: TrainPosition,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write ``student.pt`` and ``train_state.pt`` into a local folder."""
    import os

    os.makedirs(folder, exist_ok=True)
    torch.save(unwrap(model).checkpoint_dict(), os.path.join(folder, STUDENT_FILE))
    torch.save(
        train_state_dict(optimizer, scheduler, progress, generator, scaler),
        os.path.join(folder, TRAIN_STATE_FILE),
    )


def load_folder(
    folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Eden,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> TrainPosition:
    """Restore ``model`` (weights only; its config must match) and the training state."""
    import os

    with open(os.path.join(folder, STUDENT_FILE), "rb") as f:
        student_state = torch.load(
            io.BytesIO(f.read()), map_location=map_location, weights_only=True
        )
    if from_dict(StudentConfig, student_state["config"]) != unwrap(model).cfg:
        raise ValueError("the checkpoint's student config differs from this run's")
    unwrap(model).load_state_dict(student_state["model"])
    with open(os.path.join(folder, TRAIN_STATE_FILE), "rb") as f:
        state = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
    return load_train_state(state, optimizer, scheduler, generator, scaler)
