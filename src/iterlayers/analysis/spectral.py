"""Spectral radius and spectral norm of a cell's Jacobian ``J = d cell(z, x) / dz`` at a point, per sample.

Why both: the spectral radius ``rho(J*)`` at the fixed point is the asymptotic linear rate of the Picard
iteration ``z_{k+1} = f(z_k)`` (Ostrowski's theorem: local convergence iff ``rho(J*) < 1``), while the spectral
norm ``||J||_2 >= rho(J)`` bounds the one-step contraction in the Euclidean norm; ``||J(z)||_2 <= q < 1`` for
every z is Banach's condition for a global contraction (cf. the contraction arguments in Kawaguchi 2021,
arXiv 2102.07346, and Zappala et al. 2023, arXiv 2310.01618).

Methods (matrix-free ones use only Jacobian-vector products, see ``_linear``):

* ``spectral_radius(method="power")``: power iteration ``v <- J v / ||J v||`` with, at every step, a
  Rayleigh-Ritz projection of ``J`` onto the small Krylov space ``span{v, J v, J^2 v, J^3 v}`` (4 Arnoldi
  vectors); the estimate is the largest modulus among the Ritz values (eigenvalues of the 4x4 compression).
  Plain power iteration fails for a dominant complex pair ``r e^{+-i t}`` (the iterate rotates forever and
  ``||J v||`` oscillates); the span of consecutive iterates instead converges to the invariant subspace of the
  dominant eigenvalues, whose Ritz values are exact, so real and complex dominant eigenvalues (and ``+-r``
  pairs) are handled alike. The error decays roughly like ``(|l_5| / |l_1|)^k`` after k steps. Convergence:
  the estimate changed by ``<= tol`` (relative) on three consecutive steps, or ``v`` is an eigenvector to
  ``tol``. Caveat: with a tiny gap the relative change can be small while the error is still larger (as for
  any power method), and strongly non-normal Jacobians may need many steps.
* ``jacobian_norm(method="power")``: power iteration on ``J^T J`` (a jvp and a vjp per step);
  ``method="lanczos"``: Lanczos on ``J^T J`` with full re-orthogonalisation (at most ``n`` steps, exact then).
* ``method="dense"``: build ``J`` (``n`` vjps) and use ``eigvals`` / ``matrix_norm(ord=2)``; the ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ._eig import power_radius, top_eig_sym
from ._linear import CellLinearization, check_method, check_positive
from .jacobian import jacobian
from iterlayers.errors import ValidationError


@dataclass
class Estimate:
    """A per-sample estimate: ``value[B]``, the ``iterations`` used (max over the batch), ``converged[B]``,
    the ``method`` name, and (spectral radius only) the dominant ``eigenvalue[B]`` (complex) found."""

    value: Tensor
    iterations: int
    converged: Tensor
    method: str
    eigenvalue: Tensor | None = field(default=None, repr=False)

    def __str__(self) -> str:
        v = self.value
        conv = int(self.converged.sum())
        return (f"Estimate(method={self.method!r}, value[min/mean/max]={v.min():.6g}/{v.mean():.6g}/{v.max():.6g}, "
                f"iterations={self.iterations}, converged={conv}/{v.numel()})")


def _validate(method, valid, tol, max_iter):
    check_method(method, valid)
    check_positive(tol, "tol")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValidationError(f"max_iter must be a positive int, got {max_iter!r}")


def spectral_radius(cell: Callable, z: Tensor, x: Tensor | None = None, *, method: str = "power",
                    tol: float = 1e-6, max_iter: int = 200, seed: int = 0) -> Estimate:
    """Spectral radius ``rho(J_b) = max |lambda_i(J_b)|`` of ``J_b = d cell(z, x)_b / d z_b`` for each sample.

    ``method``: ``"power"`` (matrix-free, see module docstring) or ``"dense"`` (exact, ``O(n^3)``).
    """
    _validate(method, ("power", "dense"), tol, max_iter)
    if method == "dense":
        J = jacobian(cell, z, x)
        ev = torch.linalg.eigvals(J)
        idx = ev.abs().argmax(-1, keepdim=True)
        lam = ev.gather(-1, idx)[:, 0]
        return Estimate(lam.abs().to(z.dtype), 1, torch.ones(z.shape[0], dtype=torch.bool, device=z.device),
                        "dense", lam)
    lin = CellLinearization(cell, z, x)
    rho, it, conv, lam = power_radius(lin.Jz.jvp, lin.batch, lin.n, tol=tol, max_iter=max_iter, seed=seed,
                                      dtype=lin.dtype, device=lin.device)
    return Estimate(rho, it, conv, "power", lam)


def jacobian_norm(cell: Callable, z: Tensor, x: Tensor | None = None, *, method: str = "power",
                  tol: float = 1e-6, max_iter: int = 200, seed: int = 0) -> Estimate:
    """Spectral norm ``||J_b||_2 = sigma_max(J_b)`` of the cell's Jacobian with respect to z, per sample.

    ``method``: ``"power"`` or ``"lanczos"`` on ``J^T J`` (matrix-free), or ``"dense"`` (exact SVD).
    """
    _validate(method, ("power", "lanczos", "dense"), tol, max_iter)
    if method == "dense":
        J = jacobian(cell, z, x)
        return Estimate(torch.linalg.matrix_norm(J, ord=2), 1,
                        torch.ones(z.shape[0], dtype=torch.bool, device=z.device), "dense")
    lin = CellLinearization(cell, z, x)
    lam, it, conv = top_eig_sym(lambda v: lin.Jz.vjp(lin.Jz.jvp(v)), lin.batch, lin.n, method=method, tol=tol,
                                max_iter=max_iter, seed=seed, dtype=lin.dtype, device=lin.device)
    return Estimate(lam.sqrt(), it, conv, method)
