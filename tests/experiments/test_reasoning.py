"""The reasoning-layer experiment: claims valid on the tiny grid, selection blind to test data, exact parts exact."""
import json

import numpy as np
import pytest
import torch

from iterlayers.reasoning import theory
from iterlayers.experiments import reasoning as R
from iterlayers.experiments.claims import DOES_NOT_HOLD

from claims_checks import assert_claims_valid


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasoning")
    return out, R.run(out=out, tiny=True, seed=0)


def test_tiny_run_claims_valid_and_rendered(tiny_run):
    out, metrics = tiny_run
    assert_claims_valid(metrics, min_claims=6)
    assert json.loads((out / "metrics.json").read_text())["settings"]["mode"] == "tiny"
    assert {c["id"] for c in metrics["claims"]} == {"R1", "R2", "A1", "G1", "B1", "B2", "L1"}
    # the flatness statistic is stored per configuration, and no claim uses a depth that is not flat
    flatness = metrics["protocol"]["flatness"]
    assert flatness and all(np.isfinite(v) for v in flatness.values())
    for c in metrics["claims"]:
        assert not set(c["depths_used"] or []) & set(c["depths_not_flat"]), c["id"]
    assert all(s["passed"] for s in metrics["sanity_checks"]), metrics["sanity_checks"]
    table = (out / "table.md").read_text()
    assert "## Paper's claims vs ours" in table and "## Sanity checks" in table
    for name in metrics["figures"]:
        assert (out / name).stat().st_size > 1000
    res = metrics["results"]["fixed"]
    for algo in ("gd", "nag"):
        for k, r in res[algo]["16"].items():
            for s_tr, s_te, g in zip(r["per_seed"]["train"], r["per_seed"]["test"], r["per_seed"]["gap"]):
                assert g == pytest.approx(s_te - s_tr)
            assert r["train"]["mean"] <= r["train_raw"]["mean"]  # floor-corrected <= raw
    # GD's closed-form rate at s = 1/L is (1 - mu)^k
    assert res["gd"]["16"]["4"]["predicted_rate"] == pytest.approx(0.9 ** 4)


def _summary(metrics):
    """The per-seed summary the claims are computed from, rebuilt from metrics.json."""
    out = {}
    for arm, per_a in metrics["results"].items():
        for algo, per_w in per_a.items():
            for w, per_k in per_w.items():
                for k, r in per_k.items():
                    d = dict(r["per_seed"])
                    n = len(d["train"])
                    d["kept_loss"], d["initial_loss"] = [r["kept_loss"]] * n, [r["initial_loss"]] * n
                    out[(arm, algo, int(w), int(k))] = d
    return out


def test_claims_use_flat_depths_only(tiny_run):
    """A configuration whose training curve has not flattened leaves its depth out of every claim comparing it;
    with no depth left the claim is 'not testable here' (the rule sees training curves only)."""
    _, metrics = tiny_run
    cfg = R.SETTINGS["tiny"]
    summary = _summary(metrics)
    main = metrics["main_width"]
    key = ("fixed", "nag", main, 4)
    assert R.flat(summary, key), summary[key]["flat"]
    summary[key] = dict(summary[key], flat=[0.0, 2 * R.FLAT_TOL])  # one seed still improving
    assert not R.flat(summary, key)
    values = R._claim_values(summary, cfg, main)
    claims = {c["id"]: c for c in R._claims(values, summary, cfg, "tiny", main)}
    for cid in ("R2", "G1"):
        assert claims[cid]["depths_used"] == [] and claims[cid]["depths_not_flat"] == [4]
        assert claims[cid]["value"] is None and claims[cid]["verdict"] == "not testable here"


def test_claim_logic_flips_on_a_false_result(tiny_run):
    """Swapping GD and NAG (a world where the faster layer fits worse) turns R2 into 'does not hold'."""
    _, metrics = tiny_run
    cfg = R.SETTINGS["tiny"]
    summary = _summary(metrics)
    values = R._claim_values(summary, cfg, metrics["main_width"])
    claims = {c["id"]: c for c in R._claims(values, summary, cfg, "tiny", metrics["main_width"])}
    stored = {c["id"]: c for c in metrics["claims"]}
    for cid in claims:
        if stored[cid]["value"] is None:  # no flat depth in tiny: rebuilt the same way
            assert claims[cid]["value"] is None and claims[cid]["verdict"] == stored[cid]["verdict"]
        else:
            assert claims[cid]["value"] == pytest.approx(stored[cid]["value"], rel=1e-9, abs=1e-12)
    swap = {"gd": "nag", "nag": "gd"}
    swapped = {(arm, swap.get(a, a) if arm == "fixed" else a, w, k): d for (arm, a, w, k), d in summary.items()}
    values = R._claim_values(swapped, cfg, metrics["main_width"])
    flipped = {c["id"]: c for c in R._claims(values, swapped, cfg, "tiny", metrics["main_width"])}
    assert claims["R2"]["value"] < -0.05
    assert flipped["R2"]["value"] > 0 and flipped["R2"]["verdict"] == DOES_NOT_HOLD


def _small_grid(pool, train_idx_seed):
    cfg = dict(epochs=8)
    rows = [(("fixed", a, 0, 3, r), a, 3, r, c, 1.0, r) for a in ("gd", "nag") for r in range(2) for c in range(2)]
    configs = [("adam", 1e-2), ("sgd", 1e-3)]
    return R._train_grid(R._hybrid, rows, configs, pool, train_idx_seed, cfg, 0, width=0)


def test_selection_never_sees_test_data():
    """Poison every non-training sample of the pool: the selection and the kept models are unchanged."""
    teacher = R.make_teacher(0)
    x, y = R.make_data(teacher, 400, seed=1)
    pool = R.Split(teacher, x, y)
    tr = [torch.randperm(400, generator=torch.Generator().manual_seed(r))[:R.N_TRAIN] for r in range(2)]
    _, trained, chosen, _, _ = _small_grid(pool, tr)
    poisoned = R.Split(teacher, x, y)
    test = torch.ones(400, dtype=torch.bool)
    test[torch.cat(tr)] = False
    g = torch.Generator().manual_seed(9)
    poisoned.target[test] = 100 * torch.randn(int(test.sum()), R.DIM, generator=g, dtype=torch.float64)
    poisoned.u[test] = torch.randn(int(test.sum()), R.DIM_IN, generator=g, dtype=torch.float64)
    _, trained_p, chosen_p, _, _ = _small_grid(poisoned, tr)
    assert chosen == chosen_p
    assert torch.equal(trained["best_loss"], trained_p["best_loss"])


def test_kept_parameters_match_the_kept_loss():
    """The off-by-one fix: the stored parameters are those the kept training loss was measured with."""
    teacher = R.make_teacher(0)
    x, y = R.make_data(teacher, 300, seed=2)
    pool = R.Split(teacher, x, y)
    tr = [torch.randperm(300, generator=torch.Generator().manual_seed(r))[:R.N_TRAIN] for r in range(2)]
    model, trained, _, ev, _ = _small_grid(pool, tr)
    assert torch.allclose(ev["train_raw"], trained["best_loss"], rtol=0, atol=1e-12)
    curve = trained["curve"]
    assert torch.equal(curve[trained["best_epoch"], torch.arange(curve.shape[1])], trained["best_loss"])
    assert torch.equal(trained["best_loss"], curve.min(0).values)


def test_row_optimiser_equals_torch_optim():
    """Each row of the batched optimiser follows torch.optim's own SGD / Adam trajectory (float64)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, generator=g, dtype=torch.float64)
    init = torch.randn(3, 4, generator=g, dtype=torch.float64)
    configs = [("adam", 1e-2), ("sgd", 5e-2), ("adam", 1e-3)]
    p = init.clone().requires_grad_(True)
    opt = R.RowOptimiser([p], adam=[c[0] == "adam" for c in configs], lr=[c[1] for c in configs],
                         weight_decay=[1e-2])
    for _ in range(25):
        opt.zero_grad()
        ((p - target) ** 4).sum().backward()
        opt.step()
    for m, (name, lr) in enumerate(configs):
        q = init[m].clone().requires_grad_(True)
        ref = (torch.optim.Adam if name == "adam" else torch.optim.SGD)([q], lr=lr, weight_decay=1e-2)
        for _ in range(25):
            ref.zero_grad()
            ((q - target[m]) ** 4).sum().backward()
            ref.step()
        assert torch.allclose(p[m], q, rtol=0, atol=1e-13)


def test_batched_residual_equals_theory_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    lam = (0.1 + 0.9 * torch.rand(4, 3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    s = torch.tensor([1.0, 0.7, 1.3, 0.5], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.0, 0.5, 0.0, 0.3], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([3, 1, 7, 12])
    assert torch.autograd.gradcheck(lambda a, b, c: R.residuals(a, b, c, k), (lam, s, beta))
    r = R.residuals(lam, s, beta, k).detach()
    for m in range(4):
        algo = "nag" if beta[m] > 0 else "gd"
        ref = theory.residual(algo, lam[m].detach(), int(k[m]), s=float(s[m].detach()),
                              beta=float(beta[m].detach()) if algo == "nag" else None)
        assert torch.allclose(r[m], ref, atol=1e-14)


def test_gd_power_equals_the_recursion_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    lam = (0.1 + 0.9 * torch.rand(4, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    s = torch.tensor([1.0, 0.7, 2.5, 0.0], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([3, 1, 12, 30])
    assert torch.autograd.gradcheck(lambda a, b: R.gd_residuals(a, b, k), (lam, s))
    ref = R.residuals(lam, s, torch.zeros(4, dtype=torch.float64), k)
    assert torch.allclose(R.gd_residuals(lam, s, k), ref, rtol=1e-13, atol=1e-15)
    a = 1 - s.detach().view(-1, 1) * lam.detach()
    assert torch.allclose(R.gd_residuals(lam, s, k), a ** k.view(-1, 1).double(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["mlp_rnn", "gradient_rnn"])
def test_batched_baselines_equal_the_library_cells(kind):
    """Rows of different depth (the finished ones leave the batch) equal MLPRNN / GradientRNN on the full Q."""
    teacher = R.make_teacher(0)
    x, y = R.make_data(teacher, 200, seed=4)
    pool = R.Split(teacher, x, y)
    idx = torch.stack([torch.randperm(200, generator=torch.Generator().manual_seed(r))[:R.N_TRAIN]
                       for r in range(5)])
    model = R.Baseline(16, [3, 1, 7, 3, 12], list(range(5)), kind=kind)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert R._library_check(model, pool, idx, range(5)) < 1e-12
    with pytest.raises(ValueError, match="kind"):
        R.Baseline(16, [1], [0], kind="lstm")


def test_widths_share_one_padded_model_exactly():
    """Rows of widths 16 and 32 in one model: each row is its own width's network (library layers on the unpadded
    energy agree), and training keeps the padding units exactly zero."""
    teacher = R.make_teacher(0)
    x, y = R.make_data(teacher, 300, seed=6)
    pool = R.Split(teacher, x, y)
    tr = [torch.randperm(300, generator=torch.Generator().manual_seed(r))[:R.N_TRAIN] for r in range(2)]
    rows = [(("fixed", a, w, 3, r), a, 3, r, 0, 1.0, r) for w in (16, 32) for a in ("gd", "nag") for r in range(2)]
    model, trained, _, _, idx = R._train_grid(R._hybrid, rows, [("adam", 1e-2)], pool, tr, dict(epochs=5), 0)
    assert model.students.widths == [16] * 4 + [32] * 4
    w_in, w_out = model.students.weights
    b_in = model.students.biases[0]
    assert torch.all(w_in[:4, 16:] == 0) and torch.all(b_in[:4, 16:] == 0) and torch.all(w_out[:4, :, 16:] == 0)
    assert torch.any(w_in[:4, :16] != 0) and torch.any(w_in[4:, 16:] != 0)
    assert R._library_check(model, pool, idx, range(8)) < 1e-12
    with pytest.raises(ValueError, match="width"):
        R.Students([0, 16], [0, 1])


def test_teacher_has_nonzero_biases_and_data_are_deterministic():
    t = R.make_teacher(0)
    assert float(t.net[0].bias.abs().min()) > 0
    assert np.ptp(t.net[2].bias.numpy()) == pytest.approx(1.0)
    (u1, R1, b1), y1 = R.make_data(t, 20, seed=3)
    (u2, R2, b2), y2 = R.make_data(t, 20, seed=3)
    assert torch.equal(u1, u2) and torch.equal(y1, y2)
    Q = t.bind((u1, R1, b1)).Q
    assert torch.allclose(torch.einsum("nij,nj->ni", Q, y1), b1, atol=1e-10)


def test_bad_seed_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="seed"):
        R.run(out=tmp_path, tiny=True, seed=1.5)
