"""How exact is each library's training gradient on the training benchmark's MLP cell, mid-training?

Run: ``python benchmarks/training_gradient_check.py [--seed 2] [--epochs 5]`` (about a minute, one thread).

Trains :class:`bench_training.Net` ("mlp": ``tanh(W z + U u)``, no constraint on ``W``) with iterlayers for
``--epochs`` epochs exactly as ``bench_training.py`` does, then, on one batch of 64, compares the loss gradient
with respect to every parameter from: iterlayers at the benchmark's settings (relative 1e-4, ``max_iter`` 50,
with and without hoisting), torchdeq at the same settings, and torchdeq at 500 iterations / 1e-7. The
reference is iterlayers at relative 1e-7 and 500 iterations in both phases; torchdeq's tight row checks it
independently. Printed: cosine and relative error of each gradient to the reference, relative error of the
equilibrium, and ``||W||_2`` (above 1 the cell is no longer a contraction).

``--modes [--seeds 3]`` instead trains the same case for 10 epochs with torchdeq and with iterlayers' implicit,
phantom and JFB gradients (``backward=``), every configuration from the same weights and batches, and prints
per seed the training-loss curve, the number of epochs whose loss rose, and the test accuracy; then each
configuration's test accuracy minus torchdeq's, paired by seed, with a 95% t-interval (about 2 minutes).

``--audit [--epochs E] [--seed S]`` asks the same question of the ResNet case (the DEQ tutorial's cell): it
trains it as ``bench_training.py`` does, then (1) solves 8 training samples in float64 with Anderson (m=5) to
an absolute residual of 1e-10 with up to 1000 iterations and prints how many have a fixed point it reaches,
after how many iterations, and where the others stall; (2) runs :func:`iterlayers.audit_gradients` on those
samples (the benchmark's DEQ, cross-entropy loss of the head), whose verdict says whether any gradient mode can be
trusted there (about a minute).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

import iterlayers as il

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bt  # noqa: E402
from bench_torchdeq import pin_allocator  # noqa: E402

from torchdeq import get_deq  # noqa: E402  (bench extra)


def modes(seeds: int) -> None:
    """Train with torchdeq and with iterlayers' implicit, phantom and JFB gradients (see the module docstring)."""
    from iterlayers.experiments.claims import seed_interval

    xtr, ytr, xte, yte = bt.digits()
    acc: dict[str, list[float]] = {}
    for seed in range(seeds):
        base = bt.Net("mlp", seed=seed)
        runs = [bt.Run("torchdeq", base, "torchdeq", 1e-4, 50, None)]
        for mode in ("implicit", "phantom", "jfb"):
            # the benchmark's own configuration, the gradient mode swapped (its backward_* options then unused)
            runs.append(bt.Run(f"iterlayers {mode}", base, "iterlayers", 1e-4, 50, None, backward=mode))
        gen = torch.Generator().manual_seed(seed)
        for e in range(10):
            order = torch.randperm(len(ytr), generator=gen)
            for r in runs:
                r.epoch(xtr, ytr, order, 64, e * 23)
        for r in runs:
            losses = [ep["train_loss"] for ep in r.epochs]
            rises = sum(b > a for a, b in zip(losses, losses[1:]))
            acc.setdefault(r.name, []).append(r.accuracy(xte, yte))
            print(f"seed {seed}, {r.name}: test accuracy {acc[r.name][-1]:.4f}, epochs whose loss rose {rises}, "
                  f"loss " + " ".join(f"{v:.3f}" for v in losses), flush=True)
    for name, v in acc.items():
        if name != "torchdeq" and seeds > 1:
            m, (lo, hi) = seed_interval([x - y for x, y in zip(v, acc["torchdeq"])])
            print(f"{name}: test accuracy minus torchdeq's, paired by seed, {m:+.4f} [{lo:+.4f}, {hi:+.4f}]")


def audit(seed: int, epochs: int, n: int = 8) -> None:
    """The ResNet case: does it have fixed points the solver reaches, and which gradient can be trusted there
    (see the module docstring)."""
    xtr, ytr, _, _ = bt.digits()
    run = bt.Run("iterlayers", bt.Net("resnet", seed=seed), "iterlayers", 1e-2, 30, None)
    run.train(xtr, ytr, epochs, seed)
    net = run.net
    print(f"ResNet case, seed {seed}, after {epochs} epochs; train loss per epoch: "
          + " ".join(f"{ep['train_loss']:.3f}" for ep in run.epochs))
    xb, yb = xtr[:n], ytr[:n]
    with torch.no_grad():
        u = net.inject(xb)
        cell = copy.deepcopy(net.cell).double()
        u64 = u.double()
        sol = il.solve(cell, torch.zeros_like(u64), args=(u64,), solver="anderson", m=5, atol=1e-10, rtol=0.0,
                       max_iter=1000, on_failure="ignore")
        st = sol.stats
        fnorm = torch.linalg.vector_norm(cell(sol.z, u64).flatten(1), dim=1)
        rel = st.abs_residual / fnorm
    conv = st.converged
    print(f"fixed points (float64, Anderson m=5, |f(z) - z| <= 1e-10, up to 1000 iterations): {int(conv.sum())} of "
          f"{n} samples reach one" + (f", after {st.nstep[conv].float().mean():.0f} iterations on average"
                                      if bool(conv.any()) else "")
          + ("" if bool(conv.all()) else
             f"; the others stall at relative residuals {', '.join(f'{float(r):.1e}' for r in rel[~conv])}"))
    with torch.no_grad():
        run.deq(u)
    bst = run.deq.stats["forward"]
    print(f"the benchmark's own solve of these samples (float32, relative 1e-2, 30 iterations): "
          f"{int(bst.converged.sum())} of {n} meet its tolerance")
    head = copy.deepcopy(net.head).double()
    report = il.audit_gradients(run.deq, u.detach(), loss=lambda z: torch.nn.functional.cross_entropy(head(z), yb),
                                n_directions=4, reference_max_iter=1000)
    print(report)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--modes", action="store_true", help="train with each gradient mode instead (see above)")
    p.add_argument("--seeds", type=int, default=3, help="with --modes: the number of seeds")
    p.add_argument("--audit", action="store_true", help="the ResNet case: fixed points and gradient audit (see above)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pin_allocator()
    if a.modes:
        modes(a.seeds)
        return
    if a.audit:
        audit(a.seed, a.epochs)
        return
    xtr, ytr, _, _ = bt.digits()
    run = bt.Run("iterlayers", bt.Net("mlp", seed=a.seed), "iterlayers", 1e-4, 50, None)
    run.train(xtr, ytr, a.epochs, a.seed)
    net = run.net
    print("train loss per epoch:", " ".join(f"{ep['train_loss']:.3f}" for ep in run.epochs))
    print(f"||W||_2 = {float(torch.linalg.matrix_norm(net.cell.W.weight.detach(), 2)):.3f}")
    xb, yb = xtr[:64], ytr[:64]

    def grads(fn):
        net.zero_grad(set_to_none=True)
        z = fn(net.inject(xb))
        torch.nn.functional.cross_entropy(net.head(z), yb).backward()
        return torch.cat([q.grad.flatten() for q in net.parameters()]).clone(), z.detach()

    def ours(tol, max_iter, **kw):
        d = il.DEQ(net.cell, solver="anderson", solver_options={"m": 5}, atol=0.0, rtol=tol, max_iter=max_iter,
                   backward_solver="anderson", backward_atol=0.0, backward_rtol=tol, backward_max_iter=max_iter,
                   on_failure="ignore", **kw)
        return lambda u: d(u)

    def theirs(tol, max_iter):
        d = get_deq(ift=True, f_solver="anderson", f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel",
                    b_solver="anderson", b_max_iter=max_iter, b_tol=tol, b_stop_mode="rel")
        return lambda u: d(lambda z: net.cell(z, u), torch.zeros_like(u))[0][-1]

    ref, zref = grads(ours(1e-7, 500))
    for name, fn in [("iterlayers 1e-4, 50", ours(1e-4, 50)),
                     ("iterlayers 1e-4, 50, hoist=False", ours(1e-4, 50, hoist=False)),
                     ("torchdeq 1e-4, 50", theirs(1e-4, 50)), ("torchdeq 1e-7, 500", theirs(1e-7, 500))]:
        g, z = grads(fn)
        cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
        print(f"{name}: gradient cosine {cos:.6f}, relative error {float((g - ref).norm() / ref.norm()):.2e}; "
              f"equilibrium relative error {float((z - zref).norm() / zref.norm()):.2e}")


if __name__ == "__main__":
    main()
