"""Batched restarted GMRES for the linear systems of implicit differentiation.

Solves ``A_b w_b = r_b`` for every sample ``b`` with only products ``v -> A v`` (``[B, n] -> [B, n]``).
Each cycle builds an Arnoldi basis ``V_k`` (modified Gram-Schmidt, applied twice for stability) with
``A V_k = V_{k+1} H_k`` and takes ``w = w_0 + V_k y``, ``y = argmin ||beta e_1 - H_k y||`` (Saad & Schultz,
1986). Used with ``A = I - J`` or ``A = I - J^T``, which is non-singular whenever ``rho(J) < 1``; unlike the
Neumann series ``w <- r + J w`` it also converges when ``rho(J) > 1`` as long as ``I - J`` is invertible.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._linear import bdot, bnorm


def gmres(matvec: Callable[[Tensor], Tensor], rhs: Tensor, *, tol: float = 1e-8, max_iter: int = 200,
          restart: int = 50) -> tuple[Tensor, Tensor]:
    """Return ``(w, converged[B])`` with ``||A w - rhs|| <= tol * ||rhs||`` per converged sample."""
    batch, n = rhs.shape
    eps = torch.finfo(rhs.dtype).eps
    tol = max(float(tol), 20 * eps)
    m = max(1, min(restart, n))
    w = torch.zeros_like(rhs)
    rhs_norm = bnorm(rhs)
    target = tol * rhs_norm
    converged = rhs_norm == 0
    used = 0
    while used < max_iter and not bool(converged.all()):
        r = rhs - matvec(w)
        beta = bnorm(r)
        converged = converged | (beta <= target)
        if bool(converged.all()):
            break
        basis = [r / beta.clamp_min(torch.finfo(rhs.dtype).tiny)[:, None]]
        H = torch.zeros(batch, m + 1, m, dtype=rhs.dtype, device=rhs.device)
        e1 = torch.zeros(batch, m + 1, dtype=rhs.dtype, device=rhs.device)
        e1[:, 0] = beta
        y = None
        k_used = 0
        for j in range(min(m, max_iter - used)):
            v = matvec(basis[j])
            for _ in range(2):
                for i in range(j + 1):
                    h = bdot(v, basis[i])
                    H[:, i, j] += h
                    v = v - h[:, None] * basis[i]
            h_next = bnorm(v)
            H[:, j + 1, j] = h_next
            # Lucky breakdown (h_next = 0) means the Krylov space is invariant: the next vector is unused.
            basis.append(v / h_next.clamp_min(torch.finfo(rhs.dtype).tiny)[:, None])
            k_used = j + 1
            Hk = H[:, : j + 2, : j + 1]
            y = torch.linalg.lstsq(Hk, e1[:, : j + 2, None]).solution[..., 0]
            res = bnorm(e1[:, : j + 2] - (Hk @ y[..., None])[..., 0])
            if bool(((res <= target) | converged).all()):
                break
        used += k_used
        if y is not None:
            w = w + torch.einsum("bk,kbn->bn", y, torch.stack(basis[:k_used]))
    final = bnorm(rhs - matvec(w))
    return w, converged | (final <= target * 10)
