"""The training-time parts of icefall's Zipformer2 (its ``scaling.py``, written again).

Everything here is the identity in the forward pass or off in eval mode, so an eval-mode model
computes the same function with or without it:

* :func:`limit_param_value` - keeps a parameter in [lo, hi] through its gradient: where it is
  out of range, gradient components that would push it further out have their sign flipped.
  The forward uses the parameter as it is (so train and eval see the same value).
* :func:`scale_grad` - multiplies the gradient (the subsampling's first convolution).
* :func:`penalize_abs_values_gt` - adds the gradient of ``penalty * relu(|x| - limit)``.
* :class:`Balancer` - per channel, keeps the mean/stddev ratio (sign balance) and the RMS
  inside limits by adding a small correction to the gradient when they are violated.
* :class:`Whiten` - when the centred covariance of a group of channels is far from a multiple
  of the identity (its eigenvalues spread), adds the gradient of that spread metric.
* :func:`shared_dropout` - dropout whose mask is shared along one dimension (time).
* :func:`scaled_linear` - ``nn.Linear`` with weights scaled by ``initial_scale`` and a bias
  uniform in +-0.1 x scale (icefall's ScaledLinear): residual branches start near identity.

Random decisions use torch's global RNG (saved in training checkpoints), never Python's.
Unlike icefall, Balancer does not skip itself when GPU memory runs high, and no SwooshL/R or
softmax memory tricks (they change memory, not results).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from spear.student.config import Schedule, Scheduled, scheduled

LIMIT_PROB = 0.6
"""Probability per training call that :func:`limit_param_value` acts (icefall's)."""
BALANCER_PROB: Scheduled = Schedule.of((0.0, 0.5), (8000.0, 0.125))
"""Default probability per training call that a Balancer acts."""


def _draw() -> float:
    return float(torch.rand(()))


class _LimitParamValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        # Descent moves x against the gradient: below lo a positive gradient would lower x
        # further, above hi a negative one would raise it; flip those.
        flip = ((grad > 0) & (x < ctx.lo)) | ((grad < 0) & (x > ctx.hi))
        return torch.where(flip, -grad, grad), None, None


def limit_param_value(x: Tensor, lo: float, hi: float, training: bool) -> Tensor:
    if not training or _draw() >= LIMIT_PROB:
        return x
    out: Tensor = _LimitParamValue.apply(x, lo, hi)
    return out


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.alpha, None


def scale_grad(x: Tensor, alpha: float) -> Tensor:
    out: Tensor = _ScaleGrad.apply(x, alpha)
    return out


class _PenalizeAbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, limit: float, penalty: float) -> Tensor:
        # Only the sign of the excess is needed for backward: int8 keeps that small.
        ctx.save_for_backward((x.sign() * (x.abs() > limit)).to(torch.int8))
        ctx.penalty = penalty
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (excess_sign,) = ctx.saved_tensors
        return grad + ctx.penalty * excess_sign.to(grad.dtype), None, None


def penalize_abs_values_gt(x: Tensor, limit: float, penalty: float) -> Tensor:
    """x, with ``penalty * relu(|x| - limit)`` (summed) added to the loss's gradient."""
    out: Tensor = _PenalizeAbs.apply(x, limit, penalty)
    return out


def shared_dropout(x: Tensor, p: float, dim: int, training: bool) -> Tensor:
    """Dropout with one mask for all positions along ``dim``, scaled by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[dim] = 1
    keep = torch.rand(shape, device=x.device) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def scaled_linear(in_dim: int, out_dim: int, initial_scale: float, bias: bool = True) -> nn.Linear:
    """icefall's ScaledLinear: torch's init times ``initial_scale``, bias in +-0.1 x scale."""
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    scale_init(layer, initial_scale)
    return layer


def scale_init(layer: nn.Linear | nn.Conv1d | nn.Conv2d, initial_scale: float) -> None:
    if initial_scale == 1.0 or layer.weight.is_meta:
        return
    with torch.no_grad():
        layer.weight.mul_(initial_scale)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -0.1 * initial_scale, 0.1 * initial_scale)


# --- Balancer -------------------------------------------------------------------------------

# icefall states the limits as a proportion of positive values and a mean absolute value; the
# gradient works on mean/stddev and RMS. These are its conversions (for a Gaussian, RMS =
# sqrt(pi/2) x mean |x|; the proportion maps through its approximation of erfinv(2p - 1)).
_ABS_TO_RMS = math.sqrt(math.pi / 2.0)
_ERFINV_APPROX = 1.0 / (math.sqrt(math.pi) * math.log(2.0))


def positive_to_mean(p: float) -> float:
    """A proportion of positive values -> the mean/stddev limit the Balancer enforces."""
    x = 2.0 * p - 1.0
    eps = 1e-10  # p of exactly 0 or 1 gives a large finite limit
    return _ERFINV_APPROX * 0.5 * (math.log(1.0 + x + eps) - math.log(1.0 - x + eps))


def abs_to_rms(a: float) -> float:
    return _ABS_TO_RMS * a


class _BalancerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, limits: tuple[float, ...], channel_dim: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.limits, ctx.channel_dim = limits, channel_dim
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        min_mean, max_mean, min_rms, max_rms, grad_scale = ctx.limits
        dims = [i for i in range(x.ndim) if i != ctx.channel_dim % x.ndim]
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xf = x.detach().float().requires_grad_(True)
            mean = xf.mean(dim=dims, keepdim=True)
            sq = (xf * xf).mean(dim=dims, keepdim=True)
            std = (sq - mean * mean).clamp_min(1e-20).sqrt()
            rms = sq.clamp_min(1e-20).sqrt()
            m = mean / std
            # Zero inside the limits; the log makes the RMS term scale-free.
            violation = (m - m.clamp(min_mean, max_mean)).abs()
            violation = violation + (rms.clamp(min_rms, max_rms) / rms).log().abs()
            (direction,) = torch.autograd.grad(violation.sum(), xf)
        norm = direction.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-20)
        direction = direction * (grad_scale / norm)
        g = grad.float()
        # |grad| is a per-element estimate of how much the loss cares about that element.
        return (g + g.abs() * direction).to(grad.dtype), None, None


class Balancer(nn.Module):
    """Gradient-only per-channel constraints: the proportion of positive values in
    [min_positive, max_positive] and the mean absolute value in [min_abs, max_abs]."""

    def __init__(
        self,
        channel_dim: int = -1,
        *,
        min_positive: Scheduled = 0.05,
        max_positive: Scheduled = 0.95,
        min_abs: Scheduled = 0.2,
        max_abs: Scheduled = 100.0,
        grad_scale: float = 0.04,
        prob: Scheduled = BALANCER_PROB,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.min_positive, self.max_positive = min_positive, max_positive
        self.min_abs, self.max_abs = min_abs, max_abs
        self.grad_scale, self.prob, self.enabled = grad_scale, prob, enabled

    def forward(self, x: Tensor, batch_count: float) -> Tensor:
        if not (self.enabled and self.training and x.requires_grad):
            return x
        if _draw() >= scheduled(self.prob, batch_count):
            return x
        limits = (
            positive_to_mean(scheduled(self.min_positive, batch_count)),
            positive_to_mean(scheduled(self.max_positive, batch_count)),
            abs_to_rms(scheduled(self.min_abs, batch_count)),
            abs_to_rms(scheduled(self.max_abs, batch_count)),
            self.grad_scale,
        )
        out: Tensor = _BalancerFunction.apply(x, limits, self.channel_dim)
        return out

    def extra_repr(self) -> str:
        return (
            f"positive=[{self.min_positive}, {self.max_positive}], "
            f"abs=[{self.min_abs}, {self.max_abs}], prob={self.prob}"
        )


# --- Whiten ---------------------------------------------------------------------------------


def whitening_metric(x: Tensor, num_groups: int) -> Tensor:
    """(..., C) -> scalar >= 1: mean squared eigenvalue / squared mean eigenvalue of the
    centred covariance of each group of C/num_groups channels (1 when white, with equal
    traces across groups)."""
    x = x.reshape(-1, x.shape[-1])
    n, c = x.shape
    x = x.reshape(n, num_groups, c // num_groups).transpose(0, 1)  # (G, N, C/G)
    x = x - x.mean(dim=1, keepdim=True)
    cov = torch.matmul(x.transpose(1, 2), x)  # (G, C/G, C/G)
    mean_eig = torch.diagonal(cov, dim1=1, dim2=2).mean()
    mean_sq_eig = (cov**2).sum() / c  # trace(cov @ cov), averaged over all C channels
    return mean_sq_eig / (mean_eig**2 + 1e-20)


class _WhitenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, module: Whiten, limit: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.module, ctx.limit = module, limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        w: Whiten = ctx.module
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xf = x.detach().float().movedim(w.channel_dim, -1).requires_grad_(True)
            metric = whitening_metric(xf, w.num_groups)
            if float(metric.detach()) < ctx.limit:
                w.prob = w.min_prob  # fine now: check rarely
                return grad, None, None
            w.prob = w.max_prob
            (penalty,) = torch.autograd.grad(metric, xf)
        penalty = penalty.movedim(-1, w.channel_dim)
        g = grad.float()
        scale = w.grad_scale * g.norm() / (penalty.norm() + 1e-20)
        return (g + penalty * scale).to(grad.dtype), None, None


class Whiten(nn.Module):
    """Gradient-only: when :func:`whitening_metric` exceeds ``limit``, adds its gradient,
    scaled to ``grad_scale`` x the norm of the incoming gradient. Acts with probability
    ``max_prob`` after a violation and ``min_prob`` after a pass. ``prob`` is a float kept in
    the state dict (``_extra_state``) so a resumed run continues where it stopped, without a
    device sync per call."""

    def __init__(
        self,
        num_groups: int,
        limit: Scheduled,
        *,
        prob: tuple[float, float] = (0.025, 0.25),
        grad_scale: float = 0.01,
        channel_dim: int = -1,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.num_groups, self.limit, self.grad_scale = num_groups, limit, grad_scale
        self.min_prob, self.max_prob = prob
        self.channel_dim, self.enabled = channel_dim, enabled
        self.prob = self.max_prob

    def get_extra_state(self) -> dict[str, float]:
        return {"prob": self.prob}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.prob = float(state["prob"])

    def forward(self, x: Tensor, batch_count: float) -> Tensor:
        if not (self.enabled and self.training and x.requires_grad and self.grad_scale > 0):
            return x
        if _draw() > self.prob:
            return x
        out: Tensor = _WhitenFunction.apply(x, self, scheduled(self.limit, batch_count))
        return out

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, limit={self.limit}, grad_scale={self.grad_scale}"


def whitening_limit(start: float, ratio: float = 2.0) -> Scheduled:
    """icefall's whitening schedule: ``start`` rising to ``ratio`` x start at batch 20000."""
    return Schedule.of((0.0, start), (20000.0, ratio * start))


# --- Norm and bypass ------------------------------------------------------------------------


class BiasNorm(nn.Module):
    """x / rms(x - bias) * exp(log_scale): LayerNorm without removing the mean, so a channel
    can carry a large constant without it being normalised away (icefall's argument).
    ``log_scale`` starts at 1 and is kept in [-1.5, 1.5] through its gradient."""

    LOG_SCALE_INIT = 1.0
    LOG_SCALE_LIMITS = (-1.5, 1.5)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(dim).normal_(mean=0.0, std=1e-4))
        self.log_scale = nn.Parameter(torch.tensor(self.LOG_SCALE_INIT))

    def forward(self, x: Tensor) -> Tensor:
        log_scale = limit_param_value(self.log_scale, *self.LOG_SCALE_LIMITS, self.training)
        rms = (x - self.bias).pow(2).mean(-1, keepdim=True).add(1e-8).rsqrt()
        return x * rms * log_scale.exp()


class Bypass(nn.Module):
    """orig + scale * (new - orig): a learned per-channel residual gate, starting at 0.5.

    In training the scale is pushed into [floor, 1] through its gradient (the floor starts
    high so every module must first learn something), and with probability ``skip`` per
    utterance the module is skipped (scale 0: the output is ``orig``)."""

    def __init__(self, dim: int, floor: Scheduled, skip: Scheduled = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.5))
        self.floor, self.skip = floor, skip

    def forward(self, orig: Tensor, new: Tensor, batch_count: float) -> Tensor:
        scale: Tensor = self.scale
        if self.training:
            scale = limit_param_value(scale, scheduled(self.floor, batch_count), 1.0, True)
            p = scheduled(self.skip, batch_count)
            if p > 0.0:
                keep = torch.rand(orig.shape[0], 1, 1, device=orig.device) >= p
                scale = scale * keep.to(scale.dtype)
        return orig + (new - orig) * scale

    def extra_repr(self) -> str:
        return f"floor={self.floor}, skip={self.skip}"
