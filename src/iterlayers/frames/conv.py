"""Convolutional (2-D, multi-channel, strided) deep frames without the dense Toeplitz matrix.

A 2-D convolution with circular padding is a block-circulant operator, so the Gram matrix of the induced global
frame of a conv net (chain / residual / dense, ``global_frame``) is block-circulant too and the DFT turns it into
a small channel matrix per spatial frequency. Everything below is derived here (the papers' texts were not read).

**Layer operator.** Layer ``j`` maps its input (``c_in`` channels on a ``p x p`` grid) to its code (``c_out``
channels on ``q x q``, ``q = p / s``, stride ``s`` dividing ``p``):

    y[o, u] = sum_{c, d in [0, f)^2} W[o, c, d] x[c, (s u + d - a) mod p],       a = (f - 1) // 2,

i.e. ``F.conv2d(F.pad(x, (a, f-1-a, a, f-1-a), mode="circular"), W, stride=s)``. The layer frame is
``B_j = A_j^T``; its atoms are the filters ``W[o]`` placed at ``s u - a``, so every atom has norm ``||W[o]||``.

**Polyphase (stride).** On ``p = s q`` write ``x_phi[c, T] = x[c, s T + phi]`` (``phi in [0, s)^2``,
``T in Z_q^2``). Then ``y[o, U] = sum_{c, phi, T} h[o, (c, phi), T] x_phi[c, U + T]`` with
``h[o, (c, phi), T] = atom_o[c, s T + phi]`` (``atom_o`` the filter placed at ``-a`` on ``Z_p^2``): a *stride-1*
circular correlation on ``Z_q^2`` from ``c_in s^2`` polyphase channels to ``c_out`` channels. Its symbol
``A^(xi) = sum_T h[T] e^{-2 pi i xi.T / q}`` (``[c_out, c_in s^2]`` per ``xi in Z_q^2``; ``torch.fft.fft2`` of
``h``) satisfies ``(A_1 A_2)^ = A_1^ A_2^``, ``(A^T)^ = (A^)^H`` and, for a block-circulant ``M`` with symbol
``M^``, ``||M||_F^2 = sum_xi ||M^(xi)||_F^2`` (Parseval with the unnormalised DFT). A code on a grid finer
than ``q`` by a factor ``m`` is ``c m^2`` polyphase channels on ``Z_q^2`` (an identity stays an identity).

**Gram blocks.** Column block ``j`` of the global frame holds ``B_j`` (or its row-split pieces, dense) and
``m_j`` fixed ``+-I`` blocks; after unit layer atoms every global column has norm ``sqrt(1 + m_j)``. The Gram
block of layers ``j <= k`` is ``G_jk = sum_r P_rj^T P_rk / sqrt((1 + m_j)(1 + m_k))`` over the row blocks
``r`` both occupy, each ``P_rj^T`` a (strided) convolution or an identity, so on the grid of code ``k``

    G^_jk(xi) = sum_r M_rj(xi) M_rk(xi)^H / sqrt((1 + m_j)(1 + m_k)),
    ||G||_F^2 = sum_j sum_xi ||G^_jj||^2 + 2 sum_{j<k} sum_xi ||G^_jk||^2,

over the Hermitian-unique frequencies only (``xi`` and ``-xi`` have conjugate symbols, so each pair counts
twice; the self-conjugate ``xi``, ``2 xi = 0 mod q``, have real symbols and use real products: ``_Symbol``).
Cost per conv x conv product: about ``q^2 / 2`` complex ``c_out x c_in s^2 x c_out`` products; memory: the
filters placed on their input grid. The dense Toeplitz matrix (``(c p^2)^2`` entries) is never formed.

**Structural support N** (the DFP's denominator): the same blocks for all-ones filters and ``+I`` identities
(no cancellation) give non-negative integer kernels ``K_jk[t]`` (``irfft2``); ``N = sum q^2 #{K_jk[t] > 1/2}``.

**Zero padding** is not shift-invariant (border atoms are truncated), so it has no exact per-frequency form.
``explicit_layer_frames`` builds it (and the circular case) exactly from torch's convolution on basis images,
for small sizes; the FFT path refuses it (``UnsupportedError``). docs/papers/frames.md reports how far the
zero-padded DFP is from the circular one on small nets.

**Structural coherence bound (derived).** ``k`` filters ``f x f`` on ``d`` channels, stride ``s``, a ``p x p``
circular input: ``K = k (p/s)^2`` unit atoms in ``D = d p^2`` dimensions. ``||G||_F^2 >= K^2 / D`` (the frame
potential bound), so some row of ``G`` has ``sum_i G_ri^2 >= K / D = k / (d s^2)``. Atom ``(o, u)`` meets only
atoms ``(o', u + t)`` with ``|s t_a| <= f - 1`` on both axes: ``k L^2`` atoms (itself included),
``L = min(2 floor((f - 1) / s) + 1, p / s)``. Hence ``1 + (k L^2 - 1) mu^2 >= k / (d s^2)``:

    mu >= sqrt( (k / (d s^2) - 1) / (k L^2 - 1) )        (k > d s^2; 0 otherwise),

the 2-D, multi-channel, strided form of the argument behind the 1-D bound of Papyan, Sulam & Elad (2017).
The Welch bound of the same size is ``sqrt((K/D - 1) / (K - 1))``; as ``k L^2 <= K`` the conv bound is never
below it, and strictly above when ``L < p / s`` (weight sharing limits how spread the Gram can be).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from ..errors import ShapeMismatchError, UnsupportedError, ValidationError
from .global_frame import STRUCTURES, FrameLayout, GlobalFrame, assemble_global_frame, check_skip, frame_layout

__all__ = [
    "PADDINGS",
    "ConvFrameArchitecture",
    "ConvFrameNet",
    "conv_symbol",
    "conv_gram_potential",
    "conv_mutual_coherence",
    "conv_coherence_bound",
]

PADDINGS = ("circular", "zero")


def _per_layer(value, depth: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        vals = tuple(V.positive_int(v, name, where="ConvFrameArchitecture") for v in value)
        if len(vals) != depth:
            raise ValidationError(f"ConvFrameArchitecture: {name} needs one value per layer ({depth}), got {vals}")
        return vals
    return (V.positive_int(value, name, where="ConvFrameArchitecture"),) * depth


@dataclass(frozen=True)
class ConvFrameArchitecture:
    """A 2-D convolutional deep frame architecture: ``input_shape = (C, p, p)``, output ``channels`` per layer,
    per-layer ``kernel_size`` ``f`` and ``stride`` ``s`` (``s`` divides the layer's input size), ``structure``
    (chain / residual / dense as in ``global_frame``), residual ``skip``, and ``padding`` (``"circular"``: the
    exact FFT case; ``"zero"``: explicit construction only).

    Structural constraints (so that every fixed identity joins codes of the same shape): a residual shortcut
    ``j -> j + skip`` needs equal channels and no stride in the layers it spans; a dense net strides in its first
    layer only (its hidden codes are concatenated). Layer ``j`` reads the previous code (chain, residual) or the
    concatenation of all previous hidden codes (dense, ``j >= 2``); layer 1 reads the input.
    """

    input_shape: tuple[int, int, int]
    channels: tuple[int, ...]
    kernel_size: int | tuple[int, ...] = 3
    stride: int | tuple[int, ...] = 1
    structure: str = "chain"
    skip: int = 2
    padding: str = "circular"
    name: str = field(default="", compare=False)

    def __post_init__(self):
        where = "ConvFrameArchitecture"
        shape = tuple(self.input_shape)
        if len(shape) != 3:
            raise ValidationError(f"{where}: input_shape must be (C, p, p), got {shape}")
        shape = tuple(V.positive_int(v, "input_shape", where=where) for v in shape)
        if shape[1] != shape[2]:
            raise ValidationError(f"{where}: input_shape must be square (C, p, p), got {shape}")
        if not isinstance(self.channels, (list, tuple)) or not self.channels:
            raise ValidationError(f"{where}: channels must be a non-empty tuple of positive ints, got {self.channels!r}")
        ch = tuple(V.positive_int(c, "channels", where=where) for c in self.channels)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "channels", ch)
        object.__setattr__(self, "kernel_size", _per_layer(self.kernel_size, len(ch), "kernel_size"))
        object.__setattr__(self, "stride", _per_layer(self.stride, len(ch), "stride"))
        V.choice(self.structure, "structure", STRUCTURES, where=where)
        V.choice(self.padding, "padding", PADDINGS, where=where)
        sizes = [shape[1]]
        for j, (f, s) in enumerate(zip(self.kernel_size, self.stride)):
            if sizes[-1] % s:
                raise ValidationError(f"{where}: layer {j + 1} stride {s} does not divide its input size {sizes[-1]}")
            if f > sizes[-1]:
                raise ValidationError(f"{where}: layer {j + 1} kernel {f} is larger than its input size {sizes[-1]}")
            sizes.append(sizes[-1] // s)
        object.__setattr__(self, "_sizes", tuple(sizes))
        if self.structure == "residual":
            check_skip(ch, self.skip)
            for j in range(len(ch) - self.skip):
                if any(s != 1 for s in self.stride[j + 1 : j + 1 + self.skip]):
                    raise ValidationError(
                        f"{where}: residual shortcut {j + 1} -> {j + 1 + self.skip} spans a strided layer "
                        f"(strides {self.stride}); strides must be 1 inside a shortcut")
        if self.structure == "dense" and any(s != 1 for s in self.stride[1:]):
            raise ValidationError(f"{where}: a dense net strides in its first layer only, got strides {self.stride}")
        if not self.name:
            desc = "x".join(str(c) for c in ch)
            object.__setattr__(self, "name", f"conv2d-{self.structure}-{desc}-s{''.join(map(str, self.stride))}")

    # ------------------------------------------------------------------ shapes
    @property
    def depth(self) -> int:
        return len(self.channels)

    @property
    def spatial_sizes(self) -> tuple[int, ...]:
        """Grid sizes ``p_0`` (input), ``p_1 .. p_l`` (codes)."""
        return self._sizes

    def in_channels(self, j: int) -> int:
        """Input channels of layer ``j`` (0-based)."""
        if j == 0:
            return self.input_shape[0]
        return sum(self.channels[:j]) if self.structure == "dense" else self.channels[j - 1]

    def weight_shapes(self) -> list[tuple[int, int, int, int]]:
        return [(c, self.in_channels(j), f, f) for j, (c, f) in enumerate(zip(self.channels, self.kernel_size))]

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Flattened code sizes ``n_j = c_j p_j^2``."""
        return tuple(c * p * p for c, p in zip(self.channels, self._sizes[1:]))

    def frame_input_sizes(self) -> list[int]:
        """Rows ``in_j`` of every layer frame."""
        return [self.in_channels(j) * self._sizes[j] ** 2 for j in range(self.depth)]

    def num_parameters(self, *, bias: bool = True) -> int:
        """Feature-layer parameters (weights and, by default, biases); the classifier is excluded."""
        return sum(math.prod(s) for s in self.weight_shapes()) + (sum(self.channels) if bias else 0)

    def init_weights(self, *, generator: torch.Generator | None = None, dtype=torch.float32) -> list[torch.Tensor]:
        """Gaussian filters ``[c_out, c_in, f, f]`` (their scale is irrelevant to the potential)."""
        return [torch.randn(s, generator=generator, dtype=dtype) / math.sqrt(math.prod(s[1:]))
                for s in self.weight_shapes()]

    def layout(self) -> FrameLayout:
        """The global frame's block layout (no weights needed)."""
        return frame_layout(math.prod(self.input_shape), self.feature_sizes, structure=self.structure, skip=self.skip)

    def tight_weights(self, *, dtype=torch.float32) -> list[torch.Tensor]:
        """Filters whose layer frames are unit-norm tight frames: filter ``o`` of layer ``j`` is row ``o`` of a
        unit-norm tight frame ``H`` ``[c_out, d]`` (``d = c s^2``: the channels of the code the layer reads, a
        dense layer reading only the previous code, times the taps of the ``s x s`` block ``[0, s)^2``, or of
        the centre tap when ``s = 1``). Then ``A^(xi) = H D(xi)`` with ``D`` diagonal unitary (the taps fall on
        distinct polyphase channels), so ``A^ A^H = H H^T = I`` (``c_out <= d``: ``H`` rows of the identity) or
        ``A^H A = H^T H = (c_out / d) I`` (``c_out > d``: a real harmonic frame, the ``d`` lowest real DFT
        columns of size ``c_out`` scaled by ``sqrt(c_out / d)``, whose rows have unit norm) at every frequency:
        every layer attains ``FP = max(n_j, n_j^2 / in_j)``, hence a chain attains
        ``deep_frame_potential_lower_bound`` (derived; tests and the experiment check it by evaluating the
        potential). Needs ``f >= s``."""
        out = []
        for j, (cout, cin, f, _) in enumerate(self.weight_shapes()):
            s = self.stride[j]
            if f < s:
                raise UnsupportedError(f"{self.name}: layer {j + 1} kernel {f} < stride {s}: some polyphase "
                                       "channels are never read, no tight start")
            read = self.channels[j - 1] if (self.structure == "dense" and j > 0) else cin
            d = read * s * s
            H = _unit_tight_frame(cout, d, torch.float64)
            a = (f - 1) // 2 if s == 1 else 0
            W = torch.zeros(cout, read, f, f, dtype=torch.float64)
            W[:, :, a : a + s, a : a + s] = H.view(cout, read, s, s)
            out.append(torch.cat([torch.zeros(cout, cin - read, f, f, dtype=torch.float64), W], 1).to(dtype))
        return out

    def _check_weights(self, weights) -> list[torch.Tensor]:
        weights = list(weights)
        if len(weights) != self.depth:
            raise ShapeMismatchError(f"{self.name}: expected {self.depth} weight tensors, got {len(weights)}")
        for j, (W, s) in enumerate(zip(weights, self.weight_shapes())):
            if not isinstance(W, torch.Tensor) or tuple(W.shape) != s:
                raise ShapeMismatchError(f"{self.name}: layer {j + 1} weight shape "
                                         f"{tuple(getattr(W, 'shape', ()))} != expected {s}")
        return weights

    # ------------------------------------------------------------------ the operator itself
    def _pad(self, j: int) -> tuple[int, int, int, int]:
        f = self.kernel_size[j]
        a = (f - 1) // 2
        return (a, f - 1 - a, a, f - 1 - a)

    def conv(self, j: int, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Layer ``j``'s convolution (the module docstring's ``A_j``) of a batch ``x`` ``[b, c_in, p, p]``."""
        mode = "circular" if self.padding == "circular" else "constant"
        return F.conv2d(F.pad(x, self._pad(j), mode=mode), W, stride=self.stride[j])

    def explicit_layer_frames(self, weights) -> list[torch.Tensor]:
        """Dense layer frames ``B_j = A_j^T`` ``[in_j, n_j]``, from torch's convolution applied to the standard
        basis (an independent reference for tests; ``(in_j)^2``-sized, small nets only)."""
        out = []
        p = self._sizes
        for j, W in enumerate(self._check_weights(weights)):
            cin, pin = self.in_channels(j), p[j]
            n = cin * pin * pin
            E = torch.eye(n, dtype=W.dtype, device=W.device).view(n, cin, pin, pin)
            out.append(self.conv(j, E, W).reshape(n, -1))
        return out

    def explicit_global_frame(self, weights, *, normalize_atoms: bool = True) -> GlobalFrame:
        """The assembled dense global frame (tests, zero padding, small nets)."""
        return assemble_global_frame(self.explicit_layer_frames(weights), structure=self.structure,
                                     normalize_atoms=normalize_atoms, skip=self.skip)

    # ------------------------------------------------------------------ spectral form
    def _row_grid(self, m: int) -> tuple[int, int]:
        """(channels, grid) of row block ``m`` (0: the input, ``m >= 1``: code ``m``)."""
        if m == 0:
            return self.input_shape[0], self._sizes[0]
        return self.channels[m - 1], self._sizes[m]

    def _pieces(self, weights):
        """Per column ``j``: ``{row m: ("conv", (first, last) input channel of the row in W_j) | ("eye", sign)}``
        and the column's ``m_j``. The conv pieces of a column, in row order, are its layer's input channels in
        order (a dense layer reads the concatenation of the earlier codes), so together they are ``W_j``."""
        lay = self.layout()
        cols = []
        for j in range(self.depth):
            pieces, off = {}, 0
            for m in range(self.depth):
                if not lay.pattern[m, j]:
                    continue
                if lay.identity[m, j]:
                    pieces[m] = ("eye", float(lay.sign[m, j]))
                else:
                    cm = self._row_grid(m)[0]
                    pieces[m] = ("conv", (off, off + cm))
                    off += cm
            cols.append(pieces)
        return cols, [int(lay.identity[:, j].sum()) for j in range(self.depth)]

    def _symbols(self, weights) -> list["_Symbol"]:
        """Each layer's whole symbol ``M_j`` (``_Symbol``: ``c_j x in_channels_j s_j^2`` per frequency), computed
        once; a row piece is a slice of it (no copy)."""
        return [_Symbol.of(W, self._sizes[j], self.stride[j]) for j, W in enumerate(weights)]

    def _diagonal_potential(self, j: int, M: "_Symbol") -> torch.Tensor:
        """``||G_jj||_F^2`` from the layer's full symbol ``M`` (all its row pieces, one grid): ``G_jj =
        (M M^H + m_j I) / (1 + m_j)``, so ``||G_jj||^2 = (||H||^2 + 2 m_j ||M||^2 + m_j^2 c_j) / (1 + m_j)^2``
        per frequency, ``H`` the smaller of ``M M^H`` and ``M^H M`` (same non-zero spectrum)."""
        m_id = int(self.layout().identity[:, j].sum())
        H = M @ M.H if M.shape[-2] <= M.shape[-1] else M.H @ M
        h2, m2 = H.norm2(), M.norm2()
        return (h2 + 2 * m_id * m2 + m_id ** 2 * self.feature_sizes[j]) / (1 + m_id) ** 2

    def _block_symbols(self, weights, *, pattern: bool = False, diagonal: bool = True, symbols=None):
        """Yields ``(j, k, q, G)`` for every structurally non-zero Gram block ``j <= k``: ``G^_jk`` (a
        ``_Symbol``, ``c_j (p_j/q)^2 x c_k`` per frequency) on code ``k``'s grid ``q`` (unnormalised columns and
        ``+I`` identities when ``pattern``).

        The conv x conv terms of all shared rows of a block are one product ``M_j[:, :, R] M_k[:, :, R]^H`` of
        slices of the layers' symbols (``symbols``, default ``_symbols(weights)``) when the shared rows ``R``
        are consecutive channels of both layers (a dense net: a prefix of both; the sum over rows is the sum
        over the contracted channels), else one product per row."""
        cols, m_id = self._pieces(weights)
        syms = self._symbols(weights) if symbols is None else symbols

        def piece(j, rows, q):
            # rows -> code j on grid q: [q (q//2+1), c_j, sum_m c_m (p_m/q)^2], a slice of M_j
            if self._sizes[j + 1] != q:
                raise UnsupportedError(f"{self.name}: block needs layer {j + 1} on a coarser grid {q}")
            ph = self.stride[j] ** 2
            return syms[j].cols(cols[j][rows[0]][1][0] * ph, cols[j][rows[-1]][1][1] * ph)

        def consecutive(j, rows):
            return all(cols[j][a][1][1] == cols[j][b][1][0] for a, b in zip(rows, rows[1:]))

        for j in range(self.depth):
            for k in range(j if diagonal else j + 1, self.depth):
                shared = [m for m in cols[j] if m in cols[k]]
                if not shared:
                    continue
                q = self._sizes[k + 1]
                terms = []
                convs = [m for m in shared if cols[j][m][0] == "conv" and cols[k][m][0] == "conv"]
                groups = [convs] if convs and consecutive(j, convs) and consecutive(k, convs) else \
                    [[m] for m in convs]
                terms += [piece(j, g, q) @ piece(k, g, q).H for g in groups]
                for m in shared:
                    (ka, va), (kb, vb) = cols[j][m], cols[k][m]
                    sa = 1.0 if pattern or ka == "conv" else va
                    sb = 1.0 if pattern or kb == "conv" else vb
                    if ka == "eye" and kb == "eye":
                        size = self.channels[j] * (self._sizes[j + 1] // q) ** 2
                        terms.append((sa * sb) * _Symbol.eye(size, q, syms[0].R))
                    elif ka == "eye" and kb == "conv":
                        terms.append(sa * piece(k, [m], q).H)
                    elif ka == "conv" and kb == "eye":
                        terms.append(sb * piece(j, [m], q))
                G = functools.reduce(lambda a, b: a + b, sorted(terms, key=lambda t: -t.R.dim()))  # eyes broadcast
                if not pattern:
                    G = G / math.sqrt((1 + m_id[j]) * (1 + m_id[k]))
                yield j, k, q, G

    def gram_nonzeros(self) -> int:
        """Structural non-zeros ``N`` of the global Gram matrix (module docstring), without forming it."""
        return self._nonzeros

    @functools.cached_property
    def _nonzeros(self) -> int:
        # float32 first (half the cost on large nets): the kernels are non-negative integers, so the count is
        # exact as long as every entry is within 0.1 of an integer (checked); float64 otherwise
        return self._count_nonzeros(torch.float32) or self._count_nonzeros(torch.float64)

    def _count_nonzeros(self, dtype) -> int | None:
        ones = [torch.ones(s, dtype=dtype) for s in self.weight_shapes()]
        total = 0
        with torch.no_grad():
            for j, k, q, G in self._block_symbols(ones, pattern=True):
                K = torch.fft.irfft2(G.rfft().permute(2, 3, 0, 1), s=(q, q))
                if dtype != torch.float64 and float((K - K.round()).abs().max()) > 0.1:
                    return None
                count = int((K > 0.5).sum()) * q * q
                total += count if j == k else 2 * count
        return total

    def potential(self, weights, *, normalize: str = "nonzero") -> torch.Tensor:
        """The deep frame potential (``nonzero``: ``||G||_F^2 / N``; ``full``: ``/ K^2``; ``none``) by the
        per-frequency form; differentiable in the weights. Circular padding only."""
        V.choice(normalize, "normalize", ("nonzero", "full", "none"), where="conv potential")
        if self.padding != "circular":
            raise UnsupportedError(f"{self.name}: the spectral potential is exact for circular padding only; "
                                   "use explicit_global_frame for zero padding")
        weights = [W / W.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) for W in self._check_weights(weights)]
        syms = self._symbols(weights)
        fp = sum(self._diagonal_potential(j, M) for j, M in enumerate(syms))
        for j, k, q, G in self._block_symbols(weights, diagonal=False, symbols=syms):
            fp = fp + 2 * G.norm2()
        if normalize == "none":
            return fp
        if normalize == "full":
            return fp / sum(self.feature_sizes) ** 2
        return fp / self.gram_nonzeros()


def _unit_tight_frame(k: int, d: int, dtype) -> torch.Tensor:
    """``k`` unit-norm rows in ``R^d`` with ``H H^T = I`` (``k <= d``) or ``H^T H = (k / d) I`` (``k > d``:
    the real harmonic frame: constant column if ``d`` is odd, then cos / sin pairs of frequencies 1, 2, ...)."""
    if k <= d:
        return torch.eye(k, d, dtype=dtype)
    i = torch.arange(k, dtype=dtype).view(-1, 1)
    cols = [torch.full((k, 1), 1.0 / math.sqrt(k), dtype=dtype)] if d % 2 else []
    m = torch.arange(1, d // 2 + 1, dtype=dtype).view(1, -1)
    ang = 2 * math.pi * i * m / k
    cols += [torch.cos(ang) * math.sqrt(2.0 / k), torch.sin(ang) * math.sqrt(2.0 / k)]
    return torch.cat(cols, 1) * math.sqrt(k / d)


def _abs2(z: torch.Tensor) -> torch.Tensor:
    """``|z|^2`` with a gradient that is finite at 0 (``abs`` is not differentiable there)."""
    return z.real.pow(2) + z.imag.pow(2)


def _rfft_weights(q: int, device=None) -> torch.Tensor:
    """Multiplicity of each ``rfft2`` frequency ``[q, q//2 + 1]`` in the full ``q x q`` spectrum."""
    w = torch.full((q // 2 + 1,), 2.0, device=device)
    w[0] = 1.0
    if q % 2 == 0:
        w[-1] = 1.0
    return w.view(1, -1).expand(q, -1)


def conv_symbol(W: torch.Tensor, p: int, stride: int, kernel_size: int | None = None) -> torch.Tensor:
    """Symbol ``A^(xi)`` ``[q, q//2 + 1, c_out, c_in s^2]`` of the circular strided convolution ``W``
    ``[c_out, c_in, f, f]`` on a ``p x p`` input (``q = p / s``), in the polyphase form of the module docstring:
    the filter is placed at ``-a`` on ``Z_p^2``, split into its ``s^2`` phases and transformed (``rfft2``)."""
    return torch.fft.rfft2(_polyphase_kernel(W, p, stride)).permute(2, 3, 0, 1)


def _polyphase_kernel(W: torch.Tensor, p: int, stride: int) -> torch.Tensor:
    """``h [c_out, c_in s^2, q, q]``: the filter placed at ``-a`` on ``Z_p^2`` (the atom of output ``u = 0``),
    split into its ``s^2`` phases (module docstring). Pad and roll only where they move something (they copy,
    also in the backward pass)."""
    c_out, c_in, f, f2 = W.shape
    if f != f2 or f > p or p % stride:
        raise ValidationError(f"conv_symbol: filter {f}x{f2}, input {p}, stride {stride} are not compatible")
    a = (f - 1) // 2
    s, q = stride, p // stride
    h = F.pad(W, (0, p - f, 0, p - f)) if p > f else W
    h = torch.roll(h, shifts=(-a, -a), dims=(-2, -1)) if a else h
    return h.reshape(c_out, c_in, q, s, q, s).permute(0, 1, 3, 5, 2, 4).reshape(c_out, c_in * s * s, q, q)


@functools.lru_cache(maxsize=None)
def _frequencies(q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat ``rfft2`` indices ``a (q//2 + 1) + b`` of the Hermitian-unique frequencies of ``Z_q^2``: the
    self-conjugate ones (``2a = 2b = 0 mod q``: the symbol is real there) and one of each remaining conjugate
    pair (``rfft2`` keeps both members of a pair in its columns ``b = 0`` and ``b = q/2``); and the
    ``(duplicate, source)`` indices of those second members (``S[duplicate] = conj(S[source])``)."""
    h = q // 2 + 1
    real, cplx, dup, src = [], [], [], []
    for a in range(q):
        for b in range(h):
            self_conj = (2 * a) % q == 0 and (2 * b) % q == 0
            paired_column = (2 * b) % q == 0  # b = 0 or b = q/2: (a, b) and (-a, b) are conjugates
            if self_conj:
                real.append(a * h + b)
            elif paired_column and a > q - a:
                dup.append(a * h + b)
                src.append((q - a) * h + b)
            else:
                cplx.append(a * h + b)
    return tuple(torch.tensor(v, dtype=torch.long) for v in (real, cplx, dup, src))


@dataclass(frozen=True)
class _Symbol:
    """A block-circulant operator on ``Z_q^2`` by its symbol at the Hermitian-unique frequencies
    (``_frequencies``): ``R`` ``[n_r, a, b]`` real at the self-conjugate ones, ``C`` ``[n_c, a, b]`` complex
    (``None`` when ``q <= 2``: every frequency is self-conjugate) at one of each conjugate pair. Products,
    adjoints and sums act per frequency; ``||M||_F^2 = sum ||R||^2 + 2 sum ||C||^2`` (Parseval, the pair's
    other member has the same norm). Real arithmetic where the symbol is real: about 40% fewer real
    multiplications than complex products at every ``rfft2`` frequency (q = 4)."""

    R: torch.Tensor
    C: torch.Tensor | None
    q: int

    @classmethod
    def of(cls, W: torch.Tensor, p: int, stride: int) -> "_Symbol":
        """The symbol of the circular strided convolution ``W`` on a ``p x p`` input (``conv_symbol``); ``q = 1``
        (a fully connected frame as 1x1 convolutions) is the polyphase kernel itself, no transform."""
        q = p // stride
        if q == 1:
            return cls(_polyphase_kernel(W, p, stride).reshape(1, W.shape[0], -1), None, 1)
        S = conv_symbol(W, p, stride)
        S = S.reshape(-1, *S.shape[2:])
        real, cplx, _, _ = _frequencies(q)
        return cls(S[real.to(S.device)].real.contiguous(), S[cplx.to(S.device)] if len(cplx) else None, q)

    def cols(self, a: int, b: int) -> "_Symbol":
        """Input channels ``[a, b)`` (a view)."""
        return _Symbol(self.R[..., a:b], None if self.C is None else self.C[..., a:b], self.q)

    @property
    def H(self) -> "_Symbol":
        """The adjoint (transpose of the operator): ``M^H`` per frequency (views; ``conj`` is lazy)."""
        return _Symbol(self.R.transpose(-1, -2), None if self.C is None else self.C.transpose(-1, -2).conj(), self.q)

    @property
    def shape(self) -> torch.Size:
        return self.R.shape

    def __matmul__(self, other: "_Symbol") -> "_Symbol":
        return _Symbol(self.R @ other.R, None if self.C is None else self.C @ other.C, self.q)

    def __mul__(self, c: float) -> "_Symbol":
        return _Symbol(c * self.R, None if self.C is None else c * self.C, self.q)

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "_Symbol":
        return self * (1.0 / c)

    def __add__(self, other: "_Symbol") -> "_Symbol":
        return _Symbol(self.R + other.R, None if self.C is None else self.C + other.C, self.q)

    @classmethod
    def eye(cls, size: int, q: int, like: torch.Tensor) -> "_Symbol":
        I = torch.eye(size, dtype=like.real.dtype, device=like.device)
        return cls(I, None if q <= 2 else I.to(torch.complex64 if I.dtype == torch.float32 else torch.complex128), q)

    def norm2(self) -> torch.Tensor:
        """``||M||_F^2`` summed over the whole spectrum (the unique frequencies with their multiplicities)."""
        n = self.R.pow(2).sum() * (len(_frequencies(self.q)[0]) if self.R.dim() == 2 else 1)
        if self.C is not None:
            n = n + 2 * _abs2(self.C).sum() * (len(_frequencies(self.q)[1]) if self.C.dim() == 2 else 1)
        return n

    def rfft(self) -> torch.Tensor:
        """The ``rfft2``-layout symbol ``[q, q//2 + 1, a, b]`` (complex), duplicates filled by conjugation."""
        real, cplx, dup, src = _frequencies(self.q)
        R = self.R.expand(len(real), *self.R.shape[-2:])
        dt = torch.complex64 if R.dtype == torch.float32 else torch.complex128
        S = torch.zeros(self.q * (self.q // 2 + 1), *R.shape[-2:], dtype=dt, device=R.device)
        S[real] = R.to(dt)
        if self.C is not None:
            S[cplx] = self.C.expand(len(cplx), *self.C.shape[-2:]).to(dt)
            S[dup] = S[src].conj()
        return S.reshape(self.q, self.q // 2 + 1, *R.shape[-2:])


def conv_gram_potential(W: torch.Tensor, p: int, stride: int = 1) -> torch.Tensor:
    """Frame potential ``||A~ A~^T||_F^2`` of one circular conv layer frame (unit filters), per frequency."""
    Wn = W / W.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    S = conv_symbol(Wn, p, stride)
    q = p // stride
    G = S @ S.conj().transpose(-1, -2)
    return (_rfft_weights(q, W.device) * _abs2(G).sum(dim=(-1, -2))).sum()


def conv_mutual_coherence(W: torch.Tensor, p: int, stride: int = 1) -> torch.Tensor:
    """Mutual coherence of the atoms of one circular conv layer frame (``k = c_out`` filters placed at every
    ``s``-th position of a ``p x p`` grid), read off the Gram kernel ``irfft2(A^ A^H)`` without the dense frame."""
    Wn = W / W.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    S = conv_symbol(Wn, p, stride)
    q = p // stride
    K = torch.fft.irfft2((S @ S.conj().transpose(-1, -2)).permute(2, 3, 0, 1), s=(q, q))  # [k, k, q, q]
    k = W.shape[0]
    mask = torch.ones_like(K, dtype=torch.bool)
    mask[torch.arange(k), torch.arange(k), 0, 0] = False
    return K.abs()[mask].max()


def conv_coherence_bound(p: int, d: int, k: int, f: int, s: int = 1) -> float:
    """Derived lower bound on the coherence of a circular conv frame (module docstring):
    ``sqrt((k / (d s^2) - 1) / (k L^2 - 1))``, ``L = min(2 floor((f-1)/s) + 1, p/s)``; 0 if ``k <= d s^2``."""
    p, d, k, f, s = (V.positive_int(v, n, where="conv_coherence_bound") for v, n in
                     ((p, "p"), (d, "d"), (k, "k"), (f, "f"), (s, "s")))
    if p % s:
        raise ValidationError(f"conv_coherence_bound: stride {s} does not divide p={p}")
    L = min(2 * ((f - 1) // s) + 1, p // s)
    ratio = k / (d * s * s)
    if ratio <= 1 or k * L * L <= 1:
        return 0.0
    return math.sqrt((ratio - 1) / (k * L * L - 1))


class ConvFrameNet(nn.Module):
    """The feed-forward (T = 1) ReLU network of a ``ConvFrameArchitecture`` with a linear classifier on the
    global-average-pooled last code (chain, residual) or on all pooled codes (dense):
    ``w_j = ReLU(A_j u_j + b_j)``, ``u_j`` the previous code (chain), plus ``w_{j-skip}`` (residual, added to
    the pre-activation), or ``[w_1; ...; w_{j-1}]`` (dense); layer 1 reads the input."""

    def __init__(self, architecture: ConvFrameArchitecture, num_classes: int):
        super().__init__()
        if not isinstance(architecture, ConvFrameArchitecture):
            raise ValidationError(f"ConvFrameNet: architecture must be a ConvFrameArchitecture, got "
                                  f"{type(architecture).__name__}")
        V.integer(num_classes, "num_classes", where="ConvFrameNet", minimum=2)
        self.architecture = architecture
        self.layers = nn.ModuleList(nn.Conv2d(cin, cout, f, stride=s) for (cout, cin, f, _), s in
                                    zip(architecture.weight_shapes(), architecture.stride))
        a = architecture
        self.head = nn.Linear(sum(a.channels) if a.structure == "dense" else a.channels[-1], num_classes)

    def weights(self) -> list[torch.Tensor]:
        return [m.weight for m in self.layers]

    def codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.architecture
        if x.dim() != 4 or tuple(x.shape[1:]) != a.input_shape:
            raise ShapeMismatchError(f"ConvFrameNet: input must be [batch, *{a.input_shape}], got {tuple(x.shape)}")
        codes: list[torch.Tensor] = []
        for j, m in enumerate(self.layers):
            if j == 0:
                u = x
            elif a.structure == "dense":
                u = torch.cat(codes, dim=1)
            else:
                u = codes[-1]
            z = a.conv(j, u, m.weight) + m.bias.view(1, -1, 1, 1)
            if a.structure == "residual" and j >= a.skip:
                z = z + codes[j - a.skip]
            codes.append(torch.relu(z))
        return codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.codes(x)
        feats = codes if self.architecture.structure == "dense" else codes[-1:]
        return self.head(torch.cat([c.mean(dim=(-2, -1)) for c in feats], dim=1))

    def extra_repr(self) -> str:
        a = self.architecture
        return (f"structure={a.structure!r}, input_shape={a.input_shape}, channels={a.channels}, "
                f"kernel_size={a.kernel_size}, stride={a.stride}, skip={a.skip}, padding={a.padding!r}")
