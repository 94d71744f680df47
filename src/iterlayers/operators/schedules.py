"""Relaxation schedules alpha_1..alpha_N for relaxed Picard iteration z_{n+1} = a_n z_n + (1 - a_n) T(z_n).

Zappala et al. (arXiv 2310.01618, Sec. 5.1) train PIGN with a *uniform* schedule (the same smoothing factor
alpha at every iteration) and also study non-uniform schedules whose alpha rises towards 1, so that late
iterations move the state less (a step size decaying like a Mann iteration). Kinds:

- ``uniform``:  a_n = alpha
- ``linear``:   a_n linear from ``start`` to ``end``
- ``sigmoid``:  a_n = sigmoid(t_n), t_n linear from ``start`` to ``end`` (logits)
- ``tanh``:     a_n = tanh(t_n),    t_n linear from ``start`` to ``end``

Every value must lie in [0, 1): a_n = 1 would freeze the iteration.
"""
from __future__ import annotations

import math
from typing import Sequence
from iterlayers import _validate as V
from iterlayers.errors import OptionTypeError, ValidationError

__all__ = ["make_schedule", "validate_schedule", "SCHEDULES"]

SCHEDULES = ("uniform", "linear", "sigmoid", "tanh")


def validate_schedule(schedule: Sequence[float], *, name: str = "schedule") -> tuple[float, ...]:
    """Check a relaxation schedule: non-empty, every alpha_n finite and in [0, 1)."""
    try:
        values = tuple(float(a) for a in schedule)
    except TypeError as exc:
        raise OptionTypeError(f"{name} must be a sequence of floats, got {type(schedule).__name__}") from exc
    if not values:
        raise ValidationError(f"{name} must contain at least one relaxation value")
    for a in values:
        if not (math.isfinite(a) and 0.0 <= a < 1.0):
            raise ValidationError(f"{name}: every alpha must be in [0, 1), got {a}")
    return values


def make_schedule(kind: str, max_iter: int, *, alpha: float = 0.5, start: float | None = None,
                  end: float | None = None) -> tuple[float, ...]:
    """A schedule of ``max_iter`` relaxation factors a_1..a_N of the given ``kind`` (see module docstring);
    ``max_iter`` is the iteration count, the paper's N."""
    if kind not in SCHEDULES:
        raise ValidationError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    max_iter = V.positive_int(max_iter, "max_iter")
    if kind == "uniform":
        return validate_schedule([alpha] * max_iter)
    defaults = {"linear": (0.5, 0.9), "sigmoid": (-1.0, 2.0), "tanh": (0.2, 1.4)}[kind]
    s = defaults[0] if start is None else float(start)
    e = defaults[1] if end is None else float(end)
    ts = [s + (e - s) * i / max(max_iter - 1, 1) for i in range(max_iter)]
    if kind == "linear":
        vals = ts
    elif kind == "sigmoid":
        vals = [1.0 / (1.0 + math.exp(-t)) for t in ts]
    else:
        vals = [math.tanh(t) for t in ts]
    return validate_schedule(vals, name=f"{kind} schedule")
