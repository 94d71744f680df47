"""Networks as operators, solved by relaxed Picard iteration (Zappala et al., arXiv 2310.01618, Sec. 3).

A network operator T(z, x) acting on a state z, with the input x held fixed, defines the operator equation
z = T(z, x). Its solution is approached by the relaxed (Krasnosel'skii-Mann) Picard iteration

    z_{n+1} = a_n z_n + (1 - a_n) T(z_n, x),       a_n in [0, 1)                                  (1)

Convergence (Banach): if T is a q-contraction in z, ||T(u) - T(v)|| <= q ||u - v|| with q < 1, then the
relaxed map R_a(z) = a z + (1 - a) T(z) is a contraction with factor

    rho = a + (1 - a) q < 1,        ||z_n - z*|| <= rho^n ||z_0 - z*||,                          (2)

and R_a has the same fixed point z* as T. Relaxation slows a contraction (rho >= q) but damps oscillation:
locally the rate is the spectral radius of a I + (1 - a) J_T(z*), which can be < 1 even when ||J_T|| > 1 if
J_T's eigenvalues point away from +1 (e.g. negative real). ``check_convergence`` measures both.

In the library's vocabulary (1) is damped iteration ``z <- z + d_n (T(z) - z)`` with the damping
``d_n = 1 - a_n``: the paper's relaxation ``alpha`` is ``1 - damping``. It runs on the one engine
:func:`iterlayers.unroll`.

Training procedure of the paper (PIGN, Sec. 5.1; the transformer, Sec. 5.2): a *fixed* number N of
iterations with a schedule a_1..a_N (uniform in the main experiments), gradients by backpropagation through
all N iterations (``backward="unrolled"``); evaluation may use a different schedule/length
(``eval_max_iter``). The library's equilibrium machinery is available as well: ``backward`` in
{"implicit", "phantom", "jfb"} solves the fixed point of R_a with the core solvers (``iterlayers.deq_solve``)
and differentiates it implicitly, and ``tol`` turns the fixed count into an adaptive one (stop when the
relative residual ||T(z_n) - z_n|| / ||T(z_n)|| of every sample is at most ``tol``, at most ``max_iter``
steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from iterlayers import _validate as V
from iterlayers import BACKWARD_MODES, DEQOptions, analysis, cells, deq_solve
from iterlayers.errors import OptionTypeError, ValidationError
from iterlayers.unrolling import Unrolling, unroll

from .schedules import validate_schedule

__all__ = [
    "relaxed_picard",
    "relative_steps",
    "PicardIteration",
    "IterativeOperator",
    "ConvergenceCheck",
    "check_convergence",
]

_EPS = 1e-12
_ALPHA_LO, _ALPHA_HI = 1e-3, 0.999  # range of a learnable alpha: strictly inside (0, 1) in float32 too


def _alpha_at(alpha, n: int):
    if isinstance(alpha, (tuple, list)):
        return alpha[min(n, len(alpha) - 1)]
    return alpha


def _damping(alpha):
    """The engine's damping ``d_n = 1 - a_n`` of a relaxation (a float, a 0-dim tensor or a schedule)."""
    if isinstance(alpha, (tuple, list)):
        return tuple(1.0 - a for a in validate_schedule(alpha, name="alpha"))
    if not isinstance(alpha, torch.Tensor):
        validate_schedule([alpha], name="alpha")
    return 1 - alpha


def relaxed_picard(operator: Callable, z0, x=None, *, alpha=0.5, max_iter: int = 10, tol: float | None = None,
                   return_iterates: bool = False, return_trace: bool = False) -> Unrolling:
    """Run iteration (1) from ``z0`` for ``max_iter`` steps (fewer if ``tol`` is met); differentiable.

    :func:`iterlayers.unroll` of ``T(., x)`` with damping ``1 - a_n``. ``alpha`` is a float, a 0-dim tensor
    (e.g. a learnable one) or a sequence a_1..a_N (a schedule; its last value is reused past its end). ``tol``
    (``None``: exactly ``max_iter`` steps) stops every sample together (``stopping="joint"``: rows may be
    coupled, e.g. a graph's nodes) once each relative residual ``||T(z) - z|| / ||T(z)||`` is at most ``tol``.
    Returns the engine's ``(z, stats, iterates)``; ``iterates`` (``return_iterates=True``) are
    ``z_0, ..., z_n``.
    """
    if tol is not None:
        tol = V.in_range(tol, "tol", low=0.0, low_open=True)
    return unroll(lambda z: operator(z, x), z0, max_iter=max_iter, damping=_damping(alpha),
                  rtol=tol, atol=None if tol is None else 0.0, stopping="joint", return_iterates=return_iterates,
                  return_trace=return_trace, name="relaxed_picard")


def relative_steps(iterates: Sequence[torch.Tensor]) -> list[float]:
    """The relative-step monitor of a run (ours; the operator experiments fit their rates to it): for each step
    n the largest (over the rows) ``||z_{n+1} - z_n|| / ||z_{n+1}||`` (row norms over the non-batch
    dimensions). Computed from the iterates, e.g. ``relaxed_picard(..., return_iterates=True).iterates``."""
    out = []
    for a, b in zip(iterates, iterates[1:]):
        step = (b - a).detach().reshape(b.shape[0], -1).norm(dim=1)
        out.append(float((step / (b.detach().reshape(b.shape[0], -1).norm(dim=1) + _EPS)).max()))
    return out


class PicardIteration(nn.Module):
    """Turn a network operator T(z, x) into the relaxed Picard iteration (1) (arXiv 2310.01618).

    Options (keyword-only):
      alpha            the paper's relaxation (``alpha = 1 - damping``): a float in [0, 1) (uniform schedule), or
                       a sequence a_1..a_N (a schedule; then ``max_iter`` defaults to its length). Paper's PIGN
                       sweeps alpha in 0.30..0.85.
      learnable_alpha  learn a single alpha = lo + (hi - lo) sigmoid(theta), initialised at ``alpha``, with
                       (lo, hi) = (0.001, 0.999): alpha stays inside (0, 1) even when the sigmoid saturates.
      max_iter         N, the number of iterations while training (and the step cap when ``tol`` is set).
      eval_max_iter    iterations in eval mode (default: ``max_iter``); a schedule repeats its last value.
      tol              None: exactly N steps. A float: stop when every relative residual <= tol.
      backward         "unrolled" (backprop through the N steps on :func:`iterlayers.unroll`, the paper's
                       procedure), or "implicit", "phantom", "jfb": fixed point of R_a by the core
                       ``iterlayers.deq_solve``.
      solver           core solver for the non-unrolled modes (a name of ``iterlayers.solvers.SOLVERS``).
      solver_options   extra :class:`~iterlayers.DEQOptions` fields for those modes (defaults: ``atol=tol`` or
                       1e-6, ``rtol=0``, ``on_failure="ignore"``).

    The core's options are one :class:`~iterlayers.DEQOptions` value, ``options`` (and ``eval_options`` for
    eval mode), built and validated once here.

    After a forward pass ``stats["forward"]`` holds the :class:`~iterlayers.SolverStats` of the run (the
    engine's, or the core solver's), ``stats["backward"]`` the adjoint solve's (implicit mode, after
    ``backward()``) or ``None``.
    """

    def __init__(self, operator: Callable, *, alpha: float | Sequence[float] = 0.5, learnable_alpha: bool = False,
                 max_iter: int | None = None, eval_max_iter: int | None = None, tol: float | None = None,
                 backward: str = "unrolled", solver: str = "picard", solver_options: dict | None = None):
        super().__init__()
        if not callable(operator):
            raise OptionTypeError(f"operator must be callable as operator(z, x), got {type(operator).__name__}")
        self.operator = operator
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self.schedule = validate_schedule([alpha], name="alpha")
            scheduled = False
        else:
            self.schedule = validate_schedule(alpha, name="alpha")
            scheduled = True
        self.learnable_alpha = V.boolean(learnable_alpha, "learnable_alpha")
        if learnable_alpha and scheduled:
            raise ValidationError("learnable_alpha=True needs a single float alpha, not a schedule")
        if learnable_alpha and not (_ALPHA_LO < self.schedule[0] < _ALPHA_HI):
            raise ValidationError(f"learnable_alpha=True needs an initial alpha in ({_ALPHA_LO}, {_ALPHA_HI}), "
                                  f"got {self.schedule[0]}")
        if max_iter is None:
            max_iter = len(self.schedule) if scheduled else 10
        max_iter = V.positive_int(max_iter, "max_iter")
        self.tol = None if tol is None else V.in_range(tol, "tol", low=0.0, low_open=True)
        self.backward = V.choice(backward, "backward", BACKWARD_MODES, where="PicardIteration")
        if backward != "unrolled" and scheduled:
            raise ValidationError(f"backward={backward!r} solves a fixed point and needs a single float alpha, "
                                  "not a schedule")
        self.scheduled = scheduled
        core = {"atol": 1e-6 if self.tol is None else self.tol, "rtol": 0.0, "on_failure": "ignore",
                **dict(solver_options or {})}  # ``tol`` is the whole stopping rule, forward and adjoint
        self.options = DEQOptions.build(solver=solver, backward=backward, max_iter=max_iter, **core)
        self.eval_max_iter = eval_max_iter  # builds eval_options
        if learnable_alpha:
            s = (self.schedule[0] - _ALPHA_LO) / (_ALPHA_HI - _ALPHA_LO)
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(s / (1.0 - s))))
        else:
            self.register_parameter("alpha_logit", None)
        self.stats: dict = {"forward": None, "backward": None}

    @property
    def max_iter(self) -> int:
        return self.options.max_iter

    @max_iter.setter
    def max_iter(self, value: int) -> None:
        """Validated, and the core options rebuilt (they hold the iteration limit)."""
        self.options = self.options.replace(max_iter=V.positive_int(value, "max_iter"))
        self.eval_max_iter = self._eval_max_iter

    @property
    def eval_max_iter(self) -> int | None:
        return self._eval_max_iter

    @eval_max_iter.setter
    def eval_max_iter(self, value: int | None) -> None:
        """Validated, and the eval-mode core options rebuilt (once, not on every eval forward)."""
        self._eval_max_iter = None if value is None else V.positive_int(value, "eval_max_iter")
        self.eval_options = self.options if value is None else self.options.replace(max_iter=self._eval_max_iter)

    @property
    def alpha(self):
        """The relaxation: a tensor in (0, 1) if learnable, the float (or schedule tuple) otherwise."""
        if self.learnable_alpha:
            return _ALPHA_LO + (_ALPHA_HI - _ALPHA_LO) * torch.sigmoid(self.alpha_logit)
        return self.schedule if self.scheduled else self.schedule[0]

    def steps(self) -> int:
        """The number of iterations of the current mode (``max_iter``, or ``eval_max_iter`` in eval mode)."""
        return self.max_iter if (self.training or self.eval_max_iter is None) else self.eval_max_iter

    def relaxed(self, z: torch.Tensor, x=None) -> torch.Tensor:
        """R_a(z) = a z + (1 - a) T(z, x) with a = the first alpha of the schedule."""
        a = _alpha_at(self.alpha, 0)
        return a * z + (1 - a) * self.operator(z, x)

    def _init(self, x, z0):
        return cells.initial_state(self.operator, x, z0=z0, where="PicardIteration")

    def forward(self, x=None, z0: torch.Tensor | None = None) -> torch.Tensor:
        z0 = self._init(x, z0)
        if self.backward == "unrolled":
            out = relaxed_picard(self.operator, z0, x, alpha=self.alpha, max_iter=self.steps(), tol=self.tol)
            self.stats = {"forward": out.stats, "backward": None}
            return out.z
        stats: dict = {}
        # The dict is shared with the backward hook, which fills stats["backward"] later.
        self.stats = stats
        options = self.options if (self.training or self.eval_max_iter is None) else self.eval_options
        return deq_solve(lambda w: self.relaxed(w, x), z0, options=options, stats=stats)

    @torch.no_grad()
    def trace(self, x=None, z0: torch.Tensor | None = None, *, max_iter: int | None = None) -> Unrolling:
        """The run of ``max_iter`` steps (default: the mode's N) without gradient, with its iterates
        ``z_0..z_N`` and residual trace: the engine's ``(z, stats, iterates)``."""
        z0 = self._init(x, z0)
        n = self.steps() if max_iter is None else max_iter
        return relaxed_picard(self.operator, z0, x, alpha=self.alpha, max_iter=n, tol=None, return_iterates=True,
                              return_trace=True)

    def extra_repr(self) -> str:
        a = f"{float(self.alpha.detach()):.3f} (learnable)" if self.learnable_alpha else (
            f"schedule[{len(self.schedule)}]" if self.scheduled else f"{self.schedule[0]}")
        return (f"alpha={a}, max_iter={self.max_iter}, eval_max_iter={self.eval_max_iter}, tol={self.tol}, "
                f"backward={self.backward!r}")


IterativeOperator = PicardIteration  # the paper's name for the general construction


@dataclass
class ConvergenceCheck:
    """The paper's convergence condition for relaxed Picard iteration of T at a point z.

    q            local Lipschitz constant of T in z: spectral norm ||J_T(z)||_2 (per sample or global)
    banach_rate  a + (1 - a) q, the guaranteed contraction factor (2) where it is < 1
    local_rate   spectral radius of a I + (1 - a) J_T(z): the asymptotic rate of (1) near z
    contractive  banach_rate < 1 (T is a contraction: Banach's theorem applies)
    convergent   local_rate < 1 (the relaxed iteration converges locally)
    certified    ``iterlayers.analysis.certify_contraction`` on R_a, when available (else None)
    """

    alpha: float
    q: torch.Tensor
    banach_rate: torch.Tensor
    local_rate: torch.Tensor
    contractive: torch.Tensor
    convergent: torch.Tensor
    method: str
    certified: object = None

    def as_dict(self) -> dict:
        f = lambda t: [float(v) for v in t.reshape(-1)]  # noqa: E731
        return {"alpha": self.alpha, "q": f(self.q), "banach_rate": f(self.banach_rate),
                "local_rate": f(self.local_rate), "contractive": [bool(v) for v in self.contractive.reshape(-1)],
                "convergent": [bool(v) for v in self.convergent.reshape(-1)], "method": self.method}


class _Flattened(nn.Module):
    """View T(z, x) on z of shape S as a map of w = z.reshape(1, -1): one 'sample' for the whole state
    (a graph's node features are coupled through A^, so the contraction is a property of the whole graph)."""

    def __init__(self, op: Callable, shape: torch.Size):
        super().__init__()
        self.op, self.shape = op, shape

    def forward(self, w: torch.Tensor, x=None) -> torch.Tensor:
        return self.op(w.reshape(self.shape), x).reshape(1, -1)


class _Relaxed(nn.Module):
    def __init__(self, op: Callable, alpha: float):
        super().__init__()
        self.op, self.alpha = op, alpha

    def forward(self, z: torch.Tensor, x=None) -> torch.Tensor:
        return self.alpha * z + (1 - self.alpha) * self.op(z, x)


class _RelaxedBounded(_Relaxed):
    """R_a for an operator T that knows a global Lipschitz constant L(T) (``T.lipschitz_bound()``)."""

    def __init__(self, op: Callable, alpha: float, bound: float):
        super().__init__(op, alpha)
        self._bound = bound

    def lipschitz_bound(self) -> float:
        """a + (1 - a) L(T): a Lipschitz constant of R_a (triangle inequality)."""
        return self.alpha + (1 - self.alpha) * self._bound


def check_convergence(operator: Callable, z: torch.Tensor, x=None, *, alpha: float = 0.0, scope: str = "sample",
                      method: str = "power", max_iter: int = 100, tol: float = 1e-4) -> ConvergenceCheck:
    """Measure the paper's convergence conditions for iteration (1) of ``operator`` at ``z`` (App. A).

    ``scope="sample"`` treats the first dim of ``z`` as a batch (one estimate per sample, the operator must act
    sample-wise); ``scope="global"`` treats the whole tensor as one state (graphs: nodes are coupled).
    ``method`` is "power" (matrix-free power iteration) or "dense" (exact, small states only). The spectral
    estimates come from ``iterlayers.analysis`` (``jacobian_norm``, ``spectral_radius``,
    ``certify_contraction``).
    """
    if scope not in ("sample", "global"):
        raise ValidationError(f"scope must be 'sample' or 'global', got {scope!r}")
    if method not in ("power", "dense"):
        raise ValidationError(f"method must be 'power' or 'dense', got {method!r}")
    validate_schedule([alpha], name="alpha")
    op = operator
    zz = z.detach()
    if scope == "global":
        op = _Flattened(operator, z.shape)
        zz = zz.reshape(1, -1)
    kw = {"method": method}
    if method == "power":
        kw.update(max_iter=max_iter, tol=tol)
    q = _value(analysis.jacobian_norm(op, zz, x, **kw))
    local = _value(analysis.spectral_radius(_Relaxed(op, alpha), zz, x, **kw))
    banach = alpha + (1 - alpha) * q
    bound = cells.lipschitz_bound(operator)
    relaxed = _Relaxed(op, alpha) if bound is None else _RelaxedBounded(op, alpha, bound)
    ckw = {"method": method} if method == "dense" else {"method": "power", "tol": tol, "max_iter": max_iter}
    certified = analysis.certify_contraction(relaxed, zz, x, samples=0, **ckw)
    return ConvergenceCheck(alpha=float(alpha), q=q, banach_rate=banach, local_rate=local, contractive=banach < 1,
                            convergent=local < 1, method=method, certified=certified)


def _value(est) -> torch.Tensor:
    v = getattr(est, "value", est)
    return torch.as_tensor(v).detach().reshape(-1)
