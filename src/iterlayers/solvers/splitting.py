"""Operator-splitting solvers of monotone equilibrium problems (monDEQ; Winston & Kolter, NeurIPS 2020,
arXiv 2006.08591): forward-backward and Peaceman-Rachford.

The problem. Find ``z`` with ``0 in (I - W) z - b + df(z)``, i.e. ``z = prox_f(W z + b)``, where ``I - W`` is
strongly monotone (``(I - W) + (I - W)^T >= 2 m I``) and ``prox_f`` is the proximal map of a convex ``f``
(relu: ``f`` the indicator of ``z >= 0``; a 0/1 mask ``d``: the indicator of ``{z : z_i = 0 where d_i = 0}``,
whose prox is ``v -> d * v``). Both proximal maps here do not depend on the step ``alpha``. The problem has
one solution (a strongly monotone plus a maximal monotone operator is invertible).

The loop's map ``f(z)`` is the equilibrium map ``prox_f(W z + b)`` itself: the core loop measures the true
residual ``||prox_f(W z + b) - z||`` and gives these solvers its stopping, statistics and failure handling.
What the splitting needs beyond ``f`` -- ``W``, ``b``, the resolvent of ``I - W`` and the prox -- is the
:class:`MonotoneStructure` passed as the solver option ``structure`` (built per solve by the model that owns
``W``, e.g. :mod:`iterlayers.models.mondeq`). Without it the solvers refuse to be built: a generic map has
no splitting.

Iterations (per sample, rows of the flat state):

- ``forward_backward`` (step ``alpha``)::

      z <- prox_f((1 - alpha) z + alpha (W z + b))

  It converges linearly for ``0 < alpha < 2 m / L^2``, ``L = ||I - W||_2``: ``||I - alpha (I - W)||_2^2 <=
  1 - 2 alpha m + alpha^2 L^2 < 1`` and ``prox_f`` is nonexpansive. ``alpha=None`` takes ``m / L^2``.
- ``peaceman_rachford`` (step ``alpha > 0``; auxiliary ``u``, started at ``u = z``)::

      u_half = 2 z - u
      z_half = (I + alpha (I - W))^{-1} (u_half + alpha b)
      u      = 2 z_half - u_half
      z      = prox_f(u)

  The composition of the two reflected resolvents is a contraction when ``I - W`` is strongly monotone and
  Lipschitz, so it converges linearly for every ``alpha > 0``; its fixed points give the same ``z``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _validate as v
from ..errors import OptionTypeError, ValidationError
from ._loop import FixedPointSolver, rows, set_rows

__all__ = ["MonotoneStructure", "ForwardBackwardSolver", "PeacemanRachfordSolver"]


@dataclass(frozen=True)
class MonotoneStructure:
    """What a splitting step needs of ``z = prox_f(W z + b)``, on flat rows ``[n, N]`` of the batch.

    Attributes:
        linear: ``z -> W z`` (rows).
        resolvent: ``(v, alpha) -> (I + alpha (I - W))^{-1} v`` (rows).
        bias: ``b``, the full batch ``[B, N]`` (rows ``idx`` are taken per step).
        prox: ``(v, idx) -> prox_f(v)`` for the rows ``idx`` of the batch (``None``: all rows).
        m: the strong-monotonicity constant of ``I - W``.
        lipschitz: ``L = ||I - W||_2`` (for forward-backward's step; ``None`` if unknown).
    """

    linear: Callable[[torch.Tensor], torch.Tensor]
    resolvent: Callable[[torch.Tensor, float], torch.Tensor]
    bias: torch.Tensor
    prox: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    m: float
    lipschitz: float | None = None


def _check_structure(solver: FixedPointSolver) -> MonotoneStructure:
    if solver.structure is None:
        raise ValidationError(
            f"{solver.name}: structure must be given: this splitting solver needs the monotone structure of the "
            "map (W, b, the resolvent of I - W, the prox) as structure=MonotoneStructure(...), which a generic "
            "cell does not have; use a monDEQ model (iterlayers.models.mondeq) or another solver")
    if not isinstance(solver.structure, MonotoneStructure):
        raise OptionTypeError(f"{solver.name}: structure must be a MonotoneStructure, "
                              f"got {type(solver.structure).__name__}")
    return solver.structure


@dataclasses.dataclass
class ForwardBackwardSolver(FixedPointSolver):
    """Forward-backward splitting ``z <- prox_f((1 - alpha) z + alpha (W z + b))`` (see the module docstring).

    Args:
        alpha: the step, in ``(0, 2 m / L^2)``; ``None``: ``m / L^2`` (needs ``structure.lipschitz``).
        structure: the :class:`MonotoneStructure` of the map.
    """

    name = "forward_backward"
    alpha: float | None = None
    structure: MonotoneStructure | None = None

    def validate(self) -> None:
        if self.alpha is not None:
            self.alpha = v.in_range(self.alpha, "alpha", where=self.name, low=0.0, low_open=True)
        s = _check_structure(self)
        if self.alpha is None:
            if s.lipschitz is None:
                raise ValidationError(f"{self.name}: alpha must be given: alpha=None (m / L^2) needs "
                                      "structure.lipschitz = ||I - W||_2")
            self.alpha = s.m / s.lipschitz ** 2
        if s.lipschitz is not None and not self.alpha < 2 * s.m / s.lipschitz ** 2:
            raise ValidationError(
                f"{self.name}: alpha must lie in (0, 2 m / L^2) = (0, {2 * s.m / s.lipschitz ** 2:.4g}) where "
                f"forward-backward splitting converges (m={s.m:g}, L={s.lipschitz:.4g}), got {self.alpha:g}; use "
                "a smaller alpha or peaceman_rachford")

    def step(self, state, z, fz, idx, fn):
        s, a = self.structure, self.alpha
        z_new = s.prox((1 - a) * z + a * (s.linear(z) + rows(s.bias, idx)), idx)
        return z_new, fn(z_new)


@dataclasses.dataclass
class PeacemanRachfordSolver(FixedPointSolver):
    """Peaceman-Rachford splitting with the resolvent of ``I - W`` and the prox (see the module docstring).

    Args:
        alpha: the step, any positive number.
        structure: the :class:`MonotoneStructure` of the map.
    """

    name = "peaceman_rachford"
    alpha: float = 1.0
    structure: MonotoneStructure | None = None

    def validate(self) -> None:
        self.alpha = v.in_range(self.alpha, "alpha", where=self.name, low=0.0, low_open=True)
        _check_structure(self)

    def init(self, z, fz):
        # u = z is a valid start for any z in the range of the prox (prox(z) = z), e.g. z = 0 or a restart
        return {"u": z.clone()}

    def step(self, state, z, fz, idx, fn):
        s, a = self.structure, self.alpha
        u_half = 2 * z - rows(state["u"], idx)
        z_half = s.resolvent(u_half + a * rows(s.bias, idx), a)
        u = 2 * z_half - u_half
        set_rows(state["u"], idx, u)
        z_new = s.prox(u, idx)
        return z_new, fn(z_new)
