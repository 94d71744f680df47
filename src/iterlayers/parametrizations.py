"""Parametrised cells whose fixed point provably exists and is unique, and weight-parametrisation helpers.

``MonotoneLinear`` (Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020, arXiv 2006.08591)
-----------------------------------------------------------------------------------------------------------
Weights ``W = (1 - m) I - A^T A + B - B^T`` with free ``A, B`` and ``m > 0``. Then ``G := I - W =
m I + A^T A - (B - B^T)`` has symmetric part ``m I + A^T A >= m I``: the operator ``z -> G z`` is strongly
monotone. The equilibrium ``z* = relu(W z* + U x + b)`` is the solution of the monotone inclusion
``0 in G z - (U x + b) + N_{z >= 0}(z)`` (ReLU is the proximal map of the indicator of the non-negative
orthant), which exists and is unique for every x because a strongly monotone plus a maximal monotone operator
is invertible. With ``activation="identity"`` it is ``z* = G^{-1} (U x + b)``.

The naive Picard map ``z -> relu(W z + u)`` need not converge (``||W||`` can exceed 1), so the cell implements
the *forward-backward splitting* step (Winston & Kolter, Alg. 1) with step ``alpha``:

    cell(z, x) = relu(z - alpha (G z - (U x + b))) = relu((1 - alpha) z + alpha (W z + U x + b)).

Its fixed points are exactly the equilibria above (for ReLU, ``relu(y) = z`` is the complementarity
``z >= 0, z - y >= 0, z . (z - y) = 0``, and ``z - y`` is ``alpha (G z - u)`` in one case and ``G z - u`` in
the other, so alpha cancels). It is a contraction: ``||I - alpha G||_2^2 <= 1 - 2 alpha m + alpha^2 L^2``
with ``L = ||G||_2``, which is ``< 1`` for ``0 < alpha < 2 m / L^2``; ``alpha="auto"`` takes the minimiser
``alpha = m / L^2`` (factor ``sqrt(1 - m^2 / L^2)``), recomputed from the current weights. So plain Picard or
Anderson on this cell reaches the unique point from any start.

``SpectralNormLinear``
---------------------
``cell(z, x) = act(W z + U x + b)`` with ``W = V min(1, bound / sigma_max(V))`` (exact largest singular value,
differentiable), so ``||W||_2 <= bound`` after every optimiser step, and with a 1-Lipschitz activation the cell
is a ``bound``-contraction in z: unique fixed point, Picard rate ``<= bound`` (Banach).

``spectral_norm`` / ``weight_norm`` wrap ``torch.nn.utils.parametrizations`` for arbitrary layers.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations as _tp
from torch.nn.utils import parametrize as _parametrize

from . import _validate
from .errors import OptionTypeError, ShapeMismatchError, ValidationError

__all__ = ["MonotoneLinear", "SpectralNormLinear", "spectral_norm", "weight_norm", "spectral_cap"]

_ACTS = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda t: t}


def spectral_cap(w: Tensor, bound: float) -> Tensor:
    """``W min(1, bound / sigma_max(W))``: ``||.||_2 <= bound`` exactly (top singular value, differentiable)."""
    sigma = torch.linalg.matrix_norm(w, ord=2)
    return w * torch.clamp(bound / sigma.clamp_min(torch.finfo(w.dtype).tiny), max=1.0)


def _check_features(value, name: str, where: str) -> int:
    return _validate.positive_int(value, name, where=where)


def _positive(value, name: str, where: str) -> float:
    return _validate.in_range(value, name, where=where, low=0.0, low_open=True)


def _input_term(U: Tensor, b: Tensor | None, x: Tensor | None, batch: int, features: int, like: Tensor) -> Tensor:
    if x is None:
        u = like.new_zeros(batch, features)
    else:
        if x.dim() != 2 or x.shape[1] != U.shape[1]:
            raise ShapeMismatchError(f"x must have shape [B, {U.shape[1]}], got {tuple(x.shape)}")
        u = x @ U.T
    return u if b is None else u + b


class MonotoneLinear(nn.Module):
    """Monotone-operator equilibrium cell ``z -> act(z - alpha (G z - U x - b))``, ``G = I - W`` (see module doc).

    Args:
        features: state size n (z is ``[B, n]``).
        in_features: input size (x is ``[B, in_features]``; default n).
        m: strong-monotonicity parameter ``m > 0`` (``G + G^T >= 2 m I``).
        activation: ``"relu"`` or ``"identity"`` (proximal maps whose fixed points do not depend on alpha).
        alpha: forward-backward step, a number in ``(0, 2 m / L^2)`` or ``"auto"`` (``m / L^2``).
        bias: learn ``b``.
        init_scale: std of A and B entries times ``sqrt(n)``.
    """

    def __init__(self, features: int, *, in_features: int | None = None, m: float = 1.0,
                 activation: str = "relu", alpha: float | str = "auto", bias: bool = True, init_scale: float = 1.0):
        super().__init__()
        where = "MonotoneLinear"
        self.features = _check_features(features, "features", where)
        self.in_features = _check_features(features if in_features is None else in_features, "in_features", where)
        m = _positive(m, "m", where)
        _validate.choice(activation, "activation", ("relu", "identity"), where=where)
        if isinstance(alpha, str):
            if alpha != "auto":
                raise ValidationError(f"{where}: alpha must be 'auto' or a positive number, got {alpha!r}")
        else:
            alpha = _positive(alpha, "alpha", where)
        _validate.boolean(bias, "bias", where=where)
        init_scale = _validate.in_range(init_scale, "init_scale", where=where, low=0.0)
        self.m, self.activation, self.alpha = m, activation, alpha
        n = self.features
        self.A = nn.Parameter(torch.randn(n, n) * (init_scale / math.sqrt(n)))
        self.B = nn.Parameter(torch.randn(n, n) * (init_scale / math.sqrt(n)))
        self.U = nn.Parameter(torch.empty(n, self.in_features))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self._alpha_cache: tuple | None = None

    def W(self) -> Tensor:
        """``W = (1 - m) I - A^T A + B - B^T``."""
        eye = torch.eye(self.features, dtype=self.A.dtype, device=self.A.device)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def G(self) -> Tensor:
        """``G = I - W = m I + A^T A - (B - B^T)``, strongly monotone with constant m."""
        eye = torch.eye(self.features, dtype=self.A.dtype, device=self.A.device)
        return self.m * eye + self.A.T @ self.A - (self.B - self.B.T)

    def step_size(self) -> float:
        """The forward-backward step alpha (``m / ||G||_2^2`` for ``"auto"``), cached per weight version."""
        if self.alpha != "auto":
            return float(self.alpha)
        key = (self.A._version, self.B._version, self.A.data_ptr(), self.B.data_ptr(), self.A.dtype)
        if self._alpha_cache is None or self._alpha_cache[0] != key:
            with torch.no_grad():
                L = float(torch.linalg.matrix_norm(self.G().double(), ord=2))
            self._alpha_cache = (key, self.m / L ** 2)
        return self._alpha_cache[1]

    def lipschitz_bound(self) -> float:
        """``||I - alpha G||_2`` (exact): the contraction factor of the cell in z (the activation is 1-Lipschitz)."""
        with torch.no_grad():
            G = self.G().double()
            eye = torch.eye(self.features, dtype=G.dtype, device=G.device)
            return float(torch.linalg.matrix_norm(eye - self.step_size() * G, ord=2))

    def init_state(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], self.features, dtype=x.dtype, device=x.device)

    def input_term(self, x: Tensor | None, batch: int, like: Tensor) -> Tensor:
        return _input_term(self.U, self.bias, x, batch, self.features, like)

    def equilibrium_map(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """The undamped map ``act(W z + U x + b)`` whose fixed point is the equilibrium (may not contract)."""
        return _ACTS[self.activation](z @ self.W().T + self.input_term(x, z.shape[0], z))

    def forward(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.features:
            raise ShapeMismatchError(f"z must have shape [B, {self.features}], got {tuple(z.shape)}")
        a = self.step_size()
        y = z - a * (z @ self.G().T - self.input_term(x, z.shape[0], z))
        return _ACTS[self.activation](y)

    def extra_repr(self) -> str:
        return (f"features={self.features}, in_features={self.in_features}, m={self.m:g}, "
                f"activation={self.activation!r}, alpha={self.alpha!r}, bias={self.bias is not None}")


class SpectralNormLinear(nn.Module):
    """Contractive linear cell ``act(W z + U x + b)`` with ``||W||_2 <= bound`` enforced exactly (see module doc).

    Args:
        features: state size n; in_features: input size (default n).
        bound: spectral-norm bound of W, a number in ``(0, 1)`` for a contraction (``(0, inf)`` accepted).
        activation: ``"tanh"``, ``"relu"`` or ``"identity"`` (all 1-Lipschitz).
        bias: learn ``b``.
    """

    def __init__(self, features: int, *, in_features: int | None = None, bound: float = 0.9,
                 activation: str = "tanh", bias: bool = True):
        super().__init__()
        where = "SpectralNormLinear"
        self.features = _check_features(features, "features", where)
        self.in_features = _check_features(features if in_features is None else in_features, "in_features", where)
        bound = _positive(bound, "bound", where)
        _validate.choice(activation, "activation", tuple(_ACTS), where=where)
        _validate.boolean(bias, "bias", where=where)
        self.bound, self.activation = bound, activation
        self.V = nn.Parameter(torch.empty(features, features))
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        self.U = nn.Parameter(torch.empty(features, self.in_features))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    @property
    def weight(self) -> Tensor:
        """``W = V min(1, bound / sigma_max(V))``; differentiable (through the top singular value)."""
        return spectral_cap(self.V, self.bound)

    def lipschitz_bound(self) -> float:
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.weight.double(), ord=2))

    def init_state(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], self.features, dtype=x.dtype, device=x.device)

    def forward(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.features:
            raise ShapeMismatchError(f"z must have shape [B, {self.features}], got {tuple(z.shape)}")
        return _ACTS[self.activation](z @ self.weight.T + _input_term(self.U, self.bias, x, z.shape[0],
                                                                       self.features, z))

    def extra_repr(self) -> str:
        return (f"features={self.features}, in_features={self.in_features}, bound={self.bound:g}, "
                f"activation={self.activation!r}, bias={self.bias is not None}")


def _check_parameter(module: nn.Module, name: str, where: str) -> None:
    if not isinstance(name, str) or not isinstance(getattr(module, name, None), torch.Tensor):
        raise ValidationError(f"{where}: {type(module).__name__} has no parameter {name!r}")


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


class _SpectralNorm(_tp._SpectralNorm):
    """Torch's spectral-norm parametrisation ``W / sigma``, ``sigma = u^T W v``, whose power iteration (the
    update of the estimate ``u, v``) runs once per :class:`iterlayers.DEQ` forward pass instead of at every call.

    Torch updates ``u, v`` at every training-mode evaluation of the weight. A DEQ evaluates its cell tens of
    times per forward pass, so the normalised map changed at every solver iteration: the solver chased a moving
    target (the README tour's cell: up to 29 Anderson steps in train mode against 11-12 in eval mode) and the
    point returned was a fixed point of none of the maps. Here ``deq_reset`` (the cell protocol: the DEQ calls
    it before each solve) runs the ``n_power_iterations`` steps once; every evaluation of that forward pass,
    the backward pass included, then sees the same ``W / sigma``, differentiated with ``u, v`` held constant
    (as torch does). Until a DEQ first calls ``deq_reset`` (the module used outside an equilibrium layer) the
    update runs at every training-mode call, as in torch. ``updates`` counts the power-iteration updates.
    """

    def __init__(self, weight: Tensor, n_power_iterations: int):
        super().__init__(weight, n_power_iterations)
        self.per_solve = False
        self.updates = torch.zeros((), dtype=torch.long)  # a tensor: hoisting's fingerprint ignores its value
        # The parametrization list holding this module (not registered as a child: it is this module's parent),
        # to read the weight when deq_reset runs; deepcopy and pickling follow it with the parent. Set by
        # spectral_norm once registered.
        self.__dict__["_owner"] = None

    def _input(self) -> Tensor:
        """The weight this parametrisation receives: the original, through the parametrisations before it."""
        w = self._owner.original
        for p in self._owner:
            if p is self:
                return w
            w = p(w)
        raise RuntimeError("spectral_norm: the parametrisation is not in its owner's list")  # pragma: no cover

    def _update(self, weight: Tensor) -> None:
        self._power_method(self._reshape_weight_to_matrix(weight.detach()), self.n_power_iterations)
        self.updates += 1

    def deq_reset(self, batch: int) -> None:
        """A DEQ forward pass starts: update ``u, v`` once (training mode) and hold them for the solve."""
        self.per_solve = True
        if self.training:
            with torch.no_grad():
                w = self._input()
            if w.ndim > 1:
                self._update(w)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            return super().forward(weight)
        if self.training and not self.per_solve:
            self._update(weight)
        w = self._reshape_weight_to_matrix(weight)
        # clones: u, v are updated in place by the next update, after this graph may have saved them
        sigma = torch.vdot(self._u.clone(), torch.mv(w, self._v.clone()))
        return weight / sigma

    def extra_repr(self) -> str:
        return f"n_power_iterations={self.n_power_iterations}, per_solve={self.per_solve}"


def spectral_norm(module: nn.Module, *, bound: float = 1.0, name: str = "weight",
                  n_power_iterations: int = 1) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``bound * W / sigma_max(W)`` (spectral normalisation, Miyato et al.
    2018, by torch's parametrisation, followed by a scale). ``sigma`` is estimated by ``n_power_iterations``
    power steps, so ``||W||_2 ~= bound`` (an estimate; use ``SpectralNormLinear`` for an exact bound).

    Inside an :class:`iterlayers.DEQ` the power steps run once per forward pass (before the solve), so every
    solver iteration and the backward pass see one map; elsewhere once per training-mode call, as in torch
    (see :class:`_SpectralNorm`). ``module.parametrizations.<name>[0].updates`` counts the updates."""
    if not isinstance(module, nn.Module):
        raise OptionTypeError(f"spectral_norm: module must be an nn.Module, got {type(module).__name__}")
    bound = _positive(bound, "bound", "spectral_norm")
    n_power_iterations = _validate.positive_int(n_power_iterations, "n_power_iterations", where="spectral_norm")
    _check_parameter(module, name, "spectral_norm")
    weight = getattr(module, name)
    if weight.ndim < 2:
        raise ValidationError(f"spectral_norm: {type(module).__name__}.{name} has shape {tuple(weight.shape)}; "
                              "spectral normalisation needs a matrix (or a convolution kernel)")
    sn = _SpectralNorm(weight.detach(), n_power_iterations)
    _parametrize.register_parametrization(module, name, sn)
    sn.__dict__["_owner"] = module.parametrizations[name]  # the list exists once the first one is registered
    if bound != 1.0:
        _parametrize.register_parametrization(module, name, _Scale(bound))
    return module


def weight_norm(module: nn.Module, *, name: str = "weight", dim: int = 0) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``g v / ||v||`` (Salimans & Kingma 2016) via torch's parametrisation."""
    if not isinstance(module, nn.Module):
        raise OptionTypeError(f"weight_norm: module must be an nn.Module, got {type(module).__name__}")
    _check_parameter(module, name, "weight_norm")
    _validate.integer(dim, "dim", where="weight_norm")
    return _tp.weight_norm(module, name=name, dim=dim)
