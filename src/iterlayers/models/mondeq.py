"""Monotone operator equilibrium networks (monDEQ; Winston & Kolter, NeurIPS 2020, arXiv 2006.08591).

Model::

    b  = U x + c                                   (injection)
    z* = relu(W z* + b),   W = (1 - m) I - A^T A + B - B^T          (the equilibrium)
    y  = H z* + h                                  (head)

``I - W = m I + A^T A - (B - B^T)`` has symmetric part ``>= m I``: it is strongly monotone, so the equilibrium
exists and is unique for every x and every value of the free parameters A, B (see
:mod:`iterlayers.parametrizations`, ``MonotoneLinear``). It is found by an operator splitting of the
inclusion ``0 in (I - W) z - b + N_{z >= 0}(z)`` (:mod:`iterlayers.solvers.splitting`: forward-backward or
Peaceman-Rachford), run through the core loop with the true residual ``||relu(W z + b) - z||``.

Backward pass by the same splitting (derived): with ``D = diag(relu'(W z* + b))`` (0/1) and ``g = dl/dz*``,

    dl/db = D (I - W^T D)^{-1} g = (I - D W^T)^{-1} D g          (push-through identity)

which is the fixed point ``y = D (W^T y + g)``: the same problem with ``W^T`` for ``W`` (``I - W^T`` is strongly
monotone with the same m), ``g`` for ``b`` and ``v -> D v`` (the prox of the indicator of ``{y_i = 0 where
D_ii = 0}``) for relu. The layer solves it with the same splitting on the transposed operator and hands ``y``
to autograd as the gradient of the pre-activation ``W z* + b`` (``z*`` held fixed), which gives every
parameter its implicit-function-theorem gradient.

Two operators:

- :class:`DenseMonotone`: W as a matrix (the parameters of ``MonotoneLinear``); the resolvent
  ``(I + alpha (I - W))^{-1}`` by an LU factorisation computed once per solve.
- :class:`ConvMonotone`: A and B circular convolutions (``k x k``, C -> C channels) on ``side x side`` images.
  In the 2-D DFT basis a circular convolution is a C x C matrix per frequency, so ``W``, ``W^T`` (the
  conjugate transpose per frequency), the resolvent (``side^2`` C x C inverses) and ``||I - W||_2`` (the
  largest per-frequency norm) are exact and cheap (Winston & Kolter use the same FFT route).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import _validate as v
from ..errors import ValidationError
from ..parametrizations import MonotoneLinear
from ..solvers import LoopOptions, make_solver
from ..solvers._loop import rows
from ..solvers._loop import run_loop
from ..solvers.splitting import MonotoneStructure

__all__ = ["DenseMonotone", "ConvMonotone", "MonotoneDEQ", "MonDEQ", "MonDEQConv", "SPLITTINGS"]

SPLITTINGS = ("peaceman_rachford", "forward_backward")


class DenseMonotone(nn.Module):
    """``W = (1 - m) I - A^T A + B - B^T`` on R^width and the injection ``U x + c`` (a ``MonotoneLinear``'s
    parameters; its ``forward``, the forward-backward cell, is the reference the tests solve with Anderson)."""

    def __init__(self, in_features: int, width: int, *, m: float = 1.0):
        super().__init__()
        self.core = MonotoneLinear(width, in_features=in_features, m=m)
        self.m, self.size = self.core.m, self.core.features

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.core.input_term(x, x.shape[0], x)

    def linear(self, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``W z`` (``W^T z`` with ``transpose``) on rows ``[n, width]``."""
        W = self.core.W()
        return z @ (W if transpose else W.T)

    def lipschitz(self) -> float:
        """``||I - W||_2`` (exact)."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.core.G().double(), ord=2))

    def resolvent(self, alpha: float, transpose: bool = False):
        """``v -> (I + alpha (I - W))^{-1} v`` on rows (of ``I - W^T`` with ``transpose``), factorised once."""
        with torch.no_grad():
            M = torch.eye(self.size, dtype=self.core.A.dtype, device=self.core.A.device) + alpha * self.core.G()
            # rows r: (M^{-1} r^T)^T, i.e. solve(M, r^T)^T (and solve(M^T, r^T)^T for the transposed operator)
            lu = torch.linalg.lu_factor(M.T if transpose else M)
        return lambda r: torch.linalg.lu_solve(*lu, r.T).T

    def extra_repr(self) -> str:
        return f"width={self.size}, m={self.m:g}"


class ConvMonotone(nn.Module):
    """``W = (1 - m) I - A^T A + B - B^T`` with A, B circular ``k x k`` convolutions on C x side x side states,
    computed in the 2-D DFT basis; the injection is a zero-padded 3x3 convolution of the image.

    The DFT of the state is taken per channel; a kernel ``K`` acts at frequency w as the C x C matrix
    ``K_hat(w) = sum_ab K[:, :, a, b] exp(-2 pi i (w_1 a + w_2 b) / side)`` (offsets a, b centred on the
    kernel), so ``(K z)_hat(w) = K_hat(w) z_hat(w)`` and ``(K^T z)_hat(w) = K_hat(w)^H z_hat(w)``.
    """

    def __init__(self, in_channels: int, channels: int, side: int, *, m: float = 1.0, kernel_size: int = 3):
        super().__init__()
        self.channels, self.side = v.positive_int(channels, "channels"), v.positive_int(side, "side")
        self.kernel_size = v.choice(v.integer(kernel_size, "kernel_size"), "kernel_size", (1, 3, 5))
        if self.kernel_size > self.side:
            raise ValidationError(f"kernel_size={kernel_size} exceeds the image side {side}")
        self.m = v.in_range(m, "m", low=0.0, low_open=True)
        self.size = self.channels * self.side ** 2
        C, k = self.channels, self.kernel_size
        scale = 1.0 / math.sqrt(C * k * k)
        self.A = nn.Parameter(torch.randn(C, C, k, k) * scale)
        self.B = nn.Parameter(torch.randn(C, C, k, k) * scale)
        self.U = nn.Conv2d(in_channels, C, 3, padding=1)

    def _hat(self, K: torch.Tensor) -> torch.Tensor:
        """``K_hat`` as ``[side, side, C, C]`` (complex)."""
        k, s = self.kernel_size, self.side
        padded = F.pad(K, (0, s - k, 0, s - k)).roll((-(k // 2), -(k // 2)), dims=(2, 3))
        return torch.fft.fft2(padded).permute(2, 3, 0, 1)

    def spectrum(self) -> torch.Tensor:
        """``W_hat(w) = (1 - m) I - A_hat^H A_hat + B_hat - B_hat^H`` per frequency, ``[side, side, C, C]``."""
        a, b = self._hat(self.A), self._hat(self.B)
        eye = torch.eye(self.channels, dtype=a.dtype, device=a.device)
        return (1 - self.m) * eye - a.mH @ a + b - b.mH

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(x.reshape(x.shape[0], -1, self.side, self.side)).flatten(1)

    def _spectral(self, mats: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # z rows [n, C * side^2] -> per-frequency matrix product -> back to real rows
        zh = torch.fft.fft2(z.reshape(-1, self.channels, self.side, self.side))
        out = torch.einsum("hwoi,nihw->nohw", mats, zh)
        return torch.fft.ifft2(out).real.flatten(1)

    def linear(self, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``W z`` (``W^T z`` with ``transpose``) on flat rows."""
        Wh = self.spectrum()
        return self._spectral(Wh.mH if transpose else Wh, z)

    def lipschitz(self) -> float:
        """``||I - W||_2 = max_w ||I - W_hat(w)||_2`` (exact: the DFT is unitary up to scale)."""
        with torch.no_grad():
            Wh = self.spectrum().to(torch.complex128)
            eye = torch.eye(self.channels, dtype=Wh.dtype, device=Wh.device)
            return float(torch.linalg.matrix_norm(eye - Wh, ord=2).max())

    def resolvent(self, alpha: float, transpose: bool = False):
        """``v -> (I + alpha (I - W))^{-1} v``: one C x C inverse per frequency, computed once."""
        with torch.no_grad():
            Wh = self.spectrum()
            eye = torch.eye(self.channels, dtype=Wh.dtype, device=Wh.device)
            inv = torch.linalg.inv((1 + alpha) * eye - alpha * Wh)
            inv = inv.mH if transpose else inv
        return lambda r: self._spectral(inv, r)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, side={self.side}, kernel_size={self.kernel_size}, m={self.m:g}"


def _relu(v: torch.Tensor, idx) -> torch.Tensor:
    return torch.relu(v)


class _SplittingAdjoint(torch.autograd.Function):
    """Identity-valued splice: forward ``relu(pre)`` (= ``z*``), backward the adjoint solved by the splitting."""

    @staticmethod
    def forward(ctx, pre, layer):
        ctx.layer = layer
        ctx.save_for_backward(pre)
        return torch.relu(pre)

    @staticmethod
    def backward(ctx, g):
        (pre,) = ctx.saved_tensors
        layer = ctx.layer
        mask = (pre > 0).to(g.dtype)
        y = layer.solve(g.contiguous(), transpose=True, mask=mask)
        return y, None


class MonotoneDEQ(nn.Module):
    """The monotone equilibrium layer ``z* = relu(W z* + b(x))`` of an operator (:class:`DenseMonotone` or
    :class:`ConvMonotone`), solved and differentiated by operator splitting (module docstring).

    Args:
        operator: the operator module (parameters of W and of the injection).
        solver: ``"peaceman_rachford"`` (default) or ``"forward_backward"``; both directions use it.
        alpha: the splitting step (``None``: the solver's default, 1 for Peaceman-Rachford and ``m / L^2`` for
            forward-backward); recorded in ``stats[...].info["alpha"]``.
        atol, rtol, max_iter: the forward stopping rule on ``||relu(W z + b) - z||``.
        backward_rtol, backward_max_iter: the adjoint's, relative to each sample's incoming gradient.
        on_failure: ``"raise"``, ``"warn"`` or ``"ignore"`` when a solve does not converge.

    ``stats["forward"]`` / ``stats["backward"]`` hold the solves' :class:`~iterlayers.SolverStats`.
    """

    def __init__(self, operator: nn.Module, *, solver: str = "peaceman_rachford", alpha: float | None = None,
                 atol: float = 1e-4, rtol: float = 0.0, max_iter: int = 100, backward_rtol: float = 1e-5,
                 backward_max_iter: int = 100, on_failure: str = "warn"):
        super().__init__()
        self.operator = operator
        self.solver = v.choice(solver, "solver", SPLITTINGS)
        self.alpha = None if alpha is None else v.in_range(alpha, "alpha", low=0.0, low_open=True)
        loop = LoopOptions(atol=atol, rtol=rtol, max_iter=max_iter, on_failure=on_failure, where="MonotoneDEQ")
        self.atol, self.rtol, self.max_iter, self.on_failure = loop.atol, loop.rtol, loop.max_iter, loop.on_failure
        self.backward_rtol = v.in_range(backward_rtol, "backward_rtol", low=0.0, high=1.0, low_open=True,
                                        high_open=True)
        self.backward_max_iter = v.positive_int(backward_max_iter, "backward_max_iter")
        self.stats: dict = {"forward": None, "backward": None}

    def structure(self, bias: torch.Tensor, *, transpose: bool = False,
                  mask: torch.Tensor | None = None) -> MonotoneStructure:
        """The :class:`MonotoneStructure` of ``z = prox(W z + bias)`` (``W^T`` and ``prox = mask *`` for the
        adjoint). The resolvent is factorised once per step size the solver asks for."""
        op, factors = self.operator, {}

        def resolvent(r: torch.Tensor, alpha: float) -> torch.Tensor:
            if alpha not in factors:
                factors[alpha] = op.resolvent(alpha, transpose)
            return factors[alpha](r)

        prox = _relu if mask is None else (lambda t, idx: t * rows(mask, idx))
        return MonotoneStructure(linear=lambda z: op.linear(z, transpose), resolvent=resolvent, bias=bias,
                                 prox=prox, m=op.m, lipschitz=op.lipschitz())

    def solve(self, bias: torch.Tensor, *, transpose: bool = False, mask: torch.Tensor | None = None):
        """``z = prox(W z + bias)`` (``W^T``, ``prox = mask *`` for the adjoint) by the splitting, without a graph;
        the statistics go to ``stats``."""
        op = self.operator
        with torch.no_grad():
            bias = bias.detach()
            options = {"structure": self.structure(bias, transpose=transpose, mask=mask)}
            if self.alpha is not None:
                options["alpha"] = self.alpha
            solver = make_solver(self.solver, options)
            # built per solve from the attributes (which a user may change between solves), validated again
            if mask is None:
                f, args = (lambda z, b: torch.relu(op.linear(z) + b)), (bias,)
                loop = LoopOptions(atol=self.atol, rtol=self.rtol, max_iter=self.max_iter, on_failure=self.on_failure,
                                   where="MonotoneDEQ")
            else:
                f, args = (lambda y, g, d: d * (op.linear(y, True) + g)), (bias, mask)
                loop = LoopOptions(atol=0.0, rtol=self.backward_rtol, max_iter=self.backward_max_iter,
                                   on_failure=self.on_failure, where="MonotoneDEQ")
            z, st = run_loop(f, torch.zeros_like(bias), solver=solver, args=args, options=loop, stopping="verify",
                             phase="backward" if mask is not None else "forward")
        st.info["alpha"] = solver.alpha
        self.stats["backward" if mask is not None else "forward"] = st
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``z*`` as flat rows ``[B, size]``, differentiable (by the adjoint splitting) in x and the parameters."""
        b = self.operator.injection(x)
        self.stats = {"forward": None, "backward": None}
        z = self.solve(b)
        pre = self.operator.linear(z) + b  # z held fixed: the graph to the parameters and x
        if not torch.is_grad_enabled() or not pre.requires_grad:
            return torch.relu(pre)
        return _SplittingAdjoint.apply(pre, self)

    def extra_repr(self) -> str:
        return (f"solver={self.solver!r}, alpha={self.alpha}, atol={self.atol:g}, rtol={self.rtol:g}, "
                f"max_iter={self.max_iter}")


def _layer_options(options: dict) -> dict:
    options.setdefault("on_failure", "ignore")  # the training loop logs residuals; no warning per batch
    return options


class MonDEQ(nn.Module):
    """Fully connected monDEQ classifier: ``x -> z* = relu(W z* + U x + c) -> H z* + h``.

    Args:
        in_features: input size (inputs are flattened).
        num_classes: number of logits.
        width: size of the equilibrium state.
        m: strong-monotonicity constant of ``I - W``.
        **options: :class:`MonotoneDEQ` options (``solver``, ``alpha``, ``atol``, ``max_iter``, ...).
    """

    def __init__(self, in_features: int, num_classes: int, *, width: int = 64, m: float = 1.0, **options):
        super().__init__()
        self.in_features = v.positive_int(in_features, "in_features")
        self.num_classes = v.positive_int(num_classes, "num_classes")
        self.mon = MonotoneDEQ(DenseMonotone(self.in_features, v.positive_int(width, "width"), m=m),
                               **_layer_options(options))
        self.head = nn.Linear(width, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mon(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class MonDEQConv(nn.Module):
    """Convolutional monDEQ classifier on square images: circular-convolution W, 2x2 average pooling, linear head.

    Args:
        in_features: flattened input size, ``in_channels * side**2`` (square images, even side).
        num_classes: number of logits.
        channels: channels of the equilibrium state.
        in_channels: channels of the input image (1 for digits).
        m: strong-monotonicity constant; kernel_size: of A and B.
        **options: :class:`MonotoneDEQ` options.
    """

    def __init__(self, in_features: int, num_classes: int, *, channels: int = 8, in_channels: int = 1,
                 m: float = 1.0, kernel_size: int = 3, **options):
        super().__init__()
        in_features = v.positive_int(in_features, "in_features")
        self.num_classes = v.positive_int(num_classes, "num_classes")
        in_channels = v.positive_int(in_channels, "in_channels")
        side = math.isqrt(in_features // in_channels)
        if in_channels * side * side != in_features or side % 2:
            raise ValidationError(f"mondeq_conv needs square images of even side: in_features={in_features} is not "
                                  f"in_channels={in_channels} x side^2 with an even side")
        self.in_features, self.side = in_features, side
        op = ConvMonotone(in_channels, channels, side, m=m, kernel_size=kernel_size)
        self.mon = MonotoneDEQ(op, **_layer_options(options))
        self.head = nn.Linear(op.channels * (side // 2) ** 2, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self.mon.operator
        z = self.mon(x).reshape(x.shape[0], op.channels, self.side, self.side)
        return self.head(F.avg_pool2d(z, 2).flatten(1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, side={self.side}"
