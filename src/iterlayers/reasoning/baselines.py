"""Learned-algorithm baselines: recurrent networks that see the energy's gradient ("no reasoning prior").

Chen et al. (2020) compare algorithm layers with neural networks of the same depth that replace the
hand-designed update by a learned one.  Both baselines below run ``k`` recurrent steps (the option
``max_iter``, the paper's ``k``) from ``y_0 = 0`` and only access the energy through
``g_t = grad_y E(y_t)``, exactly like GD/NAG layers, so the comparison isolates the *prior* encoded by the
optimiser.

* :class:`GradientRNN`: ``h_{t+1} = act(U h_t - W g_t)``, ``y_{t+1} = y_t + V h_{t+1}``.
* :class:`MLPRNN`: ``y_{t+1} = V act(W_m ... act(W_1 [y_t; -g_t]))`` (an MLP cell applied recurrently).

``init="gd"`` sets the weights so that the first forward pass equals gradient descent with step
``step_size`` exactly (using ``relu(z) - relu(-z) = z`` with paired units, hence hidden width
``>= 2 n``); ``init="identity"`` uses ``W = I, U = 0, V = I`` (padded), ``init="random"`` PyTorch's
default.  Training then moves them away from GD.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .unrolled import _positive_int, bind_energy
from iterlayers.errors import ValidationError

__all__ = ["GradientRNN", "MLPRNN"]

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "none": nn.Identity}
_INITS = ("gd", "identity", "random")


def _check_common(activation: str, init: str) -> None:
    if activation not in _ACTS:
        raise ValidationError(f"activation must be one of {tuple(_ACTS)}, got {activation!r}")
    if init not in _INITS:
        raise ValidationError(f"init must be one of {_INITS}, got {init!r}")


class _RecurrentBaseline(nn.Module):
    def _cell(self, y: Tensor, h, g: Tensor):  # pragma: no cover - interface
        raise NotImplementedError

    def _h0(self, y0: Tensor):
        return None

    def forward(self, energy, x=None, *, y0: Tensor | None = None, max_iter: int | None = None,
                return_all: bool = False):
        """``y^k`` after ``k = max_iter`` recurrent steps (the layer's own unless given); ``return_all`` gives all
        iterates."""
        bound = bind_energy(energy, x)
        max_iter = self.max_iter if max_iter is None else _positive_int(max_iter, "max_iter")
        y = bound.zeros() if y0 is None else y0
        h = self._h0(y)
        trace = [y] if return_all else None
        for _ in range(max_iter):
            y, h = self._cell(y, h, bound.grad(y))
            if return_all:
                trace.append(y)
        return trace if return_all else y


class GradientRNN(_RecurrentBaseline):
    """Vanilla RNN driven by the gradient (options: ``dim``, ``hidden``, ``max_iter`` = the paper's ``k``,
    ``activation``, ``init``, ``step_size`` for ``init="gd"``)."""

    def __init__(self, dim: int, hidden: int, *, max_iter: int = 10, activation: str = "relu",
                 init: str = "gd", step_size: float = 1.0):
        super().__init__()
        self.dim, self.hidden = _positive_int(dim, "dim"), _positive_int(hidden, "hidden")
        self.max_iter = _positive_int(max_iter, "max_iter")
        _check_common(activation, init)
        if init == "gd" and hidden < 2 * dim:
            raise ValidationError(f"init='gd' needs hidden >= 2 * dim = {2 * dim}, got hidden={hidden}")
        self.activation, self.init = activation, init
        self.act = _ACTS[activation]()
        self.U = nn.Linear(hidden, hidden, bias=False)
        self.W = nn.Linear(dim, hidden, bias=False)
        self.V = nn.Linear(hidden, dim, bias=False)
        if init != "random":
            with torch.no_grad():
                eye = torch.eye(dim)
                self.U.weight.zero_()
                self.W.weight.zero_()
                self.V.weight.zero_()
                if init == "gd":
                    self.W.weight[:dim] = eye
                    self.W.weight[dim:2 * dim] = -eye
                    self.V.weight[:, :dim] = step_size * eye
                    self.V.weight[:, dim:2 * dim] = -step_size * eye
                else:
                    m = min(dim, hidden)
                    self.W.weight[:m, :m] = torch.eye(m)
                    self.V.weight[:m, :m] = torch.eye(m)

    def _h0(self, y0: Tensor):
        return y0.new_zeros(y0.shape[0], self.hidden)

    def _cell(self, y, h, g):
        h = self.act(self.U(h) - self.W(g))
        return y + self.V(h), h

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, max_iter={self.max_iter}, activation={self.activation}, "
                f"init={self.init}")


class MLPRNN(_RecurrentBaseline):
    """Recurrent MLP cell on ``[y; -g]`` (options: ``dim``, ``hidden`` tuple, ``max_iter`` = the paper's ``k``,
    ``activation``, ``init``, ``step_size``)."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (20, 20), *, max_iter: int = 10,
                 activation: str = "relu", init: str = "gd", step_size: float = 1.0):
        super().__init__()
        self.dim, self.max_iter = _positive_int(dim, "dim"), _positive_int(max_iter, "max_iter")
        hidden = tuple(hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValidationError(f"hidden must be a non-empty tuple of positive ints, got {hidden!r}")
        _check_common(activation, init)
        if init == "gd" and (activation != "relu" or min(hidden) < 2 * dim):
            raise ValidationError("init='gd' needs activation='relu' and every hidden width >= 2 * dim "
                             f"= {2 * dim}, got activation={activation!r}, hidden={hidden}")
        self.hidden, self.activation, self.init = hidden, activation, init
        self.act = _ACTS[activation]()
        widths = (2 * dim,) + hidden
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(hidden[-1], dim, bias=False)
        if init != "random":
            with torch.no_grad():
                for lin in list(self.layers) + [self.out]:
                    lin.weight.zero_()
                    m = min(lin.weight.shape)
                    lin.weight[:m, :m] = torch.eye(m)
                if init == "gd":
                    eye = torch.eye(dim)
                    first = self.layers[0].weight
                    first.zero_()
                    first[:dim, :dim], first[:dim, dim:] = eye, step_size * eye
                    first[dim:2 * dim, :dim], first[dim:2 * dim, dim:] = -eye, -step_size * eye
                    self.out.weight.zero_()
                    self.out.weight[:, :dim], self.out.weight[:, dim:2 * dim] = eye, -eye

    def _cell(self, y, h, g):
        z = torch.cat([y, -g], dim=-1)
        for lin in self.layers:
            z = self.act(lin(z))
        return self.out(z), None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, max_iter={self.max_iter}, activation={self.activation}, "
                f"init={self.init}")
