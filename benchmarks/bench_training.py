"""End-to-end training on digits, iterlayers (with and without the fixed-point caches) vs torchdeq, same process,
epochs interleaved: the DEQ tutorial's ResNet conv cell, and the core classifier's MLP cell.

Run: ``make bench`` (or ``python benchmarks/bench_training.py --out results/bench [--quick]``).

Models (cells imported from ``bench_torchdeq.py``): (1) ``conv 1->16 (3x3)`` injection, a DEQ over
:class:`ResNetCell` (16 channels, 32 inner, GroupNorm, on the 8x8 digits images as they are), ``2x2 average
pool -> linear`` head; relative tolerance 1e-2, ``max_iter`` 30. (2) ``linear 64->64`` injection, a DEQ over
:class:`MLPCell` ``tanh(W z + U u)`` with ``||W||_2 = 0.9`` at initialisation, linear head; relative tolerance
1e-4, ``max_iter`` 50 (the cell of the core DEQ classifier, without its spectral parametrisation).
Data: sklearn's bundled ``load_digits`` (1797 images, pixels / 16), one fixed 80/20 split (seed 0).
All runs start from the same weights, see the same batches in the same order (one permutation per
epoch) and use Adam (lr 1e-3), batch 64, float32, on CPU.

Threads: one by default (``--threads``). A cell evaluation here is ~2 ms of work on one core; split over two
OpenMP threads on a machine shared with other jobs it measured 60x slower in CPU time (threads spinning on
each other), so multi-threaded timings there measure contention, not the libraries.

ResNet tolerance: relative ``1e-2``, the value of the tutorial's Anderson solver. At initialisation this
cell (ReLU + GroupNorm on 8x8 maps) reaches a relative residual of 1e-2 on 62 of 64 samples of a batch only
after 30 iterations on average (measured), and stalls near 2e-2 on the others, so tighter tolerances make
every batch run to ``max_iter`` in both libraries.

Solvers, the same tolerances for both libraries: Anderson forward (m=5) to the *relative* residual
``||f(z) - z|| <= tol ||f(z)||`` (torchdeq: ``f_stop_mode="rel"``, stopping when the batch maximum passes;
iterlayers: ``atol=0, rtol=tol``, each sample), implicit (IFT) backward with Anderson to ``tol`` relative
(torchdeq: ``b_stop_mode="rel"`` relative to ``||f(u)||``; iterlayers: relative to each sample's incoming
gradient; at the solution these differ by at most the factor ``||(I - J^T)^{-1}||``).

iterlayers + cache: :class:`iterlayers.cache.FixedPointCache` keyed by dataset index (capacity = the training
set, ``max_age`` = two epochs of steps (under shuffling, the previous visit), every finite row stored,
converged or not), the training loop passing ``DEQ(u, z0=cached)``. iterlayers + cache (converged rows): the
same, storing only the rows whose solve met the tolerance (``mask=stats.converged``), so every warm start is
an equilibrium of earlier weights. iterlayers + cache (forward and adjoint): also the adjoint ``u`` of each
sample (``layer.stats["adjoint"]``) in a second cache, passed back as ``DEQ(u, z0=..., adjoint_start=...)``
when every sample of the batch hits (both caches storing every finite row).

iterlayers (joint stopping): the same DEQ with ``stopping="joint"``: every row iterates until all pass (here: to
``max_iter``), no sub-batches. ``--seeds N`` repeats every case over N seeds (initialisation and batch order)
and reports, per configuration, the epoch CPU ratio to torchdeq and the test-accuracy difference to torchdeq
paired by seed, each with a 95% t-interval; the table shows seed 0.

The cell-work floor (per case): one evaluation of the trained cell on a batch of 64 without a graph, and one
vector-Jacobian product through it, timed after training (median of 30, interleaved); torchdeq's cell calls
per epoch times the first plus its adjoint iterations times the second, divided by torchdeq's epoch time, is
the ratio a library with no overhead at all (no solver arithmetic, no bookkeeping, no Python) would reach at
torchdeq's evaluation counts. Where it is near the target, only fewer or cheaper evaluations could meet it.
The Anderson floor adds, per iteration at torchdeq's counts, the CPU time of the bare Anderson(m=5) update of
the same state (:func:`bare_anderson`: the two history writes, the Gram row, the small solve, the mix, the two
norms of a relative test, and nothing else), timed between real cell evaluations: the ratio a loop doing only
the cell and that arithmetic would reach. Where it is above the target, no eager-PyTorch Anderson loop at
these iteration counts meets it on this machine; only fewer iterations or fused kernels could.

Reported per configuration: epoch time (median of the epochs after the first; wall and process CPU time),
forward evaluations of the cell per epoch (counted by a hook on the cell's first convolution, the same count
for both libraries, so it includes the one differentiable evaluation after the solve), backward adjoint
iterations per epoch (each library's own count), final test accuracy, the cache's hit rate and memory, and
the ratios to torchdeq, and (iterlayers' rows) the mean fraction of samples whose forward / adjoint solve met
its tolerance: below 1 means the comparison is at ``max_iter`` for some samples, in both libraries alike.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import iterlayers as il
from iterlayers.cache import FixedPointCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_torchdeq import MLPCell, ResNetCell, pin_allocator  # noqa: E402  (the solver benchmark's cells)

from torchdeq import get_deq  # noqa: E402  (bench extra; bench_torchdeq.py has already checked it is there)


#: the two cases: (cell, relative tolerance, max_iter); see the module docstring
CASES = {
    "ResNet conv cell (DEQ tutorial)": ("resnet", 1e-2, 30),
    "MLP cell tanh(Wz + Ux), ||W|| = 0.9": ("mlp", 1e-4, 50),
}


class Net(nn.Module):
    """injection -> equilibrium over the cell -> head. ``counted`` is the submodule the cell calls exactly once
    per evaluation (its calls are the forward NFE, for both libraries); ``state`` the per-sample state shape."""

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        if kind == "resnet":
            c = 16
            self.inject = nn.Conv2d(1, c, 3, padding=1)
            self.cell = ResNetCell(c, 32, 8, seed=seed)
            self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(c * 16, 10))
            self.counted, self.state = self.cell.conv1, (c, 8, 8)
        else:
            d = 64
            self.inject = nn.Sequential(nn.Flatten(), nn.Linear(64, d))
            self.cell = MLPCell(d, 0.9, seed=seed)
            self.head = nn.Linear(d, 10)
            self.counted, self.state = self.cell.W, (d,)


class Counter:
    """Counts calls of a module (one per evaluation of the cell, whichever library calls it)."""

    def __init__(self, module: nn.Module):
        self.n = 0
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy())
    return x[tr], y[tr], x[te], y[te]


class Run:
    """One configuration being trained: its model copy, optimiser, counters and per-epoch records. ``options``:
    further :class:`iterlayers.DEQ` options of an iterlayers configuration (``stopping=``, ``backward=``)."""

    def __init__(self, name: str, base: Net, lib: str, tol: float, max_iter: int, cache: FixedPointCache | None,
                 adjoint_cache: FixedPointCache | None = None, converged_only: bool = False, **options):
        self.name, self.lib, self.cache, self.adjoint_cache = name, lib, cache, adjoint_cache
        self.converged_only = converged_only  # the forward cache stores converged rows only (else every finite row)
        self.net = copy.deepcopy(base)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.calls = Counter(self.net.counted)
        self.epochs: list[dict] = []
        if lib == "iterlayers":
            self.deq = il.DEQ(self.net.cell, solver="anderson", solver_options={"m": 5}, atol=0.0, rtol=tol,
                              max_iter=max_iter, backward_solver="anderson", backward_atol=0.0, backward_rtol=tol,
                              backward_max_iter=max_iter, on_failure="ignore", **options)
        else:
            self.deq = get_deq(ift=True, f_solver="anderson", f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel",
                               b_solver="anderson", b_max_iter=max_iter, b_tol=tol, b_stop_mode="rel")
        self.bwd_info: dict = {}

    def logits(self, x, z0=None, a0=None):
        u = self.net.inject(x)
        if self.lib == "iterlayers":
            z = self.deq(u, z0=z0, adjoint_start=a0)
        else:
            zs, _ = self.deq(lambda z: self.net.cell(z, u), torch.zeros_like(u), backward_writer=self.bwd_info.update)
            z = zs[-1]
        return self.net.head(z), z

    def backward_steps(self) -> int:
        if self.lib == "iterlayers":
            st = self.deq.stats.get("backward")
            return 0 if st is None else int(st.nfe)
        steps = self.bwd_info.get("nstep")
        self.bwd_info.clear()
        return 0 if steps is None else int(torch.as_tensor(steps).max())

    def epoch(self, x, y, order, batch: int, step0: int) -> None:
        self.net.train()
        self.deq.train()
        calls0, bwd, loss_sum, hits, looked = self.calls.n, 0, 0.0, 0, 0
        conv = {"forward": [], "backward": []}  # iterlayers' per-batch fraction of samples within tolerance
        w0, c0 = time.perf_counter(), time.process_time()
        for k, s in enumerate(range(0, len(order), batch)):
            ids = order[s:s + batch]
            xb, yb = x[ids], y[ids]
            z0 = hit = a0 = None
            if self.cache is not None:
                z0, hit = self.cache.lookup(ids, like=torch.zeros(len(ids), *self.net.state), step=step0 + k)
            if self.adjoint_cache is not None:
                # A miss starts from the incoming gradient as usual: zeros here would be a worse start, so a
                # batch with any miss is started cold (the cache's rows are all or nothing per batch here).
                a0, ahit = self.adjoint_cache.lookup(ids, like=torch.zeros(len(ids), *self.net.state), step=step0 + k)
                a0 = a0 if bool(ahit.all()) else None
            out, z = self.logits(xb, z0, a0)
            loss = nn.functional.cross_entropy(out, yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            bwd += self.backward_steps()
            loss_sum += float(loss.detach()) * len(ids)
            if self.lib == "iterlayers":
                for phase in conv:
                    if self.deq.stats.get(phase) is not None:  # (no adjoint solve: phantom or JFB gradients)
                        conv[phase].append(float(self.deq.stats[phase].converged.float().mean()))
            if self.cache is not None:
                st = self.deq.stats["forward"]
                # Every finite row, converged or not (an iterate that ran out of iterations is still a far
                # better start than zeros), or only the converged ones (a start that is an equilibrium).
                self.cache.store(ids, z.detach(), step=step0 + k,
                                 mask=st.converged if self.converged_only else torch.isfinite(st.abs_residual))
                self.cache.record(st.nstep, hit, st.converged)
                hits += int(hit.sum())
                looked += len(ids)
            if self.adjoint_cache is not None and self.deq.stats.get("adjoint") is not None:
                bst = self.deq.stats["backward"]
                self.adjoint_cache.store(ids, self.deq.stats["adjoint"], step=step0 + k,
                                         mask=torch.isfinite(bst.abs_residual))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        self.epochs.append({"wall_s": wall, "cpu_s": cpu, "fwd_nfe": self.calls.n - calls0, "bwd_nfe": bwd,
                            "train_loss": loss_sum / len(order), "hit_rate": hits / looked if looked else None,
                            **{f"{ph}_converged": (sum(v) / len(v) if v else None) for ph, v in conv.items()}})

    def train(self, x, y, epochs: int, seed: int, batch: int = 64) -> torch.Generator:
        """``epochs`` epochs alone, each in a fresh permutation drawn from a generator seeded with ``seed``
        (the batch order :func:`train_case` uses); returns the generator, to draw later orders from."""
        gen = torch.Generator().manual_seed(seed)
        steps = -(-len(y) // batch)
        for e in range(epochs):
            self.epoch(x, y, torch.randperm(len(y), generator=gen), batch, e * steps)
        return gen

    @torch.no_grad()
    def accuracy(self, x, y, batch: int = 256) -> float:
        self.net.eval()
        self.deq.eval()
        right = 0
        for s in range(0, len(y), batch):
            out, _ = self.logits(x[s:s + batch])
            right += int((out.argmax(1) == y[s:s + batch]).sum())
        return right / len(y)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--quick", action="store_true", help="fewer epochs (under 3 minutes on 2 cores)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch (see the module docstring)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every case over this many seeds (initialisation and "
                   "batch order) and report intervals of the ratios and of the accuracy difference to torchdeq")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    allocator = pin_allocator()
    epochs = a.epochs or (3 if a.quick else 10)
    batch = 64
    xtr, ytr, xte, yte = digits()
    rows, seeds = [], {}
    for case, (kind, tol, max_iter) in CASES.items():
        per_seed = []
        for seed in range(a.seeds):
            case_rows = train_case(case, kind, tol, max_iter, seed, epochs, batch, xtr, ytr, xte, yte)
            per_seed.append(case_rows)
            if seed == 0:
                rows += case_rows
        if a.seeds > 1:
            seeds[case] = seed_summary(per_seed)
    summary = {"rows": rows, "seeds": seeds, "threads": torch.get_num_threads(),
               "settings": {"epochs": epochs, "batch": batch, "cases": CASES, "n_train": len(ytr),
                            "n_test": len(yte), "allocator": allocator, "quick": a.quick}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "training.json").write_text(json.dumps(summary, indent=2))
    md = ["| case (rel. tol, max_iter) | config | epoch time (s, wall) | epoch CPU (s) | ratio to torchdeq "
          "(wall / CPU) | fwd cell calls / epoch | bwd adjoint iterations / epoch | train loss (first -> last "
          "epoch) | test accuracy | samples within tolerance, fwd / bwd (iterlayers' measure) |",
          "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in rows:
        md.append(f"| {row['case']} ({row['tol']:g}, {row['max_iter']}) | {row['config']} | "
                  f"{row['epoch_wall_s']:.2f} | {row['epoch_cpu_s']:.2f} | "
                  f"{row['wall_ratio']:.2f} / {row['cpu_ratio']:.2f} | {row['fwd_nfe_per_epoch']:.0f} | "
                  f"{row['bwd_nfe_per_epoch']:.0f} | {row['first_loss']:.3f} -> {row['final_loss']:.3f} | "
                  f"{row['test_acc']:.4f} | {_fraction(row['forward_converged'])} / "
                  f"{_fraction(row['backward_converged'])} |")
    md.append("")
    for row in rows:
        if "cell_work" in row:
            w = row["cell_work"]
            md.append(f"Cell-work floor, {row['case']}: one evaluation {1e3 * w['eval_s']:.2f} ms, one VJP "
                      f"{1e3 * w['vjp_s']:.2f} ms (batch {batch}); at torchdeq's counts per epoch "
                      f"{row['floor_ratio']:.2f} of its epoch CPU time: the ratio a loop with no overhead would "
                      f"reach. With the bare Anderson(m={w['m']}) arithmetic of each iteration added "
                      f"({1e3 * w['anderson_step_s']:.2f} ms per iteration): {row['anderson_floor_ratio']:.2f}, the "
                      f"ratio a loop doing nothing but the cell and the Anderson update would reach at torchdeq's "
                      f"counts.")
    for case, by_config in seeds.items():
        for config, v in by_config.items():
            (r, ri), (d, di) = v["cpu_ratio"], v["acc_minus_torchdeq"]
            md.append(f"Over {v['n']} seeds, {case}, {config}: epoch CPU ratio to torchdeq {r:.2f} [{ri[0]:.2f}, "
                      f"{ri[1]:.2f}]; test accuracy minus torchdeq's, paired by seed, {d:+.4f} [{di[0]:+.4f}, "
                      f"{di[1]:+.4f}] (95% t-intervals).")
    for row in rows:
        cs = row["cache_stats"]
        if cs is None:
            continue
        md.append(f"Cache, {row['case']}, {row['config']}: hit rate {cs['hit_rate']:.2f} over all lookups "
                  f"(epoch 1 is all misses), "
                  f"{cs['nbytes'] / 2**20:.2f} MB for {cs['capacity']} samples, mean forward iterations per "
                  f"sample warm {cs['mean_steps_warm']:.1f} vs cold {cs['mean_steps_cold']:.1f}; "
                  f"{cs['warm_unconverged_rate']:.2f} of the warm-started samples ended at max_iter (their "
                  f"results depend on the start).")
    md += ["", f"Digits 8x8, {len(ytr)} train / {len(yte)} test, {epochs} epochs (medians over epochs "
           f"2-{epochs}), batch {batch}, Adam 1e-3; Anderson forward and backward at the case's relative "
           f"tolerance; CPU threads {torch.get_num_threads()}; {allocator}."]
    (a.out / "training.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return summary


def train_case(case, kind, tol, max_iter, seed, epochs, batch, xtr, ytr, xte, yte):
    """Train every configuration of one case from the same weights (``seed``: initialisation and batch order);
    returns the case's rows (first: torchdeq)."""
    steps_per_epoch = -(-len(ytr) // batch)
    base = Net(kind, seed=seed)

    def cache():
        # Under shuffling two visits of a sample are 1 to 2 * steps_per_epoch - 1 steps apart.
        return FixedPointCache(capacity=len(ytr), max_age=2 * steps_per_epoch)

    runs = [Run("torchdeq", base, "torchdeq", tol, max_iter, None),
            Run("iterlayers", base, "iterlayers", tol, max_iter, None),
            Run("iterlayers + cache", base, "iterlayers", tol, max_iter, cache()),
            Run("iterlayers + cache (converged rows)", base, "iterlayers", tol, max_iter, cache(),
                converged_only=True),
            Run("iterlayers + cache (forward and adjoint)", base, "iterlayers", tol, max_iter, cache(), cache()),
            Run("iterlayers (joint stopping)", base, "iterlayers", tol, max_iter, None, stopping="joint")]
    gen = torch.Generator().manual_seed(seed)
    for e in range(epochs):
        order = torch.randperm(len(ytr), generator=gen)
        # Round-robin by epoch, the starting configuration rotating, so none always runs first.
        for r in runs[e % len(runs):] + runs[:e % len(runs)]:
            r.epoch(xtr, ytr, order, batch, e * steps_per_epoch)
    case_rows = []
    for r in runs:
        later = r.epochs[1:] if len(r.epochs) > 1 else r.epochs
        case_rows.append({
            "case": case, "config": r.name, "tol": tol, "max_iter": max_iter,
            "epoch_wall_s": statistics.median(ep["wall_s"] for ep in later),
            "epoch_cpu_s": statistics.median(ep["cpu_s"] for ep in later),
            "fwd_nfe_per_epoch": statistics.median(ep["fwd_nfe"] for ep in later),
            "bwd_nfe_per_epoch": statistics.median(ep["bwd_nfe"] for ep in later),
            "first_loss": r.epochs[0]["train_loss"], "final_loss": r.epochs[-1]["train_loss"],
            "test_acc": r.accuracy(xte, yte), "epochs": r.epochs,
            "cache_stats": None if r.cache is None else r.cache.stats(),
            **{f"{ph}_converged": (None if later[0][f"{ph}_converged"] is None else
                                   statistics.mean(ep[f"{ph}_converged"] for ep in later))
               for ph in ("forward", "backward")},
        })
    ref = case_rows[0]
    floor = cell_work(runs[0].net, xtr[:batch])
    ref["cell_work"] = floor
    floor_s = ref["fwd_nfe_per_epoch"] * floor["eval_s"] + ref["bwd_nfe_per_epoch"] * floor["vjp_s"]
    # Anderson iterations at torchdeq's counts: per batch, its forward cell calls less the first evaluation and
    # the differentiable one after the solve; every adjoint iteration.
    iterations = max(0, ref["fwd_nfe_per_epoch"] - 2 * steps_per_epoch) + ref["bwd_nfe_per_epoch"]
    anderson_floor_s = floor_s + iterations * floor["anderson_step_s"]
    for row in case_rows:
        row["floor_ratio"] = floor_s / ref["epoch_cpu_s"]
        row["anderson_floor_ratio"] = anderson_floor_s / ref["epoch_cpu_s"]
        row["wall_ratio"] = row["epoch_wall_s"] / ref["epoch_wall_s"]
        row["cpu_ratio"] = row["epoch_cpu_s"] / ref["epoch_cpu_s"]
        row["fwd_nfe_ratio"] = row["fwd_nfe_per_epoch"] / ref["fwd_nfe_per_epoch"]
    return case_rows


def seed_summary(per_seed: list[list[dict]]) -> dict:
    """Per configuration over the seeds: the epoch CPU ratio to torchdeq and the test-accuracy difference to
    torchdeq paired by seed, each as mean and 95% t-interval (``claims.seed_interval``)."""
    from iterlayers.experiments.claims import seed_interval

    out = {}
    for i, row in enumerate(per_seed[0][1:], start=1):
        ratio = [rs[i]["cpu_ratio"] for rs in per_seed]
        dacc = [rs[i]["test_acc"] - rs[0]["test_acc"] for rs in per_seed]
        out[row["config"]] = {"cpu_ratio": seed_interval(ratio), "acc_minus_torchdeq": seed_interval(dacc),
                              "n": len(per_seed), "torchdeq_acc": [rs[0]["test_acc"] for rs in per_seed],
                              "acc": [rs[i]["test_acc"] for rs in per_seed]}
    return out


def cell_work(net: Net, x: torch.Tensor, reps: int = 30, m: int = 5) -> dict:
    """Median CPU time of one no-graph evaluation of the cell and of one VJP through it, on the batch ``x``
    at a state near the trained fixed point (a few plain iterations from zero), interleaved; and the CPU time
    per iteration of a bare Anderson(``m``) solve of that state (:func:`bare_anderson`), timed between real
    evaluations of the cell, so the histories are as cold in cache as in a solve."""
    net.eval()
    with torch.no_grad():
        u = net.inject(x)
        z = torch.zeros(len(x), *net.state)
        for _ in range(10):
            z = net.cell(z, u)
    zg = z.clone().requires_grad_()
    fz = net.cell(zg, u)
    v = torch.randn_like(fz)
    ev, vj = [], []
    for _ in range(reps):
        with torch.no_grad():
            c0 = time.process_time()
            net.cell(z, u)
            ev.append(time.process_time() - c0)
        c0 = time.process_time()
        torch.autograd.grad(fz, zg, v, retain_graph=True)
        vj.append(time.process_time() - c0)
    with torch.no_grad():
        steps = [bare_anderson(lambda zz: net.cell(zz.view_as(z), u).reshape(len(x), -1), z.reshape(len(x), -1),
                               m=m, iters=30) for _ in range(max(3, reps // 6))]
    net.train()
    return {"eval_s": statistics.median(ev), "vjp_s": statistics.median(vj),
            "anderson_step_s": statistics.median(steps), "m": m}


def bare_anderson(f, z: torch.Tensor, m: int = 5, iters: int = 30, lam: float = 1e-4) -> float:
    """Mean CPU time per iteration of the arithmetic every Anderson(m) iteration of a relative-tolerance
    solve performs, without anything else (:func:`bare_solve`: :func:`anderson_update`, then the two norms a
    relative stopping test needs). No stopping logic, safeguard, best iterate or statistics; ``f``'s own time
    is excluded. Both libraries perform at least this per iteration (torchdeq's Anderson is the same type-II
    update), so at their iteration counts it bounds from below what any eager-PyTorch Anderson loop can cost
    on this machine."""
    spent = [0.0]
    bare_solve(f, z, iters=iters, m=m, lam=lam, clock=spent)
    return spent[0] / iters


def bare_solve(f, z: torch.Tensor, iters: int = 30, m: int = 5, lam: float = 1e-4, update=None, norms: bool = True,
               clock: list | None = None, iterates: dict | None = None) -> torch.Tensor:
    """``iters`` Anderson(m) iterations of ``z = f(z)`` from ``z`` (``[b, n]``), each :func:`anderson_update`
    (or ``update``, a function with its signature, e.g. a compiled one), then ``f``, then (``norms``) the two
    norms of a relative stopping test, and nothing else; returns the last iterate. ``clock``: a one-element
    list to which the CPU time spent outside ``f`` is added; ``iterates``: a dict receiving iterate ``k``
    under key ``k``."""
    update = anderson_update if update is None else update
    b, n = z.shape
    G, Y = z.new_empty(b, m, n), z.new_empty(b, m, n)
    H = z.new_zeros(b, m, m, dtype=torch.float64)
    eye, ones = torch.eye(m, dtype=torch.float64), z.new_ones(b, m, 1, dtype=torch.float64)
    fz = f(z)
    for k in range(iters):
        c0 = time.process_time()
        z = update(G, Y, H, eye, ones, z, fz, k % m, min(k + 1, m), lam)
        c1 = time.process_time()
        fz = f(z)
        c2 = time.process_time()
        if norms:
            torch.linalg.vector_norm(fz - z, dim=1), torch.linalg.vector_norm(fz, dim=1)
        if clock is not None:
            clock[0] += (c1 - c0) + (time.process_time() - c2)
        if iterates is not None:
            iterates[k + 1] = z
    return z


def anderson_update(G, Y, H, eye, ones, z, fz, slot: int, nh: int, lam: float) -> torch.Tensor:
    """The next Anderson iterate from ``z, f(z)``, nothing else: ``g = f(z) - z`` and ``f(z)`` into ring slot
    ``slot`` of the histories ``G, Y`` (``[b, m, n]``), the new row and column of the Gram matrix ``H``
    (float64), the ridge-regularised mixing system over the ``nh`` stored entries, the mix. The same formulas as
    :class:`iterlayers.solvers.AndersonSolver`'s fast path (``benchmarks/compile_probe.py`` compiles it)."""
    g = torch.sub(fz, z, out=G[:, slot])
    Y[:, slot] = fz
    row = torch.bmm(g.unsqueeze(1), G[:, :nh].transpose(1, 2)).squeeze(1).to(torch.float64)
    H[:, slot, :nh] = row
    H[:, :nh, slot] = row
    if nh == 1:
        return fz
    Hh = H[:, :nh, :nh]
    scale = Hh.diagonal(dim1=1, dim2=2).amin(-1, keepdim=True)
    a, _ = torch.linalg.solve_ex(torch.addcmul(Hh, scale.unsqueeze(-1), eye[:nh, :nh], value=lam), ones[:, :nh])
    alpha = (a.squeeze(-1) / a.sum((1, 2)).unsqueeze(-1)).to(z.dtype)
    return torch.bmm(alpha.unsqueeze(1), Y[:, :nh]).squeeze(1)


def _fraction(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
