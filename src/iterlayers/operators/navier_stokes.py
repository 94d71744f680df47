"""2-D incompressible Navier-Stokes in vorticity form on the periodic unit torus: a small pseudo-spectral solver
and an offline operator-learning data set (the kind of task Zappala et al., arXiv 2310.01618, give their ViT;
the set-up follows the FNO benchmark's: Li et al. 2021, arXiv 2010.08895, forcing and initial field below).

Equations, on [0, 1)^2 with periodic boundaries (velocity u = (u, v), vorticity w = v_x - u_y):

    w_t + u . grad w = nu Lap w + f,        u = (psi_y, -psi_x),      -Lap psi = w.

Discretisation (derived here, standard): Fourier modes k = 2 pi m on an n x n grid; psi^ = w^ / |k|^2 (mean mode
zero); the advection term N = u w_x + v w_y is formed in physical space and its transform truncated to the
2/3 rule (|m_x|, |m_y| < n / 3), the dealiasing that makes the semi-discrete Galerkin system conserve energy
E = 1/2 sum |u^|^2 and enstrophy Z = 1/2 sum |w^|^2 when nu = f = 0. Time: Crank-Nicolson for diffusion and
Heun (predictor-corrector, second order) for advection and forcing:

    w*      = [(1 - h/2 nu |k|^2) w^ + h (f^ - N^(w))]               / (1 + h/2 nu |k|^2)
    w^(t+h) = [(1 - h/2 nu |k|^2) w^ + h (f^ - (N^(w) + N^(w*)) / 2)] / (1 + h/2 nu |k|^2)

Closed form used by the tests (derived): a single-shell field such as Taylor-Green w = cos(2 pi x) cos(2 pi y)
has w proportional to psi, so N = 0 exactly and, unforced, w(t) = w(0) exp(-nu |k|^2 t) with |k|^2 = 8 pi^2.
Energy budget (derived, unforced): dE/dt = -2 nu Z.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from iterlayers import _validate as V
from iterlayers.errors import ShapeMismatchError, ValidationError

__all__ = ["VorticitySolver", "fno_forcing", "gaussian_random_field", "navier_stokes_pairs", "energy", "enstrophy"]


def _wavenumbers(n: int, dtype=torch.float64):
    """(kx, ky, |k|^2, dealias mask) of the rfft2 layout on an n x n grid of [0, 1)^2."""
    m_full = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype)  # integer modes along x (rows: first grid axis)
    m_half = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype)  # along y (last axis, halved by rfft)
    mx, my = torch.meshgrid(m_full, m_half, indexing="ij")
    kx, ky = 2 * math.pi * mx, 2 * math.pi * my
    k2 = kx ** 2 + ky ** 2
    keep = (mx.abs() < n / 3) & (my.abs() < n / 3)  # the 2/3 rule
    return kx, ky, k2, keep


def grid(n: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (x, y), each [n, n], x along the first axis, of the n x n grid of [0, 1)^2."""
    s = torch.arange(n, dtype=dtype) / n
    return torch.meshgrid(s, s, indexing="ij")


def fno_forcing(n: int, dtype=torch.float64) -> torch.Tensor:
    """The FNO benchmark's forcing f(x, y) = 0.1 (sin(2 pi (x + y)) + cos(2 pi (x + y)))."""
    x, y = grid(n, dtype)
    return 0.1 * (torch.sin(2 * math.pi * (x + y)) + torch.cos(2 * math.pi * (x + y)))


def gaussian_random_field(batch: int, n: int, *, alpha: float = 2.5, tau: float = 7.0, sigma: float | None = None,
                          seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Zero-mean samples of N(0, sigma^2 (-Lap + tau^2)^(-alpha)) on the torus (the FNO benchmark's initial
    vorticity: alpha 2.5, tau 7, sigma = tau^(3/2) by default): white noise
    filtered in Fourier space, then truncated to the 2/3 rule so that the solver's conservation laws hold."""
    batch, n = V.positive_int(batch, "batch"), V.positive_int(n, "n")
    sigma = tau ** 1.5 if sigma is None else sigma
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(batch, n, n, generator=g, dtype=dtype)
    _, _, k2, keep = _wavenumbers(n, dtype)
    amp = n * sigma * (k2 + tau ** 2) ** (-alpha / 2)  # white noise has coefficients of std n; the FNO's n^2
    amp[0, 0] = 0.0
    w_hat = torch.fft.rfft2(noise) * amp * keep
    return torch.fft.irfft2(w_hat, s=(n, n))


@dataclass
class VorticitySolver:
    """Pseudo-spectral solver of the vorticity equation (module docstring) on an n x n grid of [0, 1)^2.

    ``nu``: viscosity (>= 0); ``dt``: time step; ``forcing``: None (f = 0) or an [n, n] tensor.
    ``solver.run(w0, t)`` advances a batch ``[B, n, n]`` by ``t`` (a multiple of ``dt`` up to round-off).
    """

    n: int
    nu: float = 1e-3
    dt: float = 1e-2
    forcing: torch.Tensor | None = None

    def __post_init__(self):
        self.n = V.positive_int(self.n, "n", where="VorticitySolver")
        self.nu = V.in_range(self.nu, "nu", where="VorticitySolver", low=0.0)
        self.dt = V.in_range(self.dt, "dt", where="VorticitySolver", low=0.0, low_open=True)
        self.kx, self.ky, self.k2, self.keep = _wavenumbers(self.n)
        self.inv_k2 = torch.where(self.k2 > 0, 1.0 / self.k2.clamp_min(1e-30), torch.zeros_like(self.k2))
        if self.forcing is not None and tuple(self.forcing.shape) != (self.n, self.n):
            raise ShapeMismatchError(f"VorticitySolver: forcing must be [{self.n}, {self.n}], "
                                     f"got {tuple(self.forcing.shape)}")
        self.f_hat = None if self.forcing is None else torch.fft.rfft2(self.forcing.double()) * self.keep

    def advection(self, w_hat: torch.Tensor) -> torch.Tensor:
        """N^ = FFT(u w_x + v w_y), truncated to the 2/3 rule."""
        n = self.n
        psi_hat = w_hat * self.inv_k2
        u = torch.fft.irfft2(1j * self.ky * psi_hat, s=(n, n))  # psi_y
        v = torch.fft.irfft2(-1j * self.kx * psi_hat, s=(n, n))  # -psi_x
        wx = torch.fft.irfft2(1j * self.kx * w_hat, s=(n, n))
        wy = torch.fft.irfft2(1j * self.ky * w_hat, s=(n, n))
        return torch.fft.rfft2(u * wx + v * wy) * self.keep

    def step(self, w_hat: torch.Tensor) -> torch.Tensor:
        """One Crank-Nicolson / Heun step of the Fourier coefficients."""
        h, d = self.dt, 0.5 * self.dt * self.nu * self.k2
        f = 0.0 if self.f_hat is None else self.f_hat
        n0 = self.advection(w_hat)
        pred = ((1 - d) * w_hat + h * (f - n0)) / (1 + d)
        return ((1 - d) * w_hat + h * (f - 0.5 * (n0 + self.advection(pred)))) / (1 + d)

    def run(self, w0: torch.Tensor, t: float, *, snapshots: int = 0) -> torch.Tensor:
        """Advance ``w0`` ([B, n, n] or [n, n]) by time ``t``; float64 inside, returned in ``w0``'s dtype.
        ``snapshots=k`` returns [k + 1, ...] states at k + 1 equally spaced times 0..t instead of the last one."""
        if w0.shape[-2:] != (self.n, self.n):
            raise ShapeMismatchError(f"VorticitySolver: w0 must end in [{self.n}, {self.n}], got {tuple(w0.shape)}")
        t = V.in_range(t, "t", where="VorticitySolver.run", low=0.0)
        steps = round(t / self.dt)
        if abs(steps * self.dt - t) > 1e-9 * max(1.0, t):
            raise ValidationError(f"VorticitySolver.run: t={t} is not a multiple of dt={self.dt}")
        snapshots = V.non_negative_int(snapshots, "snapshots")
        if snapshots and steps % snapshots:
            raise ValidationError(f"VorticitySolver.run: {steps} steps do not split into {snapshots} snapshots")
        w_hat = torch.fft.rfft2(w0.double()) * self.keep
        out = [w_hat]
        for i in range(steps):
            w_hat = self.step(w_hat)
            if snapshots and (i + 1) % (steps // snapshots) == 0:
                out.append(w_hat)
        if not snapshots:
            return torch.fft.irfft2(w_hat, s=(self.n, self.n)).to(w0.dtype)
        return torch.stack([torch.fft.irfft2(s, s=(self.n, self.n)) for s in out]).to(w0.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, nu={self.nu}, dt={self.dt}, forced={self.forcing is not None}"


def energy(w: torch.Tensor) -> torch.Tensor:
    """Kinetic energy E = 1/2 mean(|u|^2) over the grid, per sample (from the vorticity, Parseval)."""
    n = w.shape[-1]
    w_hat = torch.fft.fft2(w.double()) / n ** 2
    m = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    K2 = (2 * math.pi) ** 2 * (m[:, None] ** 2 + m[None, :] ** 2)
    inv = torch.where(K2 > 0, 1.0 / K2.clamp_min(1e-30), torch.zeros_like(K2))
    return 0.5 * (w_hat.abs() ** 2 * inv).sum(dim=(-2, -1))


def enstrophy(w: torch.Tensor) -> torch.Tensor:
    """Enstrophy Z = 1/2 mean(w^2) over the grid, per sample."""
    return 0.5 * w.double().pow(2).mean(dim=(-2, -1))


def navier_stokes_pairs(num: int, *, n: int = 32, t: float = 1.0, nu: float = 1e-3, dt: float = 1e-2,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` pairs (w(0), w(t)) of the forced flow (FNO forcing, FNO initial field), float32 [num, n, n]:
    the operator-learning task w(0) -> w(t). Generated offline in float64 (about a second for 1,000 pairs)."""
    w0 = gaussian_random_field(V.positive_int(num, "num"), n, seed=seed)
    wt = VorticitySolver(n, nu=nu, dt=dt, forcing=fno_forcing(n)).run(w0, t)
    return w0.float(), wt.float()
