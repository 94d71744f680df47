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

Training procedure of the paper (PIGN, Sec. 5.1; the transformer, Sec. 5.2): a *fixed* number N of
iterations with a schedule a_1..a_N (uniform in the main experiments), gradients by backpropagation through
all N iterations (``gradient="unrolled"``); evaluation may use a different schedule/length
(``eval_num_iter``). The library's equilibrium machinery is available as well: ``gradient`` in
{"implicit", "phantom", "jfb"} solves the fixed point of R_a with the core solvers (``iterlayers.deq_solve``)
and differentiates it implicitly, and ``tol`` turns the fixed count into an adaptive one (stop when the
relative residual ||z_{n+1} - z_n|| / ||z_{n+1}|| falls below ``tol``, at most ``num_iter`` steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .schedules import validate_schedule

__all__ = [
    "PicardStats",
    "relaxed_picard",
    "PicardIteration",
    "IterativeOperator",
    "ConvergenceCheck",
    "check_convergence",
    "observed_rate",
    "GRADIENT_MODES",
]

GRADIENT_MODES = ("unrolled", "implicit", "phantom", "jfb")
_EPS = 1e-12
_ALPHA_LO, _ALPHA_HI = 1e-3, 0.999  # range of a learnable alpha: strictly inside (0, 1) in float32 too


@dataclass
class PicardStats:
    """What one run of relaxed Picard iteration did.

    ``residuals[n]`` is the largest (over the batch) relative step ||z_{n+1} - z_n|| / ||z_{n+1}|| of step n;
    ``abs_residual`` / ``rel_residual`` are the per-sample values of the last step.
    """

    nstep: int
    residuals: list[float] = field(default_factory=list)
    abs_residual: torch.Tensor | None = None
    rel_residual: torch.Tensor | None = None
    converged: bool = False


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1) if t.dim() > 0 else t.abs().reshape(1)


def _alpha_at(alpha, n: int):
    if isinstance(alpha, (tuple, list)):
        return alpha[min(n, len(alpha) - 1)]
    return alpha


def relaxed_picard(operator: Callable, z0: torch.Tensor, x=None, *, alpha=0.5, num_iter: int = 10,
                   tol: float | None = None, return_trace: bool = False):
    """Run iteration (1) from ``z0`` for ``num_iter`` steps (fewer if ``tol`` is met); differentiable.

    ``alpha`` is a float, a 0-dim tensor (e.g. a learnable one) or a sequence a_1..a_N (a schedule; its last
    value is reused past its end). Returns ``(z, stats)`` or ``(z, stats, trace)`` with ``trace`` the list
    of iterates z_0..z_n (detached).
    """
    if not isinstance(num_iter, int) or num_iter < 0:
        raise ValueError(f"num_iter must be a non-negative int, got {num_iter!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be None or a positive float, got {tol!r}")
    if isinstance(alpha, (tuple, list)):
        alpha = validate_schedule(alpha, name="alpha")
    elif not isinstance(alpha, torch.Tensor):
        validate_schedule([alpha], name="alpha")
    z = z0
    stats = PicardStats(nstep=0)
    trace = [z0.detach()] if return_trace else None
    for n in range(num_iter):
        a = _alpha_at(alpha, n)
        z_new = a * z + (1 - a) * operator(z, x)
        with torch.no_grad():
            step = _per_sample_norm(z_new - z)
            rel = step / (_per_sample_norm(z_new) + _EPS)
        stats.residuals.append(float(rel.max()))
        stats.abs_residual, stats.rel_residual = step, rel
        z = z_new
        stats.nstep = n + 1
        if return_trace:
            trace.append(z.detach())
        if tol is not None and float(rel.max()) <= tol:
            stats.converged = True
            break
    if return_trace:
        return z, stats, trace
    return z, stats


class PicardIteration(nn.Module):
    """Turn a network operator T(z, x) into the relaxed Picard iteration (1) (arXiv 2310.01618).

    Options (keyword-only):
      alpha            float in [0, 1) (uniform schedule), or a sequence a_1..a_N (a schedule; then
                       ``num_iter`` defaults to its length). Paper's PIGN sweeps alpha in 0.30..0.85.
      learnable_alpha  learn a single alpha = lo + (hi - lo) sigmoid(theta), initialised at ``alpha``, with
                       (lo, hi) = (0.001, 0.999): alpha stays inside (0, 1) even when the sigmoid saturates.
      num_iter         N, the number of iterations while training (and the step cap when ``tol`` is set).
      eval_num_iter    iterations in eval mode (default: ``num_iter``); a schedule repeats its last value.
      tol              None: exactly N steps. A float: stop when the relative residual <= tol.
      gradient         "unrolled" (backprop through the N steps, the paper's procedure), or "implicit",
                       "phantom", "jfb": fixed point of R_a by the core ``iterlayers.deq_solve``.
      solver           core solver for the non-unrolled modes ("picard", "anderson", "broyden").
      solver_options   extra keyword options for ``deq_solve``.
    """

    def __init__(self, operator: Callable, *, alpha: float | Sequence[float] = 0.5, learnable_alpha: bool = False,
                 num_iter: int | None = None, eval_num_iter: int | None = None, tol: float | None = None,
                 gradient: str = "unrolled", solver: str = "picard", solver_options: dict | None = None):
        super().__init__()
        if not callable(operator):
            raise TypeError(f"operator must be callable as operator(z, x), got {type(operator).__name__}")
        self.operator = operator
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self.schedule = validate_schedule([alpha], name="alpha")
            scheduled = False
        else:
            self.schedule = validate_schedule(alpha, name="alpha")
            scheduled = True
        if not isinstance(learnable_alpha, bool):
            raise TypeError(f"learnable_alpha must be a bool, got {learnable_alpha!r}")
        if learnable_alpha and scheduled:
            raise ValueError("learnable_alpha=True needs a single float alpha, not a schedule")
        if learnable_alpha and not (_ALPHA_LO < self.schedule[0] < _ALPHA_HI):
            raise ValueError(f"learnable_alpha=True needs an initial alpha in ({_ALPHA_LO}, {_ALPHA_HI}), "
                             f"got {self.schedule[0]}")
        if num_iter is None:
            num_iter = len(self.schedule) if scheduled else 10
        if not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"num_iter must be a positive int, got {num_iter!r}")
        if eval_num_iter is not None and (not isinstance(eval_num_iter, int) or eval_num_iter < 1):
            raise ValueError(f"eval_num_iter must be None or a positive int, got {eval_num_iter!r}")
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be None or a positive float, got {tol!r}")
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if gradient != "unrolled" and scheduled:
            raise ValueError(f"gradient={gradient!r} solves a fixed point and needs a single float alpha, "
                             "not a schedule")
        if solver not in ("picard", "anderson", "broyden"):
            raise ValueError(f"solver must be one of ('picard', 'anderson', 'broyden'), got {solver!r}")
        self.scheduled = scheduled
        self.learnable_alpha = learnable_alpha
        self.num_iter, self.eval_num_iter, self.tol = num_iter, eval_num_iter, tol
        self.gradient, self.solver = gradient, solver
        self.solver_options = dict(solver_options or {})
        if learnable_alpha:
            s = (self.schedule[0] - _ALPHA_LO) / (_ALPHA_HI - _ALPHA_LO)
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(s / (1.0 - s))))
        else:
            self.register_parameter("alpha_logit", None)
        self.last_stats: PicardStats | None = None

    @property
    def alpha(self):
        """The relaxation: a tensor in (0, 1) if learnable, the float (or schedule tuple) otherwise."""
        if self.learnable_alpha:
            return _ALPHA_LO + (_ALPHA_HI - _ALPHA_LO) * torch.sigmoid(self.alpha_logit)
        return self.schedule if self.scheduled else self.schedule[0]

    def steps(self) -> int:
        return self.num_iter if (self.training or self.eval_num_iter is None) else self.eval_num_iter

    def relaxed(self, z: torch.Tensor, x=None) -> torch.Tensor:
        """R_a(z) = a z + (1 - a) T(z, x) with a = the first alpha of the schedule."""
        a = _alpha_at(self.alpha, 0)
        return a * z + (1 - a) * self.operator(z, x)

    def _init(self, x, z0):
        if z0 is not None:
            return z0
        init = getattr(self.operator, "init_state", None)
        if callable(init):
            return init(x)
        if not isinstance(x, torch.Tensor):
            raise ValueError("z0 is required when x is not a tensor and the operator has no init_state(x)")
        return torch.zeros_like(x)

    def forward(self, x=None, z0: torch.Tensor | None = None) -> torch.Tensor:
        z0 = self._init(x, z0)
        if self.gradient == "unrolled":
            z, self.last_stats = relaxed_picard(self.operator, z0, x, alpha=self.alpha, num_iter=self.steps(),
                                                tol=self.tol)
            return z
        from iterlayers import deq_solve  # the core engine; imported late so this module loads without it

        opts = dict(self.solver_options)
        opts.setdefault("atol", self.tol if self.tol is not None else 1e-6)
        opts.setdefault("rtol", 0.0)  # ``tol`` is the whole stopping rule, forward and adjoint
        opts.setdefault("on_failure", "ignore")
        core: dict = {}
        z = deq_solve(lambda w: self.relaxed(w, x), z0, solver=self.solver, backward=self.gradient,
                      max_iter=self.steps(), stats=core, **opts)
        fs = core.get("forward")
        if fs is not None:  # the core solver's own SolverStats, summarised in this module's terms
            self.last_stats = PicardStats(nstep=int(fs.nstep.max()), residuals=[float(fs.rel_residual.max())],
                                          abs_residual=fs.abs_residual, rel_residual=fs.rel_residual,
                                          converged=bool(fs.converged.all()))
        return z

    @torch.no_grad()
    def trace(self, x=None, z0: torch.Tensor | None = None, *, num_iter: int | None = None):
        """Iterates z_0..z_N (no gradient) with ``num_iter`` steps (default: the mode's N), and the stats."""
        z0 = self._init(x, z0)
        n = self.steps() if num_iter is None else num_iter
        _, stats, tr = relaxed_picard(self.operator, z0, x, alpha=self.alpha, num_iter=n, tol=None,
                                      return_trace=True)
        return tr, stats

    def extra_repr(self) -> str:
        a = f"{float(self.alpha.detach()):.3f} (learnable)" if self.learnable_alpha else (
            f"schedule[{len(self.schedule)}]" if self.scheduled else f"{self.schedule[0]}")
        return (f"alpha={a}, num_iter={self.num_iter}, eval_num_iter={self.eval_num_iter}, tol={self.tol}, "
                f"gradient={self.gradient!r}")


IterativeOperator = PicardIteration  # the paper's name for the general construction


def observed_rate(residuals: Sequence[float], *, tail: float = 0.5) -> float:
    """Empirical linear rate of a residual sequence r_n ~ C rho^n: exp of the least-squares slope of log r_n
    over the last ``tail`` fraction of the steps (ignoring exact zeros)."""
    r = [float(v) for v in residuals if v > 0 and math.isfinite(v)]
    if len(r) < 2:
        raise ValueError(f"need at least 2 positive residuals to fit a rate, got {len(r)}")
    k = max(2, int(round(len(r) * tail)))
    ys = [math.log(v) for v in r[-k:]]
    xs = list(range(len(ys)))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return math.exp(slope)


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

    def __init__(self, op: Callable, alpha: float, bound: Callable[[], float]):
        super().__init__(op, alpha)
        self._bound = bound

    def lipschitz_bound(self) -> float:
        """a + (1 - a) L(T): a Lipschitz constant of R_a (triangle inequality)."""
        return self.alpha + (1 - self.alpha) * float(self._bound())


def check_convergence(operator: Callable, z: torch.Tensor, x=None, *, alpha: float = 0.0, scope: str = "sample",
                      method: str = "power", max_iter: int = 100, tol: float = 1e-4) -> ConvergenceCheck:
    """Measure the paper's convergence conditions for iteration (1) of ``operator`` at ``z`` (App. A).

    ``scope="sample"`` treats the first dim of ``z`` as a batch (one estimate per sample, the operator must act
    sample-wise); ``scope="global"`` treats the whole tensor as one state (graphs: nodes are coupled).
    ``method`` is "power" (matrix-free power iteration) or "dense" (exact, small states only). The spectral
    estimates come from ``iterlayers.analysis`` (``spectral_norm``, ``spectral_radius``,
    ``certify_contraction``).
    """
    if scope not in ("sample", "global"):
        raise ValueError(f"scope must be 'sample' or 'global', got {scope!r}")
    if method not in ("power", "dense"):
        raise ValueError(f"method must be 'power' or 'dense', got {method!r}")
    validate_schedule([alpha], name="alpha")
    from iterlayers import analysis  # written alongside; imported late so this module loads without it

    op = operator
    zz = z.detach()
    if scope == "global":
        op = _Flattened(operator, z.shape)
        zz = zz.reshape(1, -1)
    kw = {"method": method}
    if method == "power":
        kw.update(max_iter=max_iter, tol=tol)
    q = _value(analysis.spectral_norm(op, zz, x, **kw))
    local = _value(analysis.spectral_radius(_Relaxed(op, alpha), zz, x, **kw))
    banach = alpha + (1 - alpha) * q
    bound = getattr(operator, "lipschitz_bound", None)
    relaxed = _RelaxedBounded(op, alpha, bound) if callable(bound) else _Relaxed(op, alpha)
    ckw = {"method": method} if method == "dense" else {"method": "power", "tol": tol, "max_iter": max_iter}
    certified = analysis.certify_contraction(relaxed, zz, x, samples=0, **ckw)
    return ConvergenceCheck(alpha=float(alpha), q=q, banach_rate=banach, local_rate=local, contractive=banach < 1,
                            convergent=local < 1, method=method, certified=certified)


def _value(est) -> torch.Tensor:
    v = getattr(est, "value", est)
    return torch.as_tensor(v).detach().reshape(-1)
