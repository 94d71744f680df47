"""Does ``torch.compile`` make the Anderson update cheaper on this CPU? A probe, not part of ``make bench``.

Run: ``python benchmarks/compile_probe.py`` (about a minute, one thread; needs a C++ compiler for inductor).

Times 30-iteration Anderson(m=5) solves of ``z = 0.9 tanh(z) + x`` on a ``64 x 1024`` float32 state (the
training benchmark's ResNet state size; the cell is deliberately cheap, so the update dominates) with
:func:`bench_training.anderson_update` run eagerly and compiled by ``torch.compile`` with static shapes
(``dynamic=False``, one graph per ring slot and history length) and with ``dynamic=True``. Prints the compile
time, the median CPU time per solve (15 repetitions, the first 3 dropped) and the largest difference of the
compiled solves' results from the eager one. The update is ~15 small kernels on ``[b, m]`` and ``[b, m, n]``
tensors, so a compiled version could only win by fusing them; the mixing system's batched solve and the two
batched matrix products stay library calls either way.

First it checks that the update being timed is the library's: 12 iterations of it against
:class:`iterlayers.solvers.AndersonSolver` (joint stopping, float64, a contractive ``tanh`` cell), compared at
iterations 3, 6 and 12 (``bench_training.py``'s Anderson floor times the same function).
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import anderson_update, bare_solve  # noqa: E402


def solve(update, x) -> torch.Tensor:
    """30 iterations of ``z = 0.9 tanh(z) + x`` from zeros with the Anderson update ``update``."""
    return bare_solve(lambda z: 0.9 * torch.tanh(z) + x, torch.zeros_like(x), update=update, norms=False)


def same_as_library(iters: int = 12, m: int = 5) -> float:
    """Largest difference between the iterates of :func:`anderson_update` and iterlayers' Anderson solver."""
    import iterlayers as il

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, dtype=torch.float64, generator=gen)
    W = torch.randn(256, 256, dtype=torch.float64, generator=gen)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    ours: dict = {}
    bare_solve(lambda z: f(z, x), torch.zeros_like(x), iters=iters, m=m, norms=False, iterates=ours)
    keep = (3, 6, iters)
    # A tolerance no iterate meets, so the solve takes all its iterations (its warning that float64 cannot
    # resolve it is the point here, so it is silenced).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = il.solve(f, torch.zeros_like(x), args=(x,), solver="anderson", m=m, lam=1e-4, atol=1e-300, rtol=0.0,
                       max_iter=iters, stopping="joint", keep=keep, on_failure="ignore")
    return max(float((sol.stats.iterates[k] - ours[k]).abs().max()) for k in keep)


def timed(fn, reps: int = 15) -> float:
    times = []
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times[3:])


def main() -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # (slot, nh) pairs: one graph each under static shapes
    print(f"anderson_update against iterlayers' Anderson solver: largest difference {same_as_library():.1e}")
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = solve(anderson_update, x)
        print(f"eager: {1e3 * timed(lambda: solve(anderson_update, x)):.1f} ms per 30-iteration solve")
        for dynamic in (False, True):
            compiled = torch.compile(anderson_update, dynamic=dynamic)
            c0 = time.time()
            out = solve(compiled, x)
            first = time.time() - c0
            t = timed(lambda: solve(compiled, x))
            print(f"compiled (dynamic={dynamic}): {1e3 * t:.1f} ms per solve after {first:.0f} s of compiling; "
                  f"largest difference from eager {float((out - ref).abs().max()):.1e}")
        print(f"eager again: {1e3 * timed(lambda: solve(anderson_update, x)):.1f} ms")


if __name__ == "__main__":
    main()
