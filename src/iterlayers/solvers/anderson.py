"""Anderson acceleration (type II), batched, with ridge regularisation, damping and a safeguard.

With the last ``n <= m`` iterates ``z_i`` and residuals ``g_i = f(z_i) - z_i`` of a sample, the mixing weights
solve the constrained least-squares problem

    alpha = argmin_{sum(alpha) = 1} || sum_i alpha_i g_i ||^2 + lam * s * ||alpha||^2,

whose solution is ``alpha = a / sum(a)`` with ``(G G^T + lam s I) a = 1`` (``G`` stacks the ``g_i`` as rows and
``s`` is the smallest of the ``||g_i||^2``, so ``lam`` is scale free). The ridge is scaled by the smallest
residual, not the mean: residuals of a converging solve span orders of magnitude, and a ridge sized by the
oldest (largest) one would swamp the newest entries and stall the acceleration. The next iterate is

    z_{k+1} = sum_i alpha_i (z_i + beta g_i)        (beta = damping).

The first step (one history entry) is a damped Picard step. When the mixing system is singular or its
weights do not sum to one (not finite, e.g. repeated residuals with ``lam = 0``, or so large that the sum is
lost to cancellation) the affected samples take a damped Picard step instead of crashing;
``SolverStats.info["anderson_fallbacks"]`` counts these. Under per-sample stopping the histories hold the
stepping samples only (compacted once each time samples freeze, not gathered at every step).
(Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.)
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _validate as v
from ._loop import FixedPointSolver

__all__ = ["AndersonSolver"]


@dataclasses.dataclass
class AndersonSolver(FixedPointSolver):
    """Anderson acceleration.

    Args:
        m: history size (number of past iterates mixed).
        lam: relative ridge regularisation of the mixing system.
        damping: ``beta`` in ``(0, 1]``, the weight of ``f`` in the mixed update.
    """

    name = "anderson"
    m: int = 5
    lam: float = 1e-4
    damping: float = 1.0

    def validate(self) -> None:
        self.m = v.positive_int(self.m, "m", where=self.name)
        self.lam = v.in_range(self.lam, "lam", where=self.name, low=0.0)
        self.damping = v.in_range(self.damping, "damping", where=self.name, low=0.0, high=1.0, low_open=True)

    def init(self, z, fz):
        b, n = z.shape
        return {
            # residuals g_i and damped images y_i = z_i + beta g_i of the last m iterates (ring buffers), and
            # the Gram matrix <g_i, g_j> kept up to date one row per step instead of recomputed (the history
            # is the largest thing the solver touches: each pass over it costs as much as a cheap cell)
            # Uninitialised: a sample's slots are written before they are read (its first min(k, m) steps fill
            # slots 0..nh-1, and only those of the stepping rows are read; per-sample freezing is monotone, so a
            # stepping row has taken every earlier step). Zero-filling them cost more than the steps on a
            # large state that converges in a few iterations (10 MB per solve for a 64 x 16x16x16 batch).
            "G": z.new_empty(b, self.m, n),
            "Y": z.new_empty(b, self.m, n),
            "H": z.new_zeros(b, self.m, self.m, dtype=torch.float64),
            "eye": torch.eye(self.m, dtype=torch.float64, device=z.device),
            "ones": z.new_ones(b, self.m, 1, dtype=torch.float64),
            "k": 0,
            # the batch rows the histories hold, in order (None: all of them); see _hold
            "rows": None,
            # a device counter: reading it every step would cost a host synchronisation
            "fallbacks": torch.zeros((), dtype=torch.long, device=z.device),
        }

    @staticmethod
    def _hold(state, idx):
        """Shrink the histories to the rows ``idx`` (sorted batch indices) that step from now on.

        Per-sample stopping only ever removes rows, so the histories are compacted once per change of the
        stepping set rather than gathered (and scattered back) at every step: every later step then runs on
        contiguous histories, as a whole-batch step does. A stepping row the histories no longer hold would
        be read uninitialised, so that is checked, not assumed.
        """
        held = state["rows"]
        if held is not None and idx.numel() == held.numel():
            if not torch.equal(idx, held):
                raise RuntimeError("anderson: the stepping rows changed without shrinking (internal error)")
            state["rows"] = idx
            return
        if held is None:
            pos = idx
        else:
            pos = torch.searchsorted(held, idx)
            if not (int(pos.max()) < held.numel() and torch.equal(held.index_select(0, pos), idx)):
                raise RuntimeError("anderson: a stepping row has no history (internal error)")
        for key in ("G", "Y", "H"):
            state[key] = state[key].index_select(0, pos)
        state["rows"] = idx

    def step(self, state, z, fz, idx, fn):
        if idx is not None and idx is not state["rows"]:
            self._hold(state, idx)
        G, Y, H, k = state["G"], state["Y"], state["H"], state["k"]
        slot = k % self.m
        state["k"] = k = k + 1
        nh = min(k, self.m)
        # g = f(z) - z written straight into its slot (one pass, no temporary); y is never a view of a slot,
        # which a later step overwrites while the loop may still hold the iterate.
        g = None
        if not (fz.requires_grad or z.requires_grad):
            try:
                g = torch.sub(fz, z, out=G[:, slot])
            except (NotImplementedError, RuntimeError):  # out= records no derivative: forward-mode dual tensors
                g = None
        if g is None:  # a differentiated solve (run_loop under autograd or forward AD)
            g = fz - z
            G[:, slot] = g
        if self.damping == 1.0:
            y = fz
        else:
            y = torch.add(z, g, alpha=self.damping)
        Y[:, slot] = y
        Gh = G[:, :nh]
        # The new row and column of the Gram matrix: <g_i, g> for every stored residual (g itself included).
        # As a row vector times G^T: on CPU this bmm is ~10x faster than G times a column vector and ~2x
        # faster than vecdot (which materialises the product).
        row = torch.bmm(g.unsqueeze(1), Gh.transpose(1, 2)).squeeze(1).to(torch.float64)
        H[:, slot, :nh] = row
        H[:, :nh, slot] = row
        if nh == 1:
            return y, fn(y)
        Hh = H[:, :nh, :nh]
        # The small mixing system is solved in float64 whatever the state's dtype: it is nh x nh, so this
        # costs nothing and keeps float32 runs from losing the acceleration to round-off.
        scale = Hh.diagonal(dim1=1, dim2=2).amin(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        # views of constants built once in init (no allocation per step; they are read, never written)
        eye, ones = state["eye"][:nh, :nh], state["ones"][:Hh.shape[0], :nh]
        A = torch.addcmul(Hh, scale.unsqueeze(-1), eye, value=self.lam) if self.lam else Hh
        a, info = torch.linalg.solve_ex(A, ones)
        alpha = a.squeeze(-1)
        alpha = alpha / alpha.sum(-1, keepdim=True)
        # Usable weights sum to one. A singular system, a zero or non-finite sum, any non-finite weight, or
        # weights so large that their sum has lost the 1 to cancellation all fail this one test.
        ok = (info == 0) & ((alpha.sum(-1) - 1.0).abs() < 0.5)
        # On an accelerator (or in the loop's sync-free mode) a host test of ok.all() would stall the queue, so
        # the selects always run there; on the CPU the test is free and saves them when every row is ok.
        if z.device.type == "cpu" and not state.get("sync_free") and bool(ok.all()):
            mixed = torch.bmm(alpha.to(z.dtype).unsqueeze(1), Y[:, :nh]).squeeze(1)
            return mixed, fn(mixed)
        alpha = torch.where(ok.unsqueeze(-1), alpha, torch.zeros_like(alpha)).to(z.dtype)
        # sum_i alpha_i (z_i + beta g_i) = sum_i alpha_i y_i: one pass over the history
        mixed = torch.where(ok.unsqueeze(-1), torch.bmm(alpha.unsqueeze(1), Y[:, :nh]).squeeze(1), y)
        state["fallbacks"] = state["fallbacks"] + (~ok).sum()
        return mixed, fn(mixed)

    def extra_info(self, state):
        return {"anderson_fallbacks": int(state.get("fallbacks", 0))}
