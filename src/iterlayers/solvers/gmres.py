"""Restarted GMRES for fixed points of *affine* maps, as met in the backward pass of a DEQ.

For ``f(z) = A z + c`` the fixed point solves ``(I - A) z = c``. From a base point ``z_0`` with residual
``r_0 = f(z_0) - z_0`` (which is also ``c - (I - A) z_0``), GMRES builds an orthonormal basis ``V`` of the
Krylov space ``K_j(I - A, r_0)`` by Arnoldi, using only evaluations of ``f``:

    (I - A) v = v - (f(z_0 + v) - f(z_0)),

and picks ``z_j = z_0 + V_j y`` minimising ``|| r_0 - (I - A) V_j y ||`` through the small Hessenberg
least-squares problem. Because ``f`` is affine, ``f(z_j) = f(z_0) + sum_i y_i (f(z_0 + v_i) - f(z_0))``
is known without another evaluation. After ``restart`` steps the basis is rebuilt from the current point.
The loop evaluates ``f`` once more at the end so the reported residuals are true ones even if ``f`` was
not exactly affine. (Saad & Schultz 1986.)
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _validate as v
from ._loop import FixedPointSolver, rows

__all__ = ["GMRESSolver"]


@dataclasses.dataclass
class GMRESSolver(FixedPointSolver):
    """Restarted GMRES(restart) for affine fixed-point maps.

    Args:
        restart: Krylov dimension before a restart.
    """

    name = "gmres"
    verify_final = True
    restart: int = 20

    def validate(self) -> None:
        self.restart = v.positive_int(self.restart, "restart", where=self.name)

    def init(self, z, fz):
        b, n = z.shape
        r = self.restart
        return {
            "z0": z.clone(),
            "fz0": fz.clone(),
            "V": z.new_zeros(b, r + 1, n),  # Krylov basis
            "AV": z.new_zeros(b, r, n),  # f(z0 + v_i) - f(z0) = A v_i
            "H": torch.zeros(b, r + 1, r, dtype=torch.float64, device=z.device),
            "beta": torch.zeros(b, dtype=torch.float64, device=z.device),
            "j": 0,
        }

    def step(self, state, z, fz, idx, fn):
        j = state["j"]
        if j == self.restart:
            # Restart from the current iterate; the new base point's f is already known.
            j = 0
            self._write(state, "z0", idx, z)
            self._write(state, "fz0", idx, fz)
        z0, fz0 = rows(state["z0"], idx), rows(state["fz0"], idx)
        V, AV, H, beta = (rows(state[k], idx) for k in ("V", "AV", "H", "beta"))
        if j == 0:
            r0 = fz0 - z0
            beta = r0.norm(dim=1).double()
            V = torch.zeros_like(V)
            V[:, 0] = r0 / beta.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1).to(z.dtype)
            H = torch.zeros_like(H)
        v = V[:, j]
        Av = fn(z0 + v) - fz0
        w = v - Av  # (I - A) v_j
        # Modified Gram-Schmidt, twice ("twice is enough") for a basis that stays orthogonal in float32.
        for _ in range(2):
            for i in range(j + 1):
                h = (w * V[:, i]).sum(1)
                H[:, i, j] += h.double()
                w = w - h.unsqueeze(1) * V[:, i]
        hn = w.norm(dim=1)
        H[:, j + 1, j] = hn.double()
        V[:, j + 1] = w / hn.clamp_min(torch.finfo(z.dtype).tiny).unsqueeze(1)
        AV[:, j] = Av
        jj = j + 1
        rhs = torch.zeros(H.shape[0], jj + 1, 1, dtype=torch.float64, device=z.device)
        rhs[:, 0, 0] = beta
        y = torch.linalg.lstsq(H[:, : jj + 1, :jj], rhs).solution.squeeze(-1)
        y = torch.where(torch.isfinite(y), y, torch.zeros_like(y)).to(z.dtype)
        z_new = z0 + torch.einsum("bi,bin->bn", y, V[:, :jj])
        fz_new = fz0 + torch.einsum("bi,bin->bn", y, AV[:, :jj])
        for k, t in (("V", V), ("AV", AV), ("H", H), ("beta", beta)):
            self._write(state, k, idx, t)
        state["j"] = jj
        return z_new, fz_new

    @staticmethod
    def _write(state, key, idx, value):
        if idx is None:
            state[key] = value
        else:
            state[key].index_copy_(0, idx, value)
