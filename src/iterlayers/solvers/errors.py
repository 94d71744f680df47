"""The solvers' errors: the library's one family, :mod:`iterlayers.errors` (re-exported here)."""
from __future__ import annotations

from ..errors import (  # noqa: F401
    ConvergenceError,
    ConvergenceWarning,
    IterlayersError,
    NonFiniteInputError,
    OptionTypeError,
    ShapeMismatchError,
    UnsupportedError,
    ValidationError,
)

__all__ = [
    "IterlayersError",
    "ConvergenceError",
    "ConvergenceWarning",
    "ShapeMismatchError",
    "NonFiniteInputError",
    "ValidationError",
    "OptionTypeError",
    "UnsupportedError",
]
