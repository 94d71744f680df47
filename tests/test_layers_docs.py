"""The code blocks of docs/cell_contract.md and docs/gradients.md run as written."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "cell_contract.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
GRADIENTS = Path(__file__).resolve().parents[1] / "docs" / "gradients.md"
GRADIENT_BLOCKS = re.findall(r"```python\n(.*?)```", GRADIENTS.read_text(), flags=re.S)


def test_the_page_has_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_cell_contract_snippet_runs(i):
    exec(compile(BLOCKS[i], f"{DOC.name}[{i}]", "exec"), {})  # noqa: S102 - our own documentation


@pytest.mark.parametrize("i", range(len(GRADIENT_BLOCKS)))
def test_gradients_snippet_runs(i):
    exec(compile(GRADIENT_BLOCKS[i], f"{GRADIENTS.name}[{i}]", "exec"), {})  # noqa: S102 - our own documentation


def test_the_gradients_page_has_snippets():
    assert len(GRADIENT_BLOCKS) >= 1
