"""Typed errors and warnings raised by the solvers and layers.

Every failure has its own type so a caller can catch exactly what it can handle; every message names the
problem (which samples, which residual, which option) instead of surfacing a traceback from inside torch.
"""
from __future__ import annotations

__all__ = [
    "IterlayersError",
    "ConvergenceError",
    "ConvergenceWarning",
    "ShapeMismatchError",
    "NonFiniteInputError",
]


class IterlayersError(Exception):
    """Base class of every error raised by iterlayers."""


class ConvergenceError(IterlayersError, RuntimeError):
    """A solve did not reach its tolerance (``max_iter``) or diverged (NaN, Inf or residual blow-up).

    ``stats`` holds the :class:`~iterlayers.solvers.stats.SolverStats` of the failed solve.
    """

    def __init__(self, message: str, stats=None):
        super().__init__(message)
        self.stats = stats


class ConvergenceWarning(RuntimeWarning):
    """Emitted instead of :class:`ConvergenceError` when ``on_failure="warn"``."""


class ShapeMismatchError(IterlayersError, ValueError):
    """``f(z)`` does not have the shape of ``z``, or batch dimensions disagree."""


class NonFiniteInputError(IterlayersError, ValueError):
    """NaN or Inf in an initial state or an input, detected before any iteration runs."""
