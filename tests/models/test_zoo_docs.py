"""The code blocks of docs/models/*.md run as written."""
import re
from pathlib import Path

import pytest

PAGES = sorted((Path(__file__).resolve().parents[2] / "docs" / "models").glob("*.md"))
BLOCKS = [(p.name, i, b) for p in PAGES for i, b in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(),
                                                                            flags=re.S))]


def test_every_model_page_has_an_example():
    assert {p.name for p in PAGES} == {"mdeq.md", "ignn.md", "deq_transformer.md", "mondeq.md"}
    assert {name for name, _, _ in BLOCKS} == {p.name for p in PAGES}


@pytest.mark.parametrize("name, i, block", BLOCKS, ids=[f"{n}[{i}]" for n, i, _ in BLOCKS])
def test_model_page_example_runs(name, i, block):
    exec(compile(block, f"{name}[{i}]", "exec"), {})  # noqa: S102 - our own documentation
