"""PNG figures for the analysis report: residual traces, Jacobian spectra, sensitivity histograms.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through ``pyplot``, so
the library does not change a user's global backend and works headless.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _figure(ncols: int = 1, width: float = 5.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def draw_residuals(ax, trace: Tensor | None, *, fitted: Tensor | None = None, predicted: Tensor | None = None,
                   steps: Tensor | None = None, max_lines: int = 16) -> None:
    """Residual ``||f(z_k) - z_k||`` versus k (log scale) for up to ``max_lines`` samples (each cut after its
    own ``steps`` iterations when given: a converged sample's frozen residual is not data), with the geometric
    lines ``r_0 q^k`` of the mean fitted and predicted rates."""
    ax.set_title("residual traces")
    ax.set_xlabel("iteration k")
    ax.set_ylabel("||f(z_k) - z_k||")
    if trace is None or trace.numel() == 0:
        ax.text(0.5, 0.5, "no trace recorded", ha="center", va="center", transform=ax.transAxes)
        return
    tr = trace.detach().double().cpu().numpy()
    if tr.ndim == 1:
        tr = tr[:, None]
    k = np.arange(tr.shape[0])
    for b in range(min(tr.shape[1], max_lines)):
        end = tr.shape[0] if steps is None else min(tr.shape[0], int(steps[b]) + 1)
        ax.semilogy(k[:end], np.clip(tr[:end, b], 1e-300, None), color="C0", alpha=0.5, lw=1)
    r0 = float(np.median(tr[0]))
    for rate, label, color in ((fitted, "fitted", "C1"), (predicted, "predicted rho(J*)", "C3")):
        if rate is None:
            continue
        q = float(torch.nanmean(torch.as_tensor(rate, dtype=torch.float64)))
        if np.isfinite(q) and q > 0:
            ax.semilogy(k, r0 * q ** k, "--", color=color, lw=1.5, label=f"{label}: q={q:.3f}")
    ax.legend(loc="best", fontsize=8)


def draw_spectrum(ax, eigenvalues: Tensor | None, *, max_samples: int = 8) -> None:
    """Eigenvalues of ``J*`` (up to ``max_samples`` samples) in the complex plane with the unit circle."""
    ax.set_title("eigenvalues of J* = df/dz at z*")
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")
    t = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(t), np.sin(t), "k-", lw=1, label="unit circle")
    if eigenvalues is None or eigenvalues.numel() == 0:
        ax.text(0.5, 0.5, "eigenvalues not computed\n(state too large for the dense path)", ha="center",
                va="center", transform=ax.transAxes)
    else:
        ev = eigenvalues.detach().cpu()
        if ev.dim() == 1:
            ev = ev[None]
        for b in range(min(ev.shape[0], max_samples)):
            e = ev[b].to(torch.complex128).numpy()
            ax.scatter(e.real, e.imag, s=10, alpha=0.6, label="eigenvalues" if b == 0 else None)
    ax.set_aspect("equal", adjustable="datalim")
    ax.axhline(0, color="0.8", lw=0.5)
    ax.axvline(0, color="0.8", lw=0.5)
    ax.legend(loc="best", fontsize=8)


def draw_histogram(ax, values: dict[str, Tensor | None], *, bins: int = 20) -> None:
    """Histograms of per-sample quantities (e.g. input/parameter sensitivity)."""
    ax.set_title("per-sample sensitivity")
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    drawn = False
    for i, (name, v) in enumerate(values.items()):
        if v is None:
            continue
        arr = v.detach().double().cpu().numpy().ravel()
        arr = arr[np.isfinite(arr)]
        if arr.size:
            ax.hist(arr, bins=bins, alpha=0.6, color=f"C{i}", label=name)
            drawn = True
    if drawn:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no sensitivities computed", ha="center", va="center", transform=ax.transAxes)


def plot_residual_traces(trace, path, *, fitted=None, predicted=None, steps=None) -> Path:
    fig, (ax,) = _figure()
    draw_residuals(ax, trace, fitted=fitted, predicted=predicted, steps=steps)
    return _save(fig, path)


def plot_spectrum(eigenvalues, path) -> Path:
    fig, (ax,) = _figure(height=5.0)
    draw_spectrum(ax, eigenvalues)
    return _save(fig, path)


def plot_histogram(values: dict, path) -> Path:
    fig, (ax,) = _figure()
    draw_histogram(ax, values)
    return _save(fig, path)
