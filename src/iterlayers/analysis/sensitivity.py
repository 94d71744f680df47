"""Sensitivity of a fixed point (and of unrolled iterates) to the input and to the parameters.

At a fixed point ``z* = f(z*, x; theta)`` with ``I - J_z`` invertible (``J_z = df/dz`` at z*), the implicit
function theorem gives

    dz*/dx     = (I - J_z)^{-1} J_x,        dz*/dtheta = (I - J_z)^{-1} J_theta,

the same linear system the implicit backward pass of a DEQ solves (Bai et al. 2019; Kawaguchi 2021,
arXiv 2102.07346, eq. for the implicit gradient with ``U = (I - gamma sigma(A))^{-1}``). Their spectral norms
are the worst-case amplification of an input / parameter perturbation. Matrix-free, ``||M||_2`` is
``sqrt(lambda_max(M^T M))`` by power iteration (or Lanczos); each product ``M^T M v`` costs a jvp, a GMRES
solve with ``I - J_z``, a GMRES solve with ``I - J_z^T`` and a vjp. ``method="dense"`` builds the Jacobians.

``condition_number``: ``kappa(I - J_z) = sigma_max / sigma_min``, which controls how errors in the forward
residual translate into errors in z* and how hard the backward linear solve is.

For unrolled layers ``y_{k+1} = step(y_k, x)`` the quantity of interest is how much the k-th iterate moves when
the problem input moves, as a function of k: Chen et al. 2020 (arXiv 2006.13401) tie this *sensitivity* (and
the related stability) to generalisation, showing gradient descent stays insensitive while accelerated
methods amplify perturbations at intermediate k (``unrolled_sensitivity``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._eig import top_eig_sym
from ._linear import (CellLinearization, LinearMap, bnorm, call_cell, check_method, check_positive,
                      check_state, dense_from_vjp)
from ._linsolve import gmres
from iterlayers.errors import OptionTypeError, ValidationError


def _solve_tol(tol: float, solve_tol: float | None) -> float:
    return 1e-2 * tol if solve_tol is None else solve_tol


def _opts(method, tol, max_iter, valid=("power", "lanczos", "dense")):
    check_method(method, valid)
    check_positive(tol, "tol")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValidationError(f"max_iter must be a positive int, got {max_iter!r}")


def input_sensitivity(cell: Callable, z_star: Tensor, x: Tensor, *, method: str = "power", tol: float = 1e-6,
                      max_iter: int = 200, seed: int = 0, solve_tol: float | None = None,
                      solve_max_iter: int = 500) -> Tensor:
    """``||dz*/dx||_2 = ||(I - J_z)^{-1} J_x||_2`` per sample (``[B]``), at a fixed point ``z*`` of ``cell(., x)``.

    ``method``: ``"power"`` / ``"lanczos"`` on ``M^T M`` (matrix-free, GMRES inner solves to ``solve_tol``,
    default ``tol / 100``) or ``"dense"``.
    """
    _opts(method, tol, max_iter)
    lin = CellLinearization(cell, z_star, x, need_x=True)
    if method == "dense":
        Jz, Jx = dense_from_vjp(lin.Jz), dense_from_vjp(lin.Jx)
        eye = torch.eye(lin.n, dtype=lin.dtype, device=lin.device)
        return torch.linalg.matrix_norm(torch.linalg.solve(eye - Jz, Jx), ord=2)
    stol = _solve_tol(tol, solve_tol)
    Jz, Jx = lin.Jz, lin.Jx

    def op(v):
        w, _ = gmres(lambda u: u - Jz.jvp(u), Jx.jvp(v), tol=stol, max_iter=solve_max_iter)
        y, _ = gmres(lambda u: u - Jz.vjp(u), w, tol=stol, max_iter=solve_max_iter)
        return Jx.vjp(y)

    lam, _, _ = top_eig_sym(op, lin.batch, Jx.n_in, method=method, tol=tol, max_iter=max_iter, seed=seed,
                            dtype=lin.dtype, device=lin.device)
    return lam.sqrt()


def condition_number(cell: Callable, z_star: Tensor, x: Tensor | None = None, *, method: str = "power",
                     tol: float = 1e-6, max_iter: int = 200, seed: int = 0, solve_tol: float | None = None,
                     solve_max_iter: int = 500) -> Tensor:
    """``kappa(I - J_z) = sigma_max(I - J_z) / sigma_min(I - J_z)`` per sample (inf if singular).

    Matrix-free: ``sigma_max`` from ``A^T A`` and ``1 / sigma_min = ||A^{-1}||_2`` from ``A^{-T} A^{-1}`` (two
    GMRES solves per product), ``A = I - J_z``; ``method="dense"`` uses the singular values.
    """
    _opts(method, tol, max_iter)
    lin = CellLinearization(cell, z_star, x)
    if method == "dense":
        eye = torch.eye(lin.n, dtype=lin.dtype, device=lin.device)
        s = torch.linalg.svdvals(eye - dense_from_vjp(lin.Jz))
        return s[:, 0] / s[:, -1]
    Jz = lin.Jz
    kw = dict(method=method, tol=tol, max_iter=max_iter, seed=seed, dtype=lin.dtype, device=lin.device)

    def A(u):
        return u - Jz.jvp(u)

    def At(u):
        return u - Jz.vjp(u)

    smax2, _, _ = top_eig_sym(lambda v: At(A(v)), lin.batch, lin.n, **kw)
    stol = _solve_tol(tol, solve_tol)

    def inv(v):
        w, _ = gmres(At, v, tol=stol, max_iter=solve_max_iter)
        y, _ = gmres(A, w, tol=stol, max_iter=solve_max_iter)
        return y

    inv2, _, _ = top_eig_sym(inv, lin.batch, lin.n, **kw)
    return (smax2 * inv2).sqrt()


class _ParamMap:
    """Derivative of one sample's output ``out [1, n]`` with respect to a list of parameters (flattened)."""

    def __init__(self, out: Tensor, params: Sequence[Tensor]):
        self.out, self.params = out, list(params)
        self.sizes = [p.numel() for p in self.params]
        self.n_in = sum(self.sizes)
        self._dual = None

    def vjp(self, u: Tensor) -> Tensor:
        with torch.enable_grad():
            gs = torch.autograd.grad(self.out, self.params, u.reshape(self.out.shape), retain_graph=True,
                                     allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g.detach()).reshape(-1)
                          for g, p in zip(gs, self.params)])[None]

    def jvp(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            if self._dual is None:
                dummy = torch.zeros_like(self.out, requires_grad=True)
                gs = torch.autograd.grad(self.out, self.params, dummy, create_graph=True, retain_graph=True,
                                         allow_unused=True)
                self._dual = (dummy, gs)
            dummy, gs = self._dual
            chunks = v.reshape(-1).split(self.sizes)
            pairs = [(g, c.reshape(g.shape)) for g, c in zip(gs, chunks) if g is not None and g.requires_grad]
            if not pairs:
                return torch.zeros(1, self.out.numel(), dtype=self.out.dtype, device=self.out.device)
            (r,) = torch.autograd.grad([g for g, _ in pairs], dummy, [c for _, c in pairs], retain_graph=True,
                                       allow_unused=True)
        if r is None:
            return torch.zeros(1, self.out.numel(), dtype=self.out.dtype, device=self.out.device)
        return r.detach().reshape(1, -1)


def parameter_sensitivity(cell: Callable, z_star: Tensor, x: Tensor | None = None, *,
                          params: Iterable[Tensor] | None = None, method: str = "power", tol: float = 1e-6,
                          max_iter: int = 200, seed: int = 0, solve_tol: float | None = None,
                          solve_max_iter: int = 500) -> Tensor:
    """``||dz*/dtheta||_2 = ||(I - J_z)^{-1} J_theta||_2`` per sample (``[B]``), theta = ``params`` (default: the
    cell's parameters that require grad).

    Parameters are shared across the batch, so this loops over samples (each evaluated as a batch of one);
    matrix-free it runs power iteration / Lanczos on the ``n x n`` operator ``M M^T``.
    """
    _opts(method, tol, max_iter)
    check_state(z_star, "z_star")
    if params is None:
        if not isinstance(cell, nn.Module):
            raise ValidationError("params must be given when cell is not an nn.Module")
        params = [p for p in cell.parameters() if p.requires_grad]
    params = list(params)
    if not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise OptionTypeError("params must be Tensors with requires_grad=True")
    batch, n = z_star.shape[0], z_star[0].numel()
    out = torch.zeros(batch, dtype=z_star.dtype, device=z_star.device)
    if not params:
        return out
    stol = _solve_tol(tol, solve_tol)
    eye = torch.eye(n, dtype=z_star.dtype, device=z_star.device)
    for b in range(batch):
        with torch.enable_grad():
            zb = z_star[b:b + 1].detach().requires_grad_(True)
            xb = None if x is None else x[b:b + 1].detach()
            fb = call_cell(cell, zb, xb)
        Jz, Jt = LinearMap(fb, zb), _ParamMap(fb, params)
        if method == "dense":
            Jz_d = dense_from_vjp(Jz)[0]
            Jt_d = torch.cat([Jt.vjp(eye[i:i + 1]) for i in range(n)])  # rows: [n, P]
            M = torch.linalg.solve(eye - Jz_d, Jt_d)
            out[b] = torch.linalg.matrix_norm(M, ord=2)
            continue

        def op(u, Jz=Jz, Jt=Jt):
            y, _ = gmres(lambda w: w - Jz.vjp(w), u, tol=stol, max_iter=solve_max_iter)
            q = Jt.jvp(Jt.vjp(y))
            w, _ = gmres(lambda w: w - Jz.jvp(w), q, tol=stol, max_iter=solve_max_iter)
            return w

        lam, _, _ = top_eig_sym(op, 1, n, method=method, tol=tol, max_iter=max_iter, seed=seed + b,
                                dtype=z_star.dtype, device=z_star.device)
        out[b] = lam[0].sqrt()
    return out


def _joint_jvp(out: Tensor, inputs: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """``sum_i d out / d inputs[i] . tangents[i]`` by the double-vjp identity (see ``_linear``)."""
    with torch.enable_grad():
        dummy = torch.zeros_like(out, requires_grad=True)
        gs = torch.autograd.grad(out, inputs, dummy, create_graph=True, retain_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(gs, tangents) if g is not None and g.requires_grad]
        if not pairs:
            return torch.zeros_like(out)
        (r,) = torch.autograd.grad([g for g, _ in pairs], dummy, [t for _, t in pairs], allow_unused=True)
    return torch.zeros_like(out) if r is None else r.detach()


def unrolled_sensitivity(step: Callable, y0: Tensor, x: Tensor, ks: Iterable[int],
                         perturbation: Tensor | str | None = None, *, eps: float | None = None, seed: int = 0,
                         method: str = "power", tol: float = 1e-6, max_iter: int = 200) -> Tensor:
    """Sensitivity of the k-th iterate ``y_k = step^k(y0, x)`` to the problem input x, for each k in ``ks``.

    Returns ``[len(ks), B]``:

    * ``perturbation`` a Tensor shaped like x (or None: a seeded standard normal direction ``delta``):
      with ``eps=None`` the directional derivative ``||(dy_k/dx) delta_b|| / ||delta_b||`` (forward tangent
      propagation ``t_{j+1} = J_y t_j + J_x delta``, exact); with a float ``eps`` the actual displacement
      ``||y_k(x + eps delta^) - y_k(x)|| / eps`` of a finite perturbation of size eps along the unit direction.
    * ``perturbation="worst"``: the worst case ``||dy_k/dx||_2`` (power iteration / Lanczos per k).

    ``y0`` is held fixed (it does not depend on x), so the value at k = 0 is 0.
    """
    check_state(y0, "y0")
    check_state(x, "x")
    ks = [int(k) for k in ks]
    if not ks or any(k < 0 for k in ks):
        raise ValidationError(f"ks must be a non-empty iterable of non-negative ints, got {ks}")
    K = max(ks)
    batch = x.shape[0]
    if isinstance(perturbation, str):
        if perturbation != "worst":
            raise ValidationError(f"perturbation must be a Tensor shaped like x, None, or 'worst'; got {perturbation!r}")
        if eps is not None:
            raise ValidationError("eps must be None with perturbation='worst' (it is a derivative norm)")
        _opts(method, tol, max_iter, ("power", "lanczos"))
        with torch.enable_grad():
            xl = x.detach().requires_grad_(True)
            ys = [y0.detach()]
            for _ in range(K):
                ys.append(call_cell(step, ys[-1], xl))
        res = torch.zeros(len(ks), batch, dtype=x.dtype, device=x.device)
        for i, k in enumerate(ks):
            if k == 0 or not ys[k].requires_grad:
                continue
            lm = LinearMap(ys[k], xl)
            lam, _, _ = top_eig_sym(lambda v: lm.vjp(lm.jvp(v)), batch, lm.n_in, method=method, tol=tol,
                                    max_iter=max_iter, seed=seed, dtype=x.dtype, device=x.device)
            res[i] = lam.sqrt()
        return res
    if perturbation is None:
        gen = torch.Generator().manual_seed(int(seed))
        delta = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
    elif isinstance(perturbation, Tensor):
        if perturbation.shape != x.shape:
            raise ValidationError(f"perturbation must have the shape of x {tuple(x.shape)}, got {tuple(perturbation.shape)}")
        delta = perturbation.detach().to(x)
    else:
        raise OptionTypeError(f"perturbation must be a Tensor, None or 'worst', got {type(perturbation).__name__}")
    dnorm = bnorm(delta.reshape(batch, -1))
    if bool((dnorm == 0).any()):
        raise ValidationError("perturbation must be non-zero for every sample")
    out = torch.zeros(K + 1, batch, dtype=x.dtype, device=x.device)
    if eps is not None:
        check_positive(eps, "eps")
        unit = delta / dnorm.reshape(batch, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            y, yp = y0.detach(), y0.detach()
            xp = x + eps * unit
            for k in range(1, K + 1):
                y, yp = call_cell(step, y, x), call_cell(step, yp, xp)
                out[k] = bnorm((yp - y).reshape(batch, -1)) / eps
    else:
        y = y0.detach()
        t = torch.zeros_like(y)
        for k in range(1, K + 1):
            with torch.enable_grad():
                yl, xl = y.detach().requires_grad_(True), x.detach().requires_grad_(True)
                yn = call_cell(step, yl, xl)
            t = _joint_jvp(yn, (yl, xl), (t, delta))
            y = yn.detach()
            out[k] = bnorm(t.reshape(batch, -1)) / dnorm
    return out[ks]
