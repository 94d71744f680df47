"""Nesterov's accelerated gradient (NAG) for strongly convex energies as an algorithm layer.

Update (the constant-momentum scheme used by Chen et al. 2020), ``x_0 = y_0 = 0``::

    x_{t+1} = y_t - s grad E(y_t)
    y_{t+1} = x_{t+1} + beta (x_{t+1} - x_t),      beta = (1 - sqrt(mu s)) / (1 + sqrt(mu s)),

output ``x_k``.  On a quadratic, per eigenvalue ``lam`` of ``Q`` the error ``e_t = x_t - y*`` obeys the
two-term recursion ``e_{t+1} = (1 - s lam) ((1 + beta) e_t - beta e_{t-1})`` (a 2x2 block recursion,
see :mod:`.theory`), whose spectral radius at ``lam = mu`` is ``1 - sqrt(s mu)``: the accelerated rate
(``0.684`` per step for ``mu = 0.1``, ``s = 1``), against ``1 - s mu`` for gradient descent.

The state is ``(x, y)``.  With a constant momentum the map has the fixed point ``(y*, y*)``, so the
layer also runs as an equilibrium layer (:meth:`~.UnrolledAlgorithm.solve`).
"""
from __future__ import annotations

import torch

from .energy import BoundEnergy
from .unrolled import UnrolledAlgorithm, _per_step
from iterlayers.errors import ValidationError

__all__ = ["Nesterov", "nesterov_momentum"]


def nesterov_momentum(mu, s):
    """``beta = (1 - sqrt(mu s)) / (1 + sqrt(mu s))`` (tensors or floats)."""
    r = torch.sqrt(torch.as_tensor(mu * s))
    return (1 - r) / (1 + r)


class Nesterov(UnrolledAlgorithm):
    """NAG layer.  Give exactly one of ``mu`` (strong-convexity constant; momentum follows the step
    size by the formula above, so it moves when a learnable step moves) or ``momentum`` (a float, or
    ``max_iter`` floats when untied; ``learn_momentum=True`` trains it). ``max_iter`` is the number of steps, the
    paper's ``k``."""

    state_size = 2

    def __init__(self, *, max_iter: int = 10, step_size=1.0, mu: float | None = None, momentum=None,
                 tied: bool = True, learn_step: bool = False, learn_momentum: bool = False):
        super().__init__(max_iter=max_iter, step_size=step_size, tied=tied, learn_step=learn_step)
        if (mu is None) == (momentum is None):
            raise ValidationError("give exactly one of mu (momentum from the step size) or momentum")
        if mu is not None:
            if not (isinstance(mu, (int, float)) and mu > 0):
                raise ValidationError(f"mu must be a positive float, got {mu!r}")
            if learn_momentum:
                raise ValidationError("learn_momentum=True needs an explicit momentum, not mu")
        self.mu = None if mu is None else float(mu)
        self.learn_momentum = bool(learn_momentum)
        if momentum is not None:
            _per_step(self, "momentum", momentum, max_iter=self.max_iter, tied=tied, learn=learn_momentum)

    def momentum_at(self, t: int, like):
        if self.mu is not None:
            return nesterov_momentum(self.mu, self.step_at(t, like))
        return self._at(self.momentum, t, like)

    def _update(self, t: int, state, energy: BoundEnergy):
        x, y = state
        x_next = y - self.step_at(t, y) * energy.grad(y)
        beta = self.momentum_at(t, y)
        return x_next, x_next + beta * (x_next - x)

    def extra_repr(self) -> str:
        mom = f"mu={self.mu}" if self.mu is not None else f"learn_momentum={self.learn_momentum}"
        return f"{super().extra_repr()}, {mom}"
