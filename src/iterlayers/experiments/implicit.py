"""Implicit deep learning: global linear convergence of Kawaguchi's deep equilibrium linear model.

Paper: K. Kawaguchi, "On the Theory of Implicit Deep Learning: Global Convergence with Implicit Layers",
ICLR 2021, arXiv 2102.07346. Model f(x) = B (I - gamma sigma(A))^{-1} phi(x) with a column-softmax sigma
(:mod:`iterlayers.models.implicit_linear`); theory in :mod:`iterlayers.models.implicit_theory`.

What we run (full-batch gradient descent on (A, B), float64):

1. Loss vs iteration (log scale) of L - L*_R for several widths m, including m < m_y (= 10 classes) and
   m < N, for the square loss (one-hot targets) and the logistic loss, on scikit-learn's bundled digits with a
   fixed Gaussian random-feature map phi: R^64 -> R^m. Substitution: our search tool returned only the paper's
   abstract and introduction, not its numerical section, so the paper's datasets / gamma / optimiser could not
   be checked; digits is the offline dataset of this project.
2. The fitted linear rate rho_fit (gap_k ~ C rho_fit^k) next to the theorem's bound rho = exp(-eta mu lambda_T)
   (gradient flow at t = eta k) and the certified gradient-descent bound 1 - eta mu lambda_T / 2; and the
   pointwise check gap_k <= gap_0 rho^k for every k.
3. The implicit model's trajectory R_k = B_k U_k next to the shallow model's trust-region Newton trajectory
   (metric P_k^{-1}, radius eta ||grad_{A,B} L||, exact Hessian; see implicit_theory), and plain gradient
   descent on the shallow model for contrast.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from iterlayers.data import load_digits
from iterlayers.models.implicit_linear import ImplicitLinearModel, implicit_gradient
from iterlayers.models.implicit_theory import (
    fit_linear_rate,
    induced_metric,
    lambda_U,
    local_pl_constant,
    min_nonzero_eig,
    pl_constant_square,
    rate_bounds,
    shallow_grad,
    shallow_loss,
    shallow_optimum,
    trust_region_newton_step,
)

__all__ = ["run", "settings", "train_gd"]

NUM_CLASSES = 10
DTYPE = torch.float64


def settings(*, quick: bool, tiny: bool) -> dict:
    """The grid: tiny (test suite) < quick (`make run`) < full."""
    if tiny:
        return dict(n_train=60, widths=[4, 12], steps={"squared": 150, "logistic": 80}, trn_width=4,
                    trn_steps=20, trn_lr_divisor=8.0, gamma=0.5)
    if quick:
        return dict(n_train=300, widths=[4, 8, 16, 32], steps={"squared": 2000, "logistic": 1200}, trn_width=8,
                    trn_steps=300, trn_lr_divisor=8.0, gamma=0.5)
    return dict(n_train=1000, widths=[4, 8, 16, 32, 64], steps={"squared": 8000, "logistic": 5000},
                trn_width=8, trn_steps=1500, trn_lr_divisor=8.0, gamma=0.5)


def _learning_rate(model: ImplicitLinearModel, phi: torch.Tensor, loss: str) -> float:
    """eta = 1 / (beta_R * lambda_max(P_0)): beta_R the smoothness of the (mean) shallow loss in R, P_0 the
    induced metric at initialisation (the curvature of L in (A, B) along the R directions)."""
    lam_max = float(torch.linalg.eigvalsh(phi.transpose(0, 1) @ phi).max())
    beta = (2.0 if loss == "squared" else 0.5) * lam_max / phi.shape[0]
    return 1.0 / (beta * float(torch.linalg.eigvalsh(induced_metric(model)).max()))


def train_gd(model: ImplicitLinearModel, x: torch.Tensor, y: torch.Tensor, *, loss: str, steps: int, lr: float,
             optimum: float, phi: torch.Tensor, desc: str = "") -> dict:
    """Full-batch gradient descent with the closed-form implicit gradient; records the theorem's quantities."""
    gaps, lam_us, mus, decrease = [], [], [], []
    prev = None
    mu_sq = pl_constant_square(phi, reduction="mean") if loss == "squared" else None
    for _ in tqdm(range(steps + 1), desc=desc, leave=False, disable=None):
        gA, gB, L = implicit_gradient(model, x, y, loss=loss, reduction="mean", return_loss=True)
        L = float(L)
        gap = L - optimum
        gaps.append(gap)
        lam_us.append(lambda_U(model))
        with torch.no_grad():
            if loss == "squared":
                mus.append(mu_sq)
            else:
                mus.append(local_pl_constant(model.shallow_weight(), phi, y, optimum, loss=loss, reduction="mean"))
            g2 = float(gA.pow(2).sum() + gB.pow(2).sum())
            # below ~1e-11 of the initial gap the loss differences are float64 round-off, not descent
            if prev is not None and prev[1] > 0 and gap > 1e-11 * gaps[0]:
                # sufficient decrease (L_k - L_{k+1}) / (eta ||grad_k||^2): >= 1/2 certifies the GD bound
                decrease.append((prev[0] - L) / (lr * prev[1]))
            prev = (L, g2)
            model.A.sub_(lr * gA)
            model.B.sub_(lr * gB)
    return {"gaps": gaps, "lambda_U": lam_us, "mu": mus, "decrease": decrease}


def _analyse(run: dict, lr: float, loss: str) -> dict:
    gaps = run["gaps"]
    g0 = gaps[0]
    floor = 1e-11 * g0
    # the rate constant mu * lambda_T over the iterates above the float64 floor (below it the local PL ratio of
    # the logistic loss is round-off)
    rate_const = min(mu * lu for mu, lu, g in zip(run["mu"], run["lambda_U"], gaps) if math.isfinite(mu) and g > floor)
    bounds = rate_bounds(rate_const, lr)
    fitted = fit_linear_rate(gaps, floor=floor)
    # pointwise: gap_k <= gap_0 rho^k (a small slack for float64 round-off near the floor)
    tol = 1e-12 * max(1.0, abs(g0))
    pointwise = all(g <= g0 * bounds["flow"] ** k + tol for k, g in enumerate(gaps))
    pointwise_gd = all(g <= g0 * bounds["gd"] ** k + tol for k, g in enumerate(gaps))
    final = max(gaps[-1], 0.0)  # a negative gap is round-off at the optimum (float64 resolution)
    return {
        "initial_loss_gap": g0,
        "final_loss_gap": final,
        "relative_gap": final / g0,
        "reached_float64_floor": gaps[-1] <= floor,
        "fitted_rate": fitted,
        "theory_rate": bounds["flow"],
        "theory_rate_gd": bounds["gd"],
        "rate_constant": rate_const,
        "lambda_T": min(run["lambda_U"]),
        "lambda_U_init": run["lambda_U"][0],
        "pl_constant_min": min(run["mu"]),
        "bound_holds_pointwise": pointwise,
        "bound_gd_holds_pointwise": pointwise_gd,
        "min_sufficient_decrease": min(run["decrease"]) if run["decrease"] else float("nan"),
        "monotone": all(b <= a + 1e-13 * max(1.0, abs(a)) for a, b in zip(gaps, gaps[1:])),
        "lr": lr,
        "theory_rate_kind": "a-priori PL constant 4 lambda_min+(Phi^T Phi)/N" if loss == "squared"
        else "a-posteriori: local PL constant along the trajectory",
    }


def _equilibrium_check(model: ImplicitLinearModel, x: torch.Tensor) -> dict:
    """Direct solve vs the core fixed-point solver at the trained weights; well-posedness numbers."""
    with torch.no_grad():
        zd = model.equilibrium_point(x, method="direct")
        zi = model.equilibrium_point(x, method="iterative")
        cf = model.contraction_factor()
    return {"direct_vs_iterative": float((zd - zi).abs().max()), "spectral_radius": cf["spectral_radius"],
            "norm_1": cf["norm_1"],
            "solver_steps": int(model.last_stats["forward"].nstep.max()) if model.last_stats else -1}


def _implicit_step(model: ImplicitLinearModel, x, y, lr: float, loss: str):
    """One GD step of (A, B) on a copy; returns (R_before, R_after, ||grad_{A,B} L||)."""
    clone = copy.deepcopy(model)
    gA, gB = implicit_gradient(clone, x, y, loss=loss, reduction="mean")
    with torch.no_grad():
        R0 = clone.shallow_weight()
        clone.A.sub_(lr * gA)
        clone.B.sub_(lr * gB)
        return R0, clone.shallow_weight(), float(torch.sqrt(gA.pow(2).sum() + gB.pow(2).sum()))


def _tr_one_step_error(model, x, y, phi, lr: float, loss: str) -> float:
    """|v_TR - dR| / |dR|: the shallow TR-Newton step (metric P^-1, radius lr |grad|) vs the implicit step."""
    R0, R1, gnorm = _implicit_step(model, x, y, lr, loss)
    with torch.no_grad():
        P = induced_metric(model)
        metric = torch.cholesky_inverse(torch.linalg.cholesky(P))
        R_tr, _ = trust_region_newton_step(R0, phi, y, metric=metric, radius=lr * gnorm, loss=loss, reduction="mean")
        return float((R_tr - R1).norm() / (R1 - R0).norm())


def _trust_region_comparison(x, y, *, width: int, steps: int, gamma: float, seed: int, loss: str,
                             lr_divisor: float) -> dict:
    """Implicit GD trajectory R_k vs the coupled shallow trust-region Newton trajectory, and shallow GD.

    The relation is one of dynamics (gradient flow): the TR-Newton step agrees with the implicit model's step up
    to O(eta^2), so the comparison runs at eta = eta_0 / lr_divisor and also sweeps eta at initialisation.
    """
    model = ImplicitLinearModel(x.shape[1], width, NUM_CLASSES, gamma=gamma, seed=seed, dtype=DTYPE)
    phi = model.features(x).detach()
    opt = shallow_optimum(phi, y, loss=loss, reduction="mean", out_features=NUM_CLASSES)
    lr0 = _learning_rate(model, phi, loss)
    sweep = [lr0 / 2 ** j for j in range(0, 9, 2)]
    sweep_err = [_tr_one_step_error(model, x, y, phi, e, loss) for e in sweep]
    order = (math.log(sweep_err[0]) - math.log(sweep_err[-1])) / (math.log(sweep[0]) - math.log(sweep[-1]))
    lr = lr0 / lr_divisor
    with torch.no_grad():
        R_impl = model.shallow_weight().clone()
    R_trn = R_impl.clone()
    R_gd = R_impl.clone()
    rows, one_step_err, traj_dev, cosines = [], [], [], []
    for _ in tqdm(range(steps), desc=f"trust-region m={width}", leave=False, disable=None):
        gA, gB = implicit_gradient(model, x, y, loss=loss, reduction="mean")
        with torch.no_grad():
            P = induced_metric(model)
            metric = torch.cholesky_inverse(torch.linalg.cholesky(P))
            radius = lr * float(torch.sqrt(gA.pow(2).sum() + gB.pow(2).sum()))
            g_shallow = shallow_grad(R_impl, phi, y, loss=loss, reduction="mean")
            # one step from the same point: the TR-Newton step vs the implicit model's actual step of R
            R_tr_local, _ = trust_region_newton_step(R_impl, phi, y, metric=metric, radius=radius, loss=loss,
                                                     reduction="mean")
            model.A.sub_(lr * gA)
            model.B.sub_(lr * gB)
            R_next = model.shallow_weight()
            d_impl = R_next - R_impl
            one_step_err.append(float((R_tr_local - R_impl - d_impl).norm() / d_impl.norm()))
            cosines.append(float(-(d_impl * g_shallow).sum() / (d_impl.norm() * g_shallow.norm())))
            # the coupled shallow TR-Newton trajectory (its own R, the implicit model's metric and radius)
            R_trn, info = trust_region_newton_step(R_trn, phi, y, metric=metric, radius=radius, loss=loss,
                                                   reduction="mean")
            # plain GD on the shallow model with the same step: the geometry the implicit layer changes
            R_gd = R_gd - lr * shallow_grad(R_gd, phi, y, loss=loss, reduction="mean")
            R_impl = R_next.clone()
            traj_dev.append(float((R_trn - R_impl).norm() / R_impl.norm()))
            rows.append({
                "implicit": float(shallow_loss(R_impl, phi, y, loss=loss, reduction="mean")) - opt.value,
                "trust_region_newton": float(shallow_loss(R_trn, phi, y, loss=loss, reduction="mean")) - opt.value,
                "shallow_gd": float(shallow_loss(R_gd, phi, y, loss=loss, reduction="mean")) - opt.value,
                "tr_multiplier": info["lam"],
            })
    return {
        "width": width, "loss": loss, "lr": lr, "lr0": lr0, "steps": steps,
        "eta_sweep": sweep, "eta_sweep_one_step_error": sweep_err, "eta_sweep_order": order,
        "max_one_step_relative_error": max(one_step_err),
        "mean_one_step_relative_error": sum(one_step_err) / len(one_step_err),
        "max_trajectory_deviation": max(traj_dev),
        "mean_cosine_implicit_step_vs_neg_gradient": sum(cosines) / len(cosines),
        "final_gap_implicit": rows[-1]["implicit"], "final_gap_trust_region_newton": rows[-1]["trust_region_newton"],
        "final_gap_shallow_gd": rows[-1]["shallow_gd"],
        "trajectory": rows, "one_step_error": one_step_err, "deviation": traj_dev,
    }


# ----------------------------------------------------------------------------------------------- output
def _plot_losses(curves: dict, results: dict, loss: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (m, gaps) in enumerate(curves.items()):
        r = results[m]
        k = range(len(gaps))
        line, = ax.semilogy(k, [max(g, 1e-300) for g in gaps], label=f"m={m} (fit {r['fitted_rate']:.4f})")
        ax.semilogy(k, [gaps[0] * r["theory_rate"] ** j for j in k], ls="--", color=line.get_color(), lw=0.9,
                    label=f"bound m={m} ({r['theory_rate']:.4f})")
    ax.set_xlabel("gradient-descent iteration k")
    ax.set_ylabel(r"$L(A_k, B_k) - L^*_R$")
    ax.set_title(f"{loss} loss, digits, m_y = {NUM_CLASSES}: implicit linear model")
    top = max(c[0] for c in curves.values())
    low = min(min((g for g in c if g > 0), default=top) for c in curves.values())
    ax.set_ylim(max(low / 10, top * 1e-16), top * 3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rates(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for loss, marker in (("squared", "o"), ("logistic", "s")):
        rs = results.get(loss, {})
        ms = sorted(rs, key=int)
        xs = [int(m) for m in ms]
        ax.plot(xs, [1 - rs[m]["fitted_rate"] for m in ms], marker=marker, label=f"{loss}: 1 - fitted rate")
        ax.plot(xs, [1 - rs[m]["theory_rate"] for m in ms], marker=marker, ls="--", label=f"{loss}: 1 - bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(NUM_CLASSES, color="gray", lw=0.8, ls=":")
    ax.text(NUM_CLASSES, ax.get_ylim()[0], " m = m_y", fontsize=8, color="gray", va="bottom")
    ax.set_xlabel("width m")
    ax.set_ylabel("per-iteration decrease 1 - rho (larger = faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_trust_region(tr: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.8))
    rows = tr["trajectory"]
    k = range(1, len(rows) + 1)
    for key, label, ls in (("implicit", "implicit model (GD on A, B)", "-"),
                           ("trust_region_newton", "shallow model, trust-region Newton (metric P^-1)", "--"),
                           ("shallow_gd", "shallow model, plain GD (same step)", ":")):
        a1.semilogy(k, [max(r[key], 1e-300) for r in rows], label=label, ls=ls)
    a1.set_xlabel("iteration")
    a1.set_ylabel(r"$L - L^*_R$")
    a1.set_title(f"width m={tr['width']} < m_y={NUM_CLASSES}, {tr['loss']} loss, eta = eta0/{tr['lr0'] / tr['lr']:.0f}",
                 fontsize=9)
    a1.legend(fontsize=7)
    a2.semilogy(k, tr["one_step_error"], label="one step: |v_TR - dR| / |dR|")
    a2.semilogy(k, tr["deviation"], label="trajectory: |R_TR - R_impl| / |R_impl|")
    a2.set_xlabel("iteration")
    a2.legend(fontsize=7)
    a3.loglog(tr["eta_sweep"], tr["eta_sweep_one_step_error"], marker="o",
              label=f"one-step difference (order {tr['eta_sweep_order']:.2f})")
    a3.set_xlabel("step size eta")
    a3.set_ylabel("relative difference")
    a3.set_title("TR-Newton vs implicit step -> 0 with eta", fontsize=9)
    a3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _e(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def _yes(b) -> str:
    if isinstance(b, str):
        return b
    return "yes" if b else "no"


def _table(m: dict) -> str:
    lines = [
        "# Implicit deep learning: global convergence (Kawaguchi, ICLR 2021, arXiv 2102.07346)",
        "",
        f"Data: {m['data']}. gamma = {m['gamma']}, full-batch GD on (A, B) in float64, mean losses.",
        "Paper's data: not verifiable here (our search tool returned only the paper's abstract and introduction);",
        "we substitute scikit-learn's bundled digits with a fixed Gaussian random-feature map phi: R^64 -> R^m.",
        "",
        "| loss | width m | m < m_y | L0 - L* | L_T - L* | relative | fitted rate | bound (flow) | bound (GD) "
        "| pointwise bound | min suff. decrease | lambda_T | direct vs iterative |",
        "| --- | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: |",
    ]
    for loss, rs in m["results"].items():
        for width, r in rs.items():
            lines.append(
                f"| {loss} | {width} | {_yes(int(width) < NUM_CLASSES)} | {_e(r['initial_loss_gap'])} | "
                f"{_e(r['final_loss_gap'])} | {_e(r['relative_gap'])} | {r['fitted_rate']:.5f} | "
                f"{r['theory_rate']:.5f} | {r['theory_rate_gd']:.5f} | {_yes(r['bound_holds_pointwise'])} | "
                f"{r['min_sufficient_decrease']:.3f} | {_e(r['lambda_T'])} | {_e(r['direct_vs_iterative'])} |")
    tr = m["trust_region"]
    lines += [
        "",
        f"Trust-region Newton relation (width {tr['width']}, {tr['loss']} loss, {tr['steps']} steps, eta = "
        f"{_e(tr['lr'])} = eta0/{tr['lr0'] / tr['lr']:.0f}): max one-step relative difference "
        f"{_e(tr['max_one_step_relative_error'])}, max trajectory deviation {_e(tr['max_trajectory_deviation'])}; "
        f"final gaps: implicit {_e(tr['final_gap_implicit'])}, TR-Newton {_e(tr['final_gap_trust_region_newton'])}, "
        f"shallow GD (same eta) {_e(tr['final_gap_shallow_gd'])}. One-step difference vs eta at initialisation: "
        + ", ".join(f"{_e(e)}: {_e(v)}" for e, v in zip(tr["eta_sweep"], tr["eta_sweep_one_step_error"]))
        + f" (order {tr['eta_sweep_order']:.2f}; 1 = agreement to first order, as a relation of gradient flows).",
        "",
        "## Paper's claims vs ours",
        "",
        "| claim (paper) | ours | holds |",
        "| --- | --- | --- |",
    ]
    for c in m["claims"]:
        lines.append(f"| {c['claim']} | {c['ours']} | {_yes(c['holds'])} |")
    lines += [
        "",
        "Notes. Rates are per iteration: gap_k ~ C rho^k. 'bound (flow)' is exp(-eta mu lambda_T), the theorem's",
        "gradient-flow bound at t = eta k, with mu the PL constant of the shallow loss (a priori 4 lambda_min+(Phi^T Phi)/N",
        "for the square loss; for the logistic loss the local constant along the trajectory, i.e. a-posteriori) and",
        "lambda_T = min_k lambda_min(U_k U_k^T). 'bound (GD)' = 1 - eta mu lambda_T / 2 is certified for GD when the",
        "minimum sufficient-decrease ratio is >= 0.5. The exact constants of the paper's theorem and its trust-region",
        "statement could not be read (search returned the abstract/introduction only); implicit_theory.py derives them.",
    ]
    return "\n".join(lines) + "\n"


def _claims(m: dict) -> list:
    sq = m["results"]["squared"]
    lg = m["results"]["logistic"]
    tr = m["trust_region"]
    small = [w for w in sq if int(w) < NUM_CLASSES]
    claims = []
    worst_rel = max(r["relative_gap"] for r in sq.values())
    claims.append({
        "claim": "Gradient dynamics reach the global optimum L*_R of the shallow model at a linear rate (square loss)",
        "ours": f"all widths: fitted rate < 1, L - L* falls by >= {1 / worst_rel:.3g}x (worst width)",
        "holds": all(r["fitted_rate"] < 1 and r["monotone"] for r in sq.values()) and worst_rel < 1e-3,
    })
    claims.append({
        "claim": "No width condition: width may be below the output dimension and the number of samples",
        "ours": "widths " + ", ".join(small) + f" < m_y = {NUM_CLASSES} (all < N = {m['n_train']}): relative gaps "
                + ", ".join(_e(sq[w]["relative_gap"]) for w in small),
        "holds": bool(small) and all(sq[w]["relative_gap"] < 1e-3 for w in small),
    })
    claims.append({
        "claim": "Empirical rate within the theorem's bound L_t - L* <= (L_0 - L*) exp(-mu lambda_T t)",
        "ours": "square loss, gap_k <= gap_0 rho^k at every k for widths "
                + ", ".join(w for w, r in sq.items() if r["bound_holds_pointwise"])
                + "; fitted vs bound " + ", ".join(f"{r['fitted_rate']:.4f}<={r['theory_rate']:.4f}" for r in sq.values()),
        "holds": all(r["bound_holds_pointwise"] and r["fitted_rate"] <= r["theory_rate"] for r in sq.values()),
    })
    claims.append({
        "claim": "Logistic (cross-entropy) loss: linear convergence to L*_R",
        "ours": "a-posteriori rate constant (local PL x lambda_T) holds pointwise for widths "
                + ", ".join(w for w, r in lg.items() if r["bound_holds_pointwise"])
                + "; relative gaps " + ", ".join(f"m={w}: {_e(r['relative_gap'])}" for w, r in lg.items())
                + " (slow where the data are nearly separable: local PL constant small)",
        # a rate with an a-posteriori constant is weaker than the theorem's: "partly" unless every width also
        # got within 1e-3 of the optimum in the steps we ran
        "holds": (("yes" if all(r["relative_gap"] < 1e-3 for r in lg.values()) else "partly")
                  if all(r["bound_holds_pointwise"] and r["fitted_rate"] < 1 for r in lg.values()) else "no"),
    })
    claims.append({
        "claim": "The equilibrium exists and is unique for every A (normalised weights: rho(gamma sigma(A)) <= gamma < 1)",
        "ours": "spectral radius at trained weights " + ", ".join(
            f"{r['spectral_radius']:.4f}" for r in sq.values()) + f"; direct vs core solver max diff "
                + _e(max(r["direct_vs_iterative"] for rs in m["results"].values() for r in rs.values())),
        "holds": all(r["spectral_radius"] <= m["gamma"] + 1e-9 and r["direct_vs_iterative"] < 1e-8
                     for rs in m["results"].values() for r in rs.values()),
    })
    claims.append({
        "claim": "The implicit layer's gradient dynamics relate to trust-region Newton dynamics of a shallow model",
        "ours": f"TR-Newton (metric P_k^-1, radius eta |grad|) vs implicit step: difference -> 0 with order "
                f"{tr['eta_sweep_order']:.2f} in eta; at eta0/{tr['lr0'] / tr['lr']:.0f} one-step <= "
                f"{_e(tr['max_one_step_relative_error'])}, trajectory deviation <= {_e(tr['max_trajectory_deviation'])}",
        "holds": tr["eta_sweep_order"] > 0.8 and tr["max_trajectory_deviation"] < 0.1,
    })
    claims.append({
        "claim": "Implicit bias: the implicit layer changes the geometry of the shallow problem's dynamics",
        "ours": f"mean cosine between the implicit model's R-step and -grad L_R: "
                f"{tr['mean_cosine_implicit_step_vs_neg_gradient']:.3f} (1 = plain gradient descent)",
        "holds": tr["mean_cosine_implicit_step_vs_neg_gradient"] < 0.99,
    })
    return claims


def run(*, out: Path, quick: bool = True, tiny: bool = False, seed: int = 0) -> dict:
    """Reproduce the numerical study; writes metrics.json, table.md and PNG figures into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings(quick=quick, tiny=tiny)
    t0 = time.time()
    torch.manual_seed(seed)
    ds = load_digits(seed=seed)
    x = ds.x_train[: cfg["n_train"]].to(DTYPE)
    y = ds.y_train[: cfg["n_train"]]
    results: dict = {}
    curves: dict = {}
    for loss in ("squared", "logistic"):
        results[loss], curves[loss] = {}, {}
        for width in cfg["widths"]:
            model = ImplicitLinearModel(x.shape[1], width, NUM_CLASSES, gamma=cfg["gamma"], seed=seed + width,
                                        dtype=DTYPE)
            phi = model.features(x).detach()
            opt = shallow_optimum(phi, y, loss=loss, reduction="mean", out_features=NUM_CLASSES)
            lr = _learning_rate(model, phi, loss)
            traj = train_gd(model, x, y, loss=loss, steps=cfg["steps"][loss], lr=lr, optimum=opt.value, phi=phi,
                            desc=f"{loss} m={width}")
            r = _analyse(traj, lr, loss)
            lam_phi, rank = min_nonzero_eig(phi)
            r.update(_equilibrium_check(model, x))
            r.update({
                "width": width, "initial_loss": opt.value + traj["gaps"][0],
                "final_loss": opt.value + traj["gaps"][-1], "optimum": opt.value,
                "optimum_grad_norm": opt.grad_norm, "optimum_weight_norm": float(opt.R.norm()),
                "lambda_phi": lam_phi, "rank_phi": rank, "steps": cfg["steps"][loss],
            })
            results[loss][str(width)] = r
            curves[loss][str(width)] = traj["gaps"]
    tr = _trust_region_comparison(x, y, width=cfg["trn_width"], steps=cfg["trn_steps"], gamma=cfg["gamma"],
                                  seed=seed, loss="squared", lr_divisor=cfg["trn_lr_divisor"])
    metrics = {
        "experiment": "implicit",
        "paper": "Kawaguchi, On the Theory of Implicit Deep Learning, ICLR 2021 (arXiv 2102.07346)",
        "data": f"sklearn digits (train split, first {cfg['n_train']} samples, standardised), random features",
        "n_train": cfg["n_train"], "gamma": cfg["gamma"], "num_classes": NUM_CLASSES, "seed": seed,
        "mode": "tiny" if tiny else ("quick" if quick else "full"),
        "results": results,
        # top level: per width (square loss, the theorem's main case) the four required keys
        "widths": {w: {k: results["squared"][w][k] for k in ("final_loss", "initial_loss", "fitted_rate",
                                                              "theory_rate")} for w in results["squared"]},
        "trust_region": {k: v for k, v in tr.items() if k not in ("trajectory", "one_step_error", "deviation")},
    }
    metrics["claims"] = _claims(metrics)
    metrics["seconds"] = time.time() - t0
    _plot_losses(curves["squared"], results["squared"], "squared", out / "loss_squared.png")
    _plot_losses(curves["logistic"], results["logistic"], "logistic", out / "loss_logistic.png")
    _plot_rates(results, out / "rates.png")
    _plot_trust_region(tr, out / "trust_region.png")
    (out / "table.md").write_text(_table(metrics), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float), encoding="utf-8")
    return metrics
