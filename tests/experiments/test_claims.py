"""The claims mechanism itself can fail: verdicts flip on false results, controls and seeds gate them."""
import json
import math

import numpy as np
import pytest

from iterlayers.experiments import claims as C

TH = C.Threshold(">=", 0.0, "effect >= 0")
GOOD_CONTROL = {"description": "property removed", "value": -1.0, "interval": [-1.2, -0.8]}


def _claim(value, interval, control=GOOD_CONTROL, **kw):
    args = dict(id="x", statement="s", source="ours", statistic="effect", threshold=TH, value=value,
                interval=interval, n_seeds=5, control=control, mode="quick", comparison=True)
    args.update(kw)
    return C.make_claim(**args)


def test_verdict_follows_value_and_interval():
    assert C.verdict(1.0, [0.5, 1.5], TH) == C.HOLDS
    assert C.verdict(1.0, [-0.5, 1.5], TH) == C.PARTLY
    assert C.verdict(-1.0, [-1.5, 0.5], TH) == C.DOES_NOT_HOLD
    assert C.verdict(-1.0, [-1.5, -0.5], TH) == C.DOES_NOT_HOLD
    assert C.verdict(float("nan"), None, TH) == C.NOT_TESTABLE
    assert C.verdict(1.0, [2.0, 0.5], TH) == C.NOT_TESTABLE  # malformed interval
    # The boundary belongs to the side the operator says.
    assert C.verdict(0.0, [0.0, 0.0], TH) == C.HOLDS
    assert C.verdict(0.0, [0.0, 0.0], C.Threshold(">", 0.0)) == C.DOES_NOT_HOLD
    assert C.verdict(0.5, [0.1, 0.9], C.Threshold("<=", 0.95)) == C.HOLDS
    assert C.verdict(0.5, [0.1, 0.99], C.Threshold("<", 0.95)) == C.PARTLY


def test_a_false_synthetic_result_flips_the_claim():
    rng = np.random.default_rng(0)
    true_effect = rng.normal(0.5, 0.05, size=10)
    false_effect = rng.normal(-0.5, 0.05, size=10)
    v, iv = C.seed_interval(true_effect)
    assert _claim(v, iv)["verdict"] == C.HOLDS
    v, iv = C.seed_interval(false_effect)
    assert _claim(v, iv)["verdict"] == C.DOES_NOT_HOLD


def test_control_that_does_not_fail_makes_the_claim_untestable():
    c = _claim(1.0, [0.5, 1.5], control={"description": "no-op control", "value": 2.0})
    assert c["control"]["verdict"] == C.HOLDS and c["verdict"] == C.NOT_TESTABLE
    assert "negative control" in c["note"]
    with pytest.raises(ValueError):
        _claim(1.0, [0.5, 1.5], control={"value": -1.0})


def test_seed_and_baseline_rules():
    assert _claim(1.0, [0.5, 1.5], n_seeds=2)["verdict"] == C.NOT_TESTABLE  # quick comparison needs 3
    assert _claim(1.0, [0.5, 1.5], n_seeds=9, mode="full")["verdict"] == C.NOT_TESTABLE
    assert _claim(1.0, [0.5, 1.5], n_seeds=10, mode="full")["verdict"] == C.HOLDS
    assert _claim(1.0, [0.5, 1.5], n_seeds=1, comparison=False)["verdict"] == C.HOLDS
    assert _claim(1.0, [0.5, 1.5], baseline_trained=False)["verdict"] == C.NOT_TESTABLE
    assert C.recompute_verdict(_claim(1.0, [0.5, 1.5], n_seeds=2), "quick") == C.NOT_TESTABLE


def test_intervals():
    m, iv = C.seed_interval([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.303; sd = 1; half width 4.303 / sqrt(3)
    assert m == 2.0 and iv[1] - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert C.seed_interval([4.0]) == (4.0, [4.0, 4.0])
    x = np.arange(30.0)
    r, iv = C.spearman(x, x ** 3)
    assert r == pytest.approx(1.0) and iv[0] == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    r, iv = C.spearman(rng.normal(size=200), rng.normal(size=200))
    assert iv[0] < 0 < iv[1]
    # The partial correlation removes a shared driver: x and y both follow z, nothing else.
    z = rng.normal(size=300)
    x, y = z + 0.1 * rng.normal(size=300), z + 0.1 * rng.normal(size=300)
    assert C.spearman(x, y)[0] > 0.9
    pr, piv = C.partial_spearman(x, y, z)
    assert abs(pr) < 0.2 and piv[0] < 0.2


def test_write_metrics_records_mode_and_refuses_duplicates(tmp_path):
    claim = _claim(1.0, [0.5, 1.5])
    sc = C.sanity_check(id="s", statement="closed form equals itself", value=0.0, passed=True)
    path = C.write_metrics(tmp_path, {"a": np.float64(1.5)}, settings={"epochs": 2}, mode="quick", claims=[claim],
                           sanity_checks=[sc])
    body = json.loads(path.read_text())
    assert body["settings"] == {"epochs": 2, "mode": "quick"} and body["a"] == 1.5
    assert body["claims"][0]["verdict"] == C.HOLDS and body["sanity_checks"][0]["passed"] is True
    md = C.claims_markdown(body)
    assert "**holds**" in md and "property removed" in md
    with pytest.raises(ValueError, match="duplicate"):
        C.write_metrics(tmp_path, {}, settings={}, mode="quick", claims=[claim, claim], sanity_checks=[])
    with pytest.raises(ValueError):
        C.write_metrics(tmp_path, {}, settings={}, mode="fast", claims=[], sanity_checks=[])


def test_threshold_validation():
    with pytest.raises(ValueError):
        C.Threshold("~", 0.0)
    with pytest.raises(ValueError):
        C.Threshold(">", float("nan"))
