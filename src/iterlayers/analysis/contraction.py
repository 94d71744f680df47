"""A contraction verdict for a cell ``z -> f(z, x)``, with the numbers behind it.

Logic (in this order):

1. **contractive**: a global upper bound ``L`` on the Lipschitz constant of ``z -> f(z, x)`` (from
   ``lipschitz_upper_bound``) satisfies ``L <= 1 - margin``. Then f is a contraction on all of R^n and by
   Banach's theorem the fixed point exists, is unique, and Picard converges from any start at rate ``<= L``.
2. **not contractive**: at some sampled point the Jacobian's spectral radius is ``>= 1 + margin``. If f were
   a contraction in *any* norm ``||.||``, then ``rho(J(z)) <= ||J(z)|| <= q < 1`` everywhere, so one point with
   ``rho > 1`` refutes contraction in every norm (and makes the fixed point there repelling for Picard).
3. **unknown** otherwise. Sampled Jacobians with ``||J||_2 < 1`` are only local evidence (reported in the
   reason); a sampled ``||J||_2 > 1`` rules out contraction in the Euclidean norm only, not in other norms.

The global bound for a cell ``f(z, x)`` is taken from the cell's ``lipschitz_bound()`` method when it has one
(the parametrised cells in ``iterlayers.parametrizations`` do), or from ``lipschitz_upper_bound(cell)`` when
the cell is a plain feed-forward module of z (``nn.Sequential`` etc.). Otherwise it is reported as None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .. import cells
from ._linear import check_method
from .lipschitz import lipschitz_upper_bound
from .spectral import jacobian_norm, spectral_radius
from iterlayers.errors import OptionTypeError, ValidationError

VERDICTS = ("contractive", "not contractive", "unknown")


@dataclass
class ContractionCertificate:
    """Verdict (``"contractive" | "not contractive" | "unknown"``) and the evidence for it."""

    verdict: str
    lipschitz_bound: float | None
    max_spectral_norm: float | None
    max_spectral_radius: float | None
    margin: float
    samples: int
    reason: str
    details: dict = field(default_factory=dict, repr=False)

    @property
    def is_contractive(self) -> bool:
        return self.verdict == "contractive"

    def __str__(self) -> str:
        def fmt(v):
            return "n/a" if v is None else f"{v:.6g}"

        return "\n".join([
            f"contraction verdict : {self.verdict}",
            f"  Lipschitz bound   : {fmt(self.lipschitz_bound)}",
            f"  max ||J||_2       : {fmt(self.max_spectral_norm)}  (over {self.samples} sampled points)",
            f"  max rho(J)        : {fmt(self.max_spectral_radius)}",
            f"  margin            : {self.margin:g}",
            f"  reason            : {self.reason}",
        ])


def _global_bound(cell) -> tuple[float | None, str]:
    bound = cells.lipschitz_bound(cell)
    if bound is not None:
        return bound, "cell.lipschitz_bound()"
    if isinstance(cell, nn.Sequential):
        try:
            return lipschitz_upper_bound(cell), "lipschitz_upper_bound(cell)"
        except TypeError as err:
            return None, str(err)
    return None, "no global bound: the cell neither defines lipschitz_bound() nor is an nn.Sequential of z"


def certify_contraction(cell: Callable, z: Tensor | None = None, x: Tensor | None = None, *, samples: int = 8,
                        margin: float = 1e-3, scale: float = 1.0, method: str = "auto", dense_limit: int = 256,
                        tol: float = 1e-6, max_iter: int = 300, seed: int = 0) -> ContractionCertificate:
    """Decide whether ``z -> cell(z, x)`` is a contraction (see module docstring for the logic).

    Jacobians are measured at ``z`` (if given) and at ``samples`` further random points ``z + scale * N(0, I)``
    (or ``scale * N(0, I)`` around ``cell.init_state(x)`` / zeros like x when z is None). Needs z or x to know
    the state's shape; with neither only the global bound is used. ``method``: ``"dense"``, ``"power"``, or
    ``"auto"`` (dense when the state size ``n <= dense_limit``; exact numbers make the refutation safe).
    """
    check_method(method, ("auto", "dense", "power"))
    if not isinstance(samples, int) or samples < 0:
        raise ValidationError(f"samples must be a non-negative int, got {samples!r}")
    if not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValidationError(f"margin must be a number in [0, 1), got {margin!r}")
    if not isinstance(scale, (int, float)) or scale < 0:
        raise ValidationError(f"scale must be a non-negative number, got {scale!r}")
    bound, bound_source = _global_bound(cell)
    details: dict = {"bound_source": bound_source}

    points: list[Tensor] = []
    if z is not None or x is not None:
        with torch.no_grad():
            base = z if z is not None else cells.initial_state(cell, x, where="certify_contraction")
        # A tuple state is certified as its flat vector (the solvers' view; the same 2-norm).
        cell, base = cells.flattened(cell, base)
        if not isinstance(base, Tensor) or not base.is_floating_point():
            raise OptionTypeError("z (or cell.init_state(x) / x) must be a floating-point Tensor")
        if z is not None:
            points.append(base.detach())
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(samples):
            noise = torch.randn(base.shape, generator=gen, dtype=torch.float64).to(base)
            points.append(base.detach() + scale * noise)

    max_norm = max_rho = None
    if points:
        n = points[0][0].numel()
        use = ("dense" if n <= dense_limit else "power") if method == "auto" else method
        details["method"] = use
        norms, rhos, unconverged = [], [], 0
        for p in points:
            kw = dict(method=use) if use == "dense" else dict(method="power", tol=tol, max_iter=max_iter, seed=seed)
            sn = jacobian_norm(cell, p, x, **kw)
            sr = spectral_radius(cell, p, x, **kw)
            norms.append(sn.value)
            # An unconverged radius estimate is not trusted for the refutation.
            rhos.append(torch.where(sr.converged, sr.value, torch.zeros_like(sr.value)))
            unconverged += int((~sr.converged).sum())
        max_norm = float(torch.cat(norms).max())
        max_rho = float(torch.cat(rhos).max())
        details.update(spectral_norms=torch.cat(norms), spectral_radii=torch.cat(rhos),
                       unconverged_radius_estimates=unconverged)

    if bound is not None and bound <= 1 - margin:
        verdict = "contractive"
        reason = f"global Lipschitz bound {bound:.6g} <= 1 - margin ({bound_source})"
    elif max_rho is not None and max_rho >= 1 + margin:
        verdict = "not contractive"
        reason = (f"spectral radius {max_rho:.6g} >= 1 + margin at a sampled point: no norm makes the cell a "
                  "contraction")
    else:
        verdict = "unknown"
        parts = []
        if bound is not None:
            parts.append(f"global bound {bound:.6g} is not below 1 - margin")
        else:
            parts.append(bound_source)
        if max_norm is not None:
            if max_norm < 1:
                parts.append(f"locally contractive at all {len(points)} sampled points (max ||J||_2 = "
                             f"{max_norm:.6g}), which is evidence, not a proof")
            else:
                parts.append(f"max ||J||_2 = {max_norm:.6g} >= 1 (not a Euclidean contraction) but every sampled "
                             f"rho(J) < 1 + margin")
        else:
            parts.append("no points sampled (give z or x)")
        reason = "; ".join(parts)
    return ContractionCertificate(verdict, bound, max_norm, max_rho, float(margin), len(points), reason, details)
