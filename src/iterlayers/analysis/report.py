"""One-call analysis of an equilibrium layer or cell at its fixed points: ``report(layer_or_cell, x)``.

Collects, per sample, the spectral radius and norm of ``J* = df/dz`` at the fixed point, the contraction
verdict, input/parameter sensitivities ``||dz*/dx||``, ``||dz*/dtheta||``, the condition number of
``I - J*``, and, from a residual trace, the fitted linear rate next to the Picard rate ``rho(J*)`` predicted
from the Jacobian and the iteration count that rate predicts (see ``rates``). ``AnalysisReport`` prints as
a table and draws PNG figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .. import cells
from ..layers import DEQ
from ..solvers import solve
from . import plots
from ._linear import call_cell
from .jacobian import jacobian
from .contraction import ContractionCertificate, certify_contraction
from .rates import fit_linear_rate, predict_iterations
from .sensitivity import condition_number, input_sensitivity, parameter_sensitivity
from .spectral import jacobian_norm, spectral_radius
from iterlayers.errors import OptionTypeError, ValidationError


@dataclass
class AnalysisReport:
    """Per-sample analysis at the fixed points (tensors are ``[B]`` unless stated)."""

    batch: int
    n: int
    method: str
    fixed_point_residual: Tensor
    spectral_radius: Tensor
    spectral_norm: Tensor
    certificate: ContractionCertificate
    condition_number: Tensor
    input_sensitivity: Tensor | None = None
    parameter_sensitivity: Tensor | None = None
    trace: Tensor | None = field(default=None, repr=False)  # [T, B]
    trace_solver: str | None = None
    fitted_rate: Tensor | None = None
    predicted_rate: Tensor | None = None
    measured_iterations: Tensor | None = None
    predicted_iterations: Tensor | None = None
    eigenvalues: Tensor | None = field(default=None, repr=False)  # [B, n] complex

    def rows(self) -> list[tuple[str, Tensor | None]]:
        return [
            ("fixed-point residual ||f(z*)-z*||", self.fixed_point_residual),
            ("spectral radius rho(J*)", self.spectral_radius),
            ("spectral norm ||J*||_2", self.spectral_norm),
            ("condition number kappa(I-J*)", self.condition_number),
            ("input sensitivity ||dz*/dx||_2", self.input_sensitivity),
            ("param. sensitivity ||dz*/dtheta||_2", self.parameter_sensitivity),
            (f"fitted rate ({self.trace_solver or 'no'} trace)", self.fitted_rate),
            ("predicted Picard rate rho(J*)", self.predicted_rate),
            ("measured iterations", self.measured_iterations),
            ("predicted iterations (Picard)", self.predicted_iterations),
        ]

    def summary(self) -> dict:
        """Plain floats (means over the batch) for metrics files."""
        out = {"batch": self.batch, "n": self.n, "verdict": self.certificate.verdict}
        for name, v in self.rows():
            if v is not None:
                out[name] = float(torch.nanmean(v.double()))
        return out

    def __str__(self) -> str:
        w = 38
        lines = [f"iterlayers analysis report: batch {self.batch}, state size n = {self.n}, method {self.method}",
                 f"{'quantity':<{w}} {'mean':>11} {'min':>11} {'max':>11}", "-" * (w + 36)]
        for name, v in self.rows():
            if v is None:
                lines.append(f"{name:<{w}} {'n/a':>11} {'n/a':>11} {'n/a':>11}")
                continue
            d = v.double()
            fin = d[torch.isfinite(d)]
            if fin.numel() == 0:
                lines.append(f"{name:<{w}} {'nan':>11} {'nan':>11} {'nan':>11}")
                continue
            lines.append(f"{name:<{w}} {float(fin.mean()):>11.4g} {float(fin.min()):>11.4g} {float(fin.max()):>11.4g}")
        lines.append("-" * (w + 36))
        lines.append(str(self.certificate))
        return "\n".join(lines)

    # Figures ---------------------------------------------------------------------------------------------
    def plot_residuals(self, path) -> Path:
        return plots.plot_residual_traces(self.trace, path, fitted=self.fitted_rate, predicted=self.predicted_rate,
                                          steps=self.measured_iterations)

    def plot_spectrum(self, path) -> Path:
        return plots.plot_spectrum(self.eigenvalues, path)

    def plot_sensitivity(self, path) -> Path:
        return plots.plot_histogram({"input ||dz*/dx||": self.input_sensitivity,
                                     "parameter ||dz*/dtheta||": self.parameter_sensitivity}, path)

    def plot(self, path) -> Path:
        """All three panels (residual traces, spectrum with unit circle, sensitivity histogram) in one PNG."""
        fig, axes = plots._figure(ncols=3)
        plots.draw_residuals(axes[0], self.trace, fitted=self.fitted_rate, predicted=self.predicted_rate,
                             steps=self.measured_iterations)
        plots.draw_spectrum(axes[1], self.eigenvalues)
        plots.draw_histogram(axes[2], {"input ||dz*/dx||": self.input_sensitivity,
                                       "parameter ||dz*/dtheta||": self.parameter_sensitivity})
        return plots._save(fig, path)


def _rows(z, n: int):
    """The first ``n`` samples of a state (a tensor or a tuple of tensors)."""
    return tuple(p[:n] for p in z) if isinstance(z, (tuple, list)) else z[:n]


def _picard_trace(cell: Callable, x: Tensor, z0, *, atol: float, max_iter: int):
    """A Picard solve with a residual trace (the core's :func:`iterlayers.solve`)."""
    sol = solve(cell, z0, args=(x,), solver="picard", atol=atol, rtol=0.0, max_iter=max_iter, on_failure="ignore",
                return_trace=True)
    return sol.z, sol.stats.trace_tensor(), sol.stats.nstep, "picard"


def report(layer_or_cell, x: Tensor, *, z_star: Tensor | None = None, trace: Tensor | None = None,
           z0: Tensor | None = None,
           atol: float = 1e-6, max_iter: int = 500, method: str = "auto", dense_limit: int = 256,
           max_samples: int = 32, sensitivities: bool = True, certify_samples: int = 4, seed: int = 0
           ) -> AnalysisReport:
    """Analyse ``layer_or_cell`` at the fixed points ``z*`` of ``z = cell(z, x)`` for the first ``max_samples``
    samples of x.

    * an ``iterlayers.DEQ``: uses ``layer.cell``; z* from ``layer(x)`` (under no_grad) and the residual trace
      from ``layer.stats["forward"].trace`` when the layer records one (``return_trace=True``);
    * a cell ``cell(z, x)``: z* (if not given) and the trace by a Picard solve (``iterlayers.solve``,
      ``atol``, ``max_iter``), starting from ``z0``, else ``cell.init_state(x)``, else zeros like x;
    * no trace given/recorded: a Picard solve from the initial state supplies one.

    ``method``: ``"dense"`` (exact; n up to ``dense_limit``), ``"power"`` (matrix-free), or ``"auto"``.
    ``sensitivities=False`` skips the input/parameter sensitivities (the costliest part).
    """
    if method not in ("auto", "dense", "power"):
        raise ValidationError(f"method must be one of ('auto', 'dense', 'power'), got {method!r}")
    if not isinstance(max_samples, int) or max_samples < 1:
        raise ValidationError(f"max_samples must be a positive int, got {max_samples!r}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise OptionTypeError(f"x must be a Tensor with a non-empty batch dimension, got {type(x).__name__}")
    x = x[:max_samples]
    measured = None
    trace_solver = None
    tol = atol
    if isinstance(layer_or_cell, DEQ):
        layer = layer_or_cell
        cell = layer.cell
        if z_star is None:
            with torch.no_grad():
                z_star = layer(x, z0=None if z0 is None else _rows(z0, max_samples))
            stats = layer.stats.get("forward") if isinstance(layer.stats, dict) else None
            if stats is not None and getattr(stats, "trace", None) is not None and trace is None:
                trace = torch.stack(list(stats.trace))
                measured = stats.nstep
                trace_solver = stats.solver
                tol = stats.atol
    else:
        cell = layer_or_cell
    if not callable(cell):
        raise OptionTypeError(f"layer_or_cell must be an iterlayers.DEQ or a callable cell(z, x), got "
                        f"{type(layer_or_cell).__name__}")
    with torch.no_grad():
        z0 = cells.initial_state(cell, x, where="report") if z0 is None else _rows(z0, max_samples)
        if z_star is None or trace is None:
            z_solved, picard_trace, nstep, trace_solver_p = _picard_trace(cell, x, z0, atol=atol,
                                                                          max_iter=max_iter)
            if z_star is None:
                z_star = z_solved
            if trace is None:
                trace, measured, trace_solver = picard_trace, nstep, trace_solver_p
        # A tuple state is analysed as its flat vector (the solvers' view): the cell on flat states.
        cell, z_star = cells.flattened(cell, _rows(z_star, max_samples))
        z_star = z_star.detach()
        trace = None if trace is None else torch.as_tensor(trace)[..., :max_samples]
        if measured is not None:
            measured = measured[:max_samples]
        res = (call_cell(cell, z_star, x) - z_star).reshape(z_star.shape[0], -1).norm(dim=1)

    batch, n = z_star.shape[0], z_star[0].numel()
    use = ("dense" if n <= dense_limit else "power") if method == "auto" else method
    radius = spectral_radius(cell, z_star, x, method=use, seed=seed)
    norm = jacobian_norm(cell, z_star, x, method=use if use == "dense" else "lanczos", seed=seed)
    cond = condition_number(cell, z_star, x, method=use if use == "dense" else "lanczos", seed=seed)
    cert = certify_contraction(cell, z_star, x, samples=certify_samples, method=use, seed=seed)
    in_sens = par_sens = None
    if sensitivities and x.is_floating_point():
        sm = use if use == "dense" else "lanczos"
        in_sens = input_sensitivity(cell, z_star, x, method=sm, seed=seed)
        if isinstance(cell, nn.Module) and any(p.requires_grad for p in cell.parameters()):
            par_sens = parameter_sensitivity(cell, z_star, x, method=sm, seed=seed)
    eig = None
    if n <= dense_limit:
        eig = torch.linalg.eigvals(jacobian(cell, z_star, x))

    fitted = pred_iters = None
    predicted = radius.value
    if trace is not None and trace.dim() == 2 and trace.shape[0] >= 2:
        fitted = fit_linear_rate(trace)
        r0 = trace[0].double()
        ok = (predicted < 1) & (r0 > 0)
        pred_iters = torch.full((batch,), float("nan"), dtype=torch.float64)  # NaN: rho >= 1, no prediction
        if bool(ok.any()):
            pred_iters[ok] = predict_iterations(predicted.double()[ok].cpu(), r0[ok].cpu(),
                                                torch.tensor(tol, dtype=torch.float64)).double()
    return AnalysisReport(batch=batch, n=n, method=use, fixed_point_residual=res, spectral_radius=radius.value,
                          spectral_norm=norm.value, certificate=cert, condition_number=cond,
                          input_sensitivity=in_sens, parameter_sensitivity=par_sens, trace=trace,
                          trace_solver=trace_solver, fitted_rate=fitted, predicted_rate=predicted,
                          measured_iterations=measured, predicted_iterations=pred_iters, eigenvalues=eig)
