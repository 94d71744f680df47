"""Statistics every solve returns, per sample and in total."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ValidationError

__all__ = ["SolverStats", "CONVERGED", "MAX_ITER", "DIVERGED", "is_converged"]

CONVERGED = "converged"
MAX_ITER = "max_iter"
DIVERGED = "diverged"


def is_converged(residual: torch.Tensor, fnorm: torch.Tensor | None, atol: float, rtol: float) -> torch.Tensor:
    """``residual <= atol + rtol * fnorm`` per sample, where a non-finite residual never passes.

    Without the finiteness test an infinite ``f(z)`` would pass any relative tolerance (``inf <= inf``), and a
    blown-up sample would be reported converged. ``fnorm`` may be ``None`` when ``rtol == 0``.
    """
    if rtol == 0 or fnorm is None:
        return residual <= atol  # NaN and inf fail this already
    return (residual <= atol + rtol * fnorm) & (residual < math.inf)  # NaN fails both; a norm is never -inf


@dataclass
class SolverStats:
    """What happened during one batched solve.

    Per-sample tensors have shape ``[B]``:

    - ``nstep``: iterations the sample took part in (per-sample stopping: it stops counting once the sample
      has converged; joint stopping: the same for every sample),
    - ``abs_residual``: ``||f(z) - z||_2`` of the returned iterate (2-norm over all non-batch dimensions),
    - ``rel_residual``: ``abs_residual / ||f(z)||_2``,
    - ``converged``: ``abs_residual <= atol + rtol * ||f(z)||``,
    - ``diverged``: NaN/Inf met or the residual grew past ``divergence_ratio`` times its initial value,
    - ``best``: the returned iterate is an earlier, better one, not the sample's last iterate (joint stopping:
      the best whole iterate is not the last one).

    ``nfe`` counts batched evaluations of ``f``; ``status`` is ``"converged"`` when every sample converged,
    ``"diverged"`` when some sample diverged, ``"max_iter"`` otherwise (an empty batch is ``"converged"``).
    ``trace`` (with ``return_trace=True``) lists the per-sample absolute residual after each iteration, ``trace[0]`` being the
    initial one. ``info`` holds solver-specific counters (e.g. Anderson safeguard fallbacks). ``iterates``
    (with ``keep=`` iterations requested) maps each requested iteration ``k`` to the state after iteration ``k``
    (shaped like ``z0``, no graph; a sample frozen earlier holds its iterate from when it stopped, and an
    iteration the solve did not reach holds the returned iterate). ``state`` (with ``keep_state=True``) is the
    solver's final state (e.g. Broyden's inverse-Jacobian factors, for :class:`iterlayers.ShineGradient`).
    """

    solver: str
    nstep: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    best: torch.Tensor
    nfe: int
    status: str
    atol: float
    rtol: float
    max_iter: int
    trace: list[torch.Tensor] | None = None
    info: dict = field(default_factory=dict)
    iterates: dict | None = None
    state: dict | None = None

    @classmethod
    def of_final_iterate(
        cls,
        solver: str,
        abs_residual: torch.Tensor,
        fnorm: torch.Tensor,
        *,
        nstep: torch.Tensor,
        diverged: torch.Tensor,
        best: torch.Tensor,
        nfe: int,
        atol: float,
        rtol: float,
        max_iter: int,
        trace: list[torch.Tensor] | None = None,
        info: dict | None = None,
        iterates: dict | None = None,
    ) -> "SolverStats":
        """Statistics of a finished solve from its returned iterate's ``||f(z) - z||`` and ``||f(z)||``.

        The convergence test, the relative residual and the status are derived here, so that every loop that
        reports a solve (the generic solver loop, the unrolled one) applies the same rule. A non-finite
        residual is reported as ``inf``; ``diverged`` is what the loop saw during the iterations.
        """
        res = abs_residual.nan_to_num(nan=math.inf, posinf=math.inf)  # (a norm: never -inf)
        converged = is_converged(res, fnorm, atol, rtol)
        if converged.numel() == 0:
            status = CONVERGED
        else:  # one host read for both tests
            all_converged, any_diverged = torch.stack([converged.all(), diverged.any()]).tolist()
            status = CONVERGED if all_converged else (DIVERGED if any_diverged else MAX_ITER)
        return cls(
            solver=solver,
            nstep=nstep,
            abs_residual=res,
            rel_residual=res / fnorm.clamp_min(torch.finfo(fnorm.dtype).tiny),
            converged=converged,
            diverged=diverged & ~converged,
            best=best,
            nfe=int(nfe),
            status=status,
            atol=float(atol),
            rtol=float(rtol),
            max_iter=int(max_iter),
            trace=trace,
            info=dict(info or {}),
            iterates=iterates,
        )

    @property
    def residual(self) -> torch.Tensor:
        """Alias of ``abs_residual``."""
        return self.abs_residual

    @property
    def batch_size(self) -> int:
        return int(self.nstep.shape[0])

    def trace_tensor(self) -> torch.Tensor:
        """The residual trace as a ``[iterations + 1, B]`` tensor (requires ``return_trace=True``)."""
        if self.trace is None:
            raise ValidationError("no residual trace was recorded; pass return_trace=True to the solve")
        return torch.stack(self.trace)

    def summary(self) -> dict:
        """Plain-Python scalars, for logs and metrics files (an empty batch: zero work, all converged)."""
        empty = self.batch_size == 0
        return {
            "solver": self.solver,
            "status": self.status,
            "mean_nstep": 0.0 if empty else float(self.nstep.float().mean()),
            "max_nstep": 0 if empty else int(self.nstep.max()),
            "nfe": int(self.nfe),
            "mean_abs_residual": 0.0 if empty else float(self.abs_residual.mean()),
            "max_abs_residual": 0.0 if empty else float(self.abs_residual.max()),
            "mean_rel_residual": 0.0 if empty else float(self.rel_residual.mean()),
            "converged_fraction": 1.0 if empty else float(self.converged.float().mean()),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str))},
        }

    def __str__(self) -> str:
        s = self.summary()
        return (
            f"{self.solver}: {s['status']}, {s['converged_fraction']:.0%} of {self.batch_size} converged, "
            f"steps mean {s['mean_nstep']:.1f} max {s['max_nstep']}, nfe {s['nfe']}, "
            f"residual mean {s['mean_abs_residual']:.2e} max {s['max_abs_residual']:.2e}"
        )
