"""The zoo experiment in tiny mode: every zoo model trains through the loop, the metrics file is valid, the chance
levels come from the data, and the sanity checks are the pre-registered comparisons."""
import json
import math

from claims_checks import assert_claims_valid

from iterlayers.experiments import zoo


def test_zoo_tiny(tmp_path):
    res = zoo.run(out=tmp_path, quick=True, tiny=True)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert_claims_valid(metrics, min_claims=0)
    assert set(metrics["models"]) == set(zoo.RUNS)
    checks = {c["id"]: c for c in res["sanity_checks"]}
    for name, r in metrics["models"].items():
        assert 0 < r["chance"] and math.isfinite(r["value"])
        c = checks[f"zoo_{name}_trained"]
        want = (r["value"] <= zoo.PPL_FRACTION * r["chance"]) if r["metric"] == "perplexity" else \
            (r["value"] >= r["chance"] + zoo.MARGIN_ACC)
        assert c["passed"] == want  # the check is the comparison it states, in both directions
        assert checks[f"zoo_{name}_solves"]["passed"] == (r["fwd_converged"] >= 0.99 and r["bwd_iters"] > 0)
    # the character model's chance level is a perplexity above 1 and below the vocabulary size
    lm = metrics["models"]["deq_transformer"]
    assert 1 < lm["chance"] < 98
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in zoo.RUNS) and "zoo_mdeq_trained" in table
