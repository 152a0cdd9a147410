"""The docs a newcomer walks: a short README, links that lead somewhere, short module docstrings.

Figures and decisions live in docs/, MODEL_CARD.md and benchmarks/README.md; a module's
docstring says what the module is for in at most 15 lines (CONTRIBUTING.md)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_README_LINES = 150
MAX_DOCSTRING_LINES = 15
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def _docs():
    return [ROOT / n for n in ("README.md", "CONTRIBUTING.md", "MODEL_CARD.md")] + sorted((ROOT / "docs").glob("*.md"))


def _relative_links(md: Path):
    text = CODE.sub("", md.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue   # http(s), mailto, ... and anchors in the same page
        yield target.split("#", 1)[0]


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move sections to docs/ (limit {MAX_README_LINES})"


def test_docs_index_exists():
    assert (ROOT / "docs" / "README.md").is_file()


@pytest.mark.parametrize("md", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(md):
    missing = [t for t in _relative_links(md) if not (md.parent / t).exists()]
    assert not missing, f"{md.relative_to(ROOT)} links to missing files: {missing}"


def _modules():
    for root in (ROOT / "msld_sdk", ROOT / "export" / "msld_export"):
        yield from sorted(root.rglob("*.py"))


def test_module_docstrings_are_short():
    long = {}
    for path in _modules():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        n = len(doc.splitlines())
        if n > MAX_DOCSTRING_LINES:
            long[str(path.relative_to(ROOT))] = n
    assert not long, (f"module docstrings over {MAX_DOCSTRING_LINES} lines (figures and details go to docs/, "
                      f"MODEL_CARD.md or benchmarks/README.md): {long}")
