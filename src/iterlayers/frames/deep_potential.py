"""The deep frame potential of an architecture and its dataless minimisation.

Murdock & Lucey (CVPR 2020, arXiv 2003.13866; extended in arXiv 2103.05804) define the deep frame potential
as the frame potential of the column-normalised induced global frame ``B~`` (see ``global_frame``), averaged
over the structurally non-zero entries of its Gram matrix ("the average non-zero magnitude of inner products
between atoms of architecture-induced dictionaries"):

    DFP(B) = ||B~^T B~||_F^2 / N(B),      N(B) = #{(i, k) : (B^T B)_{ik} is structurally non-zero}.

Atoms of every layer frame are unit-norm (sparse-coding convention), then each global column is normalised.
The *minimal* DFP of an architecture (minimum over all weights of that shape) depends on the architecture
only; it is found here by gradient descent on the weights, without any data.

Lower bound (``deep_frame_potential_lower_bound``), for every structure from its block pattern: ``||G||_F^2``
is the sum of its Gram blocks. Column block ``j`` holds the unit atoms of ``B_j`` and ``m_j`` fixed identity
blocks (its own ``-I``, shortcut identities), so its atoms have norm ``c_j = sqrt(1 + m_j)`` and its diagonal
block is ``G_jj = (B_j^T B_j + m_j I) / c_j^2``; as ``trace B_j^T B_j = n_j`` and
``FP(B_j) >= max(n_j, n_j^2 / in_j)``,

    ||G_jj||_F^2 >= (max(n_j, n_j^2 / in_j) + 2 m_j n_j + m_j^2 n_j) / c_j^4.

An off-diagonal block ``G_jk = sum_r P_rj^T P_rk / (c_j c_k)`` (over the row blocks ``r`` both columns occupy)
is fixed when every product is identity x identity (a residual ``-I``/shortcut pair: ``||.||^2 = n``), and
equals ``-B_k / (c_j c_k)`` with squared norm ``n_k / (c_j c_k)^2`` when its only product is an identity
against a whole unit-atom layer frame (the chain coupling); otherwise it is bounded below by 0. For a chain
the bound is attained exactly when every layer frame is a unit-norm tight frame (or orthonormal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .architecture import FrameArchitecture
from ..errors import OptionTypeError, UnsupportedError, ValidationError
from .conv import ConvFrameArchitecture, ConvFrameNet
from .global_frame import STRUCTURES, GlobalFrame, assemble_global_frame, conv_matrix
from .potential import frame_potential_lower_bound, gram_matrix

__all__ = [
    "NORMALIZATIONS",
    "global_frame_potential",
    "deep_frame_potential",
    "deep_frame_potential_lower_bound",
    "DFPResult",
    "minimize_deep_frame_potential",
    "METHODS",
]

NORMALIZATIONS = ("nonzero", "none", "full", "offdiagonal", "rms", "mean_abs")


def _check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise ValidationError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


def global_frame_potential(frame: GlobalFrame, *, normalize: str = "nonzero") -> torch.Tensor:
    """The deep frame potential of an assembled global frame under one reading of "average".

    With ``G`` the Gram matrix of the column-normalised frame, ``S`` its structural support (``N = |S|``) and
    ``S_off`` the off-diagonal part of ``S``:

    - ``nonzero`` (default; the papers' definition as we read it): ``||G||_F^2 / N``;
    - ``full``: ``||G||_F^2 / K^2``; ``none``: ``||G||_F^2``;
    - ``offdiagonal``: ``sum_{S_off} G_ik^2 / |S_off|`` (the unit diagonal left out);
    - ``rms``: its square root (a root-mean-square inner product, a magnitude on the scale of coherence);
    - ``mean_abs``: ``sum_{S_off} |G_ik| / |S_off|`` ("the average non-zero magnitude of inner products",
      read literally; not a frame potential, and tight frames need not minimise it).

    ``offdiagonal``, ``rms`` and ``mean_abs`` are the alternatives tried against the papers' read-outs
    (docs/papers/frames.md); all are invariant to the scale of every atom.
    """
    _check_normalize(normalize)
    G = gram_matrix(frame.matrix)
    if normalize in ("nonzero", "full", "none"):
        fp = G.pow(2).sum()
        if normalize == "none":
            return fp
        if normalize == "full":
            return fp / frame.matrix.shape[1] ** 2
        return fp / int(frame.gram_mask().sum())
    off = frame.gram_mask() & ~torch.eye(G.shape[0], dtype=torch.bool, device=G.device)
    if not bool(off.any()):
        return G.new_zeros(())
    if normalize == "mean_abs":
        return G[off].abs().mean()
    ms = G[off].pow(2).mean()
    return ms if normalize == "offdiagonal" else ms.sqrt()


def _frames_from_model(model: nn.Module, input_shape) -> tuple[list[torch.Tensor], str]:
    if hasattr(model, "layer_frames") and hasattr(model, "structure"):
        return list(model.layer_frames()), model.structure
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if not layers:
        raise OptionTypeError(
            f"cannot read a frame from {type(model).__name__}: it has no layer_frames() and no Linear/Conv layers"
        )
    head = layers[:-1] if len(layers) > 1 else layers  # the last layer is the classifier, not a frame
    frames, shape = [], None if input_shape is None else tuple(input_shape)
    for m in head:
        if isinstance(m, nn.Linear):
            frames.append(m.weight.transpose(0, 1))
            shape = (m.out_features,)
        else:
            if shape is None or len(shape) != m.weight.dim() - 1:
                raise ValidationError("input_shape (C, *spatial) is required to read the frames of a convolutional model")
            if m.padding_mode != "zeros":
                raise UnsupportedError(f"only zero-padded convolutions are read as frames here, got {m.padding_mode!r}")
            if m.groups != 1 or any(d != 1 for d in m.dilation):
                raise ValidationError("only groups=1, dilation=1 convolutions are supported")
            if isinstance(m.padding, str):
                raise ValidationError("string conv padding is not supported; use integer padding")
            A = conv_matrix(m.weight, shape, stride=m.stride, padding=m.padding)
            frames.append(A.transpose(0, 1))
            nsp = len(shape) - 1
            sp = [
                (shape[1 + a] + 2 * m.padding[a] - m.kernel_size[a]) // m.stride[a] + 1 for a in range(nsp)
            ]
            shape = (m.out_channels, *sp)
    return frames, "chain"


def deep_frame_potential(
    weights,
    *,
    structure: str | None = None,
    input_shape: Sequence[int] | None = None,
    normalize: str = "nonzero",
    skip: int = 2,
) -> torch.Tensor:
    """Deep frame potential of an architecture's induced global frame (differentiable in the weights).

    ``weights`` is one of: a list of layer frames ``B_j`` ``[in_j, n_j]`` (2-D; ``nn.Linear.weight.T``) with
    ``structure`` (default ``"chain"``); a ``(FrameArchitecture, list_of_raw_weights)`` pair; a model with
    ``layer_frames()`` and ``structure`` (``DeepFrameNet``); a ``(ConvFrameArchitecture, filters)`` pair (the
    per-frequency form of ``conv``, no dense frame; ``nonzero`` / ``full`` / ``none`` only); or a plain module of ``Linear``/``Conv`` layers,
    read as a chain whose last layer is the classifier (conv layers need ``input_shape``). ``skip``: the
    residual shortcut span for a list of frames (an architecture or a model carries its own).
    """
    _check_normalize(normalize)
    nets = [m for m in weights.modules() if isinstance(m, ConvFrameNet)] if isinstance(weights, nn.Module) else []
    if nets:  # its convolutions are circular: the per-frequency form, not the zero-padded conv_matrix
        if len(nets) > 1 or structure not in (None, nets[0].architecture.structure):
            raise ValidationError("deep_frame_potential: expected one ConvFrameNet whose structure matches")
        return nets[0].architecture.potential(nets[0].weights(), normalize=normalize)
    if isinstance(weights, nn.Module):
        frames, model_structure = _frames_from_model(weights, input_shape)
        skip = weights.architecture.skip if hasattr(weights, "architecture") else skip
        if structure is not None and structure != model_structure:
            raise ValidationError(f"structure={structure!r} conflicts with the model's structure {model_structure!r}")
        structure = model_structure
    elif isinstance(weights, tuple) and len(weights) == 2 and isinstance(weights[0], ConvFrameArchitecture):
        return weights[0].potential(weights[1], normalize=normalize)
    elif isinstance(weights, tuple) and len(weights) == 2 and isinstance(weights[0], FrameArchitecture):
        arch, raw = weights
        frames, structure, skip = arch.layer_frames(raw), arch.structure, arch.skip
    else:
        frames = list(weights)
        if not all(isinstance(B, torch.Tensor) and B.dim() == 2 for B in frames):
            raise OptionTypeError("weights must be 2-D layer frames [in_j, n_j], an (architecture, weights) pair, or a model")
        structure = "chain" if structure is None else structure
    if structure not in STRUCTURES:
        raise ValidationError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    frame = assemble_global_frame(frames, structure=structure, normalize_atoms=True, skip=skip)
    return global_frame_potential(frame, normalize=normalize)


def deep_frame_potential_lower_bound(architecture, *, normalize: str = "nonzero") -> float:
    """Weight-independent lower bound on the DFP of ``architecture`` (the exact minimum for fully connected
    chains); only the potential-based normalisations (``nonzero``, ``full``, ``none``) have one.

    It needs only the block layout, the layer frames' input sizes and ``N``, so it holds for a
    ``ConvFrameArchitecture`` (circular padding: unit atoms, ``||A_j||_F^2 = n_j``) too, where it is not
    attained in general: weight sharing keeps a conv layer frame from being tight (``conv``)."""
    _check_normalize(normalize)
    if normalize not in ("nonzero", "full", "none"):
        raise ValidationError(f"no closed-form lower bound for normalize={normalize!r}")
    lay = architecture.layout()
    n, ins = lay.col_sizes, architecture.frame_input_sizes()
    P, I = lay.pattern, lay.identity
    learned = P & ~I
    l = len(n)
    m = [int(I[:, j].sum()) for j in range(l)]
    c2 = [1 + mj for mj in m]

    def sign(r, j):
        return float(lay.sign[r, j])

    total = 0.0
    for j in range(l):
        total += (frame_potential_lower_bound(n[j], ins[j]) + 2 * m[j] * n[j] + m[j] ** 2 * n[j]) / c2[j] ** 2
        for k in range(l):
            if k == j:
                continue
            shared = [r for r in range(l) if P[r, j] and P[r, k]]
            if not shared:
                continue
            if all(I[r, j] and I[r, k] for r in shared):
                total += n[j] * sum(sign(r, j) * sign(r, k) for r in shared) ** 2 / (c2[j] * c2[k])
            elif len(shared) == 1:
                r = shared[0]
                # identity against a whole layer frame (the column's only learned block): ||B||_F^2 = its atoms
                other = k if I[r, j] else j
                if (I[r, j] or I[r, k]) and int(learned[:, other].sum()) == 1:
                    total += n[other] / (c2[j] * c2[k])
    if normalize == "none":
        return total
    if normalize == "full":
        return total / sum(n) ** 2
    return total / architecture.gram_nonzeros()


@dataclass
class DFPResult:
    """Outcome of ``minimize_deep_frame_potential``."""

    architecture: FrameArchitecture
    dfp: float
    initial_dfp: float
    lower_bound: float
    weights: list[torch.Tensor]
    history: list[float] = field(repr=False, default_factory=list)
    steps: int = 0


METHODS = ("adam", "lbfgs")


def minimize_deep_frame_potential(
    architecture,
    *,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    tol: float = 1e-7,
    dtype: torch.dtype = torch.float32,
    normalize: str = "nonzero",
    init: Sequence[torch.Tensor] | None = None,
    method: str = "adam",
    history_size: int = 10,
) -> DFPResult:
    """Minimal deep frame potential of ``architecture`` from a Gaussian start (or from ``init``, e.g.
    ``ConvFrameArchitecture.tight_weights()``), no data.

    ``method="adam"`` (the reference): ``steps`` Adam steps of size ``lr``; stops early when the relative
    decrease over 10 steps falls below ``tol``. ``method="lbfgs"``: ``torch.optim.LBFGS`` (``history_size``
    curvature pairs, strong-Wolfe line search, ``lr`` unused) for at most ``steps`` iterations (each one or
    more evaluations) on the DFP relative to its start, stopping when that changes by less than ``tol``;
    far fewer evaluations for the same minimum (tests compare it with long Adam runs), which is what makes
    a 10^7-parameter dense conv net fit in about a minute. Returns the best weights evaluated; ``history``
    holds every evaluation. The potential is invariant to the scale of every atom, so the raw weights are
    optimised directly.
    """
    if not isinstance(architecture, (FrameArchitecture, ConvFrameArchitecture)):
        raise OptionTypeError(f"architecture must be a FrameArchitecture or ConvFrameArchitecture, got "
                        f"{type(architecture).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValidationError(f"steps must be an int >= 0, got {steps!r}")
    if lr <= 0:
        raise ValidationError(f"lr must be > 0, got {lr}")
    if method not in METHODS:
        raise ValidationError(f"method must be one of {METHODS}, got {method!r}")
    _check_normalize(normalize)
    g = torch.Generator().manual_seed(int(seed))
    start = architecture.init_weights(generator=g, dtype=dtype) if init is None else \
        [w.detach().to(dtype).clone() for w in init]
    params = [w.requires_grad_(True) for w in start]
    history: list[float] = []
    best = [math.inf, [p.detach().clone() for p in params]]

    def evaluate() -> torch.Tensor:
        dfp = deep_frame_potential((architecture, params), normalize=normalize)
        history.append(float(dfp.detach()))
        if history[-1] < best[0]:
            best[:] = [history[-1], [p.detach().clone() for p in params]]
        return dfp

    with torch.enable_grad():
        if method == "lbfgs":
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max(steps, 1), history_size=history_size,
                                    line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=tol)

            def closure():
                opt.zero_grad(set_to_none=True)
                dfp = evaluate()
                rel = dfp / history[0]  # the start's scale: tolerances are relative
                rel.backward()
                return rel

            if steps:
                opt.step(closure)
            else:
                evaluate()
        else:
            opt = torch.optim.Adam(params, lr=lr)
            for t in range(steps + 1):
                opt.zero_grad(set_to_none=True)
                dfp = evaluate()
                if t == steps:
                    break
                if t >= 10 and (history[-11] - history[-1]) <= tol * abs(history[-11]):
                    break
                dfp.backward()
                opt.step()
    return DFPResult(
        architecture=architecture,
        dfp=best[0],
        initial_dfp=history[0],
        lower_bound=deep_frame_potential_lower_bound(architecture, normalize=normalize),
        weights=best[1],
        history=history,
        steps=len(history) - 1,
    )
