"""ScaledAdam and the Eden schedule (icefall's ``optim.py``, written again and simplified).

ScaledAdam makes each update proportional to the parameter's own size: the step of a tensor is
``lr * rms(param) * adam_direction``, so every matrix moves by the same *relative* amount
whatever its scale, and a separate Adam-normalised step on the tensor's overall scale (the
gradient w.r.t. log(scale) is sum(param * grad)) lets sizes change explicitly. RMS is kept in
[param_min_rms, param_max_rms]. Momentum (beta1) is applied to the whole update. Scalars get
plain Adam at ``scalar_lr_scale * lr`` and are clamped to +-``scalar_max``. Gradients are clipped
at ``clipping_scale`` times the median of recent gradient norms.

Simplified from icefall: no batching of same-shaped tensors into one kernel, parameter RMS is
refreshed every step (icefall: every 4) and there is no per-parameter diagnostics machinery.

Eden: lr = base * ((step^2 + B^2) / B^2)^-0.25 * ((hours^2 + H^2) / H^2)^-0.25 * warm-up,
warm-up linear from 0.5 to 1 over ``warmup_batches``. icefall counts epochs; the paper counts
hours of audio seen (``lr_hours`` = 75k), which also works for streaming data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from spear.student.config import OptimConfig


class ScaledAdam(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.045,
        betas: tuple[float, float] = (0.9, 0.98),
        clipping_scale: float = 2.0,
        scalar_lr_scale: float = 0.1,
        eps: float = 1e-8,
        param_min_rms: float = 1e-5,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        clipping_window: int = 100,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "clipping_scale": clipping_scale,
            "scalar_lr_scale": scalar_lr_scale,
            "eps": eps,
            "param_min_rms": param_min_rms,
            "param_max_rms": param_max_rms,
            "scalar_max": scalar_max,
            "clipping_window": clipping_window,
        }
        super().__init__(params, defaults)
        # Recent gradient norms live in the first param group, so state_dict() carries them.
        self.param_groups[0].setdefault("recent_norms", [])
        self.param_groups[0].setdefault("num_clipped", 0)

    def _clip_factor(self) -> float:
        """1, or threshold/norm when the norm exceeds clipping_scale x median of recent norms.

        The norm is of the *relative* gradient (grad x rms(param)), which is what drives the
        update size here."""
        terms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g2 = p.grad.float().pow(2).sum()
                if p.numel() > 1:
                    g2 = g2 * p.detach().float().pow(2).mean().clamp_min(1e-10)
                terms.append(g2)
        # One device sync for the whole model, not one per tensor.
        sq = float(torch.stack(terms).sum()) if terms else 0.0
        norm = math.sqrt(sq)
        group0 = self.param_groups[0]
        history: list[float] = group0["recent_norms"]
        factor = 1.0
        if len(history) >= 10 and math.isfinite(norm):
            threshold = group0["clipping_scale"] * sorted(history)[len(history) // 2]
            if norm > threshold:
                factor = threshold / norm
                group0["num_clipped"] += 1
        if math.isfinite(norm):
            history.append(norm)
            del history[: -group0["clipping_window"]]
        return factor

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._clip_factor()
        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float() * clip
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["delta"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.numel() > 1:
                        state["scale_exp_avg_sq"] = torch.zeros((), device=p.device)
                state["step"] += 1
                step = state["step"]
                bias2 = 1.0 - beta2**step
                v = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                direction = grad / ((v / bias2).sqrt() + eps)
                delta = state["delta"]
                pf = p.detach().float()
                if p.numel() == 1:
                    update = -lr * group["scalar_lr_scale"] * direction
                else:
                    rms = pf.pow(2).mean().sqrt().clamp_min(group["param_min_rms"])
                    update = -lr * rms * direction
                    # The scale step: Adam on d(loss)/d(log scale) = sum(p * grad).
                    scale_grad = (pf * grad).sum()
                    sv = state["scale_exp_avg_sq"]
                    sv.mul_(beta2).add_(scale_grad**2, alpha=1.0 - beta2)
                    scale_step = (
                        -lr * group["scalar_lr_scale"] * scale_grad / ((sv / bias2).sqrt() + eps)
                    )
                    # Keep rms(param) in range: no growth above the max, no shrinking below the min.
                    scale_step = torch.where(
                        rms >= group["param_max_rms"], scale_step.clamp(max=0.0), scale_step
                    )
                    scale_step = torch.where(
                        rms <= group["param_min_rms"], scale_step.clamp(min=0.0), scale_step
                    )
                    update = update + pf * scale_step
                delta.mul_(beta1).add_(update, alpha=1.0 - beta1)
                new = pf + delta
                if p.numel() == 1:
                    new = new.clamp(-group["scalar_max"], group["scalar_max"])
                p.copy_(new.to(p.dtype))
        return loss


class Eden:
    """Sets each param group's ``lr`` from the step count and hours of audio seen."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_batches: float = 7500.0,
        lr_hours: float = 75_000.0,
        warmup_batches: float = 500.0,
        warmup_start: float = 0.5,
    ) -> None:
        self.optimizer = optimizer
        self.lr_batches = lr_batches
        self.lr_hours = lr_hours
        self.warmup_batches = warmup_batches
        self.warmup_start = warmup_start
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step_count = 0
        self.hours = 0.0
        self.set_progress(0, 0.0)

    def factor(self, step: int, hours: float) -> float:
        f = ((step**2 + self.lr_batches**2) / self.lr_batches**2) ** -0.25
        f *= ((hours**2 + self.lr_hours**2) / self.lr_hours**2) ** -0.25
        if step < self.warmup_batches:
            f *= self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_batches
        return f

    def set_progress(self, step: int, hours: float) -> None:
        self.step_count, self.hours = step, hours
        f = self.factor(step, hours)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "hours": self.hours}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_progress(int(state["step_count"]), float(state["hours"]))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, Eden]:
    """The configured optimiser over ``model``'s trainable parameters, with its Eden schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if cfg.name == "scaled_adam":
        opt = ScaledAdam(params, lr=cfg.lr, betas=cfg.betas, clipping_scale=cfg.clipping_scale)
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimiser {cfg.name!r}")
    return opt, Eden(opt, cfg.lr_batches, cfg.lr_hours, cfg.warmup_batches)
