"""Gradient descent as an algorithm layer.

Update (Chen et al. 2020, Sec. 3): ``y_{t+1} = y_t - s_t grad_y E(y_t)``, ``y_0 = 0``.

For a quadratic ``E = 1/2 y^T Q y - b^T y`` with ``mu I <= Q <= L I`` and a constant step ``s``::

    y_k = (I - (I - s Q)^k) Q^{-1} b,      ||y_k - y*|| <= max(|1 - s mu|, |1 - s L|)^k ||y*||,

i.e. the linear rate ``1 - s mu`` for ``s <= 1/L`` (``0.9`` per step for ``mu = 0.1, L = s^{-1} = 1``).
The tied update has the minimiser as its unique fixed point for ``0 < s < 2/L``, so the layer can also
be run to convergence with implicit gradients (:meth:`~.UnrolledAlgorithm.solve`).
"""
from __future__ import annotations

from .energy import BoundEnergy
from .unrolled import UnrolledAlgorithm

__all__ = ["GradientDescent"]


class GradientDescent(UnrolledAlgorithm):
    """``k`` steps of ``y <- y - s grad E(y)`` (options: ``max_iter`` = the paper's ``k``, ``step_size``, ``tied``,
    ``learn_step``)."""

    state_size = 1

    def _update(self, t: int, state, energy: BoundEnergy):
        (y,) = state
        return (y - self.step_at(t, y) * energy.grad(y),)
