"""Batched matrix-free eigenvalue iterations shared by the spectral and sensitivity routines.

* ``top_eig_sym``: largest eigenvalue of a symmetric positive semi-definite operator ``S`` (``J^T J``,
  ``M^T M``), by power iteration (Rayleigh quotient ``v^T S v``, error after k steps ~ (l2/l1)^{2k}) or by
  Lanczos with full re-orthogonalisation (top Ritz value of the tridiagonal ``T_k``; error ~ Chebyshev
  polynomial of degree k, far fewer products when the gap is small).
* ``power_radius``: spectral radius of a general real operator ``J`` by power iteration with a small
  Arnoldi / Rayleigh-Ritz step on ``span{v, Jv, J^2 v, J^3 v}``; see ``spectral.spectral_radius``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._linear import bdot, bnorm, random_unit

Op = Callable[[Tensor], Tensor]


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _effective_tol(tol: float, dtype: torch.dtype) -> float:
    # Below a few ulps the relative change is roundoff noise and the test could never pass.
    return max(float(tol), 8 * torch.finfo(dtype).eps)


def power_sym(op: Op, batch: int, n: int, *, tol: float, max_iter: int, seed: int, dtype, device
              ) -> tuple[Tensor, int, Tensor]:
    tol = _effective_tol(tol, dtype)
    v = random_unit(batch, n, seed=seed, dtype=dtype, device=device)
    lam = torch.zeros(batch, dtype=dtype, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    it = 0
    for it in range(1, max_iter + 1):
        w = op(v)
        new = bdot(v, w).clamp_min(0)
        nw = bnorm(w)
        done_now = (new - lam).abs() <= tol * new.abs().clamp_min(_tiny(dtype))
        done_now = done_now | (nw <= _tiny(dtype))  # S v = 0: v is in the null space, lambda = 0 along it
        lam = torch.where(converged, lam, new)
        converged = converged | (done_now & (it > 1))
        if bool(converged.all()):
            break
        v = torch.where((nw > _tiny(dtype))[:, None], w / nw.clamp_min(_tiny(dtype))[:, None], v)
    return lam, it, converged


def lanczos_sym(op: Op, batch: int, n: int, *, tol: float, max_iter: int, seed: int, dtype, device
                ) -> tuple[Tensor, int, Tensor]:
    tol = _effective_tol(tol, dtype)
    q = random_unit(batch, n, seed=seed, dtype=dtype, device=device)
    Q = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    lam = torch.zeros(batch, dtype=dtype, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = min(max_iter, n)
    k = 0
    for k in range(1, steps + 1):
        w = op(Q[-1])
        a = bdot(w, Q[-1])
        alphas.append(a)
        basis = torch.stack(Q, dim=1)  # [B, k, n]
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
            w = w - torch.einsum("bk,bkn->bn", torch.einsum("bkn,bn->bk", basis, w), basis)
        b = bnorm(w)
        T = torch.diag_embed(torch.stack(alphas, -1))
        if betas:
            off = torch.stack(betas, -1)
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        new = torch.linalg.eigvalsh(T)[:, -1].clamp_min(0)
        # b ~ 0: the Krylov space is invariant and the Ritz values are exact eigenvalues.
        invariant = b <= 10 * torch.finfo(dtype).eps * (new.abs() + a.abs()).clamp_min(_tiny(dtype))
        done_now = ((new - lam).abs() <= tol * new.clamp_min(_tiny(dtype))) & (k > 1)
        lam = torch.where(converged, lam, new)
        converged = converged | done_now | invariant | torch.full_like(converged, k == n)
        if bool(converged.all()):
            break
        betas.append(b)
        # On an invariant sample continue with an arbitrary orthogonal direction: its T stays block diagonal.
        Q.append(w / b.clamp_min(_tiny(dtype))[:, None])
    return lam, k, converged


def top_eig_sym(op: Op, batch: int, n: int, *, method: str, tol: float, max_iter: int, seed: int, dtype,
                device) -> tuple[Tensor, int, Tensor]:
    fn = lanczos_sym if method == "lanczos" else power_sym
    return fn(op, batch, n, tol=tol, max_iter=max_iter, seed=seed, dtype=dtype, device=device)


def _ritz_max(v: Tensor, w: Tensor, jvp: Op, k: int, tol: float) -> Tensor:
    """Largest-modulus Ritz value of ``J`` on the Krylov space ``span{v, Jv, ..., J^{k-1} v}`` (Arnoldi).

    ``w = J v`` is given. If the Krylov space of a sample becomes invariant after ``j < k`` vectors (the new
    residual is ``<= tol`` relative), only the leading ``j x j`` block is used: directions beyond it would be
    roundoff and, for a non-normal ``J``, could produce spurious large Ritz values.
    """
    batch = v.shape[0]
    Q, JQ = [v], [w]
    dim = torch.full((batch,), 1, dtype=torch.long, device=v.device)
    alive = torch.ones(batch, dtype=torch.bool, device=v.device)
    scale = bnorm(w).clamp_min(_tiny(v.dtype))
    for _ in range(1, k):
        r = JQ[-1]
        for _ in range(2):
            for q in Q:
                r = r - bdot(r, q)[:, None] * q
        nr = bnorm(r)
        alive = alive & (nr > tol * scale)
        if not bool(alive.any()):
            break
        dim = dim + alive.long()
        q = r / nr.clamp_min(_tiny(v.dtype))[:, None]
        Q.append(q)
        JQ.append(jvp(q))
    Qm, JQm = torch.stack(Q, -1), torch.stack(JQ, -1)  # [B, n, j]
    H = Qm.transpose(-1, -2) @ JQm
    cdtype = torch.complex128 if v.dtype == torch.float64 else torch.complex64
    out = torch.zeros(batch, dtype=cdtype, device=v.device)
    for j in range(1, H.shape[-1] + 1):
        sel = dim == j
        if bool(sel.any()):
            ev = torch.linalg.eigvals(H[sel][:, :j, :j])
            out[sel] = ev.gather(-1, ev.abs().argmax(-1, keepdim=True))[:, 0]
    return out


def power_radius(jvp: Op, batch: int, n: int, *, tol: float, max_iter: int, seed: int, dtype, device,
                 subspace: int = 4) -> tuple[Tensor, int, Tensor, Tensor]:
    """Returns ``(rho[B], iterations, converged[B], eigenvalue[B] complex)``."""
    tol = _effective_tol(tol, dtype)
    tiny = _tiny(dtype)
    k = max(1, min(subspace, n))
    v = random_unit(batch, n, seed=seed, dtype=dtype, device=device)
    w = jvp(v)
    rho = torch.zeros(batch, dtype=dtype, device=device)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    lam = torch.zeros(batch, dtype=cdtype, device=device)
    streak = torch.zeros(batch, dtype=torch.long, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    it = 0
    for it in range(1, max_iter + 1):
        new_lam = _ritz_max(v, w, jvp, k, tol)
        new = new_lam.abs().to(dtype)
        c = bdot(v, w)
        nw = bnorm(w)
        one_d = bnorm(w - c[:, None] * v) <= tol * nw  # v is an eigenvector to tolerance
        zero = nw <= tiny  # J v = 0: J is nilpotent on the orbit of v
        close = (new - rho).abs() <= tol * new.clamp_min(tiny)
        streak = torch.where(close & (it > 1), streak + 1, torch.zeros_like(streak))
        rho = torch.where(converged, rho, new)
        lam = torch.where(converged, lam, new_lam)
        # Several consecutive agreeing steps guard against a chance coincidence of two early estimates.
        converged = converged | (streak >= 3) | (one_d & (it > 1)) | zero
        if bool(converged.all()):
            break
        v = torch.where(zero[:, None], v, w / nw.clamp_min(tiny)[:, None])
        w = jvp(v)
    return rho, it, converged, lam
