"""Differentiable fixed points: one function, four gradient modes, forward and reverse mode.

:func:`deq_solve` finds ``z* = f(z*, *args, **kwargs)`` without building a graph, then attaches ``z*`` to the
graph of the parameters and inputs in one of four ways (``backward=``):

- ``"implicit"``: the implicit-function theorem. With ``J = d f / d z`` at ``z*`` and incoming gradient ``g``,

      dL/d(theta, x) = u^T  d f(z*, x; theta) / d(theta, x),      u = J^T u + g,

  and the adjoint fixed point ``u`` is found matrix-free with vector-Jacobian products by any solver of
  :mod:`iterlayers.solvers` (``backward_solver``; Anderson, Picard or GMRES). Memory is that of one
  evaluation of ``f``, whatever the number of forward iterations. The backward solve reports its own
  statistics and fails loudly (per ``on_failure``) rather than returning a silently wrong gradient.
  Forward mode (``torch.autograd.forward_ad``): the tangent of ``z*`` along input/parameter tangents is
  ``t = (I - J)^{-1} b`` with ``b`` the tangent of ``f(z*, x)`` at fixed ``z*``, i.e. the fixed point of
  ``t -> J t + b``; evaluating ``f`` at the dual ``z* + eps t`` gives exactly that tangent, so ``t`` is
  solved by the same solvers (statistics in ``stats["jvp"]``) and the output ``f(z* + eps t*, x)`` carries it.
- ``"phantom"``: ``k`` damped steps ``z <- (1 - lam) z + lam f(z)`` from ``z*`` with autograd through them
  (Geng et al. 2021, "On training implicit models").
- ``"jfb"``: Jacobian-free backprop, one step ``f(z*)`` (``u = g``; Fung et al. 2022).
- ``"unrolled"``: ordinary autograd through every forward iteration of the damped Picard loop (the
  reference; memory grows with the number of iterations). It is plain autograd, so forward mode, double
  backward and gradients to ``z0`` are those of the iteration.

For ``phantom`` and ``jfb`` the JVP (and a second derivative) is that of what their backward differentiates
(the steps from ``z*``, with ``z*`` held constant): an approximation, like their gradient. Second-order
derivatives through ``implicit`` (``create_graph=True``) are refused with :class:`UnsupportedError`, as are
``torch.func`` transforms: neither is answered wrongly.

The gradient of ``"implicit"`` is exact at an exact fixed point; tests compare it with the dense formula
``(I - J)^{-T}`` and with ``torch.autograd.gradcheck``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from . import _validate as V
from .cells import submodules
from .errors import (ConvergenceWarning, NonFiniteInputError, OptionTypeError, ShapeMismatchError, UnsupportedError,
                     ValidationError)
from .hoist import cell_fingerprint, input_signature, split_cell
from .solvers import (CONVERGED, LoopOptions, SolverStats, StateSpec, make_chain, make_solver,
                      report_failure, run_loop, solve_chain)
from .unrolling import unroll

__all__ = ["deq_solve", "DEQOptions", "BACKWARD_MODES", "STOPPING", "implicit_backward", "GradientMode",
           "ImplicitGradient", "PhantomGradient", "JFBGradient", "UnrolledGradient", "ShineGradient", "GRADIENT_MODES"]

BACKWARD_MODES = ("implicit", "phantom", "jfb", "unrolled", "shine")  # the names of GRADIENT_MODES
STOPPING = ("auto", "per_sample", "joint")

#: Defaults of the adjoint (and JVP) solve when ``backward_*`` is not given: the forward tolerance, but never
#: looser than this, and the forward iteration limit, but never fewer than ``ADJOINT_MIN_ITER``.
ADJOINT_MAX_TOL = 1e-5
ADJOINT_MIN_ITER = 50

_WHERE = "DEQOptions"


def _tolerance(value, name, *, high=None):
    return V.in_range(value, name, where=_WHERE, low=0.0, high=high, high_open=high is not None)


# ----------------------------------------------------------------------------------------------------------
# Gradient modes as values: each attaches a state found without a graph to the graph of inputs and parameters.


class _Solve:
    """What a gradient mode needs from the solve it attaches: the flat map, the forward options, the cell's
    traits (running statistics, compiled parts), the statistics dict, and which AD modes are active."""

    __slots__ = ("f_flat", "options", "traits", "stats", "grad_needed", "dual", "stopping", "adjoint_start",
                 "unflatten")

    def __init__(self, f_flat, options, traits, stats, grad_needed, dual, stopping, adjoint_start=None,
                 unflatten=None):
        self.f_flat, self.options, self.traits, self.stats = f_flat, options, traits, stats
        self.grad_needed, self.dual, self.stopping = grad_needed, dual, stopping
        # A flat initial guess of z*'s adjoint (a warm start), and the map back to the state's structure.
        self.adjoint_start, self.unflatten = adjoint_start, unflatten


class GradientMode:
    """How :func:`deq_solve` attaches the fixed point ``z*`` (found without a graph) to the graph.

    One method, :meth:`attach` ``(solve, z) -> output``: ``z`` is a flat ``[B, N]`` state without a graph and
    the output is a flat state with one (``f(z)`` for the implicit mode, whose hook turns the incoming gradient
    into the implicit one). A mode is a frozen value: build it once (``ImplicitGradient(solver="gmres")``,
    ``PhantomGradient(steps=3)``) and pass it as ``backward=``; the keyword shortcuts (``backward="phantom",
    phantom_steps=3``) build the same values. ``solves_forward`` is False for :class:`Unrolled`, whose forward
    pass *is* the differentiable iteration (it attaches ``z0``, not ``z*``).
    """

    name: str = ""
    solves_forward: bool = True

    def attach(self, solve: _Solve, z: torch.Tensor, record=None) -> torch.Tensor:
        """``z`` (flat, no graph) attached to the graph; ``record(stats)`` receives the statistics of a solve
        the attachment runs later (the implicit adjoint; default: ``solve.stats["backward"] = stats``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ImplicitGradient(GradientMode):
    r"""The implicit-function theorem: ``dL/d(theta, x) = u^T df/d(theta, x)`` with ``u = J^T u + g``.

    The adjoint fixed point is solved matrix-free (vector-Jacobian products) by ``solver`` in per-sample
    units (:func:`implicit_backward`); forward-mode tangents by the tangent solve ``t = J t + b``. ``None``
    tolerances / limit follow the forward solve: ``min(forward, 1e-5)`` (raised to the dtype's resolution,
    :meth:`tolerances`) and ``max(forward max_iter, 50)`` (:meth:`limit`). Tolerances are relative to each
    sample's incoming gradient, so they must be below 1, and do not depend on the scale of the loss (a
    mean-reduced loss divides every ``g`` by the batch size; an absolute tolerance would then accept ``u = 0``).
    Statistics: ``stats["backward"]`` / ``stats["jvp"]``.

    ``adaptive`` (default True): a ``None`` tolerance is also tied to the forward residual actually reached,
    ``rho = max_i ||f(z_i) - z_i|| / ||f(z_i)||``: it becomes ``min(default, max(rho, 16 eps))``, never looser
    than the default. Why (derived, first order): ``z`` off the fixed point by ``e = (I - J)^{-1} r`` changes
    the gradient by a relative amount of the order of ``rho`` (times the conditioning of ``I - J`` and the
    curvature of ``f``), and an adjoint residual ``tau`` (relative to ``g``) changes it by the order of
    ``tau`` (times the conditioning of ``I - J^T``); ``tau = rho`` balances the two, so a forward pass solved
    to 1e-10 (a gradient check) gets a 1e-10 adjoint instead of the fixed 1e-5. The tolerance used is
    ``stats["backward"].info["adjoint_tolerance"]``.

    ``fallback`` (default None): a gradient mode value used for the samples whose adjoint solve fails
    (:class:`PhantomGradient` or :class:`JFBGradient`, or their names), instead of ``on_failure``. Opt-in and
    never silent: ``stats["backward"].info["fallback"]`` names the mode and the samples (``info
    ["fallback_samples"]`` counts them) and a ``ConvergenceWarning`` says so (unless ``on_failure="ignore"``).
    Its adjoint at the fixed point (derived): JFB ``u = g``; phantom with ``k`` steps and damping ``lam``
    ``u = lam sum_{j<k} ((1 - lam) I + lam J^T)^j g``, i.e. ``k`` damped adjoint steps from 0, which equals the
    gradient of :class:`PhantomGradient` when ``z*`` is an exact fixed point (every phantom step is then
    evaluated at ``z*``). When the forward solve coupled the rows (joint stopping) the whole batch falls back.
    """

    solver: object = "anderson"
    atol: float | None = None
    rtol: float | None = None
    max_iter: int | None = None
    solver_options: dict | None = None
    adaptive: bool = True
    fallback: object = None
    name = "implicit"

    def __post_init__(self):
        where = "Implicit"
        V.boolean(self.adaptive, "adaptive", where=where)
        if isinstance(self.fallback, str):
            V.choice(self.fallback, "fallback", ("phantom", "jfb"), where=where)
            object.__setattr__(self, "fallback", GRADIENT_MODES[self.fallback]())
        elif self.fallback is not None and not isinstance(self.fallback, (PhantomGradient, JFBGradient)):
            raise OptionTypeError(f"{where}: fallback must be None, 'phantom', 'jfb', a PhantomGradient or a "
                                  f"JFBGradient, got {self.fallback!r}")
        if self.solver_options is not None:
            if not isinstance(self.solver_options, Mapping):
                raise OptionTypeError(f"{where}: solver_options must be a dict or None, got "
                                      f"{type(self.solver_options).__name__}")
            object.__setattr__(self, "solver_options", dict(self.solver_options))
        for name in ("atol", "rtol"):
            if getattr(self, name) is not None:
                # Relative to the incoming gradient: a value >= 1 accepts the right-hand side (JFB) at once.
                V.in_range(getattr(self, name), name, where=where, low=0.0, high=1.0, high_open=True)
        if self.atol == 0 and self.rtol == 0:
            raise ValidationError(f"{where}: atol and rtol are both 0: the adjoint solve could never be declared "
                                  "converged")
        if self.max_iter is not None and V.non_negative_int(self.max_iter, "max_iter", where=where) == 0:
            raise ValidationError(
                f"{where}: max_iter=0 would return the right-hand side as the adjoint, i.e. the JFB gradient "
                "reported as implicit; use backward='jfb' (JFBGradient()) for that, or a positive limit"
            )
        object.__setattr__(self, "_solver", make_solver(self.solver, self.solver_options))

    @property
    def solver_value(self):
        """The adjoint (and tangent) solver, built once."""
        return self._solver

    def tolerances(self, forward_atol: float, forward_rtol: float, dtype: torch.dtype,
                   forward_residual: float | None = None) -> tuple[float, float]:
        """``(atol, rtol)`` of the adjoint / tangent solve in ``dtype``: the given values, or the defaults
        ``min(forward, ADJOINT_MAX_TOL)`` raised to the resolution ``eps`` of ``dtype`` (reachable in bfloat16
        and float16, where ``1e-5`` is not; no change in float32 and float64). With ``adaptive`` and the
        forward's relative residual ``forward_residual`` (``rho``), a default is lowered to ``max(rho, 16 eps)``
        where that is smaller (see the class docstring)."""
        eps = torch.finfo(dtype).eps
        atol = self.atol if self.atol is not None else max(min(forward_atol, ADJOINT_MAX_TOL), eps)
        if self.rtol is not None:
            rtol = self.rtol
        else:
            rtol = min(forward_rtol, ADJOINT_MAX_TOL)
            rtol = max(rtol, eps) if rtol > 0 else 0.0
        if self.adaptive and forward_residual is not None and math.isfinite(forward_residual):
            balanced = max(forward_residual, 16 * eps)
            if self.atol is None:
                atol = min(atol, balanced)
            if self.rtol is None and rtol > 0:
                rtol = min(rtol, balanced)
        return atol, rtol

    def limit(self, forward_max_iter: int) -> int:
        return max(forward_max_iter, ADJOINT_MIN_ITER) if self.max_iter is None else self.max_iter

    def attach(self, solve: _Solve, zf: torch.Tensor, record=None) -> torch.Tensor:
        o, f_flat, stats = solve.options, solve.f_flat, solve.stats
        t = None
        if solve.dual:
            with torch.no_grad(), _frozen_statistics(solve.traits.stat_modules):
                b = fwAD.unpack_dual(f_flat(zf)).tangent
                if b is not None:
                    t, stats["jvp"] = _tangent_solve(f_flat, zf, b, self, o, _forward_residual(stats),
                                                     _resolution_dtype(stats, b.dtype))
        z_leaf = zf.detach().requires_grad_(solve.grad_needed)
        fz = f_flat(z_leaf if t is None else fwAD.make_dual(z_leaf, t))
        if not (solve.grad_needed and fz.requires_grad):
            return fz
        inside = [False]
        mode = self

        def hook(grad):
            # The adjoint solve backpropagates through fz itself (vector-Jacobian products), which calls this
            # hook again: those inner calls must pass the gradient through unchanged.
            if inside[0] or grad is None:
                return grad
            if torch.is_grad_enabled():
                raise UnsupportedError(
                    "double backward (create_graph=True: Hessian-vector products, gradient penalties) through "
                    "backward='implicit' is not supported: the adjoint solve is not itself differentiated. Use "
                    "backward='unrolled' (plain autograd through the iterations, exact for the truncated "
                    "iteration), or compute second derivatives of an explicit reference"
                )
            inside[0] = True
            adapt = mode.adaptive and (mode.atol is None or mode.rtol is None)  # else rho is not needed
            atol, rtol = mode.tolerances(o.atol, o.rtol, _resolution_dtype(stats, fz.dtype),
                                         _forward_residual(stats) if adapt else None)
            try:
                start = solve.adjoint_start if record is None else None  # the warm start is z*'s
                u, bst = implicit_backward(
                    fz, z_leaf, grad, solver=mode.solver_value, atol=atol, rtol=rtol,
                    max_iter=mode.limit(o.max_iter), divergence_ratio=o.divergence_ratio,
                    on_failure="ignore" if mode.fallback is not None else o.on_failure, check_every=o.check_every,
                    u0=start,
                )
                bst.info["adjoint_tolerance"] = (atol, rtol)
                bst.info["adjoint_warm_start"] = start is not None
                if mode.fallback is not None and bst.status != CONVERGED:
                    u = mode._fall_back(fz, z_leaf, grad, u, bst, solve)
            finally:
                inside[0] = False
            if record is None:
                stats["backward"] = bst
                if solve.unflatten is not None:
                    stats["adjoint"] = solve.unflatten(u.detach())
            else:
                record(bst)
            return u

        fz.register_hook(hook)
        return fz

    def _fall_back(self, fz, z_leaf, grad, u, bst, solve):
        """``u`` with the rows whose adjoint failed replaced by the fallback mode's adjoint (all rows when the
        forward solve was joint, i.e. the rows are coupled); recorded in ``bst.info`` and warned about."""
        failed = ~bst.converged
        forward = solve.stats.get("forward")
        if forward is None or str(forward.info.get("stopping", "")).startswith("joint"):
            failed = torch.ones_like(failed)  # coupled rows: one row's failure spoils the others
        fb = self.fallback
        if isinstance(fb, JFBGradient):
            v = grad
        else:  # k damped adjoint steps from 0: the phantom gradient's adjoint at the fixed point
            v = torch.zeros_like(grad)
            for _ in range(fb.steps):
                (vjp,) = torch.autograd.grad(fz, z_leaf, v, retain_graph=True)
                v = (1 - fb.damping) * v + fb.damping * (vjp + grad)
        u = torch.where(failed.unsqueeze(1), v, u)
        samples = failed.nonzero().flatten().tolist()
        bst.info["fallback"] = {"mode": fb.name, "samples": samples}
        bst.info["fallback_samples"] = len(samples)
        if solve.options.on_failure != "ignore":
            warnings.warn(
                f"backward solve ({bst.solver}) did not converge on {len(samples)} of {bst.batch_size} samples "
                f"(status {bst.status}); the {fb.name} gradient was used for samples {samples[:8]}"
                f"{'...' if len(samples) > 8 else ''} (ImplicitGradient(fallback=...); recorded in "
                f"stats['backward'].info['fallback'])",
                ConvergenceWarning, stacklevel=2,
            )
        return u


def _resolution_dtype(stats, dtype: torch.dtype) -> torch.dtype:
    """The dtype that bounds what the adjoint / tangent residuals resolve: the cell's output dtype under
    autocast (recorded by the forward loop as ``info["cell_dtype"]``), else the state's."""
    st = stats.get("forward") if stats is not None else None
    name = None if st is None else st.info.get("cell_dtype")
    return dtype if name is None else getattr(torch, name.rsplit(".", 1)[-1])


def _forward_residual(stats) -> float | None:
    """The largest relative residual of the forward solve's finite samples (``None`` without one)."""
    st = stats.get("forward") if stats is not None else None
    if st is None or st.batch_size == 0:
        return None
    rel = st.rel_residual
    rel = rel[torch.isfinite(rel)]
    return float(rel.max()) if rel.numel() else None


@dataclass(frozen=True)
class PhantomGradient(GradientMode):
    """``steps`` damped steps ``z <- (1 - damping) z + damping f(z)`` from ``z*`` with autograd through them
    (Geng et al. 2021, "On training implicit models"): an approximation of the implicit gradient. Running
    statistics are those of the first step."""

    steps: int = 5
    damping: float = 0.5
    name = "phantom"

    def __post_init__(self):
        V.positive_int(self.steps, "steps", where="Phantom")
        V.in_range(self.damping, "damping", where="Phantom", low=0.0, high=1.0, low_open=True)

    def attach(self, solve: _Solve, zf: torch.Tensor, record=None) -> torch.Tensor:
        z = zf
        for k in range(self.steps):
            z = (1 - self.damping) * z + self.damping * solve.f_flat(z)
            if k == 0:
                after_first = _snapshot(solve.traits.stat_modules)
        _rebind(after_first)
        return z


@dataclass(frozen=True)
class JFBGradient(GradientMode):
    """Jacobian-free backprop: one differentiable step ``f(z*)`` (``u = g``; Fung et al. 2022)."""

    name = "jfb"

    def attach(self, solve: _Solve, zf: torch.Tensor, record=None) -> torch.Tensor:
        return solve.f_flat(zf)


@dataclass(frozen=True)
class ShineGradient(GradientMode):
    r"""SHINE: the adjoint from the forward Broyden solve's inverse-Jacobian estimate (Ramzi et al., "SHINE:
    SHaring the INverse Estimate from the forward pass for bi-level optimization and implicit models", ICLR
    2022). Broyden keeps ``H ~ (J - I)^{-1}`` (the inverse Jacobian of ``g(z) = f(z) - z``); the adjoint
    ``u = (I - J^T)^{-1} g`` is then estimated as ``u = -H^T g``, with no vector-Jacobian product at all.

    ``H`` is only accurate in the directions the forward iterations explored, so this is an approximation, and
    it is reported as one: ``stats["backward"]`` holds the *measured* adjoint residual of ``u`` (one
    vector-Jacobian product, ``||J^T u + g - u|| / ||g||`` per sample, in ``abs_residual``) against the
    implicit mode's default tolerances; its ``status`` says whether the estimate happens to meet them.
    ``refine`` > 0 runs that many adjoint iterations (Anderson) from the estimate, towards the exact implicit
    gradient. Requires ``solver="broyden"`` (one solver, not a chain). A sample frozen by per-sample stopping
    before Broyden's last restart holds the estimate it had when it stopped.
    """

    refine: int = 0
    name = "shine"

    def __post_init__(self):
        V.non_negative_int(self.refine, "refine", where="Shine")
        object.__setattr__(self, "_refiner", make_solver("anderson", None))

    def attach(self, solve: _Solve, zf: torch.Tensor, record=None) -> torch.Tensor:
        if solve.dual:
            raise UnsupportedError("forward-mode AD (jvp) through backward=ShineGradient is not supported; use "
                                   "ImplicitGradient (its tangent solve is exact)")
        o, stats = solve.options, solve.stats
        state = stats["forward"].state
        z_leaf = zf.detach().requires_grad_(solve.grad_needed)
        fz = solve.f_flat(z_leaf)
        if not (solve.grad_needed and fz.requires_grad):
            return fz
        inside = [False]
        refine = self.refine
        refiner = self._refiner

        def hook(grad):
            if inside[0] or grad is None:
                return grad
            if torch.is_grad_enabled():
                raise UnsupportedError("double backward through backward=ShineGradient is not supported")
            inside[0] = True
            try:
                k = int(state["k"])
                u = -o.forward_solver.apply_inverse_t(state, grad)
                atol, rtol = o.adjoint_tolerances(_resolution_dtype(stats, fz.dtype))
                if refine:
                    u, bst = implicit_backward(fz, z_leaf, grad, solver=refiner, atol=atol, rtol=rtol,
                                               max_iter=refine, on_failure="ignore",
                                               divergence_ratio=o.divergence_ratio, u0=u)
                    bst.info["gradient"] = f"shine (refined by {refine} anderson iterations)"
                else:
                    (vjp,) = torch.autograd.grad(fz, z_leaf, u, retain_graph=True)
                    scale = grad.norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
                    res = (vjp + grad - u).norm(dim=1) / scale
                    w = (u.norm(dim=1) / scale)
                    n = grad.shape[0]
                    bst = SolverStats.of_final_iterate(
                        "shine", res, w, nstep=torch.zeros(n, dtype=torch.long, device=grad.device),
                        diverged=~torch.isfinite(res), best=torch.zeros(n, dtype=torch.bool, device=grad.device),
                        nfe=1, atol=atol, rtol=rtol, max_iter=0, info={"gradient": "shine (estimate)"},
                    )
                bst.info["broyden_pairs"] = k
            finally:
                inside[0] = False
            if record is None:
                stats["backward"] = bst
            else:
                record(bst)
            return u

        fz.register_hook(hook)
        return fz


@dataclass(frozen=True)
class UnrolledGradient(GradientMode):
    """Ordinary autograd through every forward iteration of the damped Picard loop from ``z0`` (the reference;
    memory grows with the number of iterations). Its forward statistics are those of that loop."""

    damping: float = 1.0
    name = "unrolled"
    solves_forward = False

    def __post_init__(self):
        V.in_range(self.damping, "damping", where="Unrolled", low=0.0, high=1.0, low_open=True)

    def attach(self, solve: _Solve, z0f: torch.Tensor, record=None) -> torch.Tensor:
        o = solve.options
        z, st = _unrolled(
            solve.f_flat, z0f, stopping=solve.stopping, damping=self.damping, atol=o.atol, rtol=o.rtol,
            max_iter=o.max_iter, return_trace=o.return_trace, stat_modules=solve.traits.stat_modules,
            keep=o.kept_iterations,
        )
        if o.trajectory:  # the iterates of the differentiable loop are already in the graph
            solve.stats["trajectory"] = {k: st.iterates[k] for k in o.trajectory_iterations(int(st.nstep.max()))}
        st.info["stopping"] = solve.stopping
        solve.stats["forward"] = st
        if st.status != CONVERGED:
            report_failure(st, o.on_failure)
        return z


#: The gradient mode values, by the names ``backward=`` accepts.
GRADIENT_MODES = {"implicit": ImplicitGradient, "phantom": PhantomGradient, "jfb": JFBGradient,
                  "unrolled": UnrolledGradient, "shine": ShineGradient}


@dataclass(frozen=True)
class DEQOptions:
    """Every option of a differentiable fixed-point solve, with its default; validated when created.

    :func:`deq_solve` and :class:`iterlayers.DEQ` take these as keyword arguments (or a ready value as
    ``options=``), so the list, the defaults and the checks live here once. The solvers are built and
    validated once, here (``forward_solver``, ``adjoint_solver``), not on every forward pass.

    Attributes:
        solver: forward solver name (``"anderson"``, ``"broyden"``, ``"picard"``, ``"gmres"``) or instance, or
            a list of them: a fallback chain (:func:`iterlayers.solvers.solve_chain`; the samples a solver fails
            on continue with the next from their best iterate, ``stats["forward"].info["finished_by"]`` says which
            solver finished each sample; each solver has its own ``max_iter``).
        backward: the gradient mode: a :class:`GradientMode` value (:class:`Implicit`, :class:`Phantom`,
            :class:`JFB`, :class:`Unrolled`) or its name (one of :data:`BACKWARD_MODES`), which builds the value
            from the keyword fields below (``backward_*``, ``phantom_*``, ``unrolled_damping``); with a value,
            those fields must stay at their defaults. The value used is :attr:`gradient`.
        stopping: ``"per_sample"`` (a converged sample is frozen and the cell then runs on the active rows:
            only valid when samples are independent), ``"joint"`` (every row iterates until all have
            converged, the cell always sees the full batch: for cells that couple samples) or ``"auto"``
            (default): ``"joint"`` when the cell contains a batch norm that uses batch statistics or receives a
            keyword argument with a dimension of the batch size, else per-sample stopping verified against
            full-batch evaluations (the loop's ``"verify"``), falling back to joint when the rows turn out
            coupled. A ``torch.compile``'d cell is always evaluated on the whole batch (frozen rows in place),
            so it sees one shape.
        atol, rtol, max_iter: forward stopping rule ``||f(z) - z|| <= atol + rtol ||f(z)||`` and iteration
            limit.
        on_failure: ``"raise"``, ``"warn"`` or ``"ignore"`` when a solve (forward, backward or JVP) fails.
        return_trace: record per-iteration residuals in ``stats["forward"].trace``.
        solver_options: options of the forward solver (e.g. ``{"m": 6}`` for Anderson).
        backward_solver, backward_atol, backward_rtol, backward_max_iter, backward_solver_options: the same
            for the adjoint solve of ``backward="implicit"`` (and the tangent solve of its JVP). Their
            tolerances are *relative* to each sample's incoming gradient (tangent), so they must be below 1
            (at 1 the right-hand side itself, i.e. the JFB gradient, would pass). ``None`` (default) means
            ``min(forward value, 1e-5)`` for the tolerances (but not below the resolution of the state's
            dtype, e.g. 7.8e-3 in bfloat16: :meth:`adjoint_tolerances`) and ``max(max_iter, 50)`` for the
            limit: a loose or zero forward setting never degenerates the implicit gradient;
            ``backward_max_iter=0`` is refused (it is ``backward="jfb"``).
        backward_adaptive: default tolerances also follow the forward residual reached (never looser; see
            :class:`ImplicitGradient`); False: the fixed defaults above.
        backward_fallback: ``None`` (default), ``"phantom"`` (with ``phantom_steps`` / ``phantom_damping``) or
            ``"jfb"``: the gradient used, recorded and warned about, for samples whose adjoint solve fails.
        phantom_steps, phantom_damping: ``k`` and ``lambda`` of ``backward="phantom"``.
        unrolled_damping: damping of the Picard loop of ``backward="unrolled"``.
        divergence_ratio: a sample whose residual exceeds this multiple of its initial residual (or gets NaN/Inf)
            is declared diverged (forward, adjoint and tangent solves; see :mod:`iterlayers.solvers._loop`).
        hoist: compute the part of ``f`` that does not depend on ``z`` once per forward solve instead of once
            per iteration (:mod:`iterlayers.hoist`); results are unchanged.
        trajectory: forward iterations ``k`` (a tuple), or a count ``n`` (an int: ``k_i = ceil(i N / n)``,
            ``i = 1..n``, evenly spaced over the ``N`` iterations the solve took; every iterate is kept until
            ``N`` is known), whose state is kept and attached to the graph by the same gradient
            mode as ``z*`` (fixed-point correction / trajectory supervision): ``stats["trajectory"]`` maps each
            ``k`` to that state (an iteration the solve did not reach gives ``z*``'s state); the implicit mode's
            adjoint statistics of state ``k`` go to ``stats["trajectory_backward"][k]``.
        check_every: the host reads convergence once every ``check_every`` iterations (forward, adjoint and
            tangent solves) instead of every iteration: no host synchronisation inside those iterations, for
            GPUs (a sync stalls the launch queue). The whole batch is evaluated each iteration with converged
            rows held in place, so per-sample statistics and results are those of per-sample stopping, and rows
            a coupled cell moves again iterate again (no verification needed); the cost is up to
            ``check_every - 1`` iterations in which no row moves. Default 1 (the CPU-friendly sliced loop).
    """

    solver: object = "anderson"
    backward: object = "implicit"
    stopping: str = "auto"
    atol: float = 1e-5
    rtol: float = 1e-5
    max_iter: int = 50
    on_failure: str = "warn"
    return_trace: bool = False
    solver_options: dict | None = None
    backward_solver: object = "anderson"
    backward_atol: float | None = None
    backward_rtol: float | None = None
    backward_max_iter: int | None = None
    backward_solver_options: dict | None = None
    backward_adaptive: bool = True
    backward_fallback: str | None = None
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    unrolled_damping: float = 1.0
    hoist: bool = True
    trajectory: object = ()
    divergence_ratio: float = 1e6
    check_every: int = 1

    def __post_init__(self):
        for name in ("solver_options", "backward_solver_options"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, Mapping):
                    raise OptionTypeError(f"{_WHERE}: {name} must be a dict or None, got {type(value).__name__}")
                # Own copies: a caller's dict changed later must not change a frozen value.
                object.__setattr__(self, name, dict(value))
        if not isinstance(self.backward, GradientMode):
            V.choice(self.backward, "backward", BACKWARD_MODES, where=_WHERE)
        V.choice(self.stopping, "stopping", STOPPING, where=_WHERE)
        # The forward solve's stopping rule and failure policy: one LoopOptions value, validated (and normalised)
        # by its own checks, built once here.
        loop = LoopOptions(atol=self.atol, rtol=self.rtol, max_iter=self.max_iter, on_failure=self.on_failure,
                           divergence_ratio=self.divergence_ratio, return_trace=self.return_trace,
                           check_every=self.check_every, where=_WHERE)
        for name in ("atol", "rtol", "max_iter", "divergence_ratio", "check_every"):
            object.__setattr__(self, name, getattr(loop, name))
        object.__setattr__(self, "_loop", loop)
        V.boolean(self.hoist, "hoist", where=_WHERE)
        for name in ("backward_atol", "backward_rtol"):
            if getattr(self, name) is not None:
                # Relative to the incoming gradient: a value >= 1 accepts the right-hand side (JFB) at once.
                _tolerance(getattr(self, name), name, high=1.0)
        if self.backward_atol == 0 and self.backward_rtol == 0:
            raise ValidationError(f"{_WHERE}: backward_atol and backward_rtol are both 0: the adjoint solve could "
                                  "never be declared converged")
        if self.backward_max_iter is not None:
            if V.non_negative_int(self.backward_max_iter, "backward_max_iter", where=_WHERE) == 0:
                raise ValidationError(
                    f"{_WHERE}: backward_max_iter=0 would return the right-hand side as the adjoint, i.e. the "
                    "JFB gradient reported as implicit; use backward='jfb' for that, or a positive limit"
                )
        V.positive_int(self.phantom_steps, "phantom_steps", where=_WHERE)
        V.in_range(self.phantom_damping, "phantom_damping", where=_WHERE, low=0.0, high=1.0, low_open=True)
        V.in_range(self.unrolled_damping, "unrolled_damping", where=_WHERE, low=0.0, high=1.0, low_open=True)
        if isinstance(self.trajectory, int) and not isinstance(self.trajectory, bool):
            V.non_negative_int(self.trajectory, "trajectory", where=_WHERE)  # a count (0: none)
        elif isinstance(self.trajectory, (str, bytes)) or not isinstance(self.trajectory, (tuple, list)):
            raise OptionTypeError(f"{_WHERE}: trajectory must be a tuple of iteration numbers or a count (int), "
                                  f"got {type(self.trajectory).__name__}")
        else:
            kept = {V.positive_int(k, f"trajectory[{i}]", where=_WHERE) for i, k in enumerate(self.trajectory)}
            object.__setattr__(self, "trajectory", tuple(sorted(kept)))
        # Built and validated once per value (the value is frozen, so the cache cannot go stale).
        if isinstance(self.solver, (list, tuple)):
            if self.solver_options is not None:
                raise ValidationError(f"{_WHERE}: solver_options with a chain of solvers {list(self.solver)} is "
                                      "ambiguous; give configured solver instances in the list instead")
            if self.trajectory:
                raise UnsupportedError(f"{_WHERE}: trajectory with a chain of solvers is not supported (whose "
                                       "iteration k?); use one solver")
            # Stored as a tuple: the value is frozen and hashable like the others.
            object.__setattr__(self, "solver", tuple(self.solver))
            object.__setattr__(self, "_forward_solver", make_chain(self.solver))
        else:
            object.__setattr__(self, "_forward_solver", make_solver(self.solver, self.solver_options))
        if self.backward_fallback is not None:
            V.choice(self.backward_fallback, "backward_fallback", ("phantom", "jfb"), where=_WHERE)
        fallbacks = {None: None, "jfb": JFBGradient,
                     "phantom": lambda: PhantomGradient(self.phantom_steps, self.phantom_damping)}
        keyword = {
            "implicit": lambda: ImplicitGradient(
                self.backward_solver, self.backward_atol, self.backward_rtol, self.backward_max_iter,
                self.backward_solver_options, adaptive=self.backward_adaptive,
                fallback=fallbacks[self.backward_fallback] and fallbacks[self.backward_fallback]()),
            "phantom": lambda: PhantomGradient(self.phantom_steps, self.phantom_damping),
            "jfb": JFBGradient,
            "unrolled": lambda: UnrolledGradient(self.unrolled_damping),
            "shine": ShineGradient,
        }
        if isinstance(self.backward, GradientMode):
            defaults = {f.name: f.default for f in dataclasses.fields(DEQOptions)}
            owned = {"implicit": ("backward_solver", "backward_atol", "backward_rtol", "backward_max_iter",
                                  "backward_solver_options", "backward_adaptive", "backward_fallback"),
                     "phantom": ("phantom_steps", "phantom_damping"), "unrolled": ("unrolled_damping",)}
            both = [n for n in owned.get(self.backward.name, ()) if getattr(self, n) != defaults[n]]
            if both:
                raise ValidationError(
                    f"{_WHERE}: backward={self.backward!r} is a gradient mode value, and {both} set its options "
                    "again as keywords; give them in the value only"
                )
            gradient = self.backward
        else:
            gradient = keyword[self.backward]()
        if isinstance(gradient, ShineGradient):
            name = getattr(self._forward_solver, "name", None)
            if name != "broyden":
                raise ValidationError(f"{_WHERE}: backward=shine reuses the forward Broyden estimate of the inverse "
                                      f"Jacobian, so it needs solver='broyden' (one solver), got {self.solver!r}")
            if self.trajectory:
                raise UnsupportedError(f"{_WHERE}: trajectory with backward=shine is not supported (Broyden's "
                                       "estimate belongs to the last iterate); use backward='implicit'")
        object.__setattr__(self, "_gradient", gradient)
        # The adjoint of the JVP / backward solve: the implicit mode's own, or the one the keywords describe.
        object.__setattr__(self, "_adjoint", gradient if isinstance(gradient, ImplicitGradient) else keyword["implicit"]())

    @classmethod
    def build(cls, options: "DEQOptions | None" = None, **overrides) -> "DEQOptions":
        """``options`` (default: the defaults) with ``overrides`` applied; unknown names raise a TypeError."""
        if not overrides and isinstance(options, cls):
            return options  # the layer's own value, validated when it was built: nothing to check per call
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise OptionTypeError(f"unknown option(s) {unknown}; valid DEQ options: {valid}")
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise OptionTypeError(f"options must be a DEQOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **overrides) if overrides else options

    def replace(self, **changes) -> "DEQOptions":
        """A copy with ``changes`` applied (validated like a new value)."""
        return DEQOptions.build(self, **changes)

    @property
    def loop(self) -> LoopOptions:
        """The forward solve's :class:`~iterlayers.solvers.LoopOptions` (built once)."""
        return self._loop

    @property
    def forward_solver(self):
        """The forward solver value (built once); a tuple of them for a fallback chain."""
        return self._forward_solver

    @property
    def kept_iterations(self) -> tuple:
        """The iterations whose state the forward loop keeps: the given ones, or all (for a count)."""
        if isinstance(self.trajectory, tuple):
            return self.trajectory
        return tuple(range(1, self.max_iter + 1)) if self.trajectory else ()

    def trajectory_iterations(self, taken: int) -> tuple:
        """The kept states returned in ``stats["trajectory"]`` after a solve of ``taken`` iterations."""
        if isinstance(self.trajectory, tuple):
            return self.trajectory
        n = self.trajectory
        return tuple(sorted({math.ceil(i * taken / n) for i in range(1, n + 1)} - {0}))

    @property
    def gradient(self) -> GradientMode:
        """The gradient mode value (built once from ``backward`` and its keyword fields)."""
        return self._gradient

    @property
    def adjoint_solver(self):
        """The solver of the adjoint (and JVP) solve (built once)."""
        return self._adjoint.solver_value

    @property
    def adjoint_atol(self) -> float:
        a = self._adjoint
        return min(self.atol, ADJOINT_MAX_TOL) if a.atol is None else a.atol

    @property
    def adjoint_rtol(self) -> float:
        a = self._adjoint
        return min(self.rtol, ADJOINT_MAX_TOL) if a.rtol is None else a.rtol

    def adjoint_tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(atol, rtol)`` of the adjoint / tangent solve in ``dtype`` (:meth:`ImplicitGradient.tolerances`)."""
        return self._adjoint.tolerances(self.atol, self.rtol, dtype)

    @property
    def adjoint_max_iter(self) -> int:
        return self._adjoint.limit(self.max_iter)


# ----------------------------------------------------------------------------------------------------------
# What the cell is: coupling of rows, running statistics, compilation.


@dataclass(frozen=True)
class CellTraits:
    """What :func:`deq_solve` needs to know about ``f`` (found by walking its modules once per call).

    ``couples``: a batch norm normalising with batch statistics (rows are not independent);
    ``stat_modules``: normalisation modules that update running statistics when called;
    ``compiled``: ``f`` is, or contains, a ``torch.compile``'d module or function.
    """

    couples: bool
    stat_modules: tuple
    compiled: bool

    @staticmethod
    def of(f, modules: tuple | None = None) -> "CellTraits":
        """The traits of ``f``; ``modules``: its :func:`~iterlayers.cells.submodules` if already walked."""
        compiled = hasattr(f, "_torchdynamo_orig_callable")
        if not isinstance(f, nn.Module):
            return CellTraits(False, (), compiled)
        couples, stats = False, []
        for _, m in (submodules(f) if modules is None else modules):
            if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):
                couples = True
            if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                stats.append(m)
            # torch.compile(module) wraps it (``_orig_mod``); module.compile() sets ``_compiled_call_impl``.
            # (read from the module's dicts: a failed attribute lookup raises inside nn.Module.__getattr__)
            if m._modules.get("_orig_mod") is not None or m.__dict__.get("_compiled_call_impl") is not None:
                compiled = True
        return CellTraits(couples, tuple(stats), compiled)

    def stopping(self, requested: str, kwargs: Mapping, batch: int) -> str:
        """The stopping rule passed to the solver loop for ``stopping=requested``. A non-batched keyword
        argument with a dimension of the batch's size (an adjacency, a per-node table) is used with all rows
        at once: slicing the rows would pair it with the wrong rows, so such a solve is joint too."""
        if requested == "per_sample" and self.couples:
            raise ValidationError(
                "stopping='per_sample' with a cell that contains a batch norm using batch statistics: its rows "
                "are coupled, so solving the active rows alone would be wrong; use stopping='joint' or 'auto'"
            )
        shared_rows = any(batch in t.shape for t in _tensors(kwargs))
        if requested == "per_sample" and shared_rows:
            raise ValidationError(
                f"stopping='per_sample' with a keyword argument that has a dimension of the batch size {batch} "
                "(an adjacency, a per-row table): it is used with all rows at once, so the rows cannot be solved "
                "separately; use stopping='joint' or 'auto'"
            )
        if requested != "auto":
            return requested
        return "joint" if self.couples or shared_rows else "verify"

    def eager(self):
        """A context in which compiled code runs eagerly: the differentiable evaluations (whose graph is
        backpropagated several times by the adjoint solve) use the eager module, which is exact."""
        return torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()


#: A cached "independent" verdict is re-verified in full (one extra whole-batch evaluation) every this many solves.
REVERIFY_EVERY = 16


class _Verdicts:
    """What verified stopping found out about a module cell, per input signature and fingerprint.

    ``stopping="verify"`` (the default via ``"auto"``) spends one extra whole-batch evaluation of the cell per
    solve on its final check (:mod:`iterlayers.solvers._loop`). Whether a cell couples its rows is a property of
    its code and modules, not of one batch, so the verdict is kept per cell, keyed by the cell's training flags,
    the input signature (:func:`~iterlayers.hoist.input_signature`) and its fingerprint (the same one hoisting
    uses: module types, their Python attributes, which parameters/buffers/children exist, hooks). A change of
    any of them discards it. With an "independent" verdict the next solves keep the loop's probe (rows of
    frozen samples re-evaluated inside the first sub-batch call: it still catches batch statistics and batch
    means, and falls back to joint stopping) and skip the final check, except every ``REVERIFY_EVERY``-th
    solve, which verifies in full again. A "coupled" verdict (coupling detected, or the cell failed on a
    sub-batch) makes the next solves joint from the first iteration, without the wasted per-sample steps.
    A solve in which no row stopped early teaches nothing and leaves the entry as it was.
    """

    def __init__(self):
        self._table: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

    def lookup(self, cell, key, fingerprint):
        """``"coupled"``, ``"independent"`` (skip the final check this time) or ``None`` (verify in full)."""
        entry = self._table.get(cell, {}).get(key)
        if entry is None or entry[1] != fingerprint:
            return None
        verdict, _, solves = entry
        if verdict == "independent":
            if solves + 1 >= REVERIFY_EVERY:
                return None
            self._table[cell][key] = (verdict, fingerprint, solves + 1)
        return verdict

    def record(self, cell, key, fingerprint, stopping: str) -> None:
        """Learn from the loop's ``stats.info["stopping"]`` of a verified solve."""
        if stopping == "per_sample (verified)":
            verdict = "independent"
        elif stopping.startswith("joint (coupling") or stopping.startswith("joint (the map failed"):
            verdict = "coupled"
        else:
            return
        try:
            self._table.setdefault(cell, {})[key] = (verdict, fingerprint, 0)
        except TypeError:  # a module that cannot be weakly referenced: nothing is cached
            pass

    def clear(self) -> None:
        self._table.clear()


#: The process-wide verdicts of verified stopping (``iterlayers.implicit.VERDICTS.clear()`` forgets them).
VERDICTS = _Verdicts()


def _snapshot(modules) -> list:
    return [(m, name, b.clone()) for m in modules for name, b in m._buffers.items() if b is not None]


def _restore(saved) -> None:
    """Put the saved values back in place (for buffers no graph has saved: after a no-grad solve)."""
    with torch.no_grad():
        for m, name, value in saved:
            m._buffers[name].copy_(value)


def _rebind(saved) -> None:
    """Give the modules fresh copies of the saved values: the old buffers may be saved for backward by an
    evaluation with a graph (batch norm saves its running statistics), so they must not be written to."""
    for m, name, value in saved:
        m._buffers[name] = value.clone()


def _frozen_statistics(modules):
    """Running statistics (batch norm) untouched by the evaluations inside: the solver's iterations are not
    training steps, so only the one differentiable evaluation after the solve updates them. (A cell without
    such modules, the usual case, gets a null context: nothing to save, no generator per solve.)"""
    return _frozen(modules) if modules else contextlib.nullcontext()


@contextlib.contextmanager
def _frozen(modules):
    saved = _snapshot(modules)
    try:
        yield
    finally:
        _restore(saved)


@contextlib.contextmanager
def _primal_only():
    """Forward-mode tangents off (no JVP is propagated through the solver's iterations). There is no public
    switch for this in torch; ``torch._C._set_fwd_grad_enabled`` is what ``torch.autograd.forward_ad`` uses."""
    enabled = torch._C._is_fwd_grad_enabled()
    torch._C._set_fwd_grad_enabled(False)
    try:
        yield
    finally:
        torch._C._set_fwd_grad_enabled(enabled)


def _forward_ad_active() -> bool:
    return fwAD._current_level >= 0


# ----------------------------------------------------------------------------------------------------------
# Argument checks (layer level: f's output is checked by the solver loop).


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)


def _refuse_functorch() -> None:
    if torch._C._functorch.maybe_current_level() is not None:
        raise UnsupportedError(
            "deq_solve / DEQ under a torch.func transform (grad, jacrev, jacfwd, jvp, vmap, ...) is not supported: "
            "the solver's data-dependent stopping and the adjoint hook cannot run on functorch's wrapped "
            "tensors. Use torch.autograd.grad / .backward() for gradients (exact implicit gradient), "
            "torch.autograd.forward_ad for JVPs, a Python loop over samples instead of vmap, or "
            "backward='unrolled' with an unrolled layer (il.Unrolled) for plain autograd"
        )


def _check_devices(f, z0, args, kwargs, modules: tuple = ()) -> None:
    """Every input on ``z0``'s device, and the cell's first parameter (``modules``: its submodules)."""
    device = next(_tensors(z0)).device
    for what, value in (("args", args), ("kwargs", kwargs)):
        for t in _tensors(value):
            if t.device != device:
                raise ShapeMismatchError(f"deq_solve: a tensor in {what} is on {t.device} but z0 is on {device}")
    for path, m in modules:
        for name, p in m._parameters.items():
            if p is None:
                continue
            if p.device != device:
                name = f"{path}.{name}" if path else name
                raise ShapeMismatchError(f"deq_solve: the cell's parameter {name!r} is on {p.device} but z0 is on "
                                         f"{device}; move the cell or the inputs")
            return  # one parameter is enough to catch a cell on another device (checked every call: cheap)


def _check_same_structure(out, z0) -> None:
    parts = tuple(z0) if isinstance(z0, (tuple, list)) else (z0,)
    got = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if isinstance(out, (tuple, list)) != isinstance(z0, (tuple, list)) or len(got) != len(parts) or any(
            not isinstance(g, torch.Tensor) or g.shape != p.shape for g, p in zip(got, parts)):
        raise ShapeMismatchError(
            f"f(z) must have the structure and shape of z0 ({[tuple(p.shape) for p in parts]}); got "
            f"{[tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__ for g in got]}"
        )


def _batch_size(z0) -> int | None:
    parts = tuple(z0) if isinstance(z0, (tuple, list)) else (z0,)
    if parts and all(isinstance(p, torch.Tensor) and p.dim() >= 1 for p in parts):
        return parts[0].shape[0]
    return None


# ----------------------------------------------------------------------------------------------------------
# The adjoint and tangent solves.


def implicit_backward(
    fz: torch.Tensor,
    z_star: torch.Tensor,
    grad: torch.Tensor,
    *,
    solver,
    atol: float,
    rtol: float,
    max_iter: int,
    on_failure: str,
    divergence_ratio: float = 1e6,
    u0: torch.Tensor | None = None,
    check_every: int = 1,
) -> tuple[torch.Tensor, SolverStats]:
    """Solve the adjoint fixed point ``u = J^T u + grad`` with ``J = d fz / d z_star`` (both ``[B, N]``).

    ``fz`` must have been computed from the leaf ``z_star`` with a retained graph; only vector-Jacobian
    products are used, so ``J`` is never formed.

    The system is solved in per-sample units: with ``D = diag(||grad_i||)`` and ``u = D w``,

        w = D^{-1} J^T D w + D^{-1} grad,

    whose right-hand side has unit rows, so the tolerances are *relative* to each sample's incoming gradient.
    An absolute tolerance would declare the adjoint of a small gradient (a mean-reduced loss, a nearly fitted
    model) converged at ``u = 0`` and return a silently zero gradient. The scaling is exact whether or not
    rows are coupled (for independent rows ``D^{-1} J^T D = J^T``; rescaling the rows of a coupled system by
    different factors without the ``D`` inside would change its solution). The iteration starts from the
    right-hand side itself (the first Neumann term, i.e. the JFB gradient), or from ``u0`` if given (an
    estimate of the adjoint, e.g. SHINE's). All rows iterate jointly: every
    vector-Jacobian product covers the whole batch anyway, and ``J^T`` couples rows when the cell does.
    """
    scale = grad.norm(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rhs = grad / scale

    def adjoint(w):
        (vjp,) = torch.autograd.grad(fz, z_star, w * scale, retain_graph=True)
        return torch.addcdiv(rhs, vjp, scale)  # vjp / scale + rhs in one pass

    loop = LoopOptions(atol=atol, rtol=rtol, max_iter=max_iter, on_failure=on_failure,
                       divergence_ratio=divergence_ratio, check_every=check_every, where="implicit_backward")
    u, stats = run_loop(adjoint, rhs if u0 is None else u0 / scale, solver=solver, options=loop, check_inputs=False,
                        stopping="joint", phase="backward")
    return u * scale, stats


def _tangent_solve(f_flat, z_star, b, mode: "ImplicitGradient", o: DEQOptions, forward_residual=None,
                   resolution=None):
    """``t = J t + b`` for ``J = df/dz`` at ``z_star`` (flat ``[B, N]``). ``f`` at the dual ``z_star + eps t``
    has tangent ``J t + b``; in per-sample units ``t = D s`` (``D = diag(||b_i||)``, relative tolerances and
    exact for coupled rows, as for the adjoint) the map is ``s -> D^{-1} (tangent(f(z_star + eps D s)) - b)
    + D^{-1} b``."""
    scale = b.norm(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rhs = b / scale

    def tangent(s):
        out = fwAD.unpack_dual(f_flat(fwAD.make_dual(z_star, s * scale))).tangent
        return rhs if out is None else (out - b) / scale + rhs

    atol, rtol = mode.tolerances(o.atol, o.rtol, b.dtype if resolution is None else resolution, forward_residual)
    with torch.no_grad():
        loop = o.loop.replace(atol=atol, rtol=rtol, max_iter=mode.limit(o.max_iter), return_trace=False)
        t, stats = run_loop(tangent, rhs, solver=mode.solver_value, options=loop, check_inputs=False,
                            stopping="joint", phase="jvp")
    return t * scale, stats


def _unrolled(f_flat, z, *, stopping, damping, atol, rtol, max_iter, return_trace, stat_modules, keep=()):
    """Damped Picard iteration with autograd through every step: :func:`iterlayers.unrolling.unroll` on the
    flat state (its docstring has the stopping rule); ``keep``: iterations whose (differentiable) state goes to
    ``stats.iterates``.

    Running statistics are those of the last evaluation: every evaluation starts from the statistics the call
    began with (fresh buffers, since earlier ones are saved for backward).
    """
    saved = _snapshot(stat_modules)
    first = [True]

    def f(zf):
        if not first[0]:
            _rebind(saved)
        first[0] = False
        return f_flat(zf)

    out = unroll(f, z, max_iter=max_iter, damping=damping, atol=atol, rtol=rtol,
                 stopping="joint" if stopping == "joint" else "per_sample", return_trace=return_trace,
                 return_iterates=bool(keep), name="picard(unrolled)")
    if keep:
        # iterates[k] is the state after k steps; an iteration the loop did not reach gives the returned state
        out.stats.iterates = {k: out.iterates[k] if k < len(out.iterates) else out.z for k in keep}
    return out.z, out.stats


# ----------------------------------------------------------------------------------------------------------


def deq_solve(
    f: Callable,
    z0,
    *,
    args: Sequence = (),
    kwargs: Mapping | None = None,
    options: DEQOptions | None = None,
    stats: dict | None = None,
    arg_names: Sequence[str] | None = None,
    adjoint_start=None,
    **overrides,
):
    """Differentiable fixed point of ``z = f(z, *args, **kwargs)``; see the module docstring for the modes.

    ``args`` are the batched inputs (first dimension = batch): the solver slices them with the samples it
    still iterates. ``kwargs`` are passed to ``f`` unsliced (non-batched values: an adjacency, a positional
    table). Gradients flow to tensors passed either way, and to those ``f`` captures. ``arg_names`` name the
    ``args`` in error messages.

    The solve is configured by ``options`` (a :class:`DEQOptions`; default: its defaults) and/or keyword
    overrides of its fields, e.g. ``deq_solve(f, z0, solver="broyden", atol=1e-6, backward="phantom")``.
    Returns ``z*`` shaped like ``z0``. If ``stats`` (a dict) is given, ``stats["forward"]`` receives the
    forward :class:`SolverStats`, ``stats["backward"]`` the adjoint solve's once the backward pass has run
    (``backward="implicit"``), and ``stats["jvp"]`` the tangent solve's of a forward-mode pass. With
    ``backward="implicit"``, ``stats["adjoint"]`` then holds the adjoint ``u`` of ``z*`` (shaped like ``z0``,
    no graph), and ``adjoint_start`` (shaped like ``z0``) is the adjoint solve's initial guess instead of the
    incoming gradient: a warm start, e.g. the ``u`` of the same samples at their last visit kept in a
    :class:`iterlayers.FixedPointCache`. Like a forward warm start it changes the iterations, never the
    stopping rule.

    With ``hoist=True`` and ``f`` an ``nn.Module``, the part of ``f`` that does not depend on ``z`` (an input
    injection ``U x``, a normalised weight) is computed once per forward solve instead of once per iteration
    (:mod:`iterlayers.hoist`; verified to reproduce ``f``, and skipped when it cannot be). The number of hoisted
    operations is ``stats["forward"].info["hoisted_ops"]``. Gradients always use ``f`` itself.

    Running statistics of batch norms inside ``f`` are updated once per call (by the differentiable evaluation
    at ``z*``; for ``unrolled``, by the last iteration; for ``phantom``, by its first step), never by the
    solver's iterations. A ``torch.compile``'d cell runs compiled, at the full batch shape, in the no-grad
    forward iterations; its differentiable evaluations run eagerly.
    """
    o = DEQOptions.build(options, **overrides)
    if not callable(f):
        raise OptionTypeError(f"deq_solve: f must be callable, got {type(f).__name__}")
    if not isinstance(args, (tuple, list)):
        raise OptionTypeError(f"deq_solve: args must be a tuple of inputs, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise OptionTypeError(f"deq_solve: kwargs must be a dict, got {type(kwargs).__name__}")
    args, kwargs = tuple(args), dict(kwargs or {})
    _refuse_functorch()
    if stats is None:
        stats = {}
    stats.update(forward=None, backward=None, jvp=None, adjoint=None)
    modules = submodules(f)  # the one walk of the cell's modules in this solve
    traits = CellTraits.of(f, modules)
    if _batch_size(z0) == 0:
        # An empty batch (a DDP shard, a detection head): one evaluation gives the empty output, with a graph.
        with traits.eager():
            out = f(z0, *args, **kwargs)
        _check_same_structure(out, z0)
        return out

    spec = StateSpec.of(z0)
    _check_devices(f, z0, args, kwargs, modules)
    stopping = traits.stopping(o.stopping, kwargs, spec.batch_size)
    grad_needed = torch.is_grad_enabled()
    dual = _forward_ad_active()

    def f_flat(zf):
        return spec.flatten(f(spec.unflatten(zf), *args, **kwargs))

    mode = o.gradient
    start = None
    if adjoint_start is not None:
        spec.check_output(adjoint_start, spec.batch_size, "adjoint_start")
        if isinstance(adjoint_start, (tuple, list)):
            adjoint_start = tuple(p.detach() for p in adjoint_start)
        else:
            adjoint_start = adjoint_start.detach()
        start = spec.flatten(adjoint_start)
        if not bool(torch.isfinite(start).all()):
            raise NonFiniteInputError("adjoint_start contains NaN or Inf; pass a finite initial adjoint or None")
    solve = _Solve(f_flat, o, traits, stats, grad_needed, dual, stopping, start, spec.unflatten)
    if not mode.solves_forward and (grad_needed or dual):
        def f_checked(zf):
            out = f(spec.unflatten(zf), *args, **kwargs)
            if f_checked.first:  # the solver loop's check of f's output, before anything is flattened
                spec.check_output(out, spec.batch_size)
                f_checked.first = False
            return spec.flatten(out)

        f_checked.first = True
        solve.f_flat = f_checked
        with traits.eager():
            return spec.unflatten(mode.attach(solve, spec.flatten(z0)))

    z0d = tuple(p.detach() for p in z0) if spec.is_tuple else z0.detach()
    fingerprint = key = verdict = None
    if isinstance(f, nn.Module) and (o.hoist or stopping == "verify"):
        fingerprint = cell_fingerprint(f, modules)  # once per solve, for the hoisting cache and the verdicts
    if stopping == "verify" and isinstance(f, nn.Module) and not traits.compiled:
        key = input_signature(f, z0d, args, kwargs, modules)  # also the hoisting cache's key when kwargs is empty
        verdict = VERDICTS.lookup(f, key, fingerprint)
        if verdict == "coupled":
            stopping = "joint"
    with torch.no_grad(), (_primal_only() if dual else contextlib.nullcontext()), \
            _frozen_statistics(traits.stat_modules):
        loop_f, loop_args, names, n_hoisted = f, args, arg_names, 0
        if o.hoist and not kwargs and not traits.compiled:
            split = split_cell(f, z0d, args, spec.batch_size, fingerprint=fingerprint, signature=key)
            if split is not None:
                loop_f, loop_args, n_hoisted = split
                given = "/".join(arg_names) if arg_names else "args"
                names = tuple(f"{given} (hoisted value {i})" for i in range(len(loop_args)))
        if traits.compiled and args:
            # A compiled cell is evaluated at one batch shape: the inputs are bound here, so the loop sees a map
            # without batched arguments and evaluates the whole batch, frozen rows in place (their outputs are
            # discarded). Per-sample stopping and its statistics are unchanged; no recompilation per active set.
            def loop_f(z, **kw):
                return f(z, *args, **kw)

            loop_args, names = (), None
        loop_options = dict(args=loop_args, kwargs=kwargs, stopping=stopping, options=o.loop, arg_names=names,
                            phase="forward", verified=verdict == "independent")
        if isinstance(o.forward_solver, tuple):
            z_star, st = solve_chain(loop_f, z0d, solvers=o.forward_solver, **loop_options)
        else:
            z_star, st = run_loop(loop_f, z0d, solver=o.forward_solver, keep=o.kept_iterations,
                                  keep_state=isinstance(mode, ShineGradient), **loop_options)
    if key is not None:
        if verdict == "coupled":
            st.info["stopping"] = "joint (coupling found by an earlier verified solve of this cell)"
        else:
            VERDICTS.record(f, key, fingerprint, str(st.info.get("stopping", "")))
    st.info["hoisted_ops"] = n_hoisted
    # The loop records what happened ("per_sample (verified)", "joint (coupling detected ...)"); keep that.
    st.info["stopping_requested"] = o.stopping
    stats["forward"] = st
    if not grad_needed and not dual:
        return z_star

    with traits.eager():
        if o.trajectory:
            # Fixed-point correction: each kept state enters the graph by the same mode as z*. Running statistics
            # are then given back (fresh copies: the old buffers may be saved for backward), so that only z*'s
            # attachment updates them, once per call.
            before = _snapshot(traits.stat_modules)
            stats["trajectory"], stats["trajectory_backward"] = {}, {}
            for k in o.trajectory_iterations(int(st.nstep.max())):
                zk = st.iterates[k]
                stats["trajectory"][k] = spec.unflatten(mode.attach(
                    solve, spec.flatten(zk), record=lambda b, k=k: stats["trajectory_backward"].__setitem__(k, b)))
            _rebind(before)
        return spec.unflatten(mode.attach(solve, spec.flatten(z_star)))
