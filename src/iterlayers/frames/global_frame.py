"""The induced global frame of a deep architecture (deep frame approximation).

Murdock, Cazenavette & Lucey (arXiv 2103.05804; CVPR 2020, arXiv 2003.13866) read a feed-forward ReLU network
as approximate inference in a multilayer non-negative sparse-coding problem. Layer ``j`` has a frame
``B_j`` of shape ``[in_j, n_j]`` (for ``nn.Linear`` it is ``weight.T``; its columns, the *atoms*, are the
incoming weight vectors of the units) and the whole network induces one *global frame* ``B`` acting on the
stacked codes ``w = [w_1; ...; w_l]`` so that exact inference is a single sparse-coding problem

    min_{w >= 0}  1/2 ||x~ - B w||^2 + lambda^T w,        x~ = [x; 0; ...; 0]   (zero-padded input).

Row blocks are ``0 .. l-1`` (row 0 reconstructs the input, of dimension ``d_0``; row ``m >= 1`` has the
dimension ``n_m`` of layer ``m``), column blocks are the layers ``1 .. l``. The structures, as drawn in the
induced-dictionary panel of CVPR 2020 Fig. 1 (read from the project page's figure, not from the text):

- ``chain``     ``B[j-1, j] = B_j``, ``B[j, j] = -I`` (``j < l``): block lower bidiagonal. Row ``m`` reads
  ``B_{m+1} w_{m+1} - w_m``: each layer's code is reconstructed by the next layer's frame. The Gram matrix is
  block tridiagonal.
- ``residual``  the chain plus one identity block per shortcut: a shortcut from layer ``j``'s code into layer
  ``j + s`` (skip span ``s``, default 2: the basic block) puts ``+I`` at ``B[j, j+s]``, so row ``j`` reads
  ``B_{j+1} w_{j+1} + w_{j+s} - w_j``. Every ``j = 1 .. l - s`` has a shortcut (widths ``n_j = n_{j+s}``);
  the input has none. The Gram matrix is banded: blocks ``(j, k)`` with ``|j - k| > s`` are zero (at depth 4,
  span 2: the ``(1, 4)`` and ``(4, 1)`` blocks).
- ``dense``     dense connections among the *hidden* layers only: layer ``j >= 2`` reads the concatenation
  ``[w_1; ...; w_{j-1}]`` and its frame is split into row blocks ``B[i, j] = B_j^{(i)}`` (``1 <= i < j``);
  only ``B_1`` acts on the input (row 0); ``B[j, j] = -I``. The extra blocks fill the lower-left triangle
  and the Gram matrix is full (columns ``j < k`` share row ``j``).

The zero-padded input and the chain structure are stated in the papers; the residual and dense patterns follow
the figure's block layout. The sign of a shortcut identity does not change any Gram magnitude.

Convolutional layers enter as their (multi-channel, Toeplitz-structured) matrices: ``conv_matrix`` returns
``A`` with ``vec(conv(x)) = A vec(x)``, and the layer frame is ``B_j = A^T``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .potential import normalize_columns
from iterlayers.errors import ValidationError

__all__ = ["STRUCTURES", "conv_matrix", "GlobalFrame", "assemble_global_frame", "layer_input_sizes", "check_skip", "FrameLayout", "frame_layout"]

STRUCTURES = ("chain", "residual", "dense")


def _pair(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ValidationError(f"{name} must be an int or a tuple of {n} ints, got {v!r}")
    return v


def conv_matrix(
    weight: torch.Tensor, input_shape: Sequence[int], *, stride=1, padding=0
) -> torch.Tensor:
    """Dense matrix ``A`` of a 1-D or 2-D cross-correlation (``torch.nn.functional.conv1d/conv2d``).

    ``weight``: ``[C_out, C_in, k]`` or ``[C_out, C_in, kh, kw]``; ``input_shape``: ``(C_in, L)`` or
    ``(C_in, H, W)`` (no batch). Returns ``A`` of shape ``[C_out * prod(out_spatial), C_in * prod(in_spatial)]``
    (channel-major flattening, as ``Tensor.reshape``), built by index arithmetic, so it is differentiable in
    ``weight``: ``A[(o, p), (c, p * s + q - pad)] = weight[o, c, q]`` whenever the input index is inside.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (3, 4):
        raise ValidationError("weight must be a conv1d [C_out, C_in, k] or conv2d [C_out, C_in, kh, kw] tensor")
    nsp = weight.dim() - 2
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != nsp + 1:
        raise ValidationError(f"input_shape must be (C_in, *spatial) with {nsp} spatial dims, got {input_shape}")
    c_out, c_in = weight.shape[:2]
    if input_shape[0] != c_in:
        raise ValidationError(f"input_shape has {input_shape[0]} channels but weight expects {c_in}")
    ks = tuple(weight.shape[2:])
    st = _pair(stride, nsp, "stride")
    pd = _pair(padding, nsp, "padding")
    sp_in = input_shape[1:]
    sp_out = tuple((sp_in[a] + 2 * pd[a] - ks[a]) // st[a] + 1 for a in range(nsp))
    if any(s < 1 for s in sp_out):
        raise ValidationError(f"kernel {ks} does not fit input {sp_in} with padding {pd}")
    dev = weight.device
    # Per spatial axis: (output position, kernel offset) -> input position, and whether it is inside.
    out_idx, in_idx, k_idx, valid = [], [], [], []
    for a in range(nsp):
        p = torch.arange(sp_out[a], device=dev).view(-1, 1)
        q = torch.arange(ks[a], device=dev).view(1, -1)
        i = p * st[a] + q - pd[a]
        out_idx.append(p.expand_as(i))
        k_idx.append(q.expand_as(i))
        in_idx.append(i)
        valid.append((i >= 0) & (i < sp_in[a]))
    if nsp == 1:
        po, qo, io, vo = out_idx[0], k_idx[0], in_idx[0], valid[0]
        po, qo, io = po[vo], qo[vo], io[vo]
        row_sp, col_sp, kflat = po, io, qo
        n_out_sp, n_in_sp, n_k = sp_out[0], sp_in[0], ks[0]
    else:
        # Outer product of the two axes' (position, offset) pairs.
        p0, q0, i0, v0 = (t.reshape(-1) for t in (out_idx[0], k_idx[0], in_idx[0], valid[0]))
        p1, q1, i1, v1 = (t.reshape(-1) for t in (out_idx[1], k_idx[1], in_idx[1], valid[1]))
        P0, P1 = torch.meshgrid(p0, p1, indexing="ij")
        Q0, Q1 = torch.meshgrid(q0, q1, indexing="ij")
        I0, I1 = torch.meshgrid(i0, i1, indexing="ij")
        V = v0.view(-1, 1) & v1.view(1, -1)
        row_sp = (P0 * sp_out[1] + P1)[V]
        col_sp = (I0 * sp_in[1] + I1)[V]
        kflat = (Q0 * ks[1] + Q1)[V]
        n_out_sp, n_in_sp, n_k = sp_out[0] * sp_out[1], sp_in[0] * sp_in[1], ks[0] * ks[1]
    o = torch.arange(c_out, device=dev).view(-1, 1, 1)
    c = torch.arange(c_in, device=dev).view(1, -1, 1)
    rows = (o * n_out_sp + row_sp.view(1, 1, -1)).expand(c_out, c_in, -1).reshape(-1)
    cols = (c * n_in_sp + col_sp.view(1, 1, -1)).expand(c_out, c_in, -1).reshape(-1)
    vals = weight.reshape(c_out, c_in, n_k)[:, :, kflat].reshape(-1)
    A = weight.new_zeros(c_out * n_out_sp, c_in * n_in_sp)
    return A.index_put((rows, cols), vals, accumulate=True)


@dataclass
class GlobalFrame:
    """An assembled global frame ``B`` ``[D, K]`` with its block layout.

    ``row_sizes[m]`` / ``col_sizes[j]``: block sizes; ``block_pattern[m, j]``: whether block ``(m, j)`` is
    structurally non-zero; ``identity_pattern[m, j]``: whether that block is a fixed ``+-I`` (a code's own
    ``-I`` or a shortcut's identity) rather than (part of) a learned layer frame. ``gram_block_support`` says
    which Gram blocks ``(j, k)`` can be non-zero (the two layers share a row block).
    """

    matrix: torch.Tensor
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    structure: str
    block_pattern: torch.Tensor
    identity_pattern: torch.Tensor
    skip: int = 2

    @property
    def gram_block_support(self) -> torch.Tensor:
        P = self.block_pattern.to(torch.float64)
        return (P.T @ P) > 0

    def gram_mask(self) -> torch.Tensor:
        """Entry-wise structural support of ``B^T B`` (from the non-zero pattern of ``B``)."""
        P = (self.matrix.detach() != 0).to(torch.float64)
        return (P.T @ P) > 0

    @property
    def num_layers(self) -> int:
        return len(self.col_sizes)

    def __repr__(self) -> str:
        return (
            f"GlobalFrame(structure={self.structure!r}, shape={tuple(self.matrix.shape)}, "
            f"rows={self.row_sizes}, cols={self.col_sizes})"
        )


def _validate_structure(structure: str) -> str:
    if structure not in STRUCTURES:
        raise ValidationError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    return structure


def layer_input_sizes(d0: int, widths: Sequence[int], structure: str) -> list[int]:
    """Input size of every layer: ``d0`` for layer 1; then ``n_{j-1}`` (chain, residual) or
    ``n_1 + ... + n_{j-1}`` (dense: the concatenation of all earlier *hidden* codes, never the input)."""
    _validate_structure(structure)
    n = list(widths)
    return [d0] + [sum(n[:j]) if structure == "dense" else n[j - 1] for j in range(1, len(n))]


def check_skip(widths: Sequence[int], skip) -> int:
    """Validate a residual skip span (``>= 2`` layers) against the widths: every shortcut ``j -> j + skip``
    adds ``w_j`` to layer ``j + skip``'s pre-activation, so ``n_j = n_{j+skip}`` is required."""
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 2:
        raise ValidationError(f"skip must be an int >= 2 (layers spanned by a shortcut), got {skip!r}")
    n = list(widths)
    bad = [(j + 1, j + 1 + skip) for j in range(len(n) - skip) if n[j] != n[j + skip]]
    if bad:
        raise ValidationError(f"residual: shortcut(s) {bad} join layers of different widths {n}")
    return skip


@dataclass(frozen=True)
class FrameLayout:
    """The block layout of a global frame, without weights: ``pattern[m, j]`` (block ``(m, j)`` structurally
    non-zero), ``identity[m, j]`` (it is a fixed identity) and ``sign[m, j]`` (+1 / -1 of that identity)."""

    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    pattern: torch.Tensor
    identity: torch.Tensor
    sign: torch.Tensor

    @property
    def gram_block_support(self) -> torch.Tensor:
        P = self.pattern.to(torch.float64)
        return (P.T @ P) > 0


def frame_layout(d0: int, widths: Sequence[int], *, structure: str = "chain", skip: int = 2) -> FrameLayout:
    """Block layout of the induced global frame of ``structure`` on ``d0`` inputs (see the module docstring)."""
    _validate_structure(structure)
    n = [int(w) for w in widths]
    l = len(n)
    if structure == "residual":
        check_skip(n, skip)
    P = torch.zeros(l, l, dtype=torch.bool)
    ident = torch.zeros(l, l, dtype=torch.bool)
    sign = torch.zeros(l, l)
    for j in range(l):  # column block j holds layer j+1; row block m >= 1 holds code m
        if structure == "dense" and j > 0:
            P[1 : j + 1, j] = True  # B_{j+1} split over the hidden codes 1..j it reads
        else:
            P[j, j] = True
        if j + 1 < l:  # the code's own -I: row j+1 reads (what later layers reconstruct of w_{j+1}) - w_{j+1}
            P[j + 1, j], ident[j + 1, j], sign[j + 1, j] = True, True, -1.0
        if structure == "residual" and j - skip >= 0:  # shortcut w_{j+1-skip} -> layer j+1: +I in that code's row
            m = j + 1 - skip
            P[m, j], ident[m, j], sign[m, j] = True, True, 1.0
    return FrameLayout((d0,) + tuple(n[: l - 1]), tuple(n), P, ident, sign)


def assemble_global_frame(
    layer_frames: Sequence[torch.Tensor], *, structure: str = "chain", normalize_atoms: bool = True, skip: int = 2
) -> GlobalFrame:
    """Assemble the induced global frame from layer frames ``B_j`` ``[in_j, n_j]`` (differentiably).

    ``normalize_atoms=True`` first gives every layer atom (column of ``B_j``) unit norm, as the papers do
    (sparse-coding atoms are unit-norm; without it the fixed ``-I`` blocks would let the potential be driven
    to its minimum by shrinking the weights). Shapes required: chain and residual ``in_j = n_{j-1}``
    (residual also ``n_j = n_{j+skip}``); dense ``in_j = n_1 + ... + n_{j-1}`` for ``j >= 2``
    (``layer_input_sizes``).
    """
    _validate_structure(structure)
    frames = list(layer_frames)
    if not frames:
        raise ValidationError("layer_frames must contain at least one layer frame")
    for j, Bj in enumerate(frames):
        if not isinstance(Bj, torch.Tensor) or Bj.dim() != 2:
            raise ValidationError(f"layer frame {j + 1} must be a 2-D tensor [in_j, n_j], got {getattr(Bj, 'shape', Bj)}")
    dtype, dev = frames[0].dtype, frames[0].device
    l = len(frames)
    n = [int(B.shape[1]) for B in frames]
    d0 = int(frames[0].shape[0])
    ins = layer_input_sizes(d0, n, structure)
    for j in range(1, l):
        if frames[j].shape[0] != ins[j]:
            raise ValidationError(
                f"{structure}: layer {j + 1} frame must have {ins[j]} rows (its input size), got {frames[j].shape[0]}"
            )
    lay = frame_layout(d0, n, structure=structure, skip=skip)
    if normalize_atoms:
        frames = [normalize_columns(B) for B in frames]
    rows = []
    for m in range(l):
        row = []
        for j in range(l):
            if lay.identity[m, j]:
                row.append(float(lay.sign[m, j]) * torch.eye(n[j], dtype=dtype, device=dev))
            elif lay.pattern[m, j]:
                # the rows of B_j that read row block m (all of them, except for a dense layer's split frame)
                start = sum(lay.row_sizes[r] for r in range(m) if lay.pattern[r, j] and not lay.identity[r, j])
                row.append(frames[j][start : start + lay.row_sizes[m]])
            else:
                row.append(torch.zeros(lay.row_sizes[m], n[j], dtype=dtype, device=dev))
        rows.append(torch.cat(row, dim=1))
    return GlobalFrame(torch.cat(rows, dim=0), lay.row_sizes, tuple(n), structure, lay.pattern, lay.identity, skip)
