"""Core experiment: a deep-equilibrium classifier on scikit-learn's digits, its solvers and its gradients.

Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (arXiv 1909.01377); the
contraction argument is Banach's fixed-point theorem.

What it measures (every claim through :mod:`iterlayers.experiments.claims`: pre-registered threshold, interval
over seeds, a negative control run by the same code):

1. Claim ``deq_matches_mlp``: :class:`iterlayers.models.deq_mlp.DEQMLP` (z* = tanh(W z* + U x + b),
   ||W||_2 = gamma by spectral normalisation, Anderson forward, implicit backward) trained with
   :func:`iterlayers.training.train` is not worse than the explicit one-hidden-layer MLP of the same width:
   test accuracy difference DEQ - MLP >= -0.02 (a non-inferiority margin of 2 points), per seed. The MLP is
   shown to have trained (training accuracy). Control: the same DEQ training on the same inputs with the
   training labels permuted (no label information), which must fall far below the margin.
2. Claims ``anderson_fewer_iterations`` / ``broyden_fewer_iterations``: on every seed's trained cell and a
   batch of test inputs, accelerated solvers need fewer iterations than Picard to a tight tolerance
   (ratio of mean iterations Picard / solver >= 1.25). Control: the same solvers on the same cell with the
   recurrence removed (f(z) = cell(0, x), a map that Picard solves in one step: nothing to accelerate).
3. Sanity checks (they confirm the code, not the paper): the implicit-function-theorem gradient equals
   backpropagation through the converged unrolled iteration (float64); Banach's bound r_k <= L^k r_0 with
   L = ||W||_2 for the Picard residuals, and the a-priori iteration count; every forward solve converged.

No selection happens here: every number is the last epoch of a fixed budget; the test split is only evaluated.
Writes ``metrics.json``, ``table.md`` (rendered from the metrics), ``residuals.png`` and ``training.png``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import iterlayers as il
from iterlayers.analysis import fit_linear_rate
from iterlayers.data import load_digits
from iterlayers.experiments.claims import (Threshold, claims_markdown, fmt, make_claim, mode_of, new_figure,
                                           read_metrics, sanity_check, sanity_markdown, save_figure, seed_interval,
                                           write_metrics)
from iterlayers.models.deq_mlp import DEQMLP
from iterlayers.training import TrainConfig, train

__all__ = ["run", "settings"]


def settings(*, quick: bool, tiny: bool) -> dict:
    """The grid for each scale (tiny: the test suite; quick: ``make run``; full: ``--full``)."""
    if tiny:
        return dict(n_train=256, n_test=128, epochs=2, width=32, batch_size=64, lr=5e-3, solve_batch=32,
                    grad_batch=8, grad_max_iter=300, seeds=2)
    if quick:
        return dict(n_train=None, n_test=None, epochs=8, width=64, batch_size=64, lr=5e-3, solve_batch=256,
                    grad_batch=32, grad_max_iter=400, seeds=3)
    return dict(n_train=None, n_test=None, epochs=30, width=128, batch_size=64, lr=3e-3, solve_batch=450,
                grad_batch=64, grad_max_iter=600, seeds=10)


def _solver_traces(f, z0: torch.Tensor, *, atol: float, max_iter: int) -> dict:
    """Picard, Anderson and Broyden on ``z = f(z)`` from ``z0``: residual traces and iteration counts."""

    out = {}
    for name in ("picard", "anderson", "broyden"):
        t0 = time.perf_counter()
        with torch.no_grad():
            sol = il.solve(f, z0, solver=name, atol=atol, rtol=0.0,
                           max_iter=max_iter, on_failure="ignore", return_trace=True)
        st = sol.stats
        out[name] = {
            "trace": st.trace_tensor().double(),  # [T + 1, B]
            "mean_iters": float(st.nstep.double().mean()),
            "max_iters": int(st.nstep.max()),
            "nfe": int(st.nfe),
            "converged": float(st.converged.double().mean()),
            "seconds": time.perf_counter() - t0,
        }
    return out


def _banach_ratio(trace: torch.Tensor, lipschitz: float, atol: float) -> float:
    """max over samples and k of r_k / (L^k r_0), over iterates above the tolerance (<= 1 if Banach holds)."""
    k = torch.arange(trace.shape[0], dtype=torch.float64).unsqueeze(1)
    bound = trace[:1] * lipschitz ** k
    mask = trace > atol  # a converged, frozen sample repeats its last residual; do not compare those
    ratio = torch.where(mask, trace / bound.clamp_min(1e-300), torch.zeros_like(trace))
    return float(ratio.max())


def _gradient_check(model, x: torch.Tensor, y: torch.Tensor, *, max_iter: int) -> float:
    """Relative difference between implicit and unrolled parameter gradients of the loss, in float64."""

    grads = {}
    for mode in ("implicit", "unrolled"):
        m = DEQMLP(model.in_features, model.num_classes, width=model.cell.width, gamma=model.cell.gamma,
                   backward=mode, atol=1e-11, max_iter=max_iter, backward_atol=1e-11,
                   backward_max_iter=max_iter).double()
        m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        loss = F.cross_entropy(m(x.double()), y)
        g = torch.autograd.grad(loss, [p for p in m.parameters()])
        grads[mode] = torch.cat([t.reshape(-1) for t in g])
    diff = (grads["implicit"] - grads["unrolled"]).norm() / grads["unrolled"].norm()
    return float(diff)


def _plot_residuals(traces: dict, lipschitz: float, atol: float, path: Path) -> None:

    fig, (ax,) = new_figure(1, 6.4, 4.2)
    colors = {"picard": "tab:blue", "anderson": "tab:orange", "broyden": "tab:green"}
    for name, t in traces.items():
        tr = t["trace"].clamp_min(1e-16)
        its = torch.arange(tr.shape[0])
        med = tr.median(dim=1).values
        lo, hi = torch.quantile(tr, 0.1, dim=1), torch.quantile(tr, 0.9, dim=1)
        ax.semilogy(its, med, color=colors[name], label=f"{name} (median, mean iters {t['mean_iters']:.1f})")
        ax.fill_between(its, lo, hi, color=colors[name], alpha=0.2)
    r0 = traces["picard"]["trace"][0].median()
    kmax = traces["picard"]["trace"].shape[0]
    ks = torch.arange(kmax, dtype=torch.float64)
    ax.semilogy(ks, r0 * lipschitz ** ks, "k--", lw=1, label=f"Banach bound $L^k r_0$, L = {lipschitz:.2f}")
    ax.axhline(atol, color="gray", lw=0.8, ls=":", label=f"tolerance {atol:g}")
    ax.set_xlabel("iteration k")
    ax.set_ylabel(r"residual $\|f(z_k) - z_k\|_2$")
    ax.set_title("Trained DEQ cell on digits (seed 0): residual vs iteration (10-90% band)")
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=max(atol / 10, 1e-12))
    save_figure(fig, path)


def _plot_training(history: dict, path: Path) -> None:
    """Test accuracy per epoch, mean over seeds with the min-max band, for DEQ, MLP and the control."""


    fig, (a1, a2) = new_figure(2, 4.6, 3.6)
    styles = {"deq": ("o-", "DEQ"), "mlp": ("s--", "explicit MLP"), "control": ("x:", "DEQ, permuted labels")}
    for key, (style, label) in styles.items():
        runs = history[key]
        ep = [r["epoch"] for r in runs[0]]
        acc = np.array([[r["test_acc"] for r in rows] for rows in runs])
        a1.plot(ep, acc.mean(0), style, label=f"{label} test acc (n={len(runs)})")
        a1.fill_between(ep, acc.min(0), acc.max(0), alpha=0.2)
    a1.set_xlabel("epoch")
    a1.set_ylabel("test accuracy")
    a1.legend(fontsize=7)
    for key, style, label in (("fwd_iters", "o-", "forward (Anderson)"), ("bwd_iters", "s-", "backward (adjoint)")):
        its = np.array([[r[key] for r in rows] for rows in history["deq"]])
        ep = [r["epoch"] for r in history["deq"][0]]
        a2.plot(ep, its.mean(0), style, label=label)
        a2.fill_between(ep, its.min(0), its.max(0), alpha=0.2)
    a2.set_xlabel("epoch")
    a2.set_ylabel("mean iterations per sample")
    a2.legend(fontsize=8)
    fig.suptitle("DEQ classifier on digits (band: min-max over seeds)")
    save_figure(fig, path)


def _table(m: dict) -> str:
    """``table.md``, rendered from the metrics alone."""

    s = m["settings"]
    lines = [
        "# DEQ classifier on digits: solvers, contraction and implicit gradients (Bai et al. 2019)",
        "",
        f"Dataset: scikit-learn digits ({m['n_train']} train / {m['n_test']} test), width {s['width']}, "
        f"{s['epochs']} epochs, {s['seeds']} seeds, Anderson forward (atol {m['train_atol']:g}), implicit backward; "
        f"mode {s['mode']}.",
        "",
        "| seed | DEQ test acc | MLP test acc | MLP train acc | control test acc | fwd iters | fwd residual | "
        "bwd iters | Picard / Anderson / Broyden iters |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in m["per_seed"]:
        lines.append(
            f"| {r['seed']} | {fmt(r['deq_test_acc'], '.4f')} | {fmt(r['mlp_test_acc'], '.4f')} | "
            f"{fmt(r['mlp_train_acc'], '.4f')} | {fmt(r['control_test_acc'], '.4f')} | {fmt(r['fwd_iters'], '.1f')} | "
            f"{fmt(r['fwd_residual'], '.2e')} | {fmt(r['bwd_iters'], '.1f')} | "
            f"{fmt(r['iters']['picard'], '.1f')} / {fmt(r['iters']['anderson'], '.1f')} / "
            f"{fmt(r['iters']['broyden'], '.1f')} |"
        )
    lines += ["", claims_markdown(m), sanity_markdown(m),
              "![residuals](residuals.png)", "", "![training](training.png)", ""]
    return "\n".join(lines)


def _permuted_label_file(path: Path, data, seed: int) -> Path:
    """The digits split with its training labels permuted (the control's data: inputs kept, labels uninformative)."""

    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(data.y_train), generator=g)
    np.savez(path, x=data.x_train.numpy(), y=data.y_train[perm].numpy(), x_test=data.x_test.numpy(),
             y_test=data.y_test.numpy())
    return path


def run(*, out: Path, quick: bool = True, tiny: bool = False, seed: int = 0) -> dict:
    """Train over seeds, solve, check gradients; write ``metrics.json``, ``table.md`` and figures into ``out``."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(quick=quick, tiny=tiny)
    mode = mode_of(quick=quick, tiny=tiny)
    gamma, train_atol, solve_atol = 0.9, 1e-4, 1e-6
    seeds = [seed + i for i in range(s["seeds"])]
    per_seed, history, traces0 = [], {"deq": [], "mlp": [], "control": []}, None
    control_traces = None
    for sd in seeds:
        data = load_digits(seed=sd)
        if s["n_train"] is not None or s["n_test"] is not None:
            data = data.subset(s["n_train"], s["n_test"])
        common = dict(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=sd,
                      n_train=s["n_train"], n_test=s["n_test"])
        deq_opts = dict(width=s["width"], gamma=gamma, atol=train_atol)
        deq = train(TrainConfig(model="deq_mlp", data="digits", out=str(out / f"deq_run_{sd}"),
                                model_options=deq_opts, **common), progress=sd == seeds[0])
        mlp = train(TrainConfig(model="mlp", data="digits", out=str(out / f"mlp_run_{sd}"),
                                model_options=dict(width=s["width"]), **common), progress=False)
        # The digits split is reproduced by load_digits(seed) inside train; the control file holds that same
        # split (already cut to n_train / n_test), so n_train / n_test are not applied twice.
        ctrl_file = _permuted_label_file(out / f"permuted_labels_{sd}.npz", data, sd)
        ctrl = train(TrainConfig(model="deq_mlp", data=str(ctrl_file), out=str(out / f"control_run_{sd}"),
                                 model_options=deq_opts, **{**common, "n_train": None, "n_test": None}),
                     progress=False)
        model = deq.model.cpu().eval()
        x = data.x_test[: s["solve_batch"]]
        with torch.no_grad():
            u = model.inject(x)
        cell = model.cell
        traces = _solver_traces(lambda z: cell(z, u), torch.zeros_like(u), atol=solve_atol, max_iter=300)
        # Control: the recurrence removed (f does not depend on z), same solvers, same tolerance.
        ctraces = _solver_traces(lambda z: cell(torch.zeros_like(z), u), torch.zeros_like(u), atol=solve_atol,
                                 max_iter=300)
        if traces0 is None:
            traces0, control_traces, model0, data0 = traces, ctraces, model, data
        last, last_mlp, last_ctrl = deq.rows[-1], mlp.rows[-1], ctrl.rows[-1]
        history["deq"].append(deq.rows)
        history["mlp"].append(mlp.rows)
        history["control"].append(ctrl.rows)
        per_seed.append({
            "seed": sd, "deq_test_acc": last["test_acc"], "deq_train_acc": last["train_acc"],
            "mlp_test_acc": last_mlp["test_acc"], "mlp_train_acc": last_mlp["train_acc"],
            "control_test_acc": last_ctrl["test_acc"], "control_train_acc": last_ctrl["train_acc"],
            "fwd_iters": last["fwd_iters"], "fwd_residual": last["fwd_residual"],
            "fwd_converged": last["fwd_converged"], "bwd_iters": last["bwd_iters"],
            "bwd_residual": last["bwd_residual"], "test_fwd_iters": last["test_fwd_iters"],
            "iters": {k: v["mean_iters"] for k, v in traces.items()},
            "control_iters": {k: v["mean_iters"] for k, v in ctraces.items()},
            "solves_converged": min(v["converged"] for v in traces.values()),
        })

    lipschitz = model0.cell.lipschitz_bound()
    banach = _banach_ratio(traces0["picard"]["trace"], lipschitz, solve_atol)
    # The Picard rate of the median residual, from its second point while above 10 * atol (the tolerance's
    # neighbourhood is round-off dominated): the one linear-rate fit, without its plateau test.
    rate = fit_linear_rate(traces0["picard"]["trace"].median(dim=1).values, skip=1, floor=10 * solve_atol,
                           floor_factor=None)
    # Banach's a-priori count: r_k <= L^k r_0 <= atol once k >= log(atol / r_0) / log L.
    r0 = traces0["picard"]["trace"][0]
    bound_iters = int(torch.ceil(torch.log(solve_atol / r0) / math.log(lipschitz)).clamp_min(0).max())
    grad_diff = _gradient_check(model0, data0.x_test[: s["grad_batch"]], data0.y_test[: s["grad_batch"]],
                                max_iter=s["grad_max_iter"])

    diff = [r["deq_test_acc"] - r["mlp_test_acc"] for r in per_seed]
    cdiff = [r["control_test_acc"] - r["mlp_test_acc"] for r in per_seed]
    d_mean, d_iv = seed_interval(diff)
    c_mean, c_iv = seed_interval(cdiff)
    mlp_trained = all(r["mlp_train_acc"] >= 0.9 for r in per_seed)
    claims = [make_claim(
        id="deq_matches_mlp",
        statement="a single weight-tied equilibrium layer matches an explicit network of comparable size",
        source="Bai et al. 2019", statistic="test accuracy DEQ - explicit MLP (same width), mean over seeds",
        threshold=Threshold(">=", -0.02, "DEQ - MLP >= -0.02 (non-inferiority, 2 points)"),
        value=d_mean, interval=d_iv, n_seeds=len(seeds), mode=mode, comparison=True,
        baseline_trained=mlp_trained,
        control={"description": "DEQ trained on permuted training labels", "value": c_mean, "interval": c_iv},
        baseline={"mlp_train_acc": [r["mlp_train_acc"] for r in per_seed]},
    )]
    for name in ("anderson", "broyden"):
        ratio = [r["iters"]["picard"] / max(r["iters"][name], 1e-12) for r in per_seed]
        cratio = [r["control_iters"]["picard"] / max(r["control_iters"][name], 1e-12) for r in per_seed]
        v, iv = seed_interval(ratio)
        cv, civ = seed_interval(cratio)
        claims.append(make_claim(
            id=f"{name}_fewer_iterations",
            statement=f"accelerated root finding ({name}) reaches the equilibrium in fewer iterations than naive "
                      "iteration",
            source="Bai et al. 2019", statistic=f"mean Picard iterations / mean {name} iterations to "
                                                f"{solve_atol:g}, trained cell, mean over seeds",
            threshold=Threshold(">=", 1.25, f"Picard / {name} >= 1.25"),
            value=v, interval=iv, n_seeds=len(seeds), mode=mode, comparison=True,
            control={"description": "same cell with the recurrence removed (f(z) = cell(0, x))", "value": cv,
                     "interval": civ},
        ))
    sanity = [
        sanity_check(id="implicit_equals_unrolled",
                     statement="implicit (IFT) gradient = backprop through the converged unrolled iteration "
                               "(float64, relative difference < 1e-6)",
                     value=grad_diff, passed=grad_diff < 1e-6),
        sanity_check(id="banach_bound",
                     statement=f"Picard residuals obey r_k <= L^k r_0 (L = ||W||_2 = {lipschitz:.3f}) and stop "
                               f"within the a-priori count {bound_iters}",
                     value=banach, passed=banach <= 1.0 + 1e-6 and traces0["picard"]["max_iters"] <= bound_iters),
        sanity_check(id="solves_converged", statement="every forward solve of every seed reached its tolerance",
                     value=min(r["solves_converged"] for r in per_seed),
                     passed=all(r["solves_converged"] == 1.0 for r in per_seed)),
    ]
    first = per_seed[0]
    metrics = {
        "n_train": len(data0.x_train), "n_test": len(data0.x_test), "gamma": gamma, "train_atol": train_atol,
        "solve_atol": solve_atol, "seed": seed, "seeds": seeds,
        "deq_test_acc": first["deq_test_acc"], "mlp_test_acc": first["mlp_test_acc"],
        "fwd_iters": first["fwd_iters"], "fwd_residual": first["fwd_residual"],
        "fwd_converged": first["fwd_converged"], "bwd_iters": first["bwd_iters"],
        "bwd_residual": first["bwd_residual"], "test_fwd_iters": first["test_fwd_iters"],
        "lipschitz": lipschitz, "banach_ratio": banach, "picard_rate": rate, "grad_rel_diff": grad_diff,
        "picard_bound_iters": bound_iters, "per_seed": per_seed,
        "solvers": {k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in traces0.items()},
        "control_solvers": {k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in control_traces.items()},
        "history": history,
    }
    write_metrics(out, metrics, settings=s, mode=mode, claims=claims, sanity_checks=sanity)

    metrics = read_metrics(out)
    _plot_residuals(traces0, lipschitz, solve_atol, out / "residuals.png")
    _plot_training(history, out / "training.png")
    (out / "table.md").write_text(_table(metrics), encoding="utf-8")
    verdicts = ", ".join(f"{c['id']}: {c['verdict']}" for c in claims)
    print(
        f"core: DEQ - MLP test acc {d_mean:+.4f} [{d_iv[0]:+.4f}, {d_iv[1]:+.4f}] over {len(seeds)} seeds; "
        f"forward iters {first['fwd_iters']:.1f}, backward {first['bwd_iters']:.1f}; {verdicts}"
    )
    return metrics
