"""ScaledAdam and the Eden schedule (icefall's ``optim.py``, written again and simplified).

ScaledAdam makes each update proportional to the parameter's own size: the step of a tensor is
``lr * rms(param) * adam_direction``, so every matrix moves by the same *relative* amount
whatever its scale, and a separate Adam-normalised step on the tensor's overall scale (the
gradient w.r.t. log(scale) is sum(param * grad)) lets sizes change explicitly. RMS is kept in
[param_min_rms, param_max_rms]. Momentum (beta1) is applied to the whole update. Scalars get
plain Adam at ``scalar_lr_scale * lr`` and are clamped to +-``scalar_max``. Gradients are clipped
at ``clipping_scale`` times the median of recent gradient norms.

Batched differently from icefall: icefall stacks tensors of the same shape; here every
update is a ``torch._foreach_*`` op over all tensors of a param group (on a GPU a fixed ~80
aten ops a step, each one fused multi-tensor kernel), per-tensor quantities (RMS by a fused
norm, the scale gradient by float64 norms of its positive and negative parts) form one vector,
and the per-tensor factors come back to the host once a step as the foreach ops' scalars. On
CPU the same ops run over cache-sized runs of tensors (``fused=False``). The state stays per
parameter (as the per-tensor version's: old training states load). Also simplified: parameter
RMS is refreshed every step (icefall: every 4) and there is no per-parameter diagnostics
machinery. Parameters must be float32 (they are updated in place; autocast keeps them so).

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
    """See the module docstring. Every update is a ``torch._foreach_*`` op over a param group's
    tensors (one fused kernel per op on a GPU), per-tensor factors travel as one vector and
    reach the foreach ops as scalars (one host read a step)."""

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
        fused: bool | None = None,
    ) -> None:
        """``fused``: every op over a whole param group at once (one multi-tensor kernel per
        op: ~80 ops a step whatever the model); the default on a GPU. False, the default on
        CPU: the same ops over runs of tensors of at most 2^20 elements (a larger tensor
        alone) and the scale gradient as one dot product per tensor, so a run stays in cache
        through the ops instead of the whole model streaming through every op."""
        self.fused = fused
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
        for group in self.param_groups:
            bad = [tuple(p.shape) for p in group["params"] if p.dtype != torch.float32]
            if bad:
                raise ValueError(f"ScaledAdam updates float32 parameters in place; got {bad[:3]}")
        # Recent gradient norms live in the first param group, so state_dict() carries them.
        self.param_groups[0].setdefault("recent_norms", [])
        self.param_groups[0].setdefault("num_clipped", 0)

    def _clip_factor(self, sq: Tensor) -> float:
        """1, or threshold/norm when the norm exceeds clipping_scale x median of recent norms.

        ``sq``: the squared norm of the *relative* gradient (grad x rms(param)), which is what
        drives the update size here."""
        norm = math.sqrt(float(sq))  # one device sync for the whole model
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

    def _state(self, ps: list[Tensor], scalar: bool) -> list[dict[str, Any]]:
        out = []
        for p in ps:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["delta"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                if not scalar:
                    state["scale_exp_avg_sq"] = torch.zeros((), device=p.device)
            state["step"] += 1
            out.append(state)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[Any] = []
        terms = []
        for group in self.param_groups:
            # As before: a parameter without a gradient is left alone.
            ps = [p for p in group["params"] if p.grad is not None]
            for scalar in (False, True):
                for kind in self._chunks([p for p in ps if (p.numel() == 1) == scalar]):
                    terms.append(self._prepare(group, kind, scalar, work))
        if not work:
            return loss
        clip = self._clip_factor(torch.stack(terms).sum())
        for group, kind, gs, ms in work:
            if clip != 1.0:
                gs = torch._foreach_mul(gs, clip)
            self._update(group, kind, gs, ms)
        return loss

    def _fused(self, p: Tensor) -> bool:
        return self.fused if self.fused is not None else p.device.type != "cpu"

    def _chunks(self, ps: list[Tensor]) -> list[list[Tensor]]:
        if not ps:
            return []
        cap = 1 << 62 if self._fused(ps[0]) else 1 << 20
        out: list[list[Tensor]] = [[]]
        size = 0
        for p in ps:
            if out[-1] and size + p.numel() > cap:
                out.append([])
                size = 0
            out[-1].append(p)
            size += p.numel()
        return out

    def _prepare(
        self, group: dict[str, Any], kind: list[Tensor], scalar: bool, work: list[Any]
    ) -> Tensor:
        """Queue one run of tensors; returns its share of the relative gradient's squared
        norm."""
        gs = [p.grad for p in kind if p.grad is not None]
        gsq = torch.stack(torch._foreach_norm(gs)).square()
        ms = None
        if not scalar:
            n = torch.tensor([p.numel() for p in kind], device=gsq.device)
            ms = (torch.stack(torch._foreach_norm(kind)).square() / n).clamp_min(1e-10)
            gsq = gsq * ms
        work.append((group, kind, gs, ms))
        return gsq.sum()

    def _update(
        self, group: dict[str, Any], ps: list[Tensor], gs: list[Tensor], ms: Tensor | None
    ) -> None:
        """One step of one kind: ``ms`` the tensors' mean squares, None for scalars."""
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        states = self._state(ps, ms is None)
        vs = [s["exp_avg_sq"] for s in states]
        deltas = [s["delta"] for s in states]
        bias2 = [1.0 - beta2 ** s["step"] for s in states]
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denom = torch._foreach_div(vs, bias2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(gs, denom)
        if ms is None:
            torch._foreach_mul_(update, -lr * group["scalar_lr_scale"])
        else:
            rms = ms.sqrt().clamp_min(group["param_min_rms"])
            # The scale step: Adam on d(loss)/d(log scale) = sum(p * grad), per tensor; the
            # signed sum as (positive part - negative part), accumulated in float64.
            if not self._fused(ps[0]):  # one pass per tensor, in cache: a dot product
                scale_grad = torch.stack(
                    [torch.dot(p.view(-1), g.reshape(-1)) for p, g in zip(ps, gs, strict=True)]
                )
            else:  # fused kernels, no per-tensor launch
                prod = torch._foreach_mul(ps, gs)
                pos = torch._foreach_norm(
                    torch._foreach_clamp_min(prod, 0.0), 1, dtype=torch.float64
                )
                neg = torch._foreach_norm(
                    torch._foreach_clamp_max(prod, 0.0), 1, dtype=torch.float64
                )
                scale_grad = (torch.stack(pos) - torch.stack(neg)).float()
            svs = [s["scale_exp_avg_sq"] for s in states]
            sv = torch.stack(svs).mul_(beta2).addcmul_(scale_grad, scale_grad, value=1.0 - beta2)
            torch._foreach_copy_(svs, list(sv.unbind(0)))
            b2 = torch.tensor(bias2, device=sv.device)
            scale_step = -lr * group["scalar_lr_scale"] * scale_grad / ((sv / b2).sqrt() + eps)
            # Keep rms(param) in range: no growth above the max, no shrinking below the min.
            scale_step = torch.where(
                rms >= group["param_max_rms"], scale_step.clamp(max=0.0), scale_step
            )
            scale_step = torch.where(
                rms <= group["param_min_rms"], scale_step.clamp(min=0.0), scale_step
            )
            # update = -lr * rms * direction + p * scale_step; the per-tensor factors reach
            # the foreach ops as Python scalars (one host read).
            step_rms, step_scale = torch.stack([rms * -lr, scale_step]).tolist()
            torch._foreach_mul_(update, step_rms)
            torch._foreach_add_(update, torch._foreach_mul(ps, step_scale))
        torch._foreach_mul_(deltas, beta1)
        torch._foreach_add_(deltas, update, alpha=1.0 - beta1)
        torch._foreach_add_(ps, deltas)
        if ms is None:
            torch._foreach_clamp_min_(ps, -group["scalar_max"])
            torch._foreach_clamp_max_(ps, group["scalar_max"])


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
