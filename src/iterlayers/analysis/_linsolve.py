"""The linear systems of implicit differentiation, solved by the one Krylov kernel (``solvers/gmres.py``).

``A_b w_b = r_b`` for every sample ``b`` with only products ``v -> A v`` (``[B, n] -> [B, n]``), used with
``A = I - J`` or ``A = I - J^T`` (non-singular whenever ``rho(J) < 1``; unlike the Neumann series
``w <- r + J w``, GMRES also converges when ``rho(J) > 1`` as long as ``I - J`` is invertible). The system is the
fixed point of the affine map ``f(w) = u + w - A w`` with ``u = r / ||r||`` per sample, solved by
:func:`iterlayers.solve` with ``solver="gmres"``: per-sample stopping (verified), statistics, and a
:class:`~iterlayers.errors.ConvergenceWarning` when a system is not solved. Since ``A`` is linear the solution is
``||r||`` times that of the unit right-hand side, so the test ``||u - A w|| <= tol`` is the relative one
``||r - A w|| <= tol ||r||``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..solvers import solve
from ._linear import bnorm


def gmres(matvec: Callable[[Tensor], Tensor], rhs: Tensor, *, tol: float = 1e-8, max_iter: int = 200,
          restart: int = 50) -> tuple[Tensor, Tensor]:
    """Return ``(w, converged[B])`` with ``||A w - rhs|| <= tol * ||rhs||`` for each converged sample.

    ``tol`` is raised to ``20 eps`` of the dtype (below it the test measures round-off); ``restart`` is the
    Krylov dimension of a cycle (at most ``n``).
    """
    batch, n = rhs.shape
    tol = max(float(tol), 20 * torch.finfo(rhs.dtype).eps)
    scale = bnorm(rhs)
    unit = rhs / scale.clamp_min(torch.finfo(rhs.dtype).tiny)[:, None]
    sol = solve(lambda w: unit + w - matvec(w), torch.zeros_like(rhs), solver="gmres", atol=tol, rtol=0.0,
                max_iter=max_iter, divergence_ratio=float("inf"), restart=max(1, min(restart, n)))
    return sol.z * scale[:, None], sol.stats.converged
