"""Proximal-gradient layers (ISTA, FISTA) for ``E(y) = f(y) + R(y)``, ``f`` smooth, ``R`` prox-friendly.

ISTA (proximal gradient)::

    y_{t+1} = prox_{s R}(y_t - s grad f(y_t)),

whose fixed points are exactly the minimisers (``0 in grad f(y) + dR(y)``); for ``s <= 1/L`` it
converges at ``O(1/t)`` in objective, linearly when ``f`` is ``mu``-strongly convex.  With
``R = lam ||.||_1`` and ``f = 1/2 ||A y - x||^2`` this is the lasso (Beck & Teboulle 2009).

FISTA adds the time-varying momentum ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2``,
``y <- x_{k+1} + ((t_k - 1) / t_{k+1}) (x_{k+1} - x_k)`` for the ``O(1/t^2)`` rate; because the
momentum changes with the iteration count the update is not stationary, so FISTA has no fixed-point
(equilibrium) mode — use ISTA's :meth:`solve` for that.
"""
from __future__ import annotations

from ..unrolling import fista_momentum
from .energy import BoundEnergy, Regularizer
from .unrolled import UnrolledAlgorithm
from iterlayers.errors import OptionTypeError

__all__ = ["ISTA", "FISTA"]


def _check_regularizer(regularizer) -> Regularizer:
    if not isinstance(regularizer, Regularizer):
        raise OptionTypeError(f"regularizer must be a Regularizer (e.g. L1Penalty), got {type(regularizer).__name__}")
    return regularizer


class ISTA(UnrolledAlgorithm):
    """Proximal gradient on ``f + R`` (options: ``regularizer``, ``max_iter`` = the paper's ``k``, ``step_size``,
    ``tied``, ``learn_step``)."""

    state_size = 1

    def __init__(self, *, regularizer: Regularizer, max_iter: int = 10, step_size=1.0, tied: bool = True,
                 learn_step: bool = False):
        super().__init__(max_iter=max_iter, step_size=step_size, tied=tied, learn_step=learn_step)
        self.regularizer = _check_regularizer(regularizer)

    def _update(self, t: int, state, energy: BoundEnergy):
        (y,) = state
        s = self.step_at(t, y)
        return (self.regularizer.prox(y - s * energy.grad(y), s),)


class FISTA(UnrolledAlgorithm):
    """Accelerated proximal gradient (Beck & Teboulle); state ``(x, y)``, output ``x`` (options as :class:`ISTA`)."""

    state_size = 2
    has_fixed_point = False

    def __init__(self, *, regularizer: Regularizer, max_iter: int = 10, step_size=1.0, tied: bool = True,
                 learn_step: bool = False):
        super().__init__(max_iter=max_iter, step_size=step_size, tied=tied, learn_step=learn_step)
        self.regularizer = _check_regularizer(regularizer)

    def _update(self, t: int, state, energy: BoundEnergy):
        x, y = state
        s = self.step_at(t, y)
        x_next = self.regularizer.prox(y - s * energy.grad(y), s)
        return x_next, x_next + fista_momentum(t) * (x_next - x)
