"""README's results table is the rendering of the committed claims snapshot, never typed by hand."""
import json
from pathlib import Path

from iterlayers.report import README_BEGIN, README_END, claims_table, update_readme

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_block_is_rendered_from_the_claims_snapshot():
    snapshot = json.loads((ROOT / "docs" / "results_claims.json").read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert block == claims_table(snapshot).strip()
    # Every claim of the snapshot has a computed verdict and a control that failed or made it untestable.
    for c in snapshot["claims"]:
        assert c["verdict"] in ("holds", "partly", "does not hold", "not testable here")
        assert c["control"]["verdict"] == "does not hold" or c["verdict"] == "not testable here"


def test_update_readme_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nOLD-TABLE\n{README_END}\noutro\n", encoding="utf-8")
    claim = {"experiment": "core", "statement": "s", "source": "ours", "statistic": "x",
             "threshold": {"text": "x > 0"}, "value": 1.0, "interval": [0.5, 1.5], "n_seeds": 3,
             "control": {"description": "c", "value": -1.0, "verdict": "does not hold"}, "verdict": "holds"}
    assert update_readme(readme, {"claims": [claim]})
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "OLD-TABLE" not in text and "**holds**" in text
    assert not update_readme(readme, {"claims": [claim]})
