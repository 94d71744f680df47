"""Assemble ``REPORT.md`` from what the experiments wrote.

For every experiment (in :data:`iterlayers.experiments.ORDER`) whose directory ``<root>/<name>/`` exists: its
status and time (``run.json``), its ``table.md`` (which holds the "Paper's claims vs ours" table) with headings
moved one level down, and every PNG figure under it, linked by a path relative to the report so the report
renders on GitHub and in any Markdown viewer. Then the peer benchmark table: ``<root>/bench/table.md`` if a
benchmark was run, else the committed ``benchmarks/RESULTS.md`` of the source checkout.
"""
from __future__ import annotations

import json
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["write_report", "build_report", "linked_figures"]

_HEADING = re.compile(r"^(#{1,5})(\s)", flags=re.MULTILINE)


def _demote(markdown: str) -> str:
    """Push every heading one level down so an experiment's ``#``/``##`` nest under its own section."""
    return _HEADING.sub(lambda m: "#" + m.group(1) + m.group(2), markdown)


_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def _rebase_links(markdown: str, prefix: str) -> str:
    """Make the relative links of an experiment's table.md relative to the report (prefix ``<name>/``)."""

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target, flags=re.IGNORECASE):
            return m.group(0)  # URL, absolute path or in-page anchor
        return f"{m.group(1)}{prefix}/{target}{m.group(3)}"

    return _LINK.sub(fix, markdown)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _bench_table(root: Path, repo_root: Path | None) -> tuple[str, str] | None:
    candidates = [root / "bench" / "table.md"]
    if repo_root is not None:
        candidates.append(repo_root / "benchmarks" / "RESULTS.md")
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8").strip(), str(path)
    return None


def build_report(root: str | Path, *, repo_root: str | Path | None = None) -> str:
    """The Markdown text of the report for the experiment outputs under ``root``."""
    from iterlayers.experiments import ORDER, TITLES

    root = Path(root)
    repo_root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[2]
    lines = [
        "# iterlayers: results report",
        "",
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()} "
        f"({platform.system()}), Python {platform.python_version()}. Reproduce with `make run` "
        "(`iterlayers reproduce all --quick --out results`, under 10 minutes on 2 CPU cores) or `make full` "
        "(`--full`, the paper-scale settings); `iterlayers reproduce NAME` runs one experiment.",
        "",
        "| experiment | status | settings | time (s) |",
        "|---|---|---|---:|",
    ]
    present = [n for n in ORDER if (root / n).is_dir()]
    for name in present:
        run = _read_json(root / name / "run.json") or {}
        status = run.get("status", "ok" if (root / name / "table.md").exists() else "unknown")
        settings = "tiny" if run.get("tiny") else ("quick" if run.get("quick", True) else "full")
        seconds = run.get("seconds")
        lines.append(f"| [{name}](#{name}) | {status} | {settings} | {seconds:.1f} |" if seconds is not None
                     else f"| [{name}](#{name}) | {status} | {settings} | |")
    if not present:
        lines.append("| (none run) | | | |")
    else:
        total = sum((_read_json(root / n / "run.json") or {}).get("seconds") or 0.0 for n in present)
        lines.append(f"| total | | | {total:.1f} |")
    lines.append("")

    for name in present:
        d = root / name
        run = _read_json(d / "run.json") or {}
        table = d / "table.md"
        body = _rebase_links(table.read_text(encoding="utf-8").strip(), name) if table.is_file() else ""
        title = f"{name}: {TITLES.get(name, name)}"
        if body.startswith("# "):  # the experiment's own title becomes the section heading
            first, _, body = body.partition("\n")
            title = f"{name}: {first[2:].strip()}"
            body = body.strip()
        lines += [f'<a id="{name}"></a>', f"## {title}", ""]
        if run.get("status") in ("failed", "missing"):
            lines += [f"**{run['status']}**: {run.get('error', '')}", ""]
        if body:
            lines += [_demote(body), ""]
        elif run.get("status") == "ok":
            lines += ["(the experiment wrote no table.md)", ""]
        already = {m.group(2) for m in _LINK.finditer(body)}
        for fig in sorted(d.rglob("*.png")):
            rel = fig.relative_to(root).as_posix()
            if rel not in already:
                lines += [f"![{name}: {fig.stem}]({rel})", ""]

    lines += ["## Benchmark against torchdeq", ""]
    bench = _bench_table(root, repo_root)
    if bench is None:
        lines += ["No benchmark table yet: run `make bench` (or `iterlayers bench --out results/bench`).", ""]
    else:
        text, source = bench
        lines += [f"From `{Path(source).relative_to(repo_root) if Path(source).is_relative_to(repo_root) else source}`:",
                  "", _demote(text), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(root: str | Path, *, repo_root: str | Path | None = None) -> Path:
    """Write ``<root>/REPORT.md`` (see :func:`build_report`) and return its path."""
    from iterlayers.checkpoint import atomic_write_text

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "REPORT.md"
    atomic_write_text(path, build_report(root, repo_root=repo_root))
    return path


def linked_figures(report: str | Path) -> list[Path]:
    """The image paths a Markdown report links, resolved against its directory."""
    report = Path(report)
    text = report.read_text(encoding="utf-8")
    return [report.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)]
