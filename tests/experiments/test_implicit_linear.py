"""The implicit-deep-learning experiment (Kawaguchi, ICLR 2021), ``iterlayers reproduce implicit_linear``, in
its tiny setting."""
import copy
import json
import math

import pytest
import torch

from claims_checks import assert_claims_valid
from iterlayers.experiments import implicit_linear as E
from iterlayers.experiments.claims import DOES_NOT_HOLD, HOLDS

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("implicit")
    return out, E.run(out=out, tiny=True, seed=0)


def test_tiny_run_writes_valid_claims_table_and_figures(tiny_run):
    out, metrics = tiny_run
    for name in ("metrics.json", "table.md", "rates.png", "trust_region.png", "implicit_bias_digits.png",
                 "implicit_bias_mnist1d.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["settings"]["mode"] == "tiny"
    assert_claims_valid(on_disk, min_claims=10)
    ids = {c["id"] for c in on_disk["claims"]}
    assert {"square_global_optimum", "square_no_width_condition", "square_linear_rate_bound",
            "logistic_linear_rate", "trust_region_relation"} <= ids
    assert any(i.startswith("bias_mnist1d") for i in ids) and any(i.startswith("bias_digits") for i in ids)
    # what holds by construction is a sanity check, never a claim
    sanity = {s["id"]: s for s in on_disk["sanity_checks"]}
    assert "equilibrium_unique" in sanity and "equilibrium" not in " ".join(ids)
    assert all(s["passed"] for s in sanity.values()), [s for s in sanity.values() if not s["passed"]]
    table = (out / "table.md").read_text()
    assert "## Paper's claims vs ours" in table and "## Sanity checks" in table
    # a width below the output dimension is part of the grid, and the square loss reached L*_R there
    small = [w for w in on_disk["rates"]["squared"] if int(w) < 10]
    assert small and all(r["log10_relative_gap"] < -3 for w in small for r in on_disk["rates"]["squared"][w])


def test_tiny_run_trust_region_and_scale(tiny_run):
    _, metrics = tiny_run
    for row in metrics["trust_region"]["rows"]:
        # the derived TR-Newton run stays on the implicit trajectory; the Euclidean / wrong-gamma ones do not
        assert row["deviation_tr"] < 0.05 < min(row["deviation_euclidean"], row["deviation_gamma"])
    for row in metrics["scale"]:
        assert row["n"] == 1797 and max(row["z_rel_error"], row["grad_A_rel_error"], row["grad_B_rel_error"]) < 1e-4
        assert row["loss_after"] < row["loss_before"]


def test_separable_logistic_widths_are_not_applicable(tiny_run):
    _, metrics = tiny_run
    ctl = metrics["rates"]["controls"]["separable"]
    assert all(not c["attained"] for c in ctl)  # the control subset is separable (LP)
    claim = next(c for c in metrics["claims"] if c["id"] == "logistic_linear_rate")
    att = [w for w, rows in metrics["rates"]["logistic"].items() if all(r["attained"] for r in rows)]
    assert all(w in claim["statement"] for w in att)


def _bias_cfg():
    cfg = E.settings(quick=True, tiny=True)
    cfg.update(bias_seeds=1, bias_steps=200, bias_inits=[1.0])
    return cfg


def test_poisoned_test_split_changes_no_training_quantity():
    cfg = _bias_cfg()
    clean = E.bias_study(cfg, 0, datasets=("digits",))
    poisoned = E.bias_study(cfg, 0, datasets=("digits",), poison_test=True)
    assert set(clean["regimes"]) == {"n=4", "n=8", "rank_deficient", "unique"}
    changed = 0
    for regime in clean["regimes"]:
        a, b = clean["data"]["digits"]["init=1"][regime][0], poisoned["data"]["digits"]["init=1"][regime][0]
        assert a["lr"] == b["lr"] and a["impl_vs_shallow"] == b["impl_vs_shallow"]
        for k in ("implicit", "shallow", "deep"):
            assert a[k]["train_loss"] == b[k]["train_loss"] and a[k]["R_norm"] == b[k]["R_norm"]
            changed += a[k]["test_error"] != b[k]["test_error"]
    assert changed > 0  # the poison did reach the test numbers


def test_bias_regimes_have_the_stated_rank_and_shallow_gd_reaches_its_closed_form_limit():
    cfg = _bias_cfg()
    cfg.update(bias_steps=600)
    b = E.bias_study(cfg, 0, datasets=("digits",))
    xtr, ytr, xte, _ = E._bias_data("digits", 0)
    for key, reg in b["regimes"].items():
        ptr, _ = (E.rank_deficient_features(xtr, xte, cfg["bias_width"], seed=1) if reg["kind"] == "rank_deficient"
                  else E.pca_features(xtr, xte, cfg["bias_width"]))
        assert int(torch.linalg.matrix_rank(ptr[: reg["n"]])) == reg["rank"], key
        row = b["data"]["digits"]["init=1"][key][0]
        # shallow GD's limit is the least-squares solution nearest R_0 (closed form), not the minimum-norm one
        assert row["shallow"]["dist_nearest_R0"] < 1e-6 * row["travelled"]
        assert row["shallow"]["norm_ratio"] >= 1.0 - 1e-9
        if reg["kind"] == "unique":  # one minimiser: every model's limit is it
            assert row["impl_vs_shallow"] < 1e-6 and row["near_vs_min_norm"] < 1e-9
        else:
            assert row["near_vs_min_norm"] > 1e-3  # R_0 has a component off the row space: R_near != R_mn
    # rank-deficient features: every minimiser predicts alike on every input, test inputs included
    _, pte = E.rank_deficient_features(xtr, xte, cfg["bias_width"], seed=1)
    assert int(torch.linalg.matrix_rank(torch.cat([E.rank_deficient_features(xtr, xte, cfg["bias_width"],
                                                                             seed=1)[0], pte]))) == 8


def _synthetic_bias(impl_vs_shallow, err_gain):
    def row(ivs, gain):
        # the implicit limit sits at R_frozen when it is away from shallow GD's (a true result), else not
        base = {"relative_gap": 1e-9, "test_error": 0.5, "dist_frozen_U0": 0.3}
        return {"impl_vs_shallow": ivs, "implicit": {**base, "test_error": 0.5 - gain, "dist_frozen_U0": 0.3 - ivs},
                "shallow": dict(base), "deep": dict(base), "near_vs_min_norm": 1.0, "min_norm": 1.0, "travelled": 1.0}
    non = [row(v, g) for v, g in zip(impl_vs_shallow, err_gain)]
    for r in non:
        r["shallow"]["dist_nearest_R0"] = 0.0
    uni = [row(0.0, 0.0) for _ in non]
    rd = [dict(row(v, 0.0), shallow={**r["shallow"]}) for v, r in zip(impl_vs_shallow, non)]
    regimes = {"n=4": {"kind": "interpolation", "n": 4, "rank": 4},
               "rank_deficient": {"kind": "rank_deficient", "n": 64, "rank": 8},
               "unique": {"kind": "unique", "n": 64, "rank": 16}}
    return {"regimes": regimes, "data": {"digits": {"init=1": {"n=4": non, "rank_deficient": rd, "unique": uni}}}}


@pytest.mark.parametrize("ivs,gain,expected", [
    ([0.3, 0.32, 0.31], [0.05, 0.06, 0.05], HOLDS),
    ([0.0, 0.001, 0.0], [-0.05, -0.04, -0.06], DOES_NOT_HOLD),  # a false result flips every bias verdict
])
def test_bias_verdicts_follow_the_measurement(ivs, gain, expected):
    claims, _ = E._bias_claims(_synthetic_bias(ivs, gain), "quick")
    assert len(claims) == 4 and all(c["verdict"] == expected for c in claims), [c["verdict"] for c in claims]
    untrained = _synthetic_bias(ivs, gain)
    untrained["data"]["digits"]["init=1"]["n=4"][0]["deep"]["relative_gap"] = 0.5
    claims, _ = E._bias_claims(untrained, "quick")
    assert all(c["verdict"] == "not testable here" for c in claims)  # a baseline that did not train


def test_rate_change_separates_linear_from_sublinear():
    geometric = [0.9 ** k for k in range(200)]
    assert E.rate_change(geometric, floor=1e-30) == pytest.approx(1.0, rel=1e-9)
    assert E.rate_change([1.0 / (k + 1) for k in range(200)], floor=0.0) < 0.5
    plateau = [1.0 + 0.9 ** k for k in range(200)]
    assert E.rate_change(plateau, floor=0.0) < 0.1
    assert math.isnan(E.rate_change([1.0, 0.5], floor=0.0))


def test_trust_region_trajectory_is_first_order_close_and_metric_matters():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(20, 3, generator=g, dtype=F64)
    y = torch.randint(0, 10, (20,), generator=g)
    model = E._model(3, 0.5, seed=1)
    lr0 = E._learning_rate(model, phi, "squared")
    devs, eu = [], []
    for div in (4.0, 8.0):
        steps = int(10 * div)  # the same time horizon eta * steps
        impl = E._implicit_path(copy.deepcopy(model), phi, y, lr=lr0 / div, steps=steps)
        tr = E.trust_region_trajectory(model, phi, y, lr=lr0 / div, steps=steps)
        devs.append(E._deviation(tr, impl))
        eu.append(E._deviation(E.trust_region_trajectory(model, phi, y, lr=lr0 / div, steps=steps,
                                                         metric="euclidean"), impl))
    # whole-run deviation O(eta): halves with eta; the Euclidean metric stays O(1) away
    assert devs[1] < 0.65 * devs[0] and devs[1] < 0.02
    assert min(eu) > 0.1


def test_bad_options_get_typed_errors():
    from iterlayers.errors import ValidationError

    with pytest.raises(ValidationError, match="width"):
        E.pca_features(torch.zeros(5, 3), torch.zeros(2, 3), 4)
    with pytest.raises(ValidationError, match="metric"):
        E.trust_region_trajectory(E._model(3, 0.5, 0), torch.zeros(4, 3, dtype=F64), torch.zeros(4, dtype=torch.long),
                                  lr=0.1, steps=1, metric="riemann")


def test_a_baseline_at_chance_makes_the_test_error_claims_untestable():
    bias = _synthetic_bias([0.3, 0.32, 0.31], [0.05, 0.06, 0.05])
    for r in bias["data"]["digits"]["init=1"]["n=4"]:
        r["shallow"]["test_error"] = r["deep"]["test_error"] = 0.89
        r["implicit"]["test_error"] = 0.80
    claims, _ = E._bias_claims(bias, "quick")
    verdicts = {c["id"]: c["verdict"] for c in claims}
    assert verdicts["bias_digits_init1_interpolant"] == verdicts["bias_digits_init1_frozen_U0"] == HOLDS
    assert verdicts["bias_digits_init1_test_error_vs_shallow"] == "not testable here"
    assert verdicts["bias_digits_init1_test_error_vs_deep"] == "not testable here"


def test_censored_runs_are_left_out_and_a_failure_after_the_horizon_counts():
    def row(gap, censored):
        return {"log10_relative_gap": gap, "censored": censored}
    sq = {"4": [row(-11.0, False), row(-10.0, False)], "64": [row(-2.0, True), row(-2.5, True)]}
    worst, censored = E.worst_uncensored(sq)
    assert worst == [-11.0, -10.0] and len(censored) == 2
    sq["64"][1]["censored"] = False  # the same gap after the horizon is a failure, not an inconclusive run
    worst, censored = E.worst_uncensored(sq)
    assert worst == [-11.0, -2.5] and len(censored) == 1


def test_step_budget_is_derived_from_the_bound_and_each_model_stops_at_its_own():
    from iterlayers.implicit_linear import lambda_U_range, pl_constant_square

    g = torch.Generator().manual_seed(3)
    phi = torch.randn(40, 6, generator=g, dtype=F64)
    y = torch.randint(0, 10, (40,), generator=g)
    model = E._model(6, 0.5, seed=2)
    lr = E._learning_rate(model, phi, "squared")
    h = E._horizon(model, phi, lr, steps=10, cap=10 ** 6)
    expected = math.ceil(math.log(1e3) / (lr * pl_constant_square(phi, reduction="mean") * lambda_U_range(model)[0]))
    assert h["horizon"] == expected and h["steps_budget"] == max(10, expected)
    assert E._horizon(model, phi, lr, steps=10, cap=20)["steps_budget"] == 20  # the mode's cap
    assert E._horizon(model, phi, lr, steps=10 ** 5, cap=20)["steps_budget"] == 10 ** 5  # never below steps
    # worse-conditioned features (one direction scaled down 30x) need a longer horizon
    bad = phi.clone()
    bad[:, 0] /= 30.0
    assert E._horizon(model, bad, E._learning_rate(model, bad, "squared"), 10, 10 ** 6)["horizon"] > 10 * expected
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    runs = E.train_gd(models, torch.stack([phi, phi]), torch.stack([y, y]), loss="squared", steps=[5, 12],
                      lr=[lr, lr], optimum=[0.0, 0.0])
    assert [len(r["gaps"]) - 1 for r in runs] == [5, 12]
    assert runs[0]["gaps"] == runs[1]["gaps"][:6]  # the same trajectory, stopped earlier
    # the recorded gap (moment form) is the loss of the final weights computed from the samples
    from iterlayers.implicit_linear import shallow_loss
    assert runs[1]["gaps"][-1] == pytest.approx(float(shallow_loss(models[1].shallow_weight().detach(), phi, y,
                                                                   reduction="mean")), rel=1e-12)


def test_frozen_reference_is_where_gd_on_b_alone_goes():
    """R_frozen (closed form) is the limit of GD on B with U = U_0 fixed: checked by running that GD."""
    from iterlayers.implicit_linear import nearest_least_squares

    g = torch.Generator().manual_seed(5)
    phi = torch.randn(6, 10, generator=g, dtype=F64)
    T = torch.nn.functional.one_hot(torch.randint(0, 10, (6,), generator=g), 10).to(F64)
    model = E._model(10, 0.5, seed=4)
    U0, B = model.inverse_factor().detach(), model.B.detach().clone()
    feats = phi @ U0.transpose(0, 1)
    ref = nearest_least_squares(feats, T, B) @ U0
    lr = 1.0 / (2.0 * float(torch.linalg.eigvalsh(feats.T @ feats / 6).max()))
    for _ in range(5000):
        B = B - lr * 2.0 * (B @ feats.T - T.T) @ feats / 6
    torch.testing.assert_close(B @ U0, ref, rtol=1e-9, atol=1e-9)
    assert float((ref - nearest_least_squares(phi, T, model.shallow_weight().detach())).norm()) > 1e-2


def test_bias_budget_follows_the_conditioning_and_brings_shallow_gd_to_its_limit():
    # An ill-conditioned subset (column scales spanning 3x): the fixed budget leaves shallow GD short of its
    # closed-form limit; the derived horizon (7 decades in the slowest direction of the row space) reaches it.
    from iterlayers.experiments import implicit_linear as E
    g = torch.Generator().manual_seed(3)
    n, m = 12, 16
    phi = torch.randn(1, n, m, generator=g, dtype=torch.float64) * torch.logspace(0, -0.5, m, dtype=torch.float64)
    y = torch.randint(0, 10, (1, n), generator=g)
    C = phi.transpose(1, 2) @ phi / n
    ev = torch.linalg.eigvalsh(C)[0]
    kappa = float(ev[-1] / ev[ev > 1e-10 * ev[-1]].min())
    assert E._shallow_horizon(C) == math.ceil(7 * math.log(10) * kappa)
    pt, yt = phi.clone(), y.clone()

    def short_of_limit(**kw):
        (row,) = E._fit_three(phi, y, pt, yt, gamma=0.5, seeds=[0], inits=[1.0], record=50, **kw)
        return row["shallow"]["dist_nearest_R0"] / max(row["travelled"], row["min_norm"]), row["steps"]

    fixed, k_fixed = short_of_limit(steps=100)
    derived, k_derived = short_of_limit(steps=100, cap=10 ** 6)
    assert k_fixed == 100 and k_derived == E._shallow_horizon(C) > 100
    assert fixed > 1e-4 and derived < 1e-6
