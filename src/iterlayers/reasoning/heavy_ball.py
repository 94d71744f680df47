"""Polyak's heavy-ball momentum as an algorithm layer.

Update, ``y_{-1} = y_0 = 0``::

    y_{t+1} = y_t - s grad E(y_t) + beta (y_t - y_{t-1}).

On a quadratic with spectrum in ``[mu, L]`` the optimal constants ``s = 4 / (sqrt L + sqrt mu)^2``,
``beta = ((sqrt L - sqrt mu) / (sqrt L + sqrt mu))^2`` give the rate ``(sqrt(kappa) - 1) /
(sqrt(kappa) + 1)``, ``kappa = L / mu`` (:func:`polyak_parameters`).  The state is ``(y, y_prev)``; the
tied map has the fixed point ``(y*, y*)`` and can run as an equilibrium layer.
"""
from __future__ import annotations

import math

from .energy import BoundEnergy
from .unrolled import UnrolledAlgorithm, _per_step
from iterlayers.errors import ValidationError

__all__ = ["HeavyBall", "polyak_parameters"]


def polyak_parameters(mu: float, L: float) -> tuple[float, float]:
    """Optimal ``(step_size, momentum)`` of heavy ball on quadratics with spectrum in ``[mu, L]``."""
    if not (0 < mu <= L):
        raise ValidationError(f"need 0 < mu <= L, got mu={mu!r}, L={L!r}")
    a, c = math.sqrt(L), math.sqrt(mu)
    return 4.0 / (a + c) ** 2, ((a - c) / (a + c)) ** 2


class HeavyBall(UnrolledAlgorithm):
    """Heavy-ball layer (options: ``max_iter`` = the paper's ``k``, ``step_size``, ``momentum``, ``tied``,
    ``learn_step``, ``learn_momentum``)."""

    state_size = 2

    def __init__(self, *, max_iter: int = 10, step_size=1.0, momentum=0.5, tied: bool = True,
                 learn_step: bool = False, learn_momentum: bool = False):
        super().__init__(max_iter=max_iter, step_size=step_size, tied=tied, learn_step=learn_step)
        self.learn_momentum = bool(learn_momentum)
        _per_step(self, "momentum", momentum, max_iter=self.max_iter, tied=tied, learn=learn_momentum)

    def _update(self, t: int, state, energy: BoundEnergy):
        y, y_prev = state
        y_next = y - self.step_at(t, y) * energy.grad(y) + self._at(self.momentum, t, y) * (y - y_prev)
        return y_next, y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learn_momentum={self.learn_momentum}"
