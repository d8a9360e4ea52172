"""Training recipe for the MVQ quantiser (one file: setup, train, checkpoint, save).

Two phases (SPEC section 2): 2C codebooks of sqrt(K) entries, then pairs merged into C codebooks
of K entries (:meth:`Quantizer.product`) with the learning rate halved. Loss per minibatch:

    ||x_hat - x||^2 / ||x - mean||^2      (relative reconstruction, at the refined indexes)
    + CE(logits, refined indexes)           (teaches the argmax start)
    + 0.01 * (log K - H(mean softmax)) / log K   (pushes codebook usage towards uniform)

Adam lr 5e-3, betas (0.9, 0.98); the lr halves ``lr_halvings`` times per phase.

Pure torch: :func:`fit` takes any iterable of frame minibatches and hands checkpoints (bytes,
:func:`~spear.quantizer.serial.state_to_bytes`) to a callback; reading shards and writing files
is the caller's (``spear.pipeline.quantize``). Inference never imports this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spear.errors import SpearError
from spear.quantizer.config import QuantizerTrainConfig
from spear.quantizer.eval import evaluate_rrl
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.quantizer.serial import QuantizerFileError, state_from_bytes, state_to_bytes


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpearError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


@dataclass
class QuantizerStepStats:
    step: int
    phase: int
    loss: float
    rrl: float  # on this minibatch, at the refined indexes
    logprob: float
    entropy: float


class QuantizerTrainer:
    """``while not trainer.done(): trainer.step(x)``; then ``trainer.quantizer``."""

    def __init__(self, cfg: QuantizerTrainConfig, info: QuantizerInfo, device: torch.device):
        self.cfg = cfg
        self.device = device
        root = round(math.sqrt(cfg.codebook_size))
        info.num_codebooks, info.codebook_size = 2 * cfg.num_codebooks, root
        self.quantizer = Quantizer(info).to(device)
        self.dim = info.dim
        self.step_count = 0
        self.phase = 1
        self._init_optimizer()

    def _init_optimizer(self) -> None:
        lr = self.cfg.lr * (0.5 if self.phase == 2 else 1.0)
        self.optim = torch.optim.Adam(
            self.quantizer.parameters(), lr=lr, betas=self.cfg.betas, eps=1e-9, weight_decay=1e-6
        )
        every = max(1, self.cfg.phase_steps // self.cfg.lr_halvings)
        self.sched = torch.optim.lr_scheduler.StepLR(self.optim, step_size=every, gamma=0.5)

    def done(self) -> bool:
        return self.step_count >= 2 * self.cfg.phase_steps

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerStepStats]:
        """Loss of a normalised minibatch x (B, dim)."""
        q = self.quantizer
        logits = q.logits(x)  # (B, C, K)
        idx = q.indexes(x.detach(), self.cfg.train_refine_rounds)  # (B, C)
        x_hat = q.decode(idx, denormalise=False)  # (B, dim)
        rel = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-20)
        logp = logits.log_softmax(-1)
        logprob = -logp.gather(2, idx[..., None]).mean()
        probs = logp.exp().mean(0) + 1e-20  # (C, K)
        ref = math.log(q.codebook_size)
        entropy = (ref - -(probs * probs.log()).sum(-1).mean()) / ref
        total = rel + logprob + self.cfg.entropy_weight * entropy
        vals = [float(v.detach()) for v in (total, rel, logprob, entropy)]
        stats = QuantizerStepStats(self.step_count, self.phase, *vals)
        return total, stats

    def step(self, x: torch.Tensor) -> QuantizerStepStats:
        """One optimiser step on a minibatch (B, dim) in the teacher's space."""
        x = self.quantizer.normalise(x.to(self.device, torch.float32))
        total, stats = self.loss(x)
        self.optim.zero_grad(set_to_none=True)
        total.backward()
        self.optim.step()
        self.sched.step()
        self.step_count += 1
        if self.phase == 1 and self.step_count >= self.cfg.phase_steps:
            self.quantizer = self.quantizer.product()
            self.phase = 2
            self._init_optimizer()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "phase": self.phase,
            "info": self.quantizer.info.to_json(),
            "model": self.quantizer.state_dict(),
            "optim": self.optim.state_dict(),
            "sched": self.sched.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        info = QuantizerInfo.from_json(state["info"])
        phase = int(state["phase"])
        c, k = self.cfg.num_codebooks, self.cfg.codebook_size
        want = (self.dim, 2 * c, round(math.sqrt(k))) if phase == 1 else (self.dim, c, k)
        got = (info.dim, info.num_codebooks, info.codebook_size)
        if got != want:
            raise ValueError(
                f"its phase-{phase} quantiser is dim {got[0]}, {got[1]} x {got[2]}; this "
                f"training's is dim {want[0]}, {want[1]} x {want[2]}"
            )
        self.step_count = int(state["step"])
        self.phase = phase
        self.quantizer = Quantizer(info).to(self.device)
        self.quantizer.load_state_dict(state["model"])
        self._init_optimizer()
        self.optim.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])

    def state_bytes(self, extra: dict[str, Any] | None = None) -> bytes:
        """The resumable state (and ``extra``, plain JSON values) as checkpoint bytes."""
        return state_to_bytes({"trainer": self.state_dict(), "extra": extra or {}})

    def load_state_bytes(self, data: bytes, where: str = "checkpoint") -> dict[str, Any]:
        """Resume from :meth:`state_bytes`; returns its ``extra``. A state that does not fit
        this trainer's shapes raises :class:`QuantizerFileError` naming ``where``."""
        state = state_from_bytes(data, where)
        try:
            self.load_state_dict(state["trainer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise QuantizerFileError(f"{where} does not fit this training: {first}") from None
        extra = state.get("extra", {})
        return extra if isinstance(extra, dict) else {}


def normalisation_stats(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (float32, computed in float64) of frames (N, dim)."""
    x = frames.double()
    return x.mean(0).float(), x.std(0).float()


def fit(
    trainer: QuantizerTrainer,
    batches: Iterable[np.ndarray | torch.Tensor],
    heldout: torch.Tensor,
    *,
    refine_rounds: int = 5,
    report: Callable[[str], None] | None = None,
    checkpoint: Callable[[QuantizerTrainer], None] | None = None,
) -> Quantizer:
    """Train until done on ``batches`` (minibatches (B, dim) in the teacher's space).

    Every ``log_every`` steps (and at the end) ``report`` gets a progress line with the RRL on
    ``heldout`` (N, dim); every ``checkpoint_every`` steps before the end ``checkpoint`` gets
    the trainer (to persist :meth:`QuantizerTrainer.state_bytes`). Returns the final quantiser
    in eval mode, with ``info.rrl`` set (NaN without held-out frames)."""
    tc = trainer.cfg
    stream = iter(batches)
    start = time.time()
    while not trainer.done():
        try:
            x = next(stream)
        except StopIteration:
            raise SpearError(
                f"the training frames ran out at step {trainer.step_count} of {2 * tc.phase_steps}"
            ) from None
        stats = trainer.step(torch.as_tensor(x))
        step = trainer.step_count
        if report and tc.log_every and (step % tc.log_every == 0 or trainer.done()):
            rrl = evaluate_rrl(trainer.quantizer, heldout, refine_rounds)
            report(
                f"step {step}/{2 * tc.phase_steps} phase {stats.phase} loss {stats.loss:.4f} "
                f"train_rrl {stats.rrl:.4f} heldout_rrl {rrl:.4f} "
                f"({time.time() - start:.1f}s)"
            )
        every = tc.checkpoint_every
        if checkpoint and every and step % every == 0 and not trainer.done():
            checkpoint(trainer)
    q = trainer.quantizer.eval()
    q.info.rrl = evaluate_rrl(q, heldout, refine_rounds)
    return q
