"""A deep-equilibrium classifier for feature vectors, and the explicit MLP it is compared with.

Model (Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, arXiv 1909.01377)::

    u   = U x + b                       (encoder, computed once: the "input injection")
    z*  = sigma(W z* + u)               (the equilibrium layer, solved by iterlayers.DEQ)
    y   = H z* + c                      (linear head)

Why it converges: sigma in {tanh, relu} is 1-Lipschitz, so z -> sigma(W z + u) is a contraction with factor
||W||_2 whenever ||W||_2 < 1 (Banach), and Picard iteration converges linearly, ||z_k - z*|| <= ||W||_2^k ||z_0 - z*||.
With ``norm="spectral"`` the layer uses W = gamma * V / ||V||_2 (spectral normalisation, Miyato et al. 2018,
computed exactly and statelessly, so every solver iteration sees the same map), which guarantees the factor
gamma < 1. ``norm="weight"`` uses weight normalisation w_i = g_i v_i / ||v_i|| (Salimans & Kingma 2016): it
eases optimisation but bounds nothing; ``norm="none"`` uses V as is.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import positive_int, real
from ..errors import ValidationError
from ..implicit import DEQOptions
from ..layers import DEQ

__all__ = ["MLPCell", "DEQClassifier", "DEQMLP", "MLPClassifier", "ACTIVATIONS", "WEIGHT_NORMS", "CLASSIFIER_DEQ_OPTIONS"]

#: The equilibrium layer of the classifiers (:class:`DEQMLP`, :class:`~iterlayers.models.deq_conv.DEQConv`):
#: a loose absolute tolerance (classification needs no more) and no warning per batch on a slow sample, whose
#: residual the training loop logs instead.
CLASSIFIER_DEQ_OPTIONS = DEQOptions(atol=1e-4, rtol=0.0, max_iter=40, on_failure="ignore")

ACTIVATIONS = ("tanh", "relu")
WEIGHT_NORMS = ("spectral", "weight", "none")  # weight parametrisations of the cell


def _check_choice(name: str, value, choices) -> None:
    # The model registry's phrasing ("activation='gelu' is not valid; ...") is part of the CLI's contract.
    if value not in choices:
        raise ValidationError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _check_gamma(gamma) -> float:
    gamma = real(gamma, "gamma")
    if not 0.0 < gamma < 1.0:
        raise ValidationError(f"gamma must lie in (0, 1), got {gamma!r}")
    return gamma


class DEQClassifier(nn.Module):
    """Base of the classifiers whose equilibrium layer is ``self.deq``: the cell is stored once, in the DEQ.

    ``self.cell`` is a property reading ``self.deq.cell``, so the state dict holds each cell weight once
    (``deq.cell.*``). Checkpoints of the earlier layout, which registered the cell a second time as ``cell.*``,
    still load: the duplicate keys are dropped (or, alone, renamed) before loading.
    """

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_pre_hook(_drop_duplicate_cell)

    @property
    def cell(self) -> nn.Module:
        return self.deq.cell


def _drop_duplicate_cell(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    old = prefix + "cell."
    for key in [k for k in state_dict if k.startswith(old)]:
        value = state_dict.pop(key)
        state_dict.setdefault(prefix + "deq.cell." + key[len(old):], value)


class MLPCell(nn.Module):
    """The equilibrium map f(z, u) = sigma(W z + u) on R^width, with a normalised W.

    Args:
        width: dimension of z and u.
        activation: ``"tanh"`` or ``"relu"`` (both 1-Lipschitz).
        norm: ``"spectral"`` (W = gamma V / ||V||_2, a gamma-contraction), ``"weight"`` or ``"none"``.
        gamma: the target spectral norm for ``norm="spectral"``, in (0, 1).
    """

    def __init__(self, width: int, *, activation: str = "tanh", norm: str = "spectral", gamma: float = 0.9):
        super().__init__()
        self.width = positive_int(width, "width")
        _check_choice("activation", activation, ACTIVATIONS)
        _check_choice("norm", norm, WEIGHT_NORMS)
        self.activation = activation
        self.norm = norm
        self.gamma = _check_gamma(gamma)
        v = torch.empty(width, width)
        nn.init.orthogonal_(v)
        self.v = nn.Parameter(v * (0.5 if norm == "none" else 1.0))
        if norm == "weight":
            self.g = nn.Parameter(self.v.detach().norm(dim=1) * self.gamma)
        else:
            self.register_parameter("g", None)

    def weight(self) -> torch.Tensor:
        """The effective matrix W used by the map."""
        if self.norm == "spectral":
            sigma = torch.linalg.matrix_norm(self.v, ord=2)
            return self.v * (self.gamma / sigma)
        if self.norm == "weight":
            return self.v * (self.g / self.v.norm(dim=1)).unsqueeze(1)
        return self.v

    def lipschitz_bound(self) -> float:
        """An upper bound on the Lipschitz constant of z -> f(z, u): ||W||_2 (sigma is 1-Lipschitz)."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.weight(), ord=2))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        pre = torch.nn.functional.linear(z, self.weight()) + u
        return torch.tanh(pre) if self.activation == "tanh" else torch.relu(pre)

    def extra_repr(self) -> str:
        return f"width={self.width}, activation={self.activation!r}, norm={self.norm!r}, gamma={self.gamma}"


class DEQMLP(DEQClassifier):
    """Encoder -> :class:`iterlayers.DEQ` over an :class:`MLPCell` -> linear head.

    Args:
        in_features: number of input features (inputs are flattened).
        num_classes: number of output logits.
        width: hidden width of the equilibrium state.
        activation, norm, gamma: see :class:`MLPCell`.
        **deq_options: fields of :class:`iterlayers.DEQOptions` (``solver``, ``backward``, ``atol``, ...)
            overriding :data:`CLASSIFIER_DEQ_OPTIONS`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        width: int = 64,
        activation: str = "tanh",
        norm: str = "spectral",
        gamma: float = 0.9,
        **deq_options,
    ):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.num_classes = positive_int(num_classes, "num_classes")
        width = positive_int(width, "width")
        self.encoder = nn.Linear(in_features, width)
        self.deq = DEQ(MLPCell(width, activation=activation, norm=norm, gamma=gamma), CLASSIFIER_DEQ_OPTIONS,
                       **deq_options)
        self.head = nn.Linear(width, num_classes)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """The input injection u = U x + b fed to the equilibrium layer."""
        return self.encoder(x.reshape(x.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inject(x)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class MLPClassifier(nn.Module):
    """The explicit baseline: x -> sigma(U x + b) -> head, i.e. one step of the DEQ map from z = 0."""

    def __init__(self, in_features: int, num_classes: int, *, width: int = 64, activation: str = "tanh", depth: int = 1):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes), ("width", width),
                            ("depth", depth)):
            positive_int(value, name)
        _check_choice("activation", activation, ACTIVATIONS)
        act = nn.Tanh if activation == "tanh" else nn.ReLU
        layers: list[nn.Module] = []
        dims = [in_features] + [width] * depth
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.in_features, self.num_classes = int(in_features), int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
