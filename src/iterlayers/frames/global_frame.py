"""The induced global frame of a deep architecture (deep frame approximation).

Murdock, Cazenavette & Lucey (arXiv 2103.05804; CVPR 2020, arXiv 2003.13866) read a feed-forward ReLU network
as approximate inference in a multilayer non-negative sparse-coding problem. Layer ``j`` has a frame
``B_j`` of shape ``[in_j, n_j]`` (for ``nn.Linear`` it is ``weight.T``; its columns, the *atoms*, are the
incoming weight vectors of the units) and the whole network induces one *global frame* ``B`` acting on the
stacked codes ``w = [w_1; ...; w_l]`` so that exact inference is a single sparse-coding problem

    min_{w >= 0}  1/2 ||x~ - B w||^2 + lambda^T w,        x~ = [x; 0; ...; 0]   (zero-padded input).

Row blocks are ``0 .. l-1`` (row 0 reconstructs the input, of dimension ``d_0``; row ``m >= 1`` has the
dimension ``n_m`` of layer ``m``), column blocks are the layers ``1 .. l``. The structures built here:

- ``chain``     ``B[j-1, j] = B_j``, ``B[j, j] = -I`` (``j < l``): block lower bidiagonal. Row ``m`` reads
  ``w_m - B_{m+1} w_{m+1}``: each layer's code is reconstructed by the next layer's frame.
- ``residual``  ``B[j-1, j] = B_j``, ``B[m, j] = -I`` for every ``m = j .. l-1`` (all widths equal). Row ``m``
  reads ``h_m - B_{m+1} w_{m+1}`` with the residual stream ``h_m = w_1 + ... + w_m``: the identity shortcuts
  fill the lower triangle with identity blocks, so every pair of layers interacts in the Gram matrix.
- ``dense``     ``B_j`` (over the concatenation ``[x; w_1; ...; w_{j-1}]``) is split into its row blocks
  ``B[i, j] = B_j^{(i)}``, ``i < j``, and ``B[j, j] = -I``: a block lower-triangular frame; row ``m`` reads
  ``w_m - sum_{k > m} B_k^{(m)} w_k`` (every later layer that consumes ``w_m`` helps to reconstruct it).

The zero-padded input and the chain structure are stated in the papers; so is the qualitative effect of skip
connections (denser Gram matrices with more non-zero blocks, hence lower minimal coherence). The exact
residual and dense block patterns above are our derivation from the networks' forward passes under the
zero-padded-input convention (the papers' figures could not be read here).

Convolutional layers enter as their (multi-channel, Toeplitz-structured) matrices: ``conv_matrix`` returns
``A`` with ``vec(conv(x)) = A vec(x)``, and the layer frame is ``B_j = A^T``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .potential import normalize_columns

__all__ = ["STRUCTURES", "conv_matrix", "GlobalFrame", "assemble_global_frame"]

STRUCTURES = ("chain", "residual", "dense")


def _pair(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {v!r}")
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
        raise ValueError("weight must be a conv1d [C_out, C_in, k] or conv2d [C_out, C_in, kh, kw] tensor")
    nsp = weight.dim() - 2
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != nsp + 1:
        raise ValueError(f"input_shape must be (C_in, *spatial) with {nsp} spatial dims, got {input_shape}")
    c_out, c_in = weight.shape[:2]
    if input_shape[0] != c_in:
        raise ValueError(f"input_shape has {input_shape[0]} channels but weight expects {c_in}")
    ks = tuple(weight.shape[2:])
    st = _pair(stride, nsp, "stride")
    pd = _pair(padding, nsp, "padding")
    sp_in = input_shape[1:]
    sp_out = tuple((sp_in[a] + 2 * pd[a] - ks[a]) // st[a] + 1 for a in range(nsp))
    if any(s < 1 for s in sp_out):
        raise ValueError(f"kernel {ks} does not fit input {sp_in} with padding {pd}")
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
    structurally non-zero. ``gram_block_support`` says which Gram blocks ``(j, k)`` can be non-zero (the two
    layers share a row block).
    """

    matrix: torch.Tensor
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    structure: str
    block_pattern: torch.Tensor

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
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    return structure


def assemble_global_frame(
    layer_frames: Sequence[torch.Tensor], *, structure: str = "chain", normalize_atoms: bool = True
) -> GlobalFrame:
    """Assemble the induced global frame from layer frames ``B_j`` ``[in_j, n_j]`` (differentiably).

    ``normalize_atoms=True`` first gives every layer atom (column of ``B_j``) unit norm, as the papers do
    (sparse-coding atoms are unit-norm; without it the fixed ``-I`` blocks would let the potential be driven
    to its minimum by shrinking the weights). Shapes required: chain ``in_j = n_{j-1}``; residual additionally
    all ``n_j`` equal; dense ``in_j = d_0 + n_1 + ... + n_{j-1}`` (``d_0 = in_1``).
    """
    _validate_structure(structure)
    frames = list(layer_frames)
    if not frames:
        raise ValueError("layer_frames must contain at least one layer frame")
    for j, Bj in enumerate(frames):
        if not isinstance(Bj, torch.Tensor) or Bj.dim() != 2:
            raise ValueError(f"layer frame {j + 1} must be a 2-D tensor [in_j, n_j], got {getattr(Bj, 'shape', Bj)}")
    dtype, dev = frames[0].dtype, frames[0].device
    l = len(frames)
    n = [int(B.shape[1]) for B in frames]
    d0 = int(frames[0].shape[0])
    for j in range(1, l):
        expect = d0 + sum(n[:j]) if structure == "dense" else n[j - 1]
        if frames[j].shape[0] != expect:
            raise ValueError(
                f"{structure}: layer {j + 1} frame must have {expect} rows (its input size), got {frames[j].shape[0]}"
            )
    if structure == "residual" and len(set(n)) > 1:
        raise ValueError(f"residual: all layer widths must be equal for identity shortcuts, got {n}")
    if normalize_atoms:
        frames = [normalize_columns(B) for B in frames]
    row_sizes = (d0,) + tuple(n[: l - 1])
    blocks: list[list[torch.Tensor | None]] = [[None] * l for _ in range(l)]
    for j in range(l):  # column block j holds layer j+1
        if structure == "dense":
            offs = [0]
            for r in row_sizes[: j + 1]:
                offs.append(offs[-1] + r)
            for i in range(j + 1):
                blocks[i][j] = frames[j][offs[i] : offs[i + 1]]
        else:
            blocks[j][j] = frames[j]
        below = range(j + 1, l) if structure == "residual" else range(j + 1, min(j + 2, l))
        for m in below:
            blocks[m][j] = -torch.eye(n[j], dtype=dtype, device=dev)
    pattern = torch.tensor([[b is not None for b in row] for row in blocks], dtype=torch.bool)
    rows = []
    for m in range(l):
        rows.append(
            torch.cat(
                [b if b is not None else torch.zeros(row_sizes[m], n[j], dtype=dtype, device=dev) for j, b in enumerate(blocks[m])],
                dim=1,
            )
        )
    return GlobalFrame(torch.cat(rows, dim=0), row_sizes, tuple(n), structure, pattern)
