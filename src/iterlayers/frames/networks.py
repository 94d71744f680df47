"""Deep frame approximation classifiers: feed-forward (T = 1) and recurrent (T-step / equilibrium) networks.

``DeepFrameNet`` holds the layer weights of a ``FrameArchitecture`` (chain / residual / dense; fully connected
or 1-D convolutional) and a linear classifier. Its representation is the sparse code of the input:

- ``max_iter=1``: the feed-forward approximation, i.e. the ordinary ReLU network
  ``w_j = ReLU(B_j^T u_j + b_j)`` (chain MLP / ResNet / DenseNet);
- ``max_iter=T > 1``: the recurrent network of Murdock, Cazenavette & Lucey (arXiv 2103.05804):
  the feed-forward pass followed by ``T - 1`` accelerated proximal-gradient steps on the global multilayer
  sparse-coding problem with the *same* weights (``lambda_j = -b_j``), approaching exact inference;
- ``solver="deq"``: exact inference as the fixed point of the proximal-gradient map, through
  ``iterlayers.deq_solve`` with implicit gradients.

The classifier reads the last code (chain, residual) or the concatenation of all codes (dense).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .architecture import FrameArchitecture
from .global_frame import GlobalFrame, assemble_global_frame
from .sparse_coding import SPARSE_CODING_SOLVERS, _deq_options, feed_forward, pad_input, solve_sparse_coding
from iterlayers.errors import OptionTypeError, ValidationError

__all__ = ["DeepFrameNet"]


class DeepFrameNet(nn.Module):
    """Classifier whose features are (approximate) multilayer sparse codes of the input.

    Options (keyword-only): ``max_iter`` (``T >= 1``: the number of inference iterations, the papers'
    "iterations" / "T"; the feed-forward pass counts as the first), ``solver`` in ``("apg", "deq")``, ``ridge >= 0``
    (adds ``ridge/2 ||w||^2`` so the problem stays bounded when biases are positive), ``deq_options``.
    """

    def __init__(
        self,
        architecture: FrameArchitecture,
        num_classes: int,
        *,
        max_iter: int = 1,
        solver: str = "apg",
        ridge: float = 0.0,
        deq_options=None,
    ):
        super().__init__()
        if not isinstance(architecture, FrameArchitecture):
            raise OptionTypeError(f"architecture must be a FrameArchitecture, got {type(architecture).__name__}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValidationError(f"DeepFrameNet: max_iter must be an int >= 1, got {max_iter!r}")
        if solver not in SPARSE_CODING_SOLVERS:
            raise ValidationError(f"solver must be one of {SPARSE_CODING_SOLVERS}, got {solver!r}")
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValidationError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if ridge < 0:
            raise ValidationError(f"ridge must be >= 0, got {ridge}")
        self.architecture = architecture
        self.max_iter = max_iter
        self.solver = solver
        self.ridge = float(ridge)
        self.deq_options = _deq_options(deq_options)  # one DEQOptions value, validated once
        layers = []
        for j, w in enumerate(architecture.widths):
            cin = architecture.in_channels(j)
            if architecture.kind == "fc":
                layers.append(nn.Linear(cin, w))
            else:
                k = architecture.kernel_size
                layers.append(nn.Conv1d(cin, w, k, padding=k // 2))
        self.layers = nn.ModuleList(layers)
        n = architecture.feature_sizes
        head_in = sum(n) if architecture.structure == "dense" else n[-1]
        self.head = nn.Linear(head_in, num_classes)

    @property
    def structure(self) -> str:
        return self.architecture.structure

    def layer_frames(self) -> list[torch.Tensor]:
        """``B_j`` ``[in_j, n_j]`` of the current weights (differentiable)."""
        return self.architecture.layer_frames([m.weight for m in self.layers])

    def lambdas(self) -> list[torch.Tensor]:
        """``lambda_j = -b_j`` (per unit; conv biases repeated over positions)."""
        L = self.architecture.input_shape[1] if self.architecture.kind == "conv" else 1
        return [-m.bias.repeat_interleave(L) for m in self.layers]

    def global_frame(self) -> GlobalFrame:
        """The un-normalised induced global frame of the network's weights."""
        return self.architecture.global_frame([m.weight for m in self.layers], normalize_atoms=False)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The codes ``[w_1, ..., w_l]`` after ``max_iter`` steps (or at the equilibrium)."""
        d0 = math.prod(self.architecture.input_shape)
        if x.dim() < 2 or math.prod(x.shape[1:]) != d0:
            raise ValidationError(
                f"input must be [batch, *{self.architecture.input_shape}] ({d0} features), got {tuple(x.shape)}"
            )
        x = x.reshape(x.shape[0], d0)
        frames, lams = self.layer_frames(), self.lambdas()
        codes = feed_forward(x, frames, lams, structure=self.structure, skip=self.architecture.skip)
        if self.max_iter == 1 and self.solver == "apg":
            return codes
        frame = assemble_global_frame(frames, structure=self.structure, normalize_atoms=False,
                                      skip=self.architecture.skip)
        B = frame.matrix
        w = solve_sparse_coding(
            pad_input(x, B.shape[0]),
            B,
            torch.cat(lams),
            w0=torch.cat(codes, dim=-1),
            solver=self.solver,
            max_iter=self.max_iter - 1,
            ridge=self.ridge,
            deq_options=self.deq_options,
        )
        return list(torch.split(w, list(frame.col_sizes), dim=-1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        if self.structure == "dense":
            return torch.cat(codes, dim=-1)
        return codes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        a = self.architecture
        return (
            f"kind={a.kind!r}, structure={a.structure!r}, input_shape={a.input_shape}, widths={a.widths}, "
            f"skip={a.skip}, max_iter={self.max_iter}, solver={self.solver!r}, ridge={self.ridge}"
        )
