"""Every Python block of README.md and docs/*.md runs as written.

Each page's blocks run in order in one namespace, the way a reader copies them
into one script (``mktestdocs`` finds the blocks, as its ``check_md_file(...,
memory=True)`` does); every page that has Python blocks must print what it
shows. A block that is only a snippet include (``--8<-- "path"``, rendered by
pymdownx.snippets) must name a script that tests/test_examples_distributed.py
runs (under ``torchrun`` for PyTorch, so not in this process).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

mktestdocs = pytest.importorskip("mktestdocs")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r'--8<-- "([^"]+)"')
FRAMEWORKS = ("torch", "jax", "flax", "tensorflow", "keras")


def _blocks(page: Path) -> list[str]:
    return mktestdocs.grab_code_blocks(page.read_text(encoding="utf-8"), lang="python")


def test_pages_have_python_blocks():
    assert sum(len(_blocks(p)) for p in PAGES) >= 22


@pytest.mark.skipif(
    any(importlib.util.find_spec(f) is None for f in FRAMEWORKS),
    reason="the docs use every framework (tests(backend='all'))",
)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
@pytest.mark.filterwarnings("error:The given NumPy array is not writable")
def test_page_runs_as_one_script(page, capsys, isolated_registry, monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = _blocks(page)
    if not blocks:
        pytest.skip("no Python block")
    namespace: dict[str, object] = {"__name__": "__main__"}
    ran = 0
    for index, block in enumerate(blocks):
        include = SNIPPET.fullmatch(block.strip())
        if include:
            path = ROOT / include[1]
            assert path.is_file(), f"{page.name} includes a missing file {include[1]}"
            runner = (ROOT / "tests" / "test_examples_distributed.py").read_text()
            assert path.name in runner, f"{include[1]} is not run by any test"
            continue
        code = compile(block, f"{page.relative_to(ROOT)} (Python block {index + 1})", "exec")
        exec(code, namespace)
        ran += 1
    if ran:
        assert capsys.readouterr().out.strip(), f"{page.name}: the blocks print nothing"
