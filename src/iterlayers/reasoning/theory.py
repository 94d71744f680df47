"""Closed forms for algorithm layers on quadratic energies, and their numerical counterparts.

Setting (Chen, Zhang, Reisinger, Song, NeurIPS 2020, Sec. 3-4): ``E(y) = 1/2 y^T Q y - b^T y`` with
``spec(Q) in [mu, L]``, ``y_0 = 0``.  Every layer here is linear in ``b`` and a spectral function of
``Q``::

    y_k = P_k(Q) b,      P_k(lam) = (1 - r_k(lam)) / lam,      y_k - y* = -r_k(Q) Q^{-1} b,

with the *residual polynomial* ``r_k`` (``r_k(0) = 1``):

* GD:  ``r_k(lam) = (1 - s lam)^k``;
* NAG: ``r_k(lam) = [M(lam)^k]_{00} + [M(lam)^k]_{01}``, ``M = [[(1+beta) a, -beta a], [1, 0]]``,
  ``a = 1 - s lam`` (the 2x2 block recursion ``e_{t+1} = a((1+beta) e_t - beta e_{t-1})``, ``e_{-1}=e_0``);
* heavy ball: ``M = [[1 + beta - s lam, -beta], [1, 0]]``.

In every closed-form function below, ``k`` is the iteration count k of these formulas (the layer's
``max_iter``; ``k = 0`` is the start ``y_0 = 0``), the index of ``r_k`` and ``P_k``; the ``measure_*``
functions take a layer and, optionally, ``max_iter`` for its depth.

The three algorithm-layer properties of the paper, as functions of ``k, mu, L`` and the parameters
``phi = (s, beta)``:

* convergence: ``||y_k - y*|| <= C(k) ||y*||`` with ``C(k) = sup_{lam in [mu, L]} |r_k(lam)|``
  (GD: ``max(|1 - s mu|, |1 - s L|)^k``; NAG: ``~ (1 + k sqrt(s mu)) (1 - sqrt(s mu))^k``);
* stability (Lipschitz constants of ``(Q, b) -> y_k``, ``||y_k(Q,b) - y_k(Q',b')|| <=
  Stab_Q(k) ||b|| ||Q - Q'|| + Stab_b(k) ||b - b'||`` for perturbations of ``Q`` that keep its
  eigenvectors, which is exactly the class the paper's experiment learns)::

      Stab_b(k) = sup_lam |P_k(lam)|,       Stab_Q(k) = sup_lam |P_k'(lam)|;

  for GD ``Stab_b = (1 - (1 - s mu)^k) / mu`` grows monotonically to ``1/mu`` (the minimiser's own
  Lipschitz constant).  NAG's ``Stab_b`` never overshoots ``1/mu`` either: its momentum puts a double
  root ``1 - sqrt(s mu)`` of the recursion at ``lam = mu``, so ``r_k(mu) = (1 + k sqrt(s mu))
  (1 - sqrt(s mu))^k > 0`` and (derived, checked numerically on the grid) the sup is
  ``P_k(mu) = (1 - r_k(mu)) / mu``, increasing in ``k`` and approached from below (``mu = 0.1``,
  ``s = L = 1``: ``1/mu - Stab_b(79) = 2.4e-11``; ``tests/reasoning/test_reasoning_stability.py``).
  NAG is less stable than GD in the sense that it approaches ``1/mu`` faster and its ``Stab_Q`` is larger;
  general (non-commuting) perturbations follow the Daleckii-Krein formula :func:`frechet_derivative`;
* sensitivity (Lipschitz constant in the step size): ``Sen(k) = sup_lam |dP_k(lam)/ds|``
  (GD: ``k (1 - s mu)^{k-1}``; for NAG with ``beta = beta(s, mu)`` the total derivative).

The ``sup`` over ``lam`` is taken on a dense grid of ``[mu, L]`` (plus its endpoints); derivatives of
the closed forms are exact (autograd through the closed-form expression in float64).  The ``measure_*``
functions compute the same quantities numerically from any layer (autograd through the layer itself),
which is what the tests compare against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from iterlayers.analysis import fit_linear_rate, spectral_radius

from .energy import Quadratic
from iterlayers.errors import ValidationError

__all__ = [
    "ALGORITHMS",
    "residual",
    "transfer",
    "closed_form_iterates",
    "convergence_factor",
    "asymptotic_rate",
    "stability",
    "sensitivity",
    "frechet_derivative",
    "measure_convergence",
    "measure_stability",
    "measure_sensitivity",
    "measure_asymptotic_rate",
    "measure_trace_rate",
    "nag_beta",
]

ALGORITHMS = ("gd", "nag", "heavy_ball")


def nag_beta(mu: float, s) -> Tensor:
    """Nesterov's momentum for strongly convex problems ``(1 - sqrt(mu s)) / (1 + sqrt(mu s))``."""
    r = torch.sqrt(torch.as_tensor(mu, dtype=torch.float64) * torch.as_tensor(s, dtype=torch.float64))
    return (1 - r) / (1 + r)


def _check(algorithm: str, k: int) -> None:
    if algorithm not in ALGORITHMS:
        raise ValidationError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValidationError(f"k must be a non-negative int, got {k!r}")


def _momentum(algorithm: str, s: Tensor, beta, mu) -> Tensor:
    if algorithm == "gd":
        return torch.zeros_like(s)
    if beta is not None:
        return torch.as_tensor(beta, dtype=s.dtype)
    if algorithm == "nag" and mu is not None:
        return nag_beta(mu, s)
    raise ValidationError(f"{algorithm} needs beta (momentum) or, for nag, mu")


def residual(algorithm: str, lam: Tensor, k: int, *, s=1.0, beta=None, mu=None) -> Tensor:
    """Residual polynomial ``r_k(lam)`` (``y_k - y* = -r_k(Q) y*``), elementwise in ``lam``; ``k`` is the
    iteration count k of the formulas.

    ``beta`` is the momentum; for ``"nag"`` it defaults to ``nag_beta(mu, s)`` when ``mu`` is given.
    """
    _check(algorithm, k)
    lam = torch.as_tensor(lam, dtype=torch.float64) if not isinstance(lam, Tensor) else lam
    s = torch.as_tensor(s, dtype=lam.dtype)
    if algorithm == "gd":
        return (1 - s * lam) ** k
    b = _momentum(algorithm, s, beta, mu).to(lam.dtype)
    a = 1 - s * lam
    if algorithm == "nag":
        m00, m01 = (1 + b) * a, -b * a
    else:
        m00, m01 = 1 + b - s * lam, -b * torch.ones_like(lam)
    one, zero = torch.ones_like(lam), torch.zeros_like(lam)
    M = torch.stack([torch.stack([m00 * one, m01 * one], -1), torch.stack([one, zero], -1)], -2)
    Mk = torch.linalg.matrix_power(M, k)
    return Mk[..., 0, 0] + Mk[..., 0, 1]


def transfer(algorithm: str, lam: Tensor, k: int, *, s=1.0, beta=None, mu=None) -> Tensor:
    """Filter ``P_k(lam) = (1 - r_k(lam)) / lam`` with ``y_k = P_k(Q) b`` (``k``: the iteration count k)."""
    return (1 - residual(algorithm, lam, k, s=s, beta=beta, mu=mu)) / lam


def closed_form_iterates(algorithm: str, Q: Tensor, b: Tensor, k: int, *, s=1.0, beta=None,
                         mu=None) -> Tensor:
    """``y_k = V P_k(Lambda) V^T b`` from the eigendecomposition ``Q = V Lambda V^T`` ([B, n]); ``k`` is the
    iteration count k of the formulas."""
    lam, V = torch.linalg.eigh(Q)
    p = transfer(algorithm, lam, k, s=s, beta=beta, mu=mu)
    return torch.einsum("bij,bj->bi", V, p * torch.einsum("bji,bj->bi", V, b))


def _grid(mu: float, L: float, n: int) -> Tensor:
    if not (0 < mu <= L):
        raise ValidationError(f"need 0 < mu <= L, got mu={mu!r}, L={L!r}")
    return torch.linspace(mu, L, n, dtype=torch.float64)


def convergence_factor(algorithm: str, k: int, mu: float, L: float, *, s=1.0, beta=None,
                       grid: int = 2001) -> float:
    """``C(k) = sup_{lam in [mu, L]} |r_k(lam)|``: worst relative error ``||y_k - y*|| / ||y*||`` after ``k``
    iterations (``k``: the iteration count k of the formulas)."""
    if algorithm == "gd":
        _check(algorithm, k)
        return max(abs(1 - s * mu), abs(1 - s * L)) ** k
    lam = _grid(mu, L, grid)
    return float(residual(algorithm, lam, k, s=s, beta=beta, mu=mu).abs().max())


def asymptotic_rate(algorithm: str, mu: float, L: float, *, s=1.0, beta=None, grid: int = 2001) -> float:
    """Per-step linear rate: ``sup_lam`` spectral radius of the iteration matrix.

    GD: ``max(|1 - s mu|, |1 - s L|)``; NAG with ``beta = nag_beta(mu, s)``, ``s <= 1/L``:
    ``1 - sqrt(s mu)``; heavy ball with Polyak's constants: ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)``.
    """
    _check(algorithm, 1)
    if algorithm == "gd":
        return max(abs(1 - s * mu), abs(1 - s * L))
    lam = _grid(mu, L, grid)
    st = torch.as_tensor(s, dtype=torch.float64)
    b = _momentum(algorithm, st, beta, mu)
    if algorithm == "nag":
        tr, det = (1 + b) * (1 - st * lam), b * (1 - st * lam)
    else:
        tr, det = 1 + b - st * lam, b * torch.ones_like(lam)
    disc = (tr * tr - 4 * det).to(torch.complex128)
    roots = torch.stack([(tr + disc.sqrt()) / 2, (tr - disc.sqrt()) / 2])
    return float(roots.abs().max())


def _sup_abs(values: Tensor) -> float:
    return float(values.abs().max())


def stability(algorithm: str, k: int, mu: float, L: float, *, s=1.0, beta=None,
              grid: int = 2001) -> dict[str, float]:
    """``{"b": Stab_b(k), "Q": Stab_Q(k)}`` (see module docstring); ``Stab_Q`` is per unit ``||b||``.

    ``k`` is the iteration count k of the formulas; ``k = 0`` gives ``0`` (``y_0 = 0`` ignores the energy).
    For NAG given by ``mu`` the momentum is ``nag_beta(mu, s)`` and is held fixed while ``Q`` moves (it
    depends on the class, not on ``Q``).
    """
    _check(algorithm, k)
    if algorithm == "nag" and beta is None:
        beta = float(nag_beta(mu, s))
    lam = _grid(mu, L, grid).requires_grad_(True)
    with torch.enable_grad():
        p = transfer(algorithm, lam, k, s=s, beta=beta)
        (dp,) = torch.autograd.grad(p.sum(), lam)
    return {"b": _sup_abs(p.detach()), "Q": _sup_abs(dp)}


def sensitivity(algorithm: str, k: int, mu: float, L: float, *, s=1.0, beta=None,
                grid: int = 2001) -> float:
    """``Sen(k) = sup_lam |d P_k(lam) / d s|`` per unit ``||b||`` (``k``: the iteration count k of the formulas).

    For NAG without an explicit ``beta`` the momentum ``nag_beta(mu, s)`` moves with ``s`` (the paper's
    parametrisation); otherwise ``beta`` is held fixed.
    """
    _check(algorithm, k)
    lam = _grid(mu, L, grid)
    # one copy of s per grid point, so that one backward pass gives every d P_k(lam_i) / d s
    st = torch.full_like(lam, float(s)).requires_grad_(True)
    with torch.enable_grad():
        p = transfer(algorithm, lam, k, s=st, beta=beta, mu=mu)
        (dp,) = torch.autograd.grad(p.sum(), st)
    return _sup_abs(dp)


def frechet_derivative(algorithm: str, Q: Tensor, b: Tensor, dQ: Tensor, k: int, *, s=1.0, beta=None,
                       mu=None) -> Tensor:
    """Directional derivative ``d/dt y_k(Q + t dQ, b)`` at ``t = 0`` (Daleckii-Krein formula); ``k`` is the
    iteration count k of the formulas.

    With ``Q = V diag(lam) V^T``: ``D y_k[dQ] = V ((V^T dQ V) o G) V^T b``, where
    ``G_ij = (P_k(lam_i) - P_k(lam_j)) / (lam_i - lam_j)`` and ``G_ii = P_k'(lam_i)``.
    """
    lam, V = torch.linalg.eigh(Q)
    lam_ = lam.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        p = transfer(algorithm, lam_, k, s=s, beta=beta, mu=mu)
        (dp,) = torch.autograd.grad(p.sum(), lam_)
    p = p.detach()
    diff_l = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    diff_p = p.unsqueeze(-1) - p.unsqueeze(-2)
    close = diff_l.abs() < 1e-9 * (1 + lam.abs().max())
    G = torch.where(close, 0.5 * (dp.unsqueeze(-1) + dp.unsqueeze(-2)), diff_p / torch.where(close, torch.ones_like(diff_l), diff_l))
    inner = (V.transpose(-1, -2) @ dQ @ V) * G
    return torch.einsum("bij,bj->bi", V @ inner @ V.transpose(-1, -2), b)


# ---------------------------------------------------------------------------------------------
# Numerical counterparts (autograd through an actual layer)
# ---------------------------------------------------------------------------------------------
def _run(layer, Q: Tensor, b: Tensor, max_iter: int | None) -> Tensor:
    return layer(Quadratic(Q, b), max_iter=max_iter)


def measure_convergence(layer, Q: Tensor, b: Tensor, *, max_iter: int | None = None) -> Tensor:
    """Per-sample ``||y_k - y*|| / ||y*||`` of ``layer`` on the quadratic ``(Q, b)`` (``k = max_iter``, the
    layer's own depth by default)."""
    y_star = Quadratic(Q, b).minimizer()
    with torch.no_grad():
        y = _run(layer, Q, b, max_iter)
    return (y - y_star).norm(dim=-1) / y_star.norm(dim=-1)


def measure_stability(layer, Q: Tensor, b: Tensor, *, max_iter: int | None = None) -> dict[str, Tensor]:
    """Per-sample Lipschitz constants of ``layer`` measured by autograd through its iterations.

    ``"b"``: ``||d y_k / d b||_2`` (spectral norm of the [n, n] Jacobian);
    ``"Q"``: ``||d y_k / d lam||_2 / ||b||`` where ``lam`` are the eigenvalues of ``Q`` moved with fixed
    eigenvectors (the commuting perturbations of :func:`stability`).
    """
    lam, V = torch.linalg.eigh(Q)
    B, n = b.shape
    jac_b = torch.zeros(B, n, n, dtype=b.dtype)
    jac_l = torch.zeros(B, n, n, dtype=b.dtype)
    with torch.enable_grad():
        lam_ = lam.detach().clone().requires_grad_(True)
        b_ = b.detach().clone().requires_grad_(True)
        Qm = (V * lam_.unsqueeze(-2)) @ V.transpose(-1, -2)
        y = _run(layer, Qm, b_, max_iter)
        for i in range(n):
            gl, gb = torch.autograd.grad(y[:, i].sum(), (lam_, b_), retain_graph=i < n - 1)
            jac_l[:, i], jac_b[:, i] = gl, gb
    return {"b": torch.linalg.matrix_norm(jac_b, ord=2),
            "Q": torch.linalg.matrix_norm(jac_l, ord=2) / b.norm(dim=-1)}


def measure_sensitivity(layer_factory, Q: Tensor, b: Tensor, s: float, *, eps: float = 1e-6) -> Tensor:
    """Per-sample ``||d y_k / d s|| / ||b||`` by central differences of ``layer_factory(s)``."""
    with torch.no_grad():
        yp = _run(layer_factory(s + eps), Q, b, None)
        ym = _run(layer_factory(s - eps), Q, b, None)
    return (yp - ym).norm(dim=-1) / (2 * eps) / b.norm(dim=-1)



def measure_asymptotic_rate(layer, Q: Tensor, b: Tensor) -> Tensor:
    """Per-sample spectral radius of the layer's (tied) update Jacobian at its fixed point.

    Measured with the analysis toolkit (``iterlayers.analysis.spectral_radius``, dense path) on the
    flattened state map of :meth:`UnrolledAlgorithm.fixed_point_map`; the closed-form counterpart is
    :func:`asymptotic_rate` (for quadratics the Jacobian does not depend on the point).
    """
    bound = Quadratic(Q, b)
    f = layer.fixed_point_map(bound)
    y_star = bound.minimizer()
    z_star = torch.cat([y_star] * layer.state_size, dim=-1)
    return spectral_radius(lambda z, x: f(z), z_star, None, method="dense").value


def measure_trace_rate(layer, Q: Tensor, b: Tensor, *, max_iter: int = 60, tail: float = 0.5) -> Tensor:
    """Per-sample linear rate fitted (``iterlayers.analysis.fit_linear_rate``) to ``||y_t - y*||``, ``t <= max_iter``."""
    bound = Quadratic(Q, b)
    y_star = bound.minimizer()
    with torch.no_grad():
        trace = layer(bound, max_iter=max_iter, return_all=True)
    res = torch.stack([(y - y_star).norm(dim=-1) for y in trace[1:]])
    return fit_linear_rate(res, tail=tail)
