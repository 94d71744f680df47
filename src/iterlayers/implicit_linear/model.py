"""Kawaguchi's deep equilibrium linear model: nonlinearity only on the weights, an implicit layer, a linear head.

Model (K. Kawaguchi, "On the Theory of Implicit Deep Learning: Global Convergence with Implicit Layers",
ICLR 2021, arXiv 2102.07346)::

    z^(l)  = gamma * sigma(A) z^(l-1) + phi(x)          (the weight-tied layer, l = 1, 2, ...)
    z*     = lim z^(l) = (I - gamma sigma(A))^{-1} phi(x) =: U phi(x)      (the implicit layer)
    f(x)   = B z* = B U phi(x)                           (linear output layer)

with ``A`` in R^{m x m}, ``B`` in R^{m_y x m}, ``gamma`` in (0, 1) fixed, ``phi`` a fixed feature map into
R^m (m is the *width*) and ``sigma`` the column-wise softmax

    sigma(A)_{ij} = exp(A_{ij}) / sum_k exp(A_{kj}),

so every column of sigma(A) is a probability vector. Hence ||gamma sigma(A)||_1 = gamma < 1 (the induced
1-norm is the largest column sum), the spectral radius of gamma sigma(A) is at most gamma, the Neumann series
sum_l (gamma sigma(A))^l converges, and the equilibrium exists and is unique for *every* A: that is what the
normalisation buys. Fixed-point iteration converges at least like gamma^l in the 1-norm.

Losses: L(A, B) = sum_i l(f(x_i), y_i) with the square loss l(q, y) = ||q - y||_2^2 or the logistic
(softmax cross-entropy) loss l(q, y) = -log softmax(q)_y.

Implicit gradient (closed form; g_i = dl/dq at q = f(x_i), z_i = U phi(x_i), v_i = U^T B^T g_i):

    dL/dB        = sum_i g_i z_i^T
    dL/dsigma(A) = gamma * sum_i v_i z_i^T
    dL/dA[:, j]  = (diag(s_j) - s_j s_j^T) dL/dsigma(A)[:, j],       s_j = sigma(A)[:, j]

(the last line is the per-column softmax Jacobian). This is exactly what implicit differentiation of the
fixed point gives; it is checked against autograd through the direct solve, the core DEQ implicit backward and
finite differences in the tests.

Batch convention: samples are rows, so Z = Phi U^T solves Z = gamma Z sigma(A)^T + Phi.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from iterlayers import DEQOptions, _validate, deq_solve
from iterlayers.errors import OptionTypeError, ShapeMismatchError, ValidationError

__all__ = [
    "column_softmax",
    "EquilibriumCell",
    "ImplicitLinearModel",
    "squared_loss",
    "logistic_loss",
    "loss_fn",
    "loss_grad",
    "implicit_gradient",
    "equilibrium_gradient",
    "square_moments",
    "square_moment_gradient",
    "EQUILIBRIA",
    "LOSSES",
    "REDUCTIONS",
]

EQUILIBRIA = ("direct", "iterative")
LOSSES = ("squared", "logistic")
REDUCTIONS = ("sum", "mean")
#: the iterative path's defaults where they differ from the core's (used when no ``options`` value is given): the
#: map contracts at rate gamma in the 1-norm, so an absolute tolerance near rounding level is reached cheaply
_SOLVE_DEFAULTS = {"rtol": 0.0, "max_iter": 500}


def _check_choice(name: str, value, choices) -> None:
    _validate.choice(value, name, choices)


def _check_positive_int(name: str, value) -> None:
    _validate.positive_int(value, name)


def column_softmax(a: torch.Tensor) -> torch.Tensor:
    """sigma(A)_{ij} = exp(A_ij) / sum_k exp(A_kj): every column is a probability vector (Kawaguchi 2021)."""
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ShapeMismatchError(f"A must be a square matrix, got shape {tuple(a.shape)}")
    return torch.softmax(a, dim=0)


# ----------------------------------------------------------------------------------------------- losses
def _check_loss_args(kind: str, reduction: str) -> None:
    _check_choice("loss", kind, LOSSES)
    _check_choice("reduction", reduction, REDUCTIONS)


def _as_targets(kind: str, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Square loss: y as given (or one-hot if integer labels). Logistic: a probability matrix."""
    if q.dim() != 2:
        raise ShapeMismatchError(f"outputs must be [N, out_features], got shape {tuple(q.shape)}")
    if y.shape[0] != q.shape[0]:
        raise ShapeMismatchError(f"targets have {y.shape[0]} rows but outputs have {q.shape[0]}")
    if not torch.is_floating_point(y):
        if y.dim() != 1:
            raise ShapeMismatchError(f"integer labels must be 1-D, got shape {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= q.shape[1]:
            raise ValidationError(f"labels must lie in [0, {q.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")
        return torch.nn.functional.one_hot(y, q.shape[1]).to(q.dtype)
    y = y.to(q.dtype)
    if y.dim() == 1 and q.shape[1] == 1:
        y = y[:, None]
    if y.shape != q.shape:
        raise ShapeMismatchError(f"targets of shape {tuple(y.shape)} do not match outputs {tuple(q.shape)}")
    return y


def squared_loss(q: torch.Tensor, y: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """L = sum_i ||q_i - y_i||_2^2 (``reduction="mean"`` divides by the number of samples N)."""
    _check_loss_args("squared", reduction)
    t = _as_targets("squared", q, y)
    total = ((q - t) ** 2).sum()
    return total / q.shape[0] if reduction == "mean" else total


def logistic_loss(q: torch.Tensor, y: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """L = -sum_i sum_k y_ik log softmax(q_i)_k (integer labels are one-hot encoded); ``mean`` divides by N."""
    _check_loss_args("logistic", reduction)
    t = _as_targets("logistic", q, y)
    total = -(t * torch.log_softmax(q, dim=1)).sum()
    return total / q.shape[0] if reduction == "mean" else total


def loss_fn(kind: str, q: torch.Tensor, y: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """Dispatch on ``kind`` in ``LOSSES``."""
    _check_loss_args(kind, reduction)
    return (squared_loss if kind == "squared" else logistic_loss)(q, y, reduction=reduction)


def loss_grad(kind: str, q: torch.Tensor, y: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """G with rows g_i = dl(q_i, y_i)/dq_i: 2 (q_i - y_i) (square) or softmax(q_i) - y_i (logistic)."""
    _check_loss_args(kind, reduction)
    t = _as_targets(kind, q, y)
    if kind == "squared":
        g = 2.0 * (q - t)
    else:
        g = torch.softmax(q, dim=1) * t.sum(1, keepdim=True) - t
    return g / q.shape[0] if reduction == "mean" else g


# ----------------------------------------------------------------------------------------------- modules
class EquilibriumCell(nn.Module):
    """The weight-tied map h(z, u) = gamma * sigma(A) z + u (rows: z <- gamma z sigma(A)^T + u).

    ``u = phi(x)`` is the input injection. A core-compatible cell: ``cell(z, u) -> z_next``.
    """

    def __init__(self, width: int, *, gamma: float = 0.8, init_scale: float = 1.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        _check_positive_int("width", width)
        gamma = _validate.in_range(gamma, "gamma", low=0.0, high=1.0, low_open=True, high_open=True)
        if not isinstance(init_scale, (int, float)) or init_scale < 0:
            raise ValidationError(f"init_scale must be a non-negative number, got {init_scale!r}")
        self.width = int(width)
        self.gamma = float(gamma)
        a = torch.randn(width, width, generator=generator, dtype=dtype or torch.get_default_dtype())
        self.A = nn.Parameter(a * float(init_scale))

    def weight_map(self) -> torch.Tensor:
        """sigma(A), column-stochastic."""
        return column_softmax(self.A)

    def matrix(self) -> torch.Tensor:
        """gamma sigma(A): the linear map of the layer; ||.||_1 = gamma < 1."""
        return self.gamma * self.weight_map()

    def init_state(self, u: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(u)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix().transpose(0, 1) + u

    def extra_repr(self) -> str:
        return f"width={self.width}, gamma={self.gamma}"


class _RandomProjection(nn.Module):
    """phi(x) = W x / sqrt(d) with a fixed Gaussian W (a buffer: phi is not trained, as in the paper)."""

    def __init__(self, in_features: int, width: int, generator: torch.Generator | None, dtype):
        super().__init__()
        w = torch.randn(width, in_features, generator=generator, dtype=dtype or torch.get_default_dtype())
        self.register_buffer("weight", w / in_features ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(self.weight.dtype) @ self.weight.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, width={self.weight.shape[0]}"


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class ImplicitLinearModel(nn.Module):
    """f(x) = B (I - gamma sigma(A))^{-1} phi(x), the deep equilibrium linear model of Kawaguchi (ICLR 2021).

    Args:
        features: ``in_features`` (int) -- then phi is the identity when ``in_features == width`` and a fixed
            Gaussian projection x -> W x / sqrt(in_features) otherwise -- or a callable / ``nn.Module`` feature
            map phi: [N, ...] -> [N, width] (its parameters, if any, are frozen: phi is fixed in the paper).
        width: m, the dimension of the implicit layer (may be smaller than ``out_features`` and N).
        out_features: m_y.
        gamma: the fixed factor in (0, 1).
        equilibrium: ``"direct"`` (torch.linalg.solve of (I - gamma sigma(A)) z = phi(x), differentiated by
            autograd through the solve) or ``"iterative"`` (the core's differentiable fixed-point solve
            ``iterlayers.deq_solve``, configured by ``options``).
        options: the core's :class:`~iterlayers.DEQOptions` of the iterative path (solver, tolerances, gradient
            mode, failure policy, ...), used as given; ``**deq_options`` are keyword shortcuts for its fields
            (``solver="picard", backward="phantom"``), applied on top of ``options`` or, without one, of this
            model's defaults: the core's, except ``rtol=0``, ``max_iter=500`` and ``atol`` 1e-12 for a model
            built in float64, 1e-6 otherwise (fixed here: a model converted to another dtype later keeps it).
            Built and validated once, here; :attr:`options` holds the value.
            ``stats`` holds the core's {"forward", "backward"} SolverStats of the latest iterative solve (both
            ``None`` before one, and after a direct solve, which iterates nothing).
        init_scale: A ~ N(0, init_scale^2); B ~ N(0, 1/m).
        seed: seeds the initialisation (and the random projection) for reproducibility.
    """

    def __init__(
        self,
        features: int | Callable[[torch.Tensor], torch.Tensor],
        width: int,
        out_features: int,
        *,
        gamma: float = 0.8,
        equilibrium: str = "direct",
        options: DEQOptions | None = None,
        init_scale: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        **deq_options,
    ):
        super().__init__()
        _check_positive_int("width", width)
        _check_positive_int("out_features", out_features)
        _check_choice("equilibrium", equilibrium, EQUILIBRIA)
        if options is None:
            atol = 1e-12 if (dtype or torch.get_default_dtype()) == torch.float64 else 1e-6
            deq_options = {**_SOLVE_DEFAULTS, "atol": atol, **deq_options}
        #: the core's options of the iterative path (one validated value; its solvers are built once)
        self.options = DEQOptions.build(options, **deq_options)
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        self.width = int(width)
        self.out_features = int(out_features)
        self.equilibrium = equilibrium
        if isinstance(features, bool):
            raise OptionTypeError("features must be in_features (int) or a callable feature map, got a bool")
        if isinstance(features, int):
            _check_positive_int("in_features", features)
            self.in_features = int(features)
            self.phi = _Flatten() if features == width else _RandomProjection(features, width, gen, dtype)
        elif callable(features):
            self.in_features = None
            self.phi = features
            if isinstance(features, nn.Module):
                for p in features.parameters():
                    p.requires_grad_(False)
        else:
            raise OptionTypeError(f"features must be in_features (int) or a callable feature map, got {type(features)}")
        self.cell = EquilibriumCell(width, gamma=gamma, init_scale=init_scale, generator=gen, dtype=dtype)
        b = torch.randn(out_features, width, generator=gen, dtype=dtype or torch.get_default_dtype())
        self.B = nn.Parameter(b / width ** 0.5)
        self.stats: dict = {"forward": None, "backward": None}

    # -- parameters and derived matrices ----------------------------------------------------------
    @property
    def gamma(self) -> float:
        return self.cell.gamma

    @property
    def A(self) -> nn.Parameter:
        return self.cell.A

    def weight_map(self) -> torch.Tensor:
        """sigma(A)."""
        return self.cell.weight_map()

    def inverse_factor(self) -> torch.Tensor:
        """U = (I - gamma sigma(A))^{-1} (dense; always exists since ||gamma sigma(A)||_1 = gamma < 1)."""
        m = self.width
        eye = torch.eye(m, dtype=self.A.dtype, device=self.A.device)
        return torch.linalg.solve(eye - self.cell.matrix(), eye)

    def shallow_weight(self) -> torch.Tensor:
        """R = B U: the end-to-end linear map of the features, f(x) = R phi(x)."""
        return self.B @ self.inverse_factor()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x), shape [N, width]."""
        u = self.phi(x)
        if u.dim() != 2 or u.shape[1] != self.width:
            raise ShapeMismatchError(f"feature map must return [N, {self.width}], got shape {tuple(u.shape)}")
        return u.to(self.A.dtype)

    # -- the equilibrium --------------------------------------------------------------------------
    def equilibrium_point(self, x: torch.Tensor, *, method: str | None = None, z0: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """z* with z* = gamma sigma(A) z* + phi(x), rows = samples. ``method`` overrides ``equilibrium``."""
        method = self.equilibrium if method is None else method
        _check_choice("method", method, EQUILIBRIA)
        u = self.features(x)
        if method == "direct":
            m = self.width
            eye = torch.eye(m, dtype=u.dtype, device=u.device)
            # (I - gamma S) Z^T = Phi^T, one factorisation for the whole batch
            return torch.linalg.solve(eye - self.cell.matrix(), u.transpose(0, 1)).transpose(0, 1)
        return self._iterative(u, z0)

    def _iterative(self, u: torch.Tensor, z0: torch.Tensor | None) -> torch.Tensor:
        if z0 is None:
            z0 = self.cell.init_state(u)
        elif z0.shape != u.shape:
            raise ShapeMismatchError(f"z0 must have shape {tuple(u.shape)}, got {tuple(z0.shape)}")
        stats: dict = {}
        self.stats = stats  # the backward hook fills stats["backward"] later
        return deq_solve(self.cell, z0, args=(u,), options=self.options, stats=stats)

    def forward(self, x: torch.Tensor, *, method: str | None = None) -> torch.Tensor:
        """f(x) = B z*(x), shape [N, out_features]."""
        return self.equilibrium_point(x, method=method) @ self.B.transpose(0, 1)

    def loss(self, x: torch.Tensor, y: torch.Tensor, *, loss: str = "squared", reduction: str = "sum",
             method: str | None = None) -> torch.Tensor:
        """L(A, B) = sum_i l(f(x_i), y_i) (or the mean)."""
        return loss_fn(loss, self(x, method=method), y, reduction=reduction)

    def contraction_factor(self) -> dict:
        """Why the equilibrium is well posed: ||gamma sigma(A)||_1 (= gamma) and the spectral radius (<= gamma)."""
        with torch.no_grad():
            mat = self.cell.matrix()
            return {
                "norm_1": float(torch.linalg.matrix_norm(mat, ord=1)),
                "spectral_radius": float(torch.linalg.eigvals(mat).abs().max()),
                "norm_2": float(torch.linalg.matrix_norm(mat, ord=2)),
                "gamma": self.gamma,
            }

    def extra_repr(self) -> str:
        o = self.options
        return (f"in_features={self.in_features}, width={self.width}, out_features={self.out_features}, "
                f"gamma={self.gamma}, equilibrium={self.equilibrium!r}, solver={o.solver!r}, "
                f"backward={o.backward!r}, atol={o.atol}, max_iter={o.max_iter}")


def equilibrium_gradient(A: torch.Tensor, B: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, *, gamma: float,
                         loss: str = "squared", reduction: str = "sum"):
    """Closed-form (dL/dA, dL/dB, L) of L(A, B) = sum_i l(B (I - gamma sigma(A))^{-1} phi_i, y_i), functional.

    The formulas of the module doc with U = (I - gamma sigma(A))^{-1}, Z = Phi U^T, G = [g_i], V = G B U:
    dL/dB = G^T Z, dL/dsigma = gamma V^T Z, then the column-softmax Jacobian. Leading batch dimensions are
    allowed (A [..., m, m], B [..., m_y, m], Phi [..., N, m], y [..., N, m_y] or integer labels [..., N]): one
    independent model per batch index (e.g. one per seed), each with its own mean over its N samples; L then
    has the batch shape (one loss per model). No autograd is involved.
    """
    _check_loss_args(loss, reduction)
    with torch.no_grad():
        m = A.shape[-1]
        S = torch.softmax(A, dim=-2)
        eye = torch.eye(m, dtype=A.dtype, device=A.device)
        U = torch.linalg.solve(eye - gamma * S, eye.expand_as(S))
        Z = phi @ U.transpose(-1, -2)
        q = Z @ B.transpose(-1, -2)
        n, my = q.shape[-2], q.shape[-1]
        qf = q.reshape(-1, my)
        yf = y.reshape(-1) if not torch.is_floating_point(y) else y.reshape(-1, y.shape[-1])
        scale = 1.0 / n if reduction == "mean" else 1.0
        G = loss_grad(loss, qf, yf, reduction="sum").reshape(q.shape) * scale
        t = _as_targets(loss, qf, yf).reshape(q.shape)
        per = (q - t) ** 2 if loss == "squared" else -t * torch.log_softmax(q, dim=-1)
        value = per.sum((-2, -1)) * scale  # one loss per model: shape A.shape[:-2]
        grad_B = G.transpose(-1, -2) @ Z
        V = G @ B @ U
        grad_S = gamma * V.transpose(-1, -2) @ Z
        grad_A = S * (grad_S - (S * grad_S).sum(-2, keepdim=True))
    return grad_A, grad_B, value


def square_moments(phi: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple:
    """(C, D, c) = (Phi^T Phi / N, Phi^T Y / N, ||Y||_F^2 / N): the mean square loss of any linear predictor R of
    the features depends on the data only through these, L(R) = tr(R C R^T) - 2 tr(R D) + c (Y one-hot of the
    integer labels ``y``, or ``y`` itself if floating). Leading batch dimensions as in :func:`equilibrium_gradient`.
    """
    with torch.no_grad():
        t = y.to(phi.dtype) if torch.is_floating_point(y) else torch.nn.functional.one_hot(y, num_classes).to(phi.dtype)
        n = phi.shape[-2]
        return (phi.transpose(-1, -2) @ phi / n, phi.transpose(-1, -2) @ t / n, t.pow(2).sum((-2, -1)) / n)


def square_moment_gradient(A: torch.Tensor, B: torch.Tensor, moments: tuple, *, gamma: float):
    """(dL/dA, dL/dB, L) of the *mean* square loss from :func:`square_moments`: the same values as
    :func:`equilibrium_gradient` (``loss="squared"``, ``reduction="mean"``) at a cost independent of N.

    With R = B U, U = (I - gamma sigma(A))^{-1}: G_R = dL/dR = 2 (R C - D^T), dL/dB = G_R U^T, dL/dsigma(A) =
    gamma R^T G_R U^T (from dR = gamma B U dsigma U), then the column-softmax Jacobian.
    """
    C, D, c = moments
    with torch.no_grad():
        m = A.shape[-1]
        S = torch.softmax(A, dim=-2)
        eye = torch.eye(m, dtype=A.dtype, device=A.device)
        U = torch.linalg.solve(eye - gamma * S, eye.expand_as(S))
        R = B @ U
        RC = R @ C
        RDt = R @ D
        value = (RC * R).sum((-2, -1)) - 2.0 * RDt.diagonal(dim1=-2, dim2=-1).sum(-1) + c
        G = 2.0 * (RC - D.transpose(-1, -2))
        Ut = U.transpose(-1, -2)
        grad_B = G @ Ut
        grad_S = gamma * R.transpose(-1, -2) @ grad_B
        grad_A = S * (grad_S - (S * grad_S).sum(-2, keepdim=True))
    return grad_A, grad_B, value


def implicit_gradient(model: ImplicitLinearModel, x: torch.Tensor, y: torch.Tensor, *, loss: str = "squared",
                      reduction: str = "sum", return_loss: bool = False):
    """Closed-form (dL/dA, dL/dB) of L = sum_i l(f(x_i), y_i) by implicit differentiation (see module doc).

    :func:`equilibrium_gradient` at the model's weights and features phi(x). Returns (dL/dA, dL/dB), and the
    loss value L as a third element with ``return_loss=True`` (same solve, no extra cost).
    """
    with torch.no_grad():
        grad_A, grad_B, value = equilibrium_gradient(model.A, model.B, model.features(x), y, gamma=model.gamma,
                                                     loss=loss, reduction=reduction)
    if return_loss:
        return grad_A, grad_B, value
    return grad_A, grad_B
