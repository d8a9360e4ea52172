"""ScaledAdam and the Eden schedule (icefall's ``optim.py``, written again and simplified).

ScaledAdam makes each update proportional to the parameter's own size: the step of a tensor is
``lr * rms(param) * adam_direction``, so every matrix moves by the same *relative* amount
whatever its scale, and a separate Adam-normalised step on the tensor's overall scale (the
gradient w.r.t. log(scale) is sum(param * grad)) lets sizes change explicitly. RMS is kept in
[param_min_rms, param_max_rms]. Momentum (beta1) is applied to the whole update. Scalars get
plain Adam at ``scalar_lr_scale * lr`` and are clamped to +-``scalar_max``. Gradients are clipped
at ``clipping_scale`` times the median of recent gradient norms.

Batched differently from icefall: icefall stacks tensors of the same shape; here each param
group's tensors are one flat vector (and its scalars another), per-tensor quantities (RMS, the
scale gradient) are segment sums over it, and the new values go back with one
``_foreach_copy_``: a step is a fixed number of whole-model ops (GPU kernels) plus one view per
gradient. The optimiser state is flat too (held under each kind's first parameter). Also
simplified: parameter RMS is refreshed every step (icefall: every 4), a parameter without a
gradient gets a zero one (as icefall), no per-parameter diagnostics machinery.

Eden: lr = base * ((step^2 + B^2) / B^2)^-0.25 * ((hours^2 + H^2) / H^2)^-0.25 * warm-up,
warm-up linear from 0.5 to 1 over ``warmup_batches``. icefall counts epochs; the paper counts
hours of audio seen (``lr_hours`` = 75k), which also works for streaming data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spear.student.config import OptimConfig


@dataclass
class _Flat:
    """A param group's tensors of one kind (numel > 1, or scalars) as one flat vector: the
    update runs as a fixed number of whole-vector ops, whatever the number of tensors."""

    params: list[Tensor]
    views: list[Tensor]
    """Flat views of the parameters (written back with one ``_foreach_copy_``)."""
    sizes: list[int]
    lengths: Tensor
    """(N,) element counts, on the parameters' device (segment sums, broadcasts)."""
    total: int

    @classmethod
    def of(cls, params: list[Tensor]) -> _Flat:
        sizes = [p.numel() for p in params]
        device = params[0].device if params else torch.device("cpu")
        return cls(
            params=params,
            views=[p.detach().view(-1) for p in params],
            sizes=sizes,
            lengths=torch.tensor(sizes, device=device),
            total=sum(sizes),
        )

    def stale(self) -> bool:
        # A parameter moved (model.to() after the optimiser was built): rebuild the views.
        return any(
            v.data_ptr() != p.data_ptr() for v, p in zip(self.views, self.params, strict=True)
        )

    def grads(self) -> list[Tensor]:
        """Flat views of the gradients (zeros for a parameter without one, as icefall does)."""
        return [
            torch.zeros_like(v) if p.grad is None else p.grad.reshape(-1)
            for p, v in zip(self.params, self.views, strict=True)
        ]

    def square_sums(self, xs: list[Tensor]) -> Tensor:
        """(N,) per-tensor sums of squares, one fused norm over the list."""
        return torch.stack(torch._foreach_norm(xs)).float().square()

    def segment_sum(self, x: Tensor) -> Tensor:
        """Per-tensor sums of a flat vector, accumulated in float64 (a segment sum adds in
        order: in float32 a 400k-element tensor's sum would be off by ~1e-5)."""
        return torch.segment_reduce(x.double(), "sum", lengths=self.lengths).float()

    def spread(self, per_tensor: Tensor) -> Tensor:
        """(N,) -> (total,): each tensor's value on each of its elements."""
        return torch.repeat_interleave(per_tensor, self.lengths, output_size=self.total)

    def write(self, new: Tensor) -> None:
        torch._foreach_copy_(self.views, list(new.split(self.sizes)))


class ScaledAdam(torch.optim.Optimizer):
    """See the module docstring. Each param group is held as two flat vectors (tensors and
    scalars), so a step is ~70 whole-model ops plus one view per gradient: 403 aten ops on the
    tiny student, icefall's (same-shaped tensors stacked) 1,839 (``benchmarks/student.py``)."""

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
        self._flats: dict[int, tuple[_Flat, _Flat]] = {}

    def _group_flats(self, i: int, group: dict[str, Any]) -> tuple[_Flat, _Flat]:
        flats = self._flats.get(i)
        if flats is None or flats[0].stale() or flats[1].stale():
            params = list(group["params"])
            flats = (
                _Flat.of([p for p in params if p.numel() > 1]),
                _Flat.of([p for p in params if p.numel() == 1]),
            )
            self._flats[i] = flats
        return flats

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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[tuple[dict[str, Any], _Flat, Tensor, Tensor, Tensor | None]] = []
        terms = []
        for i, group in enumerate(self.param_groups):
            if not any(p.grad is not None for p in group["params"]):
                continue
            mats, scal = self._group_flats(i, group)
            if mats.total:
                gs = mats.grads()
                ms = (mats.square_sums(mats.views) / mats.lengths).clamp_min(1e-10)
                terms.append((mats.square_sums(gs) * ms).sum())
                g, pf = torch.cat(gs).float(), torch.cat(mats.views).float()
                work.append((group, mats, g, pf, ms))
            if scal.total:
                g, pf = torch.cat(scal.grads()).float(), torch.cat(scal.views).float()
                terms.append((g * g).sum())
                work.append((group, scal, g, pf, None))
        if not work:
            return loss
        clip = self._clip_factor(torch.stack(terms).sum())
        for group, flat, grad, param, mean_sq in work:
            if clip != 1.0:
                grad.mul_(clip)
            self._update(group, flat, grad, param, mean_sq)
        return loss

    def _update(
        self, group: dict[str, Any], flat: _Flat, g: Tensor, pf: Tensor, ms: Tensor | None
    ) -> None:
        """One step of a flat kind: ``ms`` the tensors' mean squares, None for scalars."""
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        # The flat state lives under the kind's first parameter, so state_dict() carries it.
        state = self.state[flat.params[0]]
        if not state:
            state["step"] = 0
            state["delta"] = torch.zeros_like(pf)
            state["exp_avg_sq"] = torch.zeros_like(pf)
            if ms is not None:
                state["scale_exp_avg_sq"] = torch.zeros_like(ms)
        state["step"] += 1
        bias2 = 1.0 - beta2 ** state["step"]
        v = state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        direction = g / (v / bias2).sqrt_().add_(eps)
        if ms is None:
            update = direction.mul_(-lr * group["scalar_lr_scale"])
        else:
            rms = ms.sqrt().clamp_min(group["param_min_rms"])
            update = direction.mul_(flat.spread(rms)).mul_(-lr)
            # The scale step: Adam on d(loss)/d(log scale) = sum(p * grad), per tensor.
            scale_grad = flat.segment_sum(pf * g)
            sv = (
                state["scale_exp_avg_sq"]
                .mul_(beta2)
                .addcmul_(scale_grad, scale_grad, value=1.0 - beta2)
            )
            scale_step = -lr * group["scalar_lr_scale"] * scale_grad / ((sv / bias2).sqrt() + eps)
            # Keep rms(param) in range: no growth above the max, no shrinking below the min.
            scale_step = torch.where(
                rms >= group["param_max_rms"], scale_step.clamp(max=0.0), scale_step
            )
            scale_step = torch.where(
                rms <= group["param_min_rms"], scale_step.clamp(min=0.0), scale_step
            )
            update.addcmul_(pf, flat.spread(scale_step))
        delta = state["delta"].mul_(beta1).add_(update, alpha=1.0 - beta1)
        new = pf.add_(delta)
        if ms is None:
            new = new.clamp_(-group["scalar_max"], group["scalar_max"])
        flat.write(new)


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
