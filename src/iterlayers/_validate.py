"""One validation vocabulary: every check of a user-supplied argument or option in iterlayers goes through here.

Each checker returns the (normalised) value or raises a typed error of the one family
(:class:`~iterlayers.errors.OptionTypeError` for a wrong type, :class:`~iterlayers.errors.ValidationError` for
a bad value), with a message that names the argument (``where`` is the owner, e.g. ``"anderson"`` or
``"DEQ"``), the value received and what is allowed. ``bool`` is never accepted where a number belongs
(``max_iter=True`` is a mistake, not 1), NaN never passes a range check, and strings never pass as numbers.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

from .errors import OptionTypeError, ValidationError

__all__ = ["integer", "positive_int", "non_negative_int", "real", "finite", "in_range", "choice", "boolean",
           "probability"]


def _name(name: str, where: str | None) -> str:
    return f"{where}: {name}" if where else name


def integer(value, name: str, *, where: str | None = None, minimum: int | None = None) -> int:
    """An ``int`` (not a bool, not a float), optionally ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionTypeError(f"{_name(name, where)} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValidationError(f"{_name(name, where)} must be an integer >= {minimum}, got {value!r}")
    return value


def positive_int(value, name: str, *, where: str | None = None) -> int:
    return integer(value, name, where=where, minimum=1)


def non_negative_int(value, name: str, *, where: str | None = None) -> int:
    return integer(value, name, where=where, minimum=0)


def real(value, name: str, *, where: str | None = None) -> float:
    """A real number (int or float, not bool / str / complex); NaN passes (use :func:`finite` to refuse it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionTypeError(f"{_name(name, where)} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def finite(value, name: str, *, where: str | None = None) -> float:
    v = real(value, name, where=where)
    if not math.isfinite(v):
        raise ValidationError(f"{_name(name, where)} must be finite, got {value!r}")
    return v


def in_range(value, name: str, *, where: str | None = None, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """A real number in the interval given by ``low`` / ``high`` (closed unless ``*_open``); never NaN."""
    v = real(value, name, where=where)
    if math.isnan(v) or (not allow_inf and math.isinf(v)):
        raise ValidationError(f"{_name(name, where)} must be a finite number, got {value!r}")
    ok = True
    if low is not None:
        ok &= v > low if low_open else v >= low
    if high is not None:
        ok &= v < high if high_open else v <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValidationError(f"{_name(name, where)} must be in {interval}, got {value!r}")
    return v


def probability(value, name: str, *, where: str | None = None) -> float:
    return in_range(value, name, where=where, low=0.0, high=1.0)


def choice(value, name: str, options: Iterable, *, where: str | None = None):
    """One of ``options`` (compared with ``==``; the message lists them)."""
    options = list(options)
    if isinstance(value, bool) and not any(isinstance(o, bool) for o in options):
        raise OptionTypeError(f"{_name(name, where)} must be one of {options}, got {value!r}")
    try:
        ok = value in options
    except TypeError:
        ok = False
    if not ok:
        raise ValidationError(f"{_name(name, where)} must be one of {options}, got {value!r}")
    return value


def boolean(value, name: str, *, where: str | None = None) -> bool:
    if not isinstance(value, bool):
        raise OptionTypeError(f"{_name(name, where)} must be True or False, got {value!r} ({type(value).__name__})")
    return value
