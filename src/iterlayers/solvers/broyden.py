"""Limited-memory ("good") Broyden's method for ``g(z) = f(z) - z = 0``.

The inverse Jacobian of ``g`` is approximated as ``H = -I + sum_i u_i v_i^T`` (``-I`` is exact when ``f`` is
constant, so the first step is a Picard step). A quasi-Newton step ``dz = -H g`` is taken, optionally shortened
by a backtracking line search on ``||g||``, and ``H`` receives the rank-one update

    H <- H + (dz - H dg) (dz^T H) / (dz^T H dg),     dz = z_new - z, dg = g_new - g,

which makes ``H dg = dz`` (the secant condition). At most ``memory`` pairs ``(u_i, v_i)`` are kept, so memory
does not grow with ``max_iter``. When the memory is full the method restarts from ``H = -I``: each update is
defined relative to the ones before it, so overwriting the oldest pair (a ring buffer) leaves an
inconsistent ``H`` and was seen to diverge on linear problems where the restarted method converges.
(Broyden 1965; as used for DEQs by Bai et al. 2019.)
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _validate as v
from ._loop import FixedPointSolver, rows

__all__ = ["BroydenSolver"]


def _apply(U, V, x):
    """``H x`` with ``H = -I + U^T V`` stored as rows: ``-x + sum_i u_i (v_i . x)``."""
    if U.shape[1] == 0:
        return -x
    # v_i . x as a row vector times V^T: on CPU ~10x faster than V times a column vector
    c = torch.bmm(x.unsqueeze(1), V.transpose(1, 2))  # [b, 1, k]
    return torch.baddbmm(-x.unsqueeze(1), c, U).squeeze(1)


def _apply_t(U, V, x):
    """``x^T H`` as a row vector: ``-x + sum_i (x . u_i) v_i``."""
    return _apply(V, U, x)


@dataclasses.dataclass
class BroydenSolver(FixedPointSolver):
    """Limited-memory Broyden.

    Args:
        memory: number of rank-one updates kept before a restart.
        line_search: backtrack ``dz -> dz/2`` (up to ``ls_steps`` times) while ``||g||`` does not decrease.
        ls_steps: maximum number of halvings in the line search.
    """

    name = "broyden"
    memory: int = 20
    line_search: bool = False
    ls_steps: int = 3

    def validate(self) -> None:
        self.memory = v.positive_int(self.memory, "memory", where=self.name)
        self.line_search = v.boolean(self.line_search, "line_search", where=self.name)
        self.ls_steps = v.non_negative_int(self.ls_steps, "ls_steps", where=self.name)

    def init(self, z, fz):
        b, n = z.shape
        # "skipped" is a device counter: reading it every step would cost a host synchronisation.
        return {"U": z.new_zeros(b, self.memory, n), "V": z.new_zeros(b, self.memory, n), "k": 0,
                "skipped": torch.zeros((), dtype=torch.long, device=z.device), "restarts": 0}

    def step(self, state, z, fz, idx, fn):
        if state["k"] == self.memory:
            # Only the rows that step restart: a frozen sample keeps its own (consistent) estimate, whose
            # first k pairs are its H after k updates (read by ShineGradient).
            if idx is None:
                state["U"].zero_()
                state["V"].zero_()
            else:
                state["U"].index_fill_(0, idx, 0.0)
                state["V"].index_fill_(0, idx, 0.0)
            state["k"] = 0
            state["restarts"] += 1
        # Only the k updates made since the last restart are non-zero: use just those.
        k = state["k"]
        U, V = rows(state["U"][:, :k], idx), rows(state["V"][:, :k], idx)
        g = fz - z
        dz = -_apply(U, V, g)
        z_new = z + dz
        fz_new = fn(z_new)
        if self.line_search:
            gnorm = g.norm(dim=1)
            t = 1.0
            for _ in range(self.ls_steps):
                worse = ~((fz_new - z_new).norm(dim=1) < gnorm)
                if not bool(worse.any()):
                    break
                t *= 0.5
                z_try = torch.where(worse.unsqueeze(1), z + t * dz, z_new)
                # Only the samples that backtrack need f again, but f is evaluated batched; the others
                # keep their accepted values.
                f_try = fn(z_try)
                z_new = z_try
                fz_new = torch.where(worse.unsqueeze(1), f_try, fz_new)
        dz = z_new - z
        dg = (fz_new - z_new) - g
        Hdg = _apply(U, V, dg)
        vT = _apply_t(U, V, dz)
        denom = (vT * dg).sum(1, keepdim=True)
        tiny = torch.finfo(z.dtype).eps * dz.norm(dim=1, keepdim=True) * dg.norm(dim=1, keepdim=True)
        ok = denom.abs() > tiny
        u = torch.where(ok, (dz - Hdg) / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(dz))
        vT = torch.where(ok, vT, torch.zeros_like(vT))
        state["skipped"] = state["skipped"] + (~ok).sum()
        slot = state["k"]
        if idx is None:
            state["U"][:, slot] = u
            state["V"][:, slot] = vT
        else:
            state["U"][idx, slot] = u
            state["V"][idx, slot] = vT
        state["k"] += 1
        return z_new, fz_new

    def apply_inverse_t(self, state, x):
        """``H^T x`` per row (``H ~ (J - I)^{-1}``, the current inverse-Jacobian estimate of ``f(z) - z``), for
        a final ``state`` of a solve (``stats.state`` with ``keep_state=True``); ``x`` is ``[B, N]``."""
        k = int(state["k"])
        return _apply_t(state["U"][:, :k].to(x.dtype), state["V"][:, :k].to(x.dtype), x)

    def extra_info(self, state):
        return {"broyden_skipped_updates": int(state.get("skipped", 0)), "broyden_restarts": int(state.get("restarts", 0))}
