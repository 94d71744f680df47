"""The one error family of iterlayers: every error it raises is an :class:`IterlayersError`.

Each failure has its own type so a caller can catch exactly what it can handle, and each type is also the
builtin a user would catch (``ValueError`` for a bad value, ``TypeError`` for a wrong type,
``NotImplementedError`` for an unsupported mode), so ``except ValueError`` keeps working. Every message names
the problem (the argument, which samples, which residual, which option, forward or backward solve) instead of
surfacing a traceback from inside torch. The CLI catches this family, and only this family, as user errors.
"""
from __future__ import annotations

__all__ = [
    "IterlayersError",
    "ValidationError",
    "OptionTypeError",
    "ShapeMismatchError",
    "NonFiniteInputError",
    "ConvergenceError",
    "ConvergenceWarning",
    "UnsupportedError",
    "CheckpointError",
    "IterlayersWarning",
]


class IterlayersError(Exception):
    """Base class of every error raised by iterlayers."""


class ValidationError(IterlayersError, ValueError):
    """An argument or option has a bad value (out of range, NaN, unknown name); the message names it."""


class OptionTypeError(IterlayersError, TypeError):
    """An argument or option has the wrong type (a string where a float belongs, ``max_iter=True``, ...)."""


class ShapeMismatchError(IterlayersError, ValueError):
    """``f(z)`` does not have the shape of ``z``, or batch dimensions / devices / dtypes disagree."""


class NonFiniteInputError(IterlayersError, ValueError):
    """NaN or Inf in an initial state or an input, detected before any iteration runs."""


class ConvergenceError(IterlayersError, RuntimeError):
    """A solve (forward or backward) did not reach its tolerance (``max_iter``) or diverged.

    ``stats`` holds the :class:`~iterlayers.solvers.SolverStats` of the failed solve.
    """

    def __init__(self, message: str, stats=None):
        super().__init__(message)
        self.stats = stats


class UnsupportedError(IterlayersError, NotImplementedError):
    """A combination iterlayers refuses rather than answer wrongly (e.g. double backward through an
    implicit layer); the message names the alternatives that are exact."""


class CheckpointError(IterlayersError, ValueError):
    """A checkpoint is truncated, corrupted (hash mismatch) or does not match the model; names the file."""


class IterlayersWarning(UserWarning):
    """Base class of iterlayers' warnings."""


class ConvergenceWarning(IterlayersWarning, RuntimeWarning):
    """Emitted instead of :class:`ConvergenceError` when ``on_failure="warn"``."""
