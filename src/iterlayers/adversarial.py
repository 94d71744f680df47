"""Adversarial evaluation for any classifier ``nn.Module``: FGSM and PGD in the l_inf and l_2 balls.

For a loss ``l(f(x), y)`` (cross-entropy by default) and radius ``eps``:

- FGSM (Goodfellow et al. 2015): one step to the boundary of the ball,
  ``x' = x + eps * sign(grad)`` (l_inf) or ``x' = x + eps * grad / ||grad||_2`` (l_2).
- PGD (Madry et al. 2018): ``x^{t+1} = Proj_{||x' - x|| <= eps}(x^t + alpha * d(grad))`` with the same steepest
  ascent direction ``d`` (sign, or normalised gradient), optionally from a uniformly random start in the ball;
  default step ``alpha = 2.5 eps / steps``.

Both work on the whole batch at once with per-sample norms, in any floating dtype, leave the model's
parameters and mode untouched (only the input receives gradients), and optionally clamp to a valid input box.
``robust_accuracy`` reports accuracy under an attack for several radii (``eps = 0`` is clean accuracy).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import OptionTypeError, ShapeMismatchError, ValidationError

__all__ = ["ATTACK_NORMS", "fgsm", "pgd", "robust_accuracy", "project"]

ATTACK_NORMS = ("inf", "2")  # the norm balls of the attacks


def _check_norm(norm) -> str:
    norm = str(norm)
    if norm in ("linf", "Linf", "l_inf"):
        norm = "inf"
    if norm in ("l2", "L2", "l_2", "2.0"):
        norm = "2"
    if norm not in ATTACK_NORMS:
        raise ValidationError(f"norm must be one of {ATTACK_NORMS} (or 'linf'/'l2'), got {norm!r}")
    return norm


def _check_inputs(model, x, y, eps):
    if not isinstance(model, nn.Module) and not callable(model):
        raise OptionTypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise OptionTypeError("x must be a floating-point tensor")
    if not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]:
        raise ShapeMismatchError("y must be a tensor with one label per sample of x")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValidationError(f"eps must be a number >= 0, got {eps!r}")


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Per-sample projection of ``delta`` onto the ``eps``-ball of ``norm``."""
    norm = _check_norm(norm)
    if norm == "inf":
        return delta.clamp(-eps, eps)
    scale = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "inf":
        return g.sign()
    return g / _flat_norm(g).clamp_min(1e-12)


def _input_grad(model, x, y, loss_fn) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        (g,) = torch.autograd.grad(loss, x)
    return g


def _clamp(x, clamp):
    return x if clamp is None else x.clamp(*clamp)


def _default_loss(logits, y):
    return nn.functional.cross_entropy(logits, y, reduction="sum")


def fgsm(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "inf",
    loss_fn: Callable | None = None,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Fast gradient (sign) method: ``x + eps * d(grad_x l)``; returns a detached adversarial batch."""
    _check_inputs(model, x, y, eps)
    norm = _check_norm(norm)
    g = _input_grad(model, x, y, loss_fn or _default_loss)
    return _clamp(x.detach() + eps * _direction(g, norm), clamp).detach()


def pgd(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "inf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int | None = None,
    loss_fn: Callable | None = None,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on the loss inside the ``eps``-ball around ``x`` (detached result)."""
    _check_inputs(model, x, y, eps)
    norm = _check_norm(norm)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValidationError(f"steps must be an int >= 1, got {steps!r}")
    if step_size is not None and step_size <= 0:
        raise ValidationError(f"step_size must be > 0, got {step_size}")
    alpha = 2.5 * eps / steps if step_size is None else step_size
    loss_fn = loss_fn or _default_loss
    x0 = x.detach()
    if eps == 0:
        return x0.clone()
    delta = torch.zeros_like(x0)
    if random_start:
        gen = torch.Generator(device=x0.device)
        # without a seed, draw one from the global generator (reproducible under torch.manual_seed)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
        if norm == "inf":
            delta = (torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype) * 2 - 1) * eps
        else:
            u = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            u = u / _flat_norm(u).clamp_min(1e-12)
            n = u[0].numel()
            r = torch.rand((x0.shape[0],) + (1,) * (x0.dim() - 1), generator=gen, device=x0.device, dtype=x0.dtype)
            delta = u * eps * r.pow(1.0 / n)  # uniform in the l_2 ball
        delta = _clamp(x0 + delta, clamp) - x0
    for _ in range(steps):
        g = _input_grad(model, x0 + delta, y, loss_fn)
        delta = project(delta + alpha * _direction(g, norm), eps, norm)
        delta = _clamp(x0 + delta, clamp) - x0
    return (x0 + delta).detach()


@torch.no_grad()
def _accuracy(model, x, y, batch_size):
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def robust_accuracy(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float],
    *,
    attack: str = "pgd",
    norm: str = "inf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = 1024,
    clamp: tuple[float, float] | None = None,
) -> dict[float, float]:
    """Accuracy under ``attack`` in ``("pgd", "fgsm")`` for every ``eps`` in ``eps_list``: ``{eps: acc}``."""
    if attack not in ("pgd", "fgsm"):
        raise ValidationError(f"attack must be one of ('pgd', 'fgsm'), got {attack!r}")
    norm = _check_norm(norm)
    out: dict[float, float] = {}
    for eps in eps_list:
        advs = []
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if eps == 0:
                advs.append(xb)
            elif attack == "fgsm":
                advs.append(fgsm(model, xb, yb, eps, norm=norm, clamp=clamp))
            else:
                advs.append(
                    pgd(model, xb, yb, eps, norm=norm, steps=steps, step_size=step_size,
                        random_start=random_start, seed=seed + i, clamp=clamp)
                )
        out[float(eps)] = _accuracy(model, torch.cat(advs), y, batch_size)
    return out
