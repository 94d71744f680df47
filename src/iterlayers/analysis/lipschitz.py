"""A global upper bound on the Lipschitz constant of a feed-forward module (Euclidean norms).

For a composition ``g = g_L o ... o g_1``, ``Lip(g) <= prod_l Lip(g_l)`` (Szegedy et al. 2014; the bound used
to build contractive cells, e.g. spectrally normalised DEQs). Per layer:

* ``nn.Linear``: ``sigma_max(W)`` (bias does not change it).
* ``nn.Conv1d/2d/3d``: ``sqrt(prod_i r_i) * max_g sigma_max(W_g)`` where ``W_g`` is group g's kernel reshaped to
  ``[out_g, in_g * prod(kernel)]`` and ``r_i = ceil(k_i / s_i)`` (``k_i`` for dilated kernels) is
  the most output positions along axis i that read one input entry. The convolution is ``W_g`` applied to the
  patch matrix, and the patch-extraction map duplicates each entry at most ``prod r_i`` times, so its norm
  is at most ``sqrt(prod r_i)`` (zero padding only removes entries; other padding modes are unsupported).
* ``nn.BatchNorm*`` in eval mode: ``max |gamma| / sqrt(running_var + eps)``.
* MaxPool*: ``sqrt(prod_i r_i)`` (1 for non-overlapping windows).
* Activations: ReLU, Tanh, Hardtanh, Softplus, Softsign, ReLU6, Identity, Flatten, Unflatten: 1; LeakyReLU:
  ``max(1, |slope|)``; ELU/CELU: ``max(1, alpha)``; Sigmoid: 1/4; GELU (exact): 1.12890...; SiLU: 1.09984...;
  Dropout: 1 in eval mode, ``1/(1-p)`` in training mode; AvgPool* (no ceil_mode, padding counted):
  ``sqrt(prod r_i / prod k_i) <= 1`` by the same counting argument and Cauchy-Schwarz.
* ``nn.Sequential``: the product over children; any module with a ``lipschitz_bound()`` method (e.g. the
  cells in ``iterlayers.parametrizations``): that method's value.

Anything else (attention, normalisation layers with data-dependent scale, residual blocks, custom modules)
raises ``TypeError`` naming the unsupported layers: a bound we cannot justify is not a bound.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from iterlayers.errors import OptionTypeError

_ONE = (nn.ReLU, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.ReLU6, nn.Identity, nn.Flatten, nn.Unflatten,
        nn.Softsign)
# Lipschitz constants of smooth activations: max_t |act'(t)|, rounded up. GELU: at t = sqrt(2),
# 0.5 (1 + erf(1)) + e^{-1} / sqrt(pi) = 1.12890414...; SiLU: at t ~ 2.3994, 1.09983932... (checked in tests).
_GELU_LIP = 1.1289042
_GELU_TANH_LIP = 1.1289931  # approximate="tanh" variant
_SILU_LIP = 1.0998394


def _conv_bound(m: nn.modules.conv._ConvNd) -> float:
    w = m.weight.detach()
    groups = m.groups
    out_g = w.shape[0] // groups
    norm = 0.0
    for g in range(groups):
        wg = w[g * out_g:(g + 1) * out_g].reshape(out_g, -1)
        norm = max(norm, float(torch.linalg.matrix_norm(wg.double(), ord=2)))
    reps = 1
    for k, s, d in zip(m.kernel_size, m.stride, m.dilation):
        reps *= k if d != 1 else math.ceil(k / s)
    return norm * math.sqrt(reps)


def _maxpool_bound(m) -> float:
    """``sqrt(prod_i r_i)``: each window's max moves by at most the largest change inside it, and each input
    entry lies in at most ``prod r_i`` windows (``r_i = ceil(k_i / s_i)``, ``k_i`` with dilation)."""
    ndim = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
    reps = 1
    for k, s, d in zip(_tuple(m.kernel_size, ndim), _tuple(m.stride, ndim), _tuple(m.dilation, ndim)):
        reps *= k if d != 1 else math.ceil(k / s)
    return math.sqrt(reps)


def _tuple(v, ndim: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * ndim


def _pool_bound(m) -> float | None:
    """``sqrt(prod ceil(k/s) / prod k)``: ``||avg||^2 <= (1/K) sum_j x_j^2 * #windows(j)`` by Cauchy-Schwarz.
    Returns None where border windows use a smaller divisor (then the count argument fails)."""
    ndim = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
    pad = _tuple(m.padding, ndim)
    if m.ceil_mode or (any(p != 0 for p in pad) and not m.count_include_pad) or \
            getattr(m, "divisor_override", None) is not None:
        return None
    reps, size = 1, 1
    for k, s in zip(_tuple(m.kernel_size, ndim), _tuple(m.stride, ndim)):
        reps *= math.ceil(k / s)
        size *= k
    return math.sqrt(reps / size)


def _layer_bound(m: nn.Module, unsupported: list[str], path: str) -> float:
    if hasattr(m, "lipschitz_bound") and callable(m.lipschitz_bound):
        return float(m.lipschitz_bound())
    if isinstance(m, nn.Sequential):
        out = 1.0
        for name, child in m.named_children():
            out *= _layer_bound(child, unsupported, f"{path}.{name}" if path else name)
        return out
    if isinstance(m, nn.Linear):
        return float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.padding_mode == "zeros":
        return _conv_bound(m)
    if type(m) in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        return _maxpool_bound(m)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats:
        scale = 1.0 / torch.sqrt(m.running_var.double() + m.eps)
        if m.affine:
            scale = scale * m.weight.detach().double().abs()
        return float(scale.max())
    if type(m) in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d) and _pool_bound(m) is not None:
        return _pool_bound(m)
    if isinstance(m, _ONE):
        return 1.0
    if isinstance(m, nn.LeakyReLU):
        return max(1.0, abs(m.negative_slope))
    if isinstance(m, (nn.ELU, nn.CELU)):
        return max(1.0, float(m.alpha))
    if isinstance(m, nn.Sigmoid):
        return 0.25
    if isinstance(m, nn.GELU):
        return _GELU_TANH_LIP if m.approximate == "tanh" else _GELU_LIP
    if isinstance(m, nn.SiLU):
        return _SILU_LIP
    if isinstance(m, nn.Dropout):
        return 1.0 / (1.0 - m.p) if m.training and m.p < 1 else 1.0
    unsupported.append(f"{path or '<root>'} ({type(m).__name__})")
    return float("nan")


def lipschitz_upper_bound(module: nn.Module) -> float:
    """Upper bound on ``Lip(module)`` w.r.t. the Euclidean norm: product of the layers' bounds (see module doc).

    Raises ``TypeError`` naming every unsupported layer (with its path inside the module)."""
    if not isinstance(module, nn.Module):
        raise OptionTypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    unsupported: list[str] = []
    with torch.no_grad():
        value = _layer_bound(module, unsupported, "")
    if unsupported:
        raise OptionTypeError("lipschitz_upper_bound does not support these layers: " + ", ".join(unsupported)
                        + ". Supported: Sequential, Linear, Conv1d/2d/3d, eval-mode BatchNorm, pooling, "
                        "elementwise activations, and modules defining lipschitz_bound().")
    return value
