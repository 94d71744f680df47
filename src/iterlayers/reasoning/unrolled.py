"""Base class of algorithm layers: ``k`` unrolled steps of an optimiser, or its fixed point.

An algorithm layer ``Alg^k_phi`` maps an energy ``E`` (see :mod:`.energy`) to the ``k``-th iterate of
an optimisation algorithm started at ``y_0`` (``0`` by default, as in Chen et al. 2020).  The depth ``k``
(the paper's k) is the option ``max_iter``, the core's word for an iteration count (``iterlayers.unroll``).
Its parameters ``phi`` are the step sizes (and momenta for subclasses):

* ``tied=True``: one value shared by all steps; ``tied=False``: one value per step (a length-``k``
  vector, "untied" unrolling as in LISTA-type networks);
* ``learn_step=True``: the step sizes are ``nn.Parameter``\\ s trained end to end; otherwise buffers.

Subclasses define the state (a tuple of [B, n] tensors, e.g. ``(x, x_prev)`` for momentum methods),
``_update(t, state, energy)`` and ``_output(state)``.  Where the update map with tied parameters has the
minimiser as a fixed point (GD, heavy ball, NAG with constant momentum, ISTA), :meth:`solve` runs it to
convergence as a deep-equilibrium layer through the core (``iterlayers.deq_solve``, tuple states as they are)
with implicit gradients.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from iterlayers import DEQOptions, deq_solve
from iterlayers.errors import OptionTypeError, ValidationError

from .energy import BoundEnergy, Energy, Quadratic

__all__ = ["UnrolledAlgorithm", "bind_energy"]

#: the equilibrium mode's defaults: a minimiser to high accuracy (an algorithm's update is cheap)
_SOLVE_DEFAULTS = {"solver": "anderson", "backward": "implicit", "atol": 1e-8, "rtol": 0.0, "max_iter": 500}


def bind_energy(energy, x=None) -> BoundEnergy:
    """Accept a :class:`BoundEnergy`, an :class:`Energy` with its input ``x``, or a pair ``(Q, b)``."""
    if isinstance(energy, BoundEnergy):
        if x is not None:
            raise OptionTypeError("x must be None when a bound energy is passed")
        return energy
    if isinstance(energy, Energy):
        if x is None:
            raise OptionTypeError(f"{type(energy).__name__} needs its input x")
        return energy.bind(x)
    if isinstance(energy, (tuple, list)) and len(energy) == 2:
        return Quadratic(*energy)
    raise OptionTypeError("energy must be a BoundEnergy, an Energy (with x) or a pair (Q, b); "
                    f"got {type(energy).__name__}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"{name} must be a positive int, got {value!r}")
    return value


def _per_step(module: nn.Module, name: str, value, *, max_iter: int, tied: bool, learn: bool) -> None:
    """Register ``name`` as a [1] (tied) or [max_iter] (untied) float64 parameter/buffer."""
    if isinstance(value, Tensor):
        t = value.detach().to(torch.float64).flatten()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.tensor([float(value)], dtype=torch.float64)
    elif isinstance(value, Sequence):
        t = torch.tensor([float(v) for v in value], dtype=torch.float64)
    else:
        raise OptionTypeError(f"{name} must be a float, a sequence of floats or a tensor, got {type(value).__name__}")
    n = 1 if tied else max_iter
    if t.numel() == 1:
        t = t.repeat(n)
    if t.numel() != n:
        raise ValidationError(f"{name} needs 1 value (tied) or max_iter={max_iter} values (untied), got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValidationError(f"{name} must be finite, got {t.tolist()}")
    if learn:
        module.register_parameter(name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


class UnrolledAlgorithm(nn.Module):
    """``k`` steps of an iterative optimiser as a layer (see module docstring).

    Options (keyword-only): ``max_iter`` (positive int: the number of unrolled steps, the paper's ``k``),
    ``step_size`` (float, or ``max_iter`` floats when untied), ``tied`` (bool), ``learn_step`` (bool).
    """

    has_fixed_point: bool = True
    state_size: int = 1  # number of [B, n] tensors in the state

    def __init__(self, *, max_iter: int = 10, step_size=1.0, tied: bool = True, learn_step: bool = False):
        super().__init__()
        self.max_iter = _positive_int(max_iter, "max_iter")
        if not isinstance(tied, bool):
            raise OptionTypeError(f"tied must be a bool, got {tied!r}")
        if not isinstance(learn_step, bool):
            raise OptionTypeError(f"learn_step must be a bool, got {learn_step!r}")
        self.tied, self.learn_step = tied, learn_step
        _per_step(self, "step_size", step_size, max_iter=self.max_iter, tied=tied, learn=learn_step)

    # -- per-step parameters -------------------------------------------------------------------
    def _at(self, p: Tensor, t: int, like: Tensor) -> Tensor:
        return (p[0] if self.tied else p[t]).to(like.dtype)

    def step_at(self, t: int, like: Tensor) -> Tensor:
        """Step size of step ``t`` (0-based) in ``like``'s dtype."""
        return self._at(self.step_size, t, like)

    # -- subclass interface ----------------------------------------------------------------------
    def _init_state(self, y0: Tensor) -> tuple[Tensor, ...]:
        return (y0,) * self.state_size

    def _update(self, t: int, state: tuple[Tensor, ...], energy: BoundEnergy) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _output(self, state: tuple[Tensor, ...]) -> Tensor:
        return state[0]

    # -- unrolled forward ------------------------------------------------------------------------
    def forward(self, energy, x=None, *, y0: Tensor | None = None, max_iter: int | None = None,
                return_all: bool = False):
        """``y^k = Alg^k(E)`` with ``k = max_iter``; ``return_all=True`` gives the list ``[y^0, ..., y^k]``.

        ``max_iter`` overrides the layer's ``max_iter`` (the paper's ``k``) for this call: a tied layer at
        another depth, an untied one at most at its own.
        """
        bound = bind_energy(energy, x)
        if max_iter is None:
            max_iter = self.max_iter
        else:
            max_iter = _positive_int(max_iter, "max_iter")
            if not self.tied and max_iter > self.max_iter:
                raise ValidationError(f"an untied layer has only max_iter={self.max_iter} steps, asked for "
                                      f"max_iter={max_iter}")
        if y0 is None:
            y0 = bound.zeros()
        elif y0.shape != bound.zeros().shape:
            raise ValidationError(f"y0 must have shape {tuple(bound.zeros().shape)}, got {tuple(y0.shape)}")
        state = self._init_state(y0)
        trace = [self._output(state)] if return_all else None
        for t in range(max_iter):
            state = self._update(t, state, bound)
            if return_all:
                trace.append(self._output(state))
        return trace if return_all else self._output(state)

    # -- equilibrium (DEQ) mode ------------------------------------------------------------------
    def update_map(self, energy: BoundEnergy):
        """The tied update ``T`` as a map of the state tuple: the fixed-point map of the DEQ mode."""
        if not self.tied:
            raise ValidationError("the equilibrium mode needs tied parameters (tied=True)")
        if not self.has_fixed_point:
            raise ValidationError(f"{type(self).__name__} has no stationary update map (time-varying momentum)")
        return lambda state: tuple(self._update(0, tuple(state), energy))

    def fixed_point_map(self, energy: BoundEnergy):
        """``T`` on the flattened state ``z = cat(state)`` [B, state_size * n] (for Jacobian analyses)."""
        T = self.update_map(energy)
        return lambda z: torch.cat(T(torch.split(z, energy.dim, dim=-1)), dim=-1)

    def solve(self, energy, x=None, *, y0: Tensor | None = None, options: DEQOptions | None = None,
              stats: dict | None = None, **overrides) -> Tensor:
        """Run the algorithm to its fixed point (the minimiser) with implicit gradients.

        ``z* = T(z*)`` for the tied update ``T`` on the state tuple; by the implicit function theorem the
        gradient of a loss ``l(y*)`` needs only ``(I - J_T(z*))^{-T}``, not the iterates (memory independent of
        the number of iterations). The solve is the core's :func:`iterlayers.deq_solve`, configured by
        ``options`` (a :class:`~iterlayers.DEQOptions`) and/or keyword overrides of its fields; the defaults
        here are ``solver="anderson"``, ``backward="implicit"``, ``atol=1e-8``, ``rtol=0``, ``max_iter=500`` (the
        solver's budget; the layer's own ``max_iter``, its unrolled depth, plays no part in this mode).
        ``stats`` (a dict) receives the solve's ``{"forward", "backward"}`` statistics.
        """
        bound = bind_energy(energy, x)
        T = self.update_map(bound)
        if y0 is None:
            y0 = bound.zeros()
        if options is None:
            overrides = {**_SOLVE_DEFAULTS, **overrides}
        z = deq_solve(T, self._init_state(y0), options=options, stats=stats, **overrides)
        return self._output(z)

    def extra_repr(self) -> str:
        return f"max_iter={self.max_iter}, tied={self.tied}, learn_step={self.learn_step}"
