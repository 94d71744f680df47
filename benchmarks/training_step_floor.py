"""How close can any Anderson DEQ loop get to issue #20's 0.7x on the training benchmark's ResNet case?

Run: ``python benchmarks/training_step_floor.py [--epochs 2] [--reps 40]`` (about 2 minutes, one thread).

Trains the ResNet case (:class:`bench_training.Net`, the DEQ tutorial's cell) with torchdeq for ``--epochs``
epochs, then times training steps (forward and implicit backward of one batch of 64, no optimiser step) in one
process, interleaved, in thread CPU time, from the same weights and batches:

- torchdeq at the benchmark's settings (Anderson m=5 both phases, relative 1e-2, 30 iterations);
- iterlayers with per-sample stopping (the default) and with joint stopping;
- a *bare loop*: the same cell, 30 iterations of :func:`bench_training.anderson_update` with the two norms of
  a relative test in each phase, the adjoint ``w = J^T w + dL/dz`` started from ``dL/dz``, and one VJP for
  the parameters, and nothing else: no stopping test, divergence test, best iterate, input screen, statistics
  or Python bookkeeping. Both libraries run both phases to ``max_iter`` on this cell, so this is what an
  Anderson loop costs when it does no work besides the arithmetic.

Printed: each configuration's median step time and its ratio to torchdeq's (median and quartiles of the
per-step ratios). First, as a sanity check that the bare loop runs the libraries' arithmetic, its forward
iterate after 30 iterations against iterlayers' 30th iterate (``keep``, joint stopping) on one batch. (Its
gradients are not compared: both libraries return each solve's *best* iterate, which on this cell's stalling
solves is not the last one; tracking it is part of what the bare loop leaves out.)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import iterlayers as il

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bt  # noqa: E402
from bench_torchdeq import pin_allocator  # noqa: E402


def bare_step(net: bt.Net, xb: torch.Tensor, yb: torch.Tensor, iters: int = 30) -> list[torch.Tensor]:
    """Forward solve, implicit backward (Anderson on the adjoint); returns the parameter gradients."""
    b = len(xb)
    u = net.inject(xb)
    with torch.no_grad():
        z = bt.bare_solve(lambda zz: net.cell(zz.view_as(u), u).reshape(b, -1), u.new_zeros(b, u[0].numel()), iters)
    zg = z.view_as(u).requires_grad_()
    fz = net.cell(zg, u)  # one differentiable evaluation at the solution
    out = fz.detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(net.head(out), yb)
    head = list(net.head.parameters())
    gz, *ghead = torch.autograd.grad(loss, [out, *head])
    gz = gz.reshape(b, -1)

    def adjoint_map(w):
        return torch.autograd.grad(fz, zg, w.view_as(fz), retain_graph=True)[0].reshape(b, -1) + gz

    w = bt.bare_solve(adjoint_map, gz.clone(), iters)
    rest = [*net.inject.parameters(), *net.cell.parameters()]
    grest = torch.autograd.grad(fz, rest, w.view_as(fz))
    return [*grest, *ghead]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="torchdeq training epochs before timing")
    p.add_argument("--reps", type=int, default=40, help="timed steps per configuration")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pin_allocator()
    xtr, ytr, _, _ = bt.digits()
    trained = bt.Run("torchdeq", bt.Net("resnet", seed=a.seed), "torchdeq", 1e-2, 30, None)
    gen = trained.train(xtr, ytr, a.epochs, a.seed)
    net = trained.net
    runs = {"torchdeq": bt.Run("torchdeq", net, "torchdeq", 1e-2, 30, None),
            "iterlayers": bt.Run("iterlayers", net, "iterlayers", 1e-2, 30, None),
            "iterlayers (joint stopping)": bt.Run("joint", net, "iterlayers", 1e-2, 30, None, stopping="joint")}
    bare_net = copy.deepcopy(net)

    def library_step(r: bt.Run, xb, yb):
        out, _ = r.logits(xb)
        r.net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(out, yb).backward()
        r.backward_steps()

    xb = xtr[:64]
    with torch.no_grad():
        u = net.inject(xb)
        b = len(xb)
        bare = bt.bare_solve(lambda zz: net.cell(zz.view_as(u), u).reshape(b, -1), u.new_zeros(b, u[0].numel()))
        sol = il.solve(net.cell, torch.zeros_like(u), args=(u,), solver="anderson", m=5, atol=0.0, rtol=1e-2,
                       max_iter=30, stopping="joint", keep=(30,), on_failure="ignore")
    diff = float((sol.stats.iterates[30].reshape(b, -1) - bare).abs().max())
    print(f"sanity check: bare forward iterate 30 against iterlayers' (joint stopping): largest difference {diff:.1e}")

    times: dict[str, list[float]] = {k: [] for k in [*runs, "bare loop"]}
    order = torch.randperm(len(ytr), generator=gen)
    for rep in range(a.reps):
        ids = order[(rep % 22) * 64:(rep % 22) * 64 + 64]
        xb, yb = xtr[ids], ytr[ids]
        for name in times:
            c0 = time.thread_time()
            if name == "bare loop":
                bare_step(bare_net, xb, yb)
            else:
                library_step(runs[name], xb, yb)
            times[name].append(time.thread_time() - c0)
    ref = times["torchdeq"][2:]
    for name, t in times.items():
        t = t[2:]
        ratios = [x / y for x, y in zip(t, ref)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{name}: step {1e3 * statistics.median(t):.1f} ms; ratio to torchdeq {statistics.median(ratios):.3f} "
              f"[quartiles {q1:.3f}, {q3:.3f}]")


if __name__ == "__main__":
    main()
