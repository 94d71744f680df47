"""The convergence theory of Kawaguchi's implicit linear model, and the shallow model it is related to.

Reference: K. Kawaguchi, "On the Theory of Implicit Deep Learning: Global Convergence with Implicit Layers",
ICLR 2021, arXiv 2102.07346. Notation: Phi in R^{N x m} (rows phi(x_i)), U = (I - gamma sigma(A))^{-1},
R = B U (the end-to-end weight), the *shallow* explicit model f(x) = R phi(x) with loss L_R(R), and its optimum
L*_R = inf_R L_R(R). The implicit model can represent exactly the shallow model's functions (U is invertible,
so any R is B U for B = R U^{-1}), whatever the width m -- also m < m_y and m < N.

Global linear convergence (the mechanism of the paper's main theorem, written for our conventions).
Gradient flow dA/dt = -dL/dA, dB/dt = -dL/dB gives, because dL/dB = grad L_R(R) U^T,

    d/dt (L - L*_R) = -||dL/dA||^2 - ||dL/dB||^2 <= -||grad L_R(R) U^T||_F^2 <= -lambda_min(U U^T) ||grad L_R||^2.

If the shallow loss satisfies the gradient-domination (Polyak-Lojasiewicz) inequality
||grad L_R(R)||_F^2 >= mu (L_R(R) - L*_R), then

    L(A_t, B_t) - L*_R <= (L(A_0, B_0) - L*_R) exp(-mu * lambda_T * t),   lambda_T = inf_{s<=t} lambda_min(U_s U_s^T).

For the square loss L_R = sum_i ||R phi_i - y_i||^2, mu = 4 lambda_phi with lambda_phi the smallest *nonzero*
eigenvalue of Phi^T Phi (= lambda_min(Phi Phi^T) in the paper's column convention when rank Phi = m); with the
mean, mu = 4 lambda_phi / N. For the logistic loss the PL constant is local (it holds on sublevel sets when the
optimum is attained); we evaluate it along the trajectory. No width condition appears: lambda_min(U U^T) > 0 for
every A and even has the a-priori lower bound 1 / (1 + gamma ||sigma(A)||_2)^2 >= 1 / (1 + gamma sqrt(m))^2
(||sigma(A)||_2 <= sqrt(||sigma(A)||_1 ||sigma(A)||_inf) <= sqrt(m)).

For gradient descent with step eta the flow bound reads rho_flow = exp(-eta mu lambda_T) per iteration; a
certified discrete version holds whenever every step achieves the sufficient decrease
L_k - L_{k+1} >= (eta / 2) ||grad L_k||^2 (true if eta <= 1 / local smoothness):
rho_gd = 1 - eta mu lambda_T / 2.

Relation to trust-region Newton on the shallow model. Writing J = d vec(R) / d(A, B), the flow induces

    d vec(R)/dt = -P_t grad L_R(R_t),      P_t = J J^T  >=  I_{m_y} (x) U^T U  > 0,

i.e. a preconditioned (natural-gradient-like) flow of the *shallow* problem. Its velocity is the solution of the
trust-region problem min_v <grad L_R, v> s.t. ||v||_{P^{-1}} <= delta with delta = ||grad_{A,B} L||, and the
trust-region *Newton* step of the shallow model in the metric P^{-1},

    v_TR = argmin_v <g, v> + 1/2 v^T H v   s.t.  v^T P^{-1} v <= delta^2     (= -(H + lam P^{-1})^{-1} g),

agrees with the implicit model's step -eta P g up to O(eta^2) when delta = eta ||grad_{A,B} L|| (the
multiplier lam ~ 1/eta dominates H). NOTE: the paper's exact statement of this relation (its choice of
Hessian model and radius) could not be read through our search tool (only the abstract and introduction were
retrievable); this module implements the relation as derived above and the tests check every step of it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from iterlayers.errors import ShapeMismatchError, ValidationError

from .model import (
    ImplicitLinearModel,
    _as_targets,
    _check_choice,
    LOSSES,
    REDUCTIONS,
    column_softmax,
    loss_fn,
    loss_grad,
)

__all__ = [
    "ShallowLinearModel",
    "ShallowOptimum",
    "TheoremQuantities",
    "shallow_loss",
    "shallow_grad",
    "shallow_hessian",
    "shallow_optimum",
    "min_nonzero_eig",
    "pl_constant_square",
    "local_pl_constant",
    "lambda_U",
    "lambda_U_range",
    "lambda_U_bounds",
    "logistic_infimum_attained",
    "nearest_least_squares",
    "theorem_quantities",
    "rate_bounds",
    "induced_metric",
    "trust_region_subproblem",
    "trust_region_newton_step",
]


# --------------------------------------------------------------------------------- the shallow model
class ShallowLinearModel(nn.Module):
    """The shallow explicit model f(x) = R phi(x) of Kawaguchi (2021), on precomputed features phi(x)."""

    def __init__(self, width: int, out_features: int, *, R: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if R is None:
            R = torch.zeros(out_features, width, dtype=dtype or torch.get_default_dtype())
        if R.shape != (out_features, width):
            raise ValidationError(f"R must have shape ({out_features}, {width}), got {tuple(R.shape)}")
        self.R = nn.Parameter(R.detach().clone())

    @classmethod
    def from_implicit(cls, model: ImplicitLinearModel) -> "ShallowLinearModel":
        """The shallow model with the same function: R = B (I - gamma sigma(A))^{-1}."""
        with torch.no_grad():
            return cls(model.width, model.out_features, R=model.shallow_weight())

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return phi @ self.R.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"width={self.R.shape[1]}, out_features={self.R.shape[0]}"


def shallow_loss(R: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, *, loss: str = "squared",
                 reduction: str = "sum") -> torch.Tensor:
    """L_R(R) = sum_i l(R phi_i, y_i)."""
    return loss_fn(loss, phi @ R.transpose(0, 1), y, reduction=reduction)


def shallow_grad(R: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, *, loss: str = "squared",
                 reduction: str = "sum") -> torch.Tensor:
    """grad L_R(R) = sum_i g_i phi_i^T = G^T Phi (closed form)."""
    return loss_grad(loss, phi @ R.transpose(0, 1), y, reduction=reduction).transpose(0, 1) @ phi


def shallow_hessian(R: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, *, loss: str = "squared",
                    reduction: str = "sum") -> torch.Tensor:
    """Hessian of L_R in vec(R) (row-major: index o * m + j), closed form.

    Square: 2 I_{m_y} (x) Phi^T Phi. Logistic: sum_i (diag(p_i) - p_i p_i^T) (x) phi_i phi_i^T (times the
    target mass, 1 for labels). Divided by N for ``reduction="mean"``.
    """
    _check_choice("loss", loss, LOSSES)
    _check_choice("reduction", reduction, REDUCTIONS)
    n, m = phi.shape
    my = R.shape[0]
    if loss == "squared":
        h = torch.kron(torch.eye(my, dtype=phi.dtype, device=phi.device), 2.0 * phi.transpose(0, 1) @ phi)
    else:
        q = phi @ R.transpose(0, 1)
        t = _as_targets("logistic", q, y)
        p = torch.softmax(q, dim=1)
        w = t.sum(1)
        # sum_i w_i [diag(p_i) - p_i p_i^T]_{o,o'} phi_ij phi_ij'
        diag_part = torch.einsum("i,io,ij,ik->ojk", w, p, phi, phi)
        outer = torch.einsum("i,io,ip,ij,ik->ojpk", w, p, p, phi, phi)
        h = -outer
        idx = torch.arange(my)
        h[idx, :, idx, :] += diag_part
        h = h.reshape(my * m, my * m)
    return h / n if reduction == "mean" else h


@dataclass
class ShallowOptimum:
    """The optimum of the shallow problem: R*, L*_R, and how it was found.

    ``nstep`` is the number of iterations taken (the core's word, as :class:`~iterlayers.SolverStats`'s
    ``nstep``; at most :func:`shallow_optimum`'s ``max_iter``): 1 for the least-squares solve of the square
    loss, the Newton steps for the logistic loss."""

    R: torch.Tensor
    value: float
    grad_norm: float
    nstep: int


def shallow_optimum(phi: torch.Tensor, y: torch.Tensor, *, loss: str = "squared", reduction: str = "sum",
                    out_features: int | None = None, max_iter: int = 100, tol: float = 1e-13) -> ShallowOptimum:
    """L*_R = min_R L_R(R): least squares for the square loss, damped Newton for the logistic loss (float64).

    ``out_features`` is needed only with integer labels whose largest class is absent from ``y``.
    """
    _check_choice("loss", loss, LOSSES)
    _check_choice("reduction", reduction, REDUCTIONS)
    phi64 = phi.detach().to(torch.float64)
    y64 = y.detach().to(torch.float64) if torch.is_floating_point(y) else y.detach()
    n, m = phi64.shape
    if loss == "squared":
        t = _as_targets("squared", torch.empty(n, _out_dim(y64, out_features), dtype=torch.float64), y64)
        R = torch.linalg.lstsq(phi64, t, driver="gelsd").solution.transpose(0, 1)
        iters = 1
    else:
        my = _out_dim(y64, out_features)
        R = torch.zeros(my, m, dtype=torch.float64)
        iters = 0
        for iters in range(1, max_iter + 1):
            g = shallow_grad(R, phi64, y64, loss=loss, reduction=reduction)
            if float(g.norm()) < tol * max(1.0, float(shallow_loss(R, phi64, y64, loss=loss, reduction=reduction))):
                break
            h = shallow_hessian(R, phi64, y64, loss=loss, reduction=reduction)
            # the softmax is invariant to adding a constant to every class: H is singular along that direction,
            # so the Newton step is the minimum-norm least-squares solution
            step = torch.linalg.lstsq(h, g.reshape(-1, 1), driver="gelsd").solution.reshape(my, m)
            f0 = float(shallow_loss(R, phi64, y64, loss=loss, reduction=reduction))
            slope = float((g * step).sum())
            s = 1.0
            while s > 1e-10:  # backtracking (Armijo) keeps the damped Newton method globally convergent
                trial = float(shallow_loss(R - s * step, phi64, y64, loss=loss, reduction=reduction))
                if trial <= f0 - 1e-4 * s * slope:
                    break
                s *= 0.5
            R = R - s * step
    value = float(shallow_loss(R, phi64, y64, loss=loss, reduction=reduction))
    gnorm = float(shallow_grad(R, phi64, y64, loss=loss, reduction=reduction).norm())
    return ShallowOptimum(R=R, value=value, grad_norm=gnorm, nstep=iters)


def _out_dim(y: torch.Tensor, default: int | None) -> int:
    if torch.is_floating_point(y):
        return 1 if y.dim() == 1 else int(y.shape[1])
    return int(y.max()) + 1 if default is None else default


# --------------------------------------------------------------------------------- theorem quantities
def min_nonzero_eig(phi: torch.Tensor, *, rtol: float = 1e-10) -> tuple[float, int]:
    """(smallest nonzero eigenvalue of Phi^T Phi, rank of Phi): lambda_phi of the PL constant."""
    ev = torch.linalg.eigvalsh(phi.detach().to(torch.float64).transpose(0, 1) @ phi.detach().to(torch.float64))
    cut = rtol * float(ev.max().clamp_min(0))
    nz = ev[ev > cut]
    return (float(nz.min()) if len(nz) else 0.0), int(len(nz))


def pl_constant_square(phi: torch.Tensor, *, reduction: str = "sum") -> float:
    """mu with ||grad L_R||_F^2 >= mu (L_R - L*_R) for the square loss: 4 lambda_phi (/ N for the mean)."""
    _check_choice("reduction", reduction, REDUCTIONS)
    lam, _ = min_nonzero_eig(phi)
    return 4.0 * lam / (phi.shape[0] if reduction == "mean" else 1.0)


def local_pl_constant(R: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, optimum: float, *,
                      loss: str = "squared", reduction: str = "sum") -> float:
    """||grad L_R(R)||^2 / (L_R(R) - L*_R): the gradient-domination ratio at R (used for the logistic loss)."""
    gap = float(shallow_loss(R, phi, y, loss=loss, reduction=reduction)) - optimum
    g2 = float(shallow_grad(R, phi, y, loss=loss, reduction=reduction).pow(2).sum())
    return g2 / gap if gap > 0 else float("inf")


def lambda_U(model: ImplicitLinearModel) -> float:
    """lambda_min(U U^T) = sigma_min(U)^2 = 1 / sigma_max(I - gamma sigma(A))^2."""
    with torch.no_grad():
        m = model.width
        eye = torch.eye(m, dtype=model.A.dtype, device=model.A.device)
        smax = torch.linalg.matrix_norm(eye - model.cell.matrix(), ord=2)
    return float(1.0 / smax ** 2)


def lambda_U_range(model: ImplicitLinearModel) -> tuple[float, float]:
    """(lambda_min, lambda_max) of U U^T: 1 / sigma_max(I - gamma sigma(A))^2 and 1 / sigma_min(...)^2 (one SVD)."""
    with torch.no_grad():
        m = model.width
        eye = torch.eye(m, dtype=model.A.dtype, device=model.A.device)
        s = torch.linalg.svdvals(eye - model.cell.matrix())
    return float(1.0 / s[0] ** 2), float(1.0 / s[-1] ** 2)


def logistic_infimum_attained(phi: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                              tol: float = 1e-7) -> dict:
    """Whether the multiclass logistic loss of the shallow model attains its infimum on (Phi, labels).

    The softmax cross-entropy L_R(R) = sum_i -log softmax(R phi_i)_{y_i} has a minimiser iff the data are not
    (quasi-)separable: iff no direction D has all margins t_ik(D) = (D phi_i)_{y_i} - (D phi_i)_k >= 0 (k != y_i)
    with at least one margin > 0 (along such a D the loss decreases strictly towards its infimum and never stops;
    directions with all margins zero leave it unchanged). We decide it by the linear program

        max_D  sum_{i, k != y_i} t_ik(D)    s.t.  0 <= t_ik(D) <= 1,

    (scipy's HiGHS): the maximum is 0 iff the infimum is attained. Returns ``{"attained", "max_margin_sum",
    "separable"}`` where ``separable`` (complete separation: some D with every margin >= 1) is tested by a second
    LP, min 0 s.t. t_ik(D) >= 1, run first (``max_margin_sum`` is then NaN: not needed).
    """
    from scipy.optimize import linprog

    if phi.dim() != 2 or labels.dim() != 1 or labels.shape[0] != phi.shape[0]:
        raise ShapeMismatchError(f"need phi [N, m] and labels [N], got {tuple(phi.shape)} and {tuple(labels.shape)}")
    if torch.is_floating_point(labels):
        raise ValidationError("labels must be integer class indices")
    phi64 = phi.detach().to(torch.float64).cpu().numpy()
    y = labels.detach().cpu().numpy().astype(int)
    n, m = phi64.shape
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    # rows: one per (i, c != y_i); t_ic = phi_i . (D_{y_i} - D_c), D flattened row-major (class-major)
    ii, cc = np.nonzero(np.arange(k)[None, :] != y[:, None])
    T = np.zeros((len(ii), k, m))
    T[np.arange(len(ii)), y[ii]] = phi64[ii]
    T[np.arange(len(ii)), cc] = -phi64[ii]
    T = T.reshape(len(ii), k * m)
    bounds = [(None, None)] * (k * m)
    # complete separation first (one feasibility LP, the cheap common case at large widths): then not attained
    sep = linprog(np.zeros(k * m), A_ub=-T, b_ub=-np.ones(len(T)), bounds=bounds, method="highs")
    if sep.status == 0:
        return {"attained": False, "separable": True, "max_margin_sum": float("nan")}
    # max sum t  s.t.  0 <= t <= 1: > 0 exactly under quasi-separation
    res = linprog(-T.sum(0), A_ub=np.vstack([T, -T]), b_ub=np.concatenate([np.ones(len(T)), np.zeros(len(T))]),
                  bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"separability LP failed: {res.message}")
    best = float(-res.fun)
    return {"attained": best <= tol * len(T), "separable": False, "max_margin_sum": best}


def nearest_least_squares(phi: torch.Tensor, targets: torch.Tensor, R0: torch.Tensor | None = None) -> torch.Tensor:
    """argmin ||R - R0||_F over the least-squares solutions R of min ||Phi R^T - T||_F (float64).

    R0 = 0 gives the minimum-norm solution (the minimum-norm interpolant when Phi has full row rank, N <= m).
    Gradient descent / flow on the shallow square loss from R0 converges to exactly this R (its iterates stay
    in R0 + span of the rows of Phi), which makes it the reference of the implicit-bias study.
    """
    if phi.dim() != 2 or targets.dim() != 2 or targets.shape[0] != phi.shape[0]:
        raise ShapeMismatchError(f"need phi [N, m] and targets [N, m_y], got {tuple(phi.shape)} and "
                                 f"{tuple(targets.shape)}")
    phi64 = phi.detach().to(torch.float64)
    t = targets.detach().to(torch.float64)
    if R0 is not None and R0.shape != (t.shape[1], phi64.shape[1]):
        raise ShapeMismatchError(f"R0 must have shape {(t.shape[1], phi64.shape[1])}, got {tuple(R0.shape)}")
    if R0 is None:
        R0 = torch.zeros(t.shape[1], phi64.shape[1], dtype=torch.float64)
    R0 = R0.detach().to(torch.float64)
    delta = torch.linalg.lstsq(phi64, t - phi64 @ R0.transpose(0, 1), driver="gelsd").solution
    return R0 + delta.transpose(0, 1)


def lambda_U_bounds(model: ImplicitLinearModel) -> dict:
    """A-priori lower bounds on lambda_min(U U^T): via ||sigma(A)||_2, and the width-only worst case."""
    with torch.no_grad():
        s2 = float(torch.linalg.matrix_norm(model.weight_map(), ord=2))
    g = model.gamma
    return {"via_norm2": 1.0 / (1.0 + g * s2) ** 2, "worst_case": 1.0 / (1.0 + g * math.sqrt(model.width)) ** 2}


@dataclass
class TheoremQuantities:
    """The quantities of the global-convergence theorem for one dataset and one set of weights."""

    loss: str
    reduction: str
    gamma: float
    width: int
    out_features: int
    num_samples: int
    rank_phi: int
    lambda_phi: float            # smallest nonzero eigenvalue of Phi^T Phi
    pl_constant: float           # mu (a-priori for the square loss, local for the logistic loss)
    lambda_U: float              # lambda_min(U U^T) at these weights
    lambda_U_lower: float        # 1 / (1 + gamma ||sigma(A)||_2)^2
    lambda_U_worst: float        # 1 / (1 + gamma sqrt(m))^2, valid for every A
    rate_constant: float         # c = mu * lambda_U: d(L - L*)/dt <= -c (L - L*)
    rate_constant_worst: float   # mu * lambda_U_worst: valid along the whole flow (square loss)
    loss_value: float
    optimum: float
    norm_1: float                # ||gamma sigma(A)||_1 (= gamma)
    spectral_radius: float       # rho(gamma sigma(A)) (<= gamma)
    conditions: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def theorem_quantities(model: ImplicitLinearModel, x: torch.Tensor, y: torch.Tensor, *, loss: str = "squared",
                       reduction: str = "sum", optimum: float | None = None) -> TheoremQuantities:
    """Evaluate the theorem's rate constant and its conditions for ``model`` on the data (x, y)."""
    _check_choice("loss", loss, LOSSES)
    _check_choice("reduction", reduction, REDUCTIONS)
    with torch.no_grad():
        phi = model.features(x).to(torch.float64)
        if optimum is None:
            optimum = shallow_optimum(phi, y, loss=loss, reduction=reduction,
                                      out_features=model.out_features).value
        lam_phi, rank = min_nonzero_eig(phi)
        R = model.shallow_weight().to(torch.float64)
        value = float(shallow_loss(R, phi, y, loss=loss, reduction=reduction))
        if loss == "squared":
            mu = pl_constant_square(phi, reduction=reduction)
        else:
            mu = local_pl_constant(R, phi, y, optimum, loss=loss, reduction=reduction)
        lu = lambda_U(model)
        bounds = lambda_U_bounds(model)
        cf = model.contraction_factor()
    conditions = {
        "gamma_in_(0,1)": 0.0 < model.gamma < 1.0,
        "well_posed_rho<1": cf["spectral_radius"] < 1.0,
        "lambda_U>0": lu > 0.0,
        "pl_constant>0": mu > 0.0,
        "no_width_condition": True,  # the theorem needs nothing of m relative to m_y or N
    }
    return TheoremQuantities(
        loss=loss, reduction=reduction, gamma=model.gamma, width=model.width, out_features=model.out_features,
        num_samples=int(phi.shape[0]), rank_phi=rank, lambda_phi=lam_phi, pl_constant=mu, lambda_U=lu,
        lambda_U_lower=bounds["via_norm2"], lambda_U_worst=bounds["worst_case"], rate_constant=mu * lu,
        rate_constant_worst=mu * bounds["worst_case"], loss_value=value, optimum=float(optimum),
        norm_1=cf["norm_1"], spectral_radius=cf["spectral_radius"], conditions=conditions,
    )


def rate_bounds(rate_constant: float, lr: float) -> dict:
    """Per-iteration contraction of L - L* for gradient descent with step ``lr``.

    ``flow``: exp(-lr c) (the theorem's gradient-flow bound at time t = lr * k);
    ``gd``: 1 - lr c / 2, certified when every step has the sufficient decrease L_k - L_{k+1} >= lr/2 ||grad||^2.
    """
    if lr <= 0:
        raise ValidationError(f"lr must be positive, got {lr!r}")
    return {"flow": math.exp(-lr * rate_constant), "gd": max(0.0, 1.0 - 0.5 * lr * rate_constant)}


# --------------------------------------------------------------------------------- trust-region Newton
def induced_metric(model: ImplicitLinearModel) -> torch.Tensor:
    """P = J J^T with J = d vec(B U(A)) / d(A, B): the preconditioner of the induced flow of R (row-major vec)."""
    gamma = model.gamma
    m = model.width
    A0 = model.A.detach()
    B0 = model.B.detach()

    def end_to_end(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(m, dtype=a.dtype, device=a.device)
        return (b @ torch.linalg.solve(eye - gamma * column_softmax(a), eye)).reshape(-1)

    ja, jb = torch.func.jacrev(end_to_end, argnums=(0, 1))(A0, B0)
    J = torch.cat([ja.reshape(ja.shape[0], -1), jb.reshape(jb.shape[0], -1)], dim=1)
    return J @ J.transpose(0, 1)


def trust_region_subproblem(g: torch.Tensor, H: torch.Tensor, M: torch.Tensor, radius: float, *,
                            tol: float = 1e-13, max_iter: int = 200) -> tuple[torch.Tensor, float]:
    """Exact solution of min_v g^T v + 1/2 v^T H v  s.t.  v^T M v <= radius^2 (M positive definite).

    Returns (v, lam) with (H + lam M) v = -g, lam >= 0, lam (||v||_M - radius) = 0 (Moré-Sorensen optimality;
    the 'hard case' is not treated, it cannot occur for the convex losses used here unless g has no component
    along the null space). Computed in the M-orthonormal basis by an eigendecomposition and bisection on lam.
    """
    if radius <= 0:
        raise ValidationError(f"radius must be positive, got {radius!r}")
    L = torch.linalg.cholesky(M)
    gt = torch.linalg.solve_triangular(L, g.reshape(-1, 1), upper=False).reshape(-1)
    Ht = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, H, upper=False).transpose(0, 1),
                                       upper=False).transpose(0, 1)
    Ht = 0.5 * (Ht + Ht.transpose(0, 1))
    ev, Q = torch.linalg.eigh(Ht)
    c = Q.transpose(0, 1) @ gt

    def wnorm(lam: float) -> float:
        return float(torch.sqrt(((c / (ev + lam)) ** 2).sum()))

    lam_lo = max(0.0, -float(ev.min()))
    if float(ev.min()) > 0 and wnorm(0.0) <= radius:
        lam = 0.0
    else:
        lo = lam_lo + 1e-300
        hi = max(1.0, lo)
        while wnorm(hi) > radius:
            hi *= 2.0
        for _ in range(max_iter):
            mid = 0.5 * (lo + hi)
            if wnorm(mid) > radius:
                lo = mid
            else:
                hi = mid
            if hi - lo <= tol * hi:
                break
        lam = hi
    w = -Q @ (c / (ev + lam))
    v = torch.linalg.solve_triangular(L.transpose(0, 1), w.reshape(-1, 1), upper=True).reshape(-1)
    return v, lam


def trust_region_newton_step(R: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, *, metric: torch.Tensor,
                             radius: float, loss: str = "squared", reduction: str = "sum"
                             ) -> tuple[torch.Tensor, dict]:
    """One trust-region Newton step of the shallow model: R + v, v the exact TR step with Hessian H(R)."""
    g = shallow_grad(R, phi, y, loss=loss, reduction=reduction).reshape(-1)
    H = shallow_hessian(R, phi, y, loss=loss, reduction=reduction)
    v, lam = trust_region_subproblem(g, H, metric, radius)
    return R + v.reshape(R.shape), {"lam": lam, "step_norm": float(v.norm()), "grad_norm": float(g.norm())}
