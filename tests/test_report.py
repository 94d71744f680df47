"""REPORT.md: every experiment's table and figures (links that resolve), failures, and the benchmark table."""
import json

from iterlayers.report import build_report, linked_figures, write_report

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
TABLE = "# Title\n\ntext\n\n## Paper's claims vs ours\n\n| claim (paper) | ours | holds |\n|---|---|---|\n| c | 1 | yes |\n"


def _experiment(root, name, status="ok", figures=("a.png",), error=None):
    d = root / name
    d.mkdir(parents=True)
    if status == "ok":
        (d / "table.md").write_text(TABLE.replace("c |", f"claim of {name} |"))
        for f in figures:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_bytes(PNG)
    (d / "run.json").write_text(json.dumps({"name": name, "status": status, "seconds": 1.5, "quick": True,
                                            "tiny": False, "error": error}))


def test_report_links_every_figure_and_nests_tables(tmp_path):
    root = tmp_path / "results"
    _experiment(root, "core", figures=("residuals.png", "sub/deep.png"))
    _experiment(root, "frames", figures=("dfp.png",))
    _experiment(root, "reasoning", status="failed", error="ValueError: bad")
    (root / "bench").mkdir()
    (root / "bench" / "table.md").write_text("| case | ratio |\n|---|---|\n| mlp | 0.5 |\n")
    path = write_report(root, repo_root=tmp_path)
    text = path.read_text()

    figs = linked_figures(path)
    assert sorted(p.relative_to(root).as_posix() for p in figs) == ["core/residuals.png", "core/sub/deep.png",
                                                                    "frames/dfp.png"]
    assert all(p.is_file() for p in figs)
    # The experiments' "##" sections sit one level below each experiment's own "##" heading.
    assert text.count("### Paper's claims vs ours") == 2 and "\n## Paper's claims" not in text
    assert "| claim of core | 1 | yes |" in text and "| claim of frames | 1 | yes |" in text
    assert "**failed**: ValueError: bad" in text
    assert "| [reasoning](#reasoning) | failed | quick | 1.5 |" in text
    assert "| mlp | 0.5 |" in text
    # Order follows the experiment registry: core before reasoning before frames.
    assert text.index("## core") < text.index("## reasoning") < text.index("## frames")
    assert "## implicit_linear" not in text  # never run, not reported


def test_benchmark_table_falls_back_to_the_committed_results(tmp_path):
    root = tmp_path / "results"
    _experiment(root, "core")
    assert "No benchmark table yet" in build_report(root, repo_root=tmp_path)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("# Bench\n\n| committed | 1 |\n")
    text = build_report(root, repo_root=tmp_path)
    assert "From `benchmarks/RESULTS.md`" in text and "| committed | 1 |" in text and "## Bench" in text


def test_links_inside_an_experiment_table_are_rebased_and_not_duplicated(tmp_path):
    root = tmp_path / "results"
    _experiment(root, "frames", figures=("dfp.png", "other.png"))
    table = root / "frames" / "table.md"
    table.write_text(table.read_text() + "\n![DFP](dfp.png)\n[paper](https://arxiv.org/abs/2103.05804) [up](#core)\n")
    path = write_report(root, repo_root=tmp_path)
    text = path.read_text()
    assert "![DFP](frames/dfp.png)" in text and "(https://arxiv.org/abs/2103.05804)" in text and "(#core)" in text
    assert text.count("frames/dfp.png") == 1 and text.count("frames/other.png") == 1
    assert all(p.is_file() for p in linked_figures(path))
    # The table's own "# Title" is the section heading; its "##" sections sit one level below.
    assert "## frames: Title" in text and "### Paper's claims vs ours" in text
