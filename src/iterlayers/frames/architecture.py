"""A data-independent description of a deep frame architecture: input shape, widths, connections, layer kind.

``FrameArchitecture`` is what the deep frame potential depends on (Murdock & Lucey, CVPR 2020: its minimisers
"depend only on network structure"): it turns raw layer weights (``nn.Linear`` / ``nn.Conv1d`` layout) into
the layer frames ``B_j`` and counts parameters, so the same object drives the dataless potential
minimisation and the construction of the trainable network.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedError, ValidationError

from .global_frame import STRUCTURES, FrameLayout, GlobalFrame, assemble_global_frame, check_skip, conv_matrix, frame_layout

__all__ = ["KINDS", "FrameArchitecture"]

KINDS = ("fc", "conv")


@dataclass(frozen=True)
class FrameArchitecture:
    """``widths`` are units (``fc``) or channels (``conv``, 1-D, stride 1, 'same' zero padding, odd kernel).

    ``input_shape``: ``(d,)`` for ``fc``; ``(C, L)`` for ``conv``. Layer ``j`` reads the previous code (chain;
    residual, whose layer ``j > skip`` also adds the code ``w_{j-skip}`` through an identity shortcut), or the
    concatenation of all previous hidden codes (dense, ``j >= 2``); layer 1 reads ``x`` in every structure.
    ``skip`` (residual only): layers spanned by a shortcut.
    """

    input_shape: tuple[int, ...]
    widths: tuple[int, ...]
    structure: str = "chain"
    kind: str = "fc"
    kernel_size: int = 3
    skip: int = 2
    name: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.structure not in STRUCTURES:
            raise ValidationError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        if self.kind not in KINDS:
            raise ValidationError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValidationError(f"widths must be a non-empty tuple of positive ints, got {self.widths}")
        if self.kind == "fc" and len(self.input_shape) != 1:
            raise ValidationError(f"fc input_shape must be (d,), got {self.input_shape}")
        if self.kind == "conv":
            if len(self.input_shape) != 2:
                raise ValidationError(f"conv input_shape must be (C, L), got {self.input_shape}")
            if self.kernel_size < 1 or self.kernel_size % 2 == 0:
                raise ValidationError(f"kernel_size must be a positive odd int, got {self.kernel_size}")
        if self.structure == "residual":
            check_skip(self.widths, self.skip)
        if not self.name:
            widths = "x".join(str(w) for w in self.widths)
            object.__setattr__(self, "name", f"{self.kind}-{self.structure}-{widths}")

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def _spatial(self) -> int:
        return self.input_shape[1] if self.kind == "conv" else 1

    def in_channels(self, j: int) -> int:
        """Input channels (``conv``) / features (``fc``) of layer ``j`` (0-based)."""
        c0 = self.input_shape[0]
        if j == 0:
            return c0
        if self.structure == "dense":
            return sum(self.widths[:j])
        return self.widths[j - 1]

    def weight_shapes(self) -> list[tuple[int, ...]]:
        if self.kind == "fc":
            return [(w, self.in_channels(j)) for j, w in enumerate(self.widths)]
        return [(w, self.in_channels(j), self.kernel_size) for j, w in enumerate(self.widths)]

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Flattened code sizes ``n_j`` (units, or channels x length)."""
        return tuple(w * self._spatial for w in self.widths)

    def num_parameters(self, *, bias: bool = True) -> int:
        """Parameters of the feature layers (weights and, by default, biases); the classifier is excluded."""
        total = sum(math.prod(s) for s in self.weight_shapes())
        return total + (sum(self.widths) if bias else 0)

    def init_weights(self, *, generator: torch.Generator | None = None, dtype=torch.float32) -> list[torch.Tensor]:
        """Gaussian weights in ``nn.Linear`` / ``nn.Conv1d`` layout (scale is irrelevant to the potential)."""
        return [torch.randn(s, generator=generator, dtype=dtype) / math.sqrt(math.prod(s[1:])) for s in self.weight_shapes()]

    def layer_frames(self, weights) -> list[torch.Tensor]:
        """Layer frames ``B_j`` ``[in_j, n_j]``: ``W^T`` for ``fc``; ``conv_matrix(W)^T`` for ``conv``."""
        weights = list(weights)
        if len(weights) != self.depth:
            raise ValidationError(f"expected {self.depth} weight tensors, got {len(weights)}")
        out = []
        for j, (W, s) in enumerate(zip(weights, self.weight_shapes())):
            if tuple(W.shape) != s:
                raise ValidationError(f"layer {j + 1}: weight shape {tuple(W.shape)} != expected {s}")
            if self.kind == "fc":
                out.append(W.transpose(0, 1))
            else:
                shape = (self.in_channels(j), self.input_shape[1])
                out.append(conv_matrix(W, shape, padding=self.kernel_size // 2).transpose(0, 1))
        return out

    def frame_input_sizes(self) -> list[int]:
        """Rows ``in_j`` of every layer frame (flattened input size of layer ``j``)."""
        return [self.in_channels(j) * self._spatial for j in range(self.depth)]

    def layout(self) -> FrameLayout:
        """The global frame's block layout (no weights needed)."""
        return frame_layout(math.prod(self.input_shape), self.feature_sizes, structure=self.structure, skip=self.skip)

    def gram_nonzeros(self) -> int:
        """Structural non-zeros ``N`` of the Gram matrix of the global frame.

        ``fc``: counted block by block (a block whose products are all identity x identity is diagonal, any
        other non-zero block is dense for generic weights), so no ``K x K`` matrix is formed; ``conv``: from
        the support of the assembled frame (Toeplitz blocks are sparse)."""
        lay = self.layout()
        n, P, I = lay.col_sizes, lay.pattern, lay.identity
        if self.kind == "conv":
            ones = [torch.ones(sh, dtype=torch.float64) for sh in self.weight_shapes()]
            return int(self.global_frame(ones, normalize_atoms=False).gram_mask().sum())
        total = 0
        for j in range(self.depth):
            for k in range(self.depth):
                shared = [r for r in range(self.depth) if P[r, j] and P[r, k]]
                if shared:
                    diagonal = j != k and all(I[r, j] and I[r, k] for r in shared)
                    total += n[j] if diagonal else n[j] * n[k]
        return total

    def as_conv(self):
        """The same frame as a ``ConvFrameArchitecture`` of 1x1 convolutions on a 1x1 grid (``fc`` only): its
        per-frequency potential is the block-by-block one (a single frequency, the smaller side of every
        diagonal block), no ``K x K`` Gram matrix; weights map by ``W.view(n, in, 1, 1)``. Built once per
        architecture (it caches its support ``N``, which a training penalty would otherwise recount per batch)."""
        if self.kind != "fc":
            raise UnsupportedError(f"{self.name}: as_conv is for fully connected architectures")
        return self._conv

    @functools.cached_property
    def _conv(self):
        from .conv import ConvFrameArchitecture  # conv.py builds on this module: resolved at call time

        return ConvFrameArchitecture((self.input_shape[0], 1, 1), self.widths, kernel_size=1, stride=1,
                                     structure=self.structure, skip=self.skip)

    def potential(self, weights, *, normalize: str = "nonzero") -> torch.Tensor:
        """The DFP of raw ``nn.Linear`` weights by ``as_conv`` (equal to ``deep_frame_potential((self, W))``)."""
        return self.as_conv().potential([W.view(*W.shape, 1, 1) for W in weights], normalize=normalize)

    def global_frame(self, weights, *, normalize_atoms: bool = True) -> GlobalFrame:
        return assemble_global_frame(
            self.layer_frames(weights), structure=self.structure, normalize_atoms=normalize_atoms, skip=self.skip
        )
