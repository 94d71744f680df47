"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration.

    z_{k+1} = (1 - beta) z_k + beta f(z_k)

With ``beta = 1`` this is plain Picard iteration. If ``f`` is a q-contraction, the undamped iteration
converges linearly with factor ``q`` (Banach); the damped one with factor ``1 - beta + beta q`` and, for a
nonexpansive (merely averaged) ``f``, still converges for ``0 < beta < 1`` where plain iteration may cycle.
"""
from __future__ import annotations

import dataclasses

from .. import _validate as v
from ._loop import FixedPointSolver

__all__ = ["PicardSolver"]


@dataclasses.dataclass
class PicardSolver(FixedPointSolver):
    """Damped fixed-point iteration.

    Args:
        damping: the mixing weight ``beta`` in ``(0, 1]``; ``1`` is plain iteration.
    """

    name = "picard"
    damping: float = 1.0

    def validate(self) -> None:
        self.damping = v.in_range(self.damping, "damping", where=self.name, low=0.0, high=1.0, low_open=True)

    def step(self, state, z, fz, idx, fn):
        z_new = fz if self.damping == 1.0 else z + self.damping * (fz - z)
        return z_new, fn(z_new)
