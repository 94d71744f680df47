"""A small convolutional deep-equilibrium classifier for image-shaped inputs (e.g. 8x8 digits).

Model (the convolutional DEQ of Bai, Kolter & Koltun 2019, arXiv 1909.01377, reduced to one resolution)::

    u  = Conv_enc(x)                          (input injection, C channels, H x W)
    z* = relu(K * z* + u)                     (equilibrium: K a 3x3, C -> C convolution with zero padding)
    y  = Linear(mean-pool(z*))                (head)

Why it converges: a zero-padded convolution is a sum over the kernel taps (i, j) of a spatial shift (operator
norm <= 1) composed with the channel-mixing matrix K[:, :, i, j], so ||K *||_2 <= sum_ij ||K[:, :, i, j]||_2.
The layer rescales the kernel so that this bound equals gamma < 1; relu is 1-Lipschitz, hence the map is a
gamma-contraction and every solver converges (Banach). The bound is exact, cheap (a batch of C x C spectral
norms) and stateless, unlike power-iteration spectral normalisation.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import integer, positive_int
from ..errors import ValidationError
from ..layers import DEQ
from .deq_mlp import CLASSIFIER_DEQ_OPTIONS, DEQClassifier, _check_choice, _check_gamma

__all__ = ["ConvCell", "DEQConv"]


class ConvCell(nn.Module):
    """f(z, u) = relu(K * z + u) with sum_ij ||K[:, :, i, j]||_2 = gamma (a gamma-contraction)."""

    def __init__(self, channels: int, *, kernel_size: int = 3, gamma: float = 0.9):
        super().__init__()
        self.channels = positive_int(channels, "channels")
        _check_choice("kernel_size", integer(kernel_size, "kernel_size"), (1, 3, 5))
        self.kernel_size, self.gamma = int(kernel_size), _check_gamma(gamma)
        v = torch.empty(channels, channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.v = nn.Parameter(v)

    def kernel(self) -> torch.Tensor:
        """The effective kernel K, scaled so that sum over taps of the tap spectral norms is gamma."""
        taps = self.v.permute(2, 3, 0, 1)  # [k, k, C_out, C_in]
        bound = torch.linalg.matrix_norm(taps, ord=2).sum()
        return self.v * (self.gamma / bound)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.conv2d(z, self.kernel(), padding=self.kernel_size // 2) + u)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, gamma={self.gamma}"


class DEQConv(DEQClassifier):
    """Conv encoder -> :class:`iterlayers.DEQ` over a :class:`ConvCell` -> pooled linear head.

    Args:
        in_features: flattened input size; it must be ``in_channels * side**2`` (square images).
        num_classes: number of logits.
        channels: channels of the equilibrium state.
        in_channels: channels of the input image (1 for digits).
        gamma: contraction factor of the cell.
        **deq_options: fields of :class:`iterlayers.DEQOptions` (``solver``, ``backward``, ``atol``, ...)
            overriding :data:`~iterlayers.models.deq_mlp.CLASSIFIER_DEQ_OPTIONS`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        channels: int = 16,
        in_channels: int = 1,
        gamma: float = 0.9,
        **deq_options,
    ):
        super().__init__()
        in_features = positive_int(in_features, "in_features")
        num_classes = positive_int(num_classes, "num_classes")
        in_channels = positive_int(in_channels, "in_channels")
        side = math.isqrt(in_features // in_channels)
        if in_channels * side * side != in_features:
            raise ValidationError(
                f"deq_conv needs square images: in_features={in_features} is not in_channels={in_channels} x side^2"
            )
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.in_channels, self.side = int(in_channels), side
        self.encoder = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.deq = DEQ(ConvCell(channels, gamma=gamma), CLASSIFIER_DEQ_OPTIONS, **deq_options)
        self.head = nn.Linear(channels, num_classes)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(x.shape[0], self.in_channels, self.side, self.side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.deq(self.inject(x))
        return self.head(z.mean(dim=(2, 3)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, side={self.side}"
