"""The solver protocol: a solver is a value (its options) with an explicit, full-batch state.

A solver never loops by itself; :func:`~iterlayers.solvers._loop.run_loop` owns the loop, the per-sample
stopping, residuals, divergence checks and statistics. A solver supplies

- ``init(z, fz) -> state``: a dict of full-batch tensors (first dimension = batch) and plain counters,
- ``step(state, z, fz, idx, fn) -> (z_new, fz_new)``: one iteration for the *active* samples. ``z`` and
  ``fz`` are the active rows, ``idx`` their row indices in the batch (``None`` when every sample is active),
  ``fn`` evaluates ``f`` on active rows. The step may call ``fn`` several times (line search).

Options are dataclass fields, so unknown options are caught by name (see ``make_solver``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import torch

__all__ = ["FixedPointSolver", "rows", "set_rows"]


def rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of a full-batch tensor (a copy), or the tensor itself when ``idx`` is None."""
    return t if idx is None else t.index_select(0, idx)


def set_rows(t: torch.Tensor, idx: torch.Tensor | None, value: torch.Tensor) -> None:
    """Write ``value`` into rows ``idx`` of ``t`` in place."""
    if idx is None:
        if value is not t:
            t.copy_(value)
    else:
        t.index_copy_(0, idx, value)


@dataclasses.dataclass
class FixedPointSolver:
    """Base class of the solvers of ``z = f(z)``. Subclasses are dataclasses whose fields are options."""

    name: ClassVar[str] = "base"
    #: evaluate f once more at the end to report true residuals (for solvers that model f, e.g. GMRES)
    verify_final: ClassVar[bool] = False

    def init(self, z: torch.Tensor, fz: torch.Tensor) -> dict:
        return {}

    def step(
        self,
        state: dict,
        z: torch.Tensor,
        fz: torch.Tensor,
        idx: torch.Tensor | None,
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement step()")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> None:
        """Check (and normalise) option values through :mod:`iterlayers._validate`; subclasses extend.

        A wrong type raises :class:`~iterlayers.errors.OptionTypeError`, a bad value
        :class:`~iterlayers.errors.ValidationError`; both name the solver and the option.
        """

    def extra_info(self, state: dict) -> dict:
        """Solver-specific counters copied into ``SolverStats.info``."""
        return {}
