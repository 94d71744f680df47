r"""Gradient audit: which gradient mode can you trust on *your* equilibrium layer and batch?

For a layer :class:`iterlayers.DEQ` and a loss ``L(theta) = loss(z*(theta; x))`` of its fixed point, every
gradient mode gives some vector ``g_mode``; the true gradient is the derivative of ``L`` through the *exact*
fixed point. :func:`audit_gradients` measures, on a float64 copy of the layer (the user's layer is not
touched):

- the reference: central finite differences of ``L`` along ``n_directions`` random unit directions ``v`` in
  parameter space, ``(L(theta + h v) - L(theta - h v)) / 2h``, each loss evaluated with a tightly converged
  forward solve (the directional derivative ``g . v`` of the exact gradient up to ``O(h^2)`` and the solve
  tolerance), together with the finite-difference noise level estimated from two step sizes ``h`` and ``h/2``;
- for each mode (``implicit``, ``phantom``, ``jfb``, ``unrolled`` with the layer's own options, float64): the
  directional derivatives ``g_mode . v``, their relative error against the reference
  ``||D_mode - D_fd|| / ||D_fd||`` and cosine, the wall time of a warm forward + backward, the forward/backward evaluations and, for
  ``implicit``, the adjoint solve's residual and convergence;
- a verdict per mode: ``trusted`` when the relative error is below ``rtol_trust`` (default 5%) *and* above
  the reference's own noise it would not be distinguishable; the recommendation is the cheapest trusted mode.

The reference is only as good as the forward solve: if the tight solve does not converge, the audit says so
(``reference_converged=False``) and trusts no mode. This is the check a user runs before believing a
training curve (the modes differ exactly where the layer is badly conditioned: ``(I - J)^{-1}`` far from
``I``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import _validate as V
from ..errors import OptionTypeError

__all__ = ["GradientAudit", "ModeAudit", "audit_gradients", "AUDIT_MODES"]

AUDIT_MODES = ("implicit", "phantom", "jfb", "unrolled")


@dataclass
class ModeAudit:
    """The audit of one gradient mode (see :func:`audit_gradients`)."""

    mode: str
    rel_error: float
    cosine: float
    seconds: float
    forward_nfe: int | None
    backward_nfe: int | None
    backward_residual: float | None
    backward_converged: bool | None
    trusted: bool
    error: str | None = None


@dataclass
class GradientAudit:
    """Result of :func:`audit_gradients`: one :class:`ModeAudit` per mode and the recommendation."""

    modes: list[ModeAudit]
    reference_converged: bool
    reference_residual: float
    fd_noise: float
    n_directions: int
    recommended: str | None
    notes: list[str] = field(default_factory=list)

    def by_mode(self) -> dict[str, ModeAudit]:
        return {m.mode: m for m in self.modes}

    def table(self) -> str:
        rows = ["| mode | rel. error vs finite differences | cosine | time (ms) | fwd NFE | bwd NFE | "
                "adjoint residual | trusted |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for m in self.modes:
            if m.error:
                rows.append(f"| {m.mode} | error: {m.error} | | | | | | no |")
                continue
            res = "" if m.backward_residual is None else f"{m.backward_residual:.2e}"
            rows.append(
                f"| {m.mode} | {m.rel_error:.2e} | {m.cosine:.6f} | {1e3 * m.seconds:.1f} | "
                f"{'' if m.forward_nfe is None else m.forward_nfe} | {'' if m.backward_nfe is None else m.backward_nfe} "
                f"| {res} | {'yes' if m.trusted else 'no'} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        head = (f"gradient audit over {self.n_directions} random directions; reference solve "
                f"{'converged' if self.reference_converged else 'DID NOT converge'} (residual "
                f"{self.reference_residual:.1e}), finite-difference noise {self.fd_noise:.1e}; recommended: "
                f"{self.recommended or 'none (no mode is trusted)'}")
        return "\n".join([head, self.table(), *self.notes])


def _default_loss(z):
    z = z[0] if isinstance(z, (tuple, list)) else z
    return 0.5 * z.double().square().sum()


def _params(layer) -> list[torch.nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def audit_gradients(
    layer,
    *inputs,
    loss: Callable | None = None,
    modes: Sequence[str] = AUDIT_MODES,
    n_directions: int = 6,
    step: float = 1e-4,
    reference_atol: float = 1e-11,
    reference_max_iter: int = 2000,
    rtol_trust: float = 0.05,
    seed: int = 0,
    **shared,
) -> GradientAudit:
    """Audit the gradient modes of ``layer`` (an :class:`iterlayers.DEQ`) on the batch ``inputs``.

    Args:
        layer: the equilibrium layer; it is deep-copied and cast to float64, never modified.
        *inputs, **shared: what ``layer(*inputs, **shared)`` takes (the user's batch).
        loss: ``loss(z) -> scalar`` of the layer's output (default ``0.5 ||z||^2``).
        modes: gradient modes to audit.
        n_directions: random unit directions in parameter space for the finite-difference reference.
        step: finite-difference step ``h`` (float64).
        reference_atol, reference_max_iter: the tight forward solve of the reference.
        rtol_trust: a mode is trusted when its relative error is below this (and the reference converged).
        seed: seed of the random directions.

    Returns a :class:`GradientAudit`; ``print(audit)`` shows the table.
    """
    from ..layers import DEQ
    from ..implicit import BACKWARD_MODES

    if not isinstance(layer, DEQ):
        raise OptionTypeError(f"audit_gradients: layer must be an iterlayers.DEQ, got {type(layer).__name__}")
    n_directions = V.positive_int(n_directions, "n_directions", where="audit_gradients")
    step = V.in_range(step, "step", where="audit_gradients", low=0.0, low_open=True)
    rtol_trust = V.in_range(rtol_trust, "rtol_trust", where="audit_gradients", low=0.0, low_open=True)
    for m in modes:
        V.choice(m, "modes", BACKWARD_MODES, where="audit_gradients")
    loss = loss or _default_loss

    def cast(t):
        return t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    xs = tuple(cast(t) for t in inputs)
    kw = {k: cast(v) for k, v in shared.items()}
    base = copy.deepcopy(layer).double()
    base.train(layer.training)
    params = _params(base)
    if not params:
        raise OptionTypeError("audit_gradients: the layer has no parameters that require a gradient")
    theta0 = [p.detach().clone() for p in params]

    # Reference: the loss through a tightly converged fixed point, by central differences.
    ref = copy.deepcopy(base)
    ref.options = ref.options.replace(atol=reference_atol, rtol=0.0, max_iter=reference_max_iter,
                                      on_failure="ignore")
    ref_params = _params(ref)

    def ref_loss(theta) -> tuple[float, object]:
        with torch.no_grad():
            for p, t in zip(ref_params, theta):
                p.copy_(t)
            z = ref(*xs, **kw)
            return float(loss(z)), ref.stats["forward"]

    l0, st0 = ref_loss(theta0)
    gen = torch.Generator().manual_seed(seed)
    dirs = []
    for _ in range(n_directions):
        d = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in theta0]
        norm = math.sqrt(sum(float(x.square().sum()) for x in d))
        dirs.append([x / norm for x in d])

    def central(h):
        out, worst = [], float(st0.abs_residual.max())
        converged = bool(st0.converged.all())
        for d in dirs:
            lp, sp = ref_loss([t + h * x for t, x in zip(theta0, d)])
            lm, sm = ref_loss([t - h * x for t, x in zip(theta0, d)])
            converged &= bool(sp.converged.all()) and bool(sm.converged.all())
            worst = max(worst, float(sp.abs_residual.max()), float(sm.abs_residual.max()))
            out.append((lp - lm) / (2 * h))
        return torch.tensor(out, dtype=torch.float64), converged, worst

    fd, converged, worst = central(step)
    fd_half, conv_half, worst_half = central(step / 2)
    converged &= conv_half
    # Richardson: the O(h^2) error of the step-h estimate is about 4/3 of the difference of the two.
    fd_noise = float((fd - fd_half).norm() / fd_half.norm().clamp_min(1e-300)) * 4 / 3
    fd = fd_half
    notes = []
    if not converged:
        notes.append("the reference forward solve did not converge to reference_atol: no mode can be trusted; "
                     "raise reference_max_iter or check that the layer has a fixed point")
    if fd_noise > rtol_trust / 2:
        notes.append(f"finite-difference noise {fd_noise:.1e} is large against rtol_trust={rtol_trust}: "
                     "change `step`")

    results = []
    for mode in modes:
        m = copy.deepcopy(base)
        m.options = m.options.replace(backward=mode)
        mp = _params(m)
        try:
            # Two passes: the first pays one-off costs (tracing for hoisting, allocator warm-up), the second is
            # the cost a training step sees and the one reported.
            for _ in range(2):
                t0 = time.perf_counter()
                z = m(*xs, **kw)
                grads = torch.autograd.grad(loss(z), mp, allow_unused=True)
                seconds = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 -- a mode that fails is reported, the audit goes on
            results.append(ModeAudit(mode, float("inf"), float("nan"), float("nan"), None, None, None, None, False,
                                     f"{type(err).__name__}: {err}".splitlines()[0]))
            continue
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, mp)]
        dm = torch.tensor([sum(float((g * x).sum()) for g, x in zip(grads, d)) for d in dirs], dtype=torch.float64)
        rel = float((dm - fd).norm() / fd.norm().clamp_min(1e-300))
        cos = float(dm @ fd / (dm.norm() * fd.norm()).clamp_min(1e-300))
        fst, bst = m.stats.get("forward"), m.stats.get("backward")
        results.append(ModeAudit(
            mode=mode, rel_error=rel, cosine=cos, seconds=seconds,
            forward_nfe=None if fst is None else int(fst.nfe),
            backward_nfe=None if bst is None else int(bst.nfe),
            backward_residual=None if bst is None else float(bst.abs_residual.max()),
            backward_converged=None if bst is None else bool(bst.converged.all()),
            trusted=bool(converged and rel <= rtol_trust and (bst is None or bool(bst.converged.all()))),
        ))
    trusted = [r for r in results if r.trusted]
    recommended = min(trusted, key=lambda r: r.seconds).mode if trusted else None
    return GradientAudit(results, converged, max(worst, worst_half), fd_noise, n_directions, recommended, notes)
