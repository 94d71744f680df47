"""A multiscale deep-equilibrium classifier (MDEQ-style) for square images, e.g. the 8x8 digits.

Model (after Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020, arXiv 2006.08656,
reduced to a small, provably contractive cell)::

    u_i  = Conv_i(P_i x)                                     (injection at resolution i = 1..S, side / 2^(i-1))
    z*_i = relu(s * (K_i * z*_i + sum_{j != i} M_ij R_ij z*_j) + u_i)        (all resolutions in one cell)
    y    = Linear(concat_i avg-pool_to_{p x p}(z*_i))        (head, p = ``pool``, 2 by default)

``K_i`` is a 3x3 convolution within resolution i; ``R_ij`` resamples resolution j to resolution i (average
pooling times the factor k when j is finer, nearest upsampling divided by k when coarser; both have operator
norm exactly 1) and ``M_ij`` is a 1x1 convolution (a C_j -> C_i matrix). The state is the tuple
``(z_1, ..., z_S)``: the core solves tuple states, so every resolution is updated in parallel in one cell and
fused at every iteration, as in MDEQ (whose residual blocks and group norms are left out here).

Why it converges (derived): the linear part ``L z`` has blocks ``L_ii = K_i *`` and ``L_ij = M_ij R_ij``, so
``||L||_2 <= ||N||_2`` with ``N`` the S x S matrix of block bounds ``N_ii = sum_taps ||K_i[:, :, a, b]||_2`` (a
zero-padded convolution is a sum of shifts times channel matrices) and ``N_ij = ||M_ij||_2`` (the block
operator norm is at most the spectral norm of the matrix of block norms). The cell uses ``s = gamma / ||N||_2``,
so ``||s L||_2 <= gamma < 1`` and, relu being 1-Lipschitz, the map is a gamma-contraction (Banach).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import integer, positive_int
from ..errors import ValidationError
from ..layers import DEQ
from .deq_mlp import CLASSIFIER_DEQ_OPTIONS, DEQClassifier, _check_gamma

__all__ = ["MultiscaleCell", "MDEQ", "resample"]


def resample(z: torch.Tensor, factor: int) -> torch.Tensor:
    """Resolution change with operator norm 1: ``factor > 1`` coarsens (k * avg-pool k), ``factor < 1`` refines
    (nearest upsampling by 1/factor, divided by it), ``1`` is the identity.

    (k x k average pooling has norm 1/k: every output is the mean of k^2 disjoint inputs; nearest upsampling
    by k copies each entry k^2 times, norm k.)"""
    if factor == 1:
        return z
    if factor > 1:
        return F.avg_pool2d(z, factor) * factor
    k = round(1 / factor)
    return F.interpolate(z, scale_factor=k, mode="nearest") / k


def _factor(i: int, j: int) -> float:
    """The resampling factor from resolution j to resolution i (i > j: coarser)."""
    return 2 ** (i - j) if i > j else 1 / 2 ** (j - i)


class MultiscaleCell(nn.Module):
    """The multiscale map on the tuple state ``(z_1, ..., z_S)`` (see the module docstring): a gamma-contraction.

    Args:
        channels: channels per resolution, finest first (its length is the number of resolutions S).
        gamma: contraction factor in (0, 1).
    """

    def __init__(self, channels, *, gamma: float = 0.9):
        super().__init__()
        channels = tuple(positive_int(c, "channels") for c in channels)
        if not 1 <= len(channels) <= 4:
            raise ValidationError(f"channels must give 1 to 4 resolutions, got {len(channels)}")
        self.channels, self.gamma = channels, _check_gamma(gamma)
        S = len(channels)
        self.K = nn.ParameterList()
        for c in channels:
            k = torch.empty(c, c, 3, 3)
            nn.init.kaiming_uniform_(k, a=math.sqrt(5))
            self.K.append(nn.Parameter(k))
        # M['i_j']: the 1x1 fusion from resolution j into i (the diagonal entries are unused and absent)
        self.M = nn.ParameterDict({
            f"{i}_{j}": nn.Parameter(torch.randn(channels[i], channels[j]) / math.sqrt(channels[j]))
            for i in range(S) for j in range(S) if i != j
        })

    def bounds(self) -> torch.Tensor:
        """The S x S matrix N of block-norm bounds (differentiable)."""
        S = len(self.channels)
        rows = []
        for i in range(S):
            row = []
            for j in range(S):
                if i == j:
                    row.append(torch.linalg.matrix_norm(self.K[i].permute(2, 3, 0, 1), ord=2).sum())
                else:
                    row.append(torch.linalg.matrix_norm(self.M[f"{i}_{j}"], ord=2))
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def scale(self) -> torch.Tensor:
        """``s = gamma / ||N||_2``: the factor that makes the linear part a gamma-contraction."""
        return self.gamma / torch.linalg.matrix_norm(self.bounds(), ord=2)

    def linear(self, z: tuple) -> tuple:
        """``L z`` (unscaled): per-resolution convolution plus the resampled 1x1 fusion of the others."""
        S = len(self.channels)
        out = []
        for i in range(S):
            acc = F.conv2d(z[i], self.K[i], padding=1)
            for j in range(S):
                if j != i:
                    acc = acc + F.conv2d(resample(z[j], _factor(i, j)), self.M[f"{i}_{j}"][:, :, None, None])
            out.append(acc)
        return tuple(out)

    def init_state(self, u: tuple) -> tuple:
        return tuple(torch.zeros_like(t) for t in u)

    def forward(self, z: tuple, u: tuple) -> tuple:
        s = self.scale()
        return tuple(torch.relu(s * lz + ui) for lz, ui in zip(self.linear(z), u))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gamma={self.gamma}"


class MDEQ(DEQClassifier):
    """Per-resolution injection -> :class:`iterlayers.DEQ` over a :class:`MultiscaleCell` -> pooled head.

    Args:
        in_features: flattened input size, ``in_channels * side**2`` (square images, side divisible by
            ``2**(S - 1)``).
        num_classes: number of logits.
        channels: channels per resolution, finest first (default ``(8, 16)``: two resolutions).
        in_channels: channels of the input image (1 for digits).
        gamma: contraction factor of the cell.
        pool: the head reads every resolution average-pooled to ``pool x pool`` (at most the coarsest side):
            a global mean (``pool=1``) discards where a feature is, and on digits trained about ten times
            slower.
        **deq_options: fields of :class:`iterlayers.DEQOptions` overriding
            :data:`~iterlayers.models.deq_mlp.CLASSIFIER_DEQ_OPTIONS`.
    """

    def __init__(self, in_features: int, num_classes: int, *, channels=(8, 16), in_channels: int = 1,
                 gamma: float = 0.9, pool: int = 2, **deq_options):
        super().__init__()
        in_features = positive_int(in_features, "in_features")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.in_channels = positive_int(in_channels, "in_channels")
        if isinstance(channels, (str, bytes)) or not hasattr(channels, "__iter__"):
            channels = (integer(channels, "channels"),)
        cell = MultiscaleCell(tuple(channels), gamma=gamma)
        S = len(cell.channels)
        side = math.isqrt(in_features // self.in_channels)
        if self.in_channels * side * side != in_features or side % 2 ** (S - 1):
            raise ValidationError(
                f"mdeq needs square images whose side is divisible by 2^{S - 1} ({S} resolutions): "
                f"in_features={in_features} is not in_channels={self.in_channels} x side^2 with such a side")
        self.in_features, self.side = in_features, side
        self.pool = positive_int(pool, "pool")
        if self.pool > side // 2 ** (S - 1):
            raise ValidationError(f"pool={pool} exceeds the coarsest side {side // 2 ** (S - 1)}")
        self.encoders = nn.ModuleList(nn.Conv2d(self.in_channels, c, 3, padding=1) for c in cell.channels)
        self.deq = DEQ(cell, CLASSIFIER_DEQ_OPTIONS, **deq_options)
        self.head = nn.Linear(sum(cell.channels) * self.pool ** 2, self.num_classes)

    def inject(self, x: torch.Tensor) -> tuple:
        """``u_i = Conv_i(avg-pool_{2^(i-1)}(x))``: the injection at every resolution."""
        x = x.reshape(x.shape[0], self.in_channels, self.side, self.side)
        return tuple(enc(F.avg_pool2d(x, 2 ** i) if i else x) for i, enc in enumerate(self.encoders))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.deq(self.inject(x))
        return self.head(torch.cat([F.adaptive_avg_pool2d(zi, self.pool).flatten(1) for zi in z], dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, side={self.side}"
