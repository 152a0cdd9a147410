"""The docs a newcomer walks: a short README, links that lead somewhere, short module docstrings.

Figures and decisions live in docs/, MODEL_CARD.md and benchmarks/README.md; a module's
docstring says what the module is for in at most 15 lines (CONTRIBUTING.md)."""
from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import io
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


def _newcomer_pages():
    """The pages a newcomer walks and this repository's docs changes keep current."""
    return [ROOT / n for n in ("README.md", "CONTRIBUTING.md")] + sorted((ROOT / "docs").glob("*.md"))


def _links(md: Path):
    text = CODE.sub("", md.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):   # http(s), mailto, ...
            yield target


def _relative_links(md: Path):
    for target in _links(md):
        if not target.startswith("#"):   # anchors in the same page: test_anchors_exist
            yield target.split("#", 1)[0]


def _anchors(md: Path) -> set:
    """The heading anchors GitHub gives a page: lower case, punctuation dropped, spaces -> '-',
    repeats numbered -1, -2, ..."""
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.*?)[ \t#]*$", text, re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move sections to docs/ (limit {MAX_README_LINES})"


def test_docs_index_exists():
    assert (ROOT / "docs" / "README.md").is_file()


@pytest.mark.parametrize("md", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(md):
    missing = [t for t in _relative_links(md) if not (md.parent / t).exists()]
    assert not missing, f"{md.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("md", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_anchors_exist(md):
    """A link's #anchor names a heading of the page it points to."""
    missing = []
    for target in _links(md):
        path, _, anchor = target.partition("#")
        page = (md.parent / path) if path else md
        if anchor and page.suffix == ".md" and page.is_file() and anchor not in _anchors(page):
            missing.append(target)
    assert not missing, f"{md.relative_to(ROOT)} links to headings that do not exist: {missing}"


def test_docs_index_lists_every_page_once():
    """docs/README.md's table names every page of docs/ exactly once, each with a description."""
    rows = [line for line in (ROOT / "docs" / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| [")]
    listed = [re.match(r"\| \[[^\]]*\]\(([^)#]+)\)", row).group(1) for row in rows]
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert sorted(set(listed)) == sorted(listed), f"pages listed twice in docs/README.md: {listed}"
    assert not set(pages) - set(listed), f"docs/README.md's table lacks {sorted(set(pages) - set(listed))}"
    assert not set(listed) - set(pages), f"docs/README.md's table lists missing pages {sorted(set(listed) - set(pages))}"
    empty = [row for row in rows if not row.rstrip(" |").split("|")[-1].strip()]
    assert not empty, f"rows without a description: {empty}"


def _current_text(md: Path) -> str:
    """A page's text without the first column of an `| old | new |` table (old names on purpose)."""
    out, old_table = [], False
    for line in md.read_text(encoding="utf-8").splitlines():
        if re.match(r"\|\s*old\s*\|\s*new\s*\|", line):
            old_table = True
        elif not line.startswith("|"):
            old_table = False
        elif old_table:
            line = "|" + line.split("|", 2)[2]
        out.append(line)
    return "\n".join(out)


REPO_PATH = re.compile(r"(?<![\w./$-])((?:msld_sdk|export|scripts|benchmarks|tests|csrc|docs)/[^\s`'\")\]|#]*)")


@pytest.mark.parametrize("md", _newcomer_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_exist(md):
    """Every repository path a page names (`msld_sdk/...`, `export/...`, `scripts/...`, ...) exists;
    a glob matches something; `{a,b}` alternatives each exist; `<placeholders>` are skipped."""
    def expand(p):
        m = re.search(r"\{([^}]*)\}", p)
        return [p] if not m else [x for alt in m.group(1).split(",") for x in expand(p[:m.start()] + alt + p[m.end():])]
    missing = []
    for path in REPO_PATH.findall(_current_text(md)):
        path = path.rstrip(".,;:")
        if "<" in path or "..." in path:
            continue
        missing += [p for p in expand(path) if not glob.glob(str(ROOT / p))]
    assert not missing, f"{md.relative_to(ROOT)} names paths that do not exist: {sorted(set(missing))}"


BUILT_MODULES = {"msld_sdk._native"}   # the extension built from csrc/


def _resolves(dotted: str) -> bool:
    """msld_sdk.a.b[.name...] / msld_export....: a module or package, or a name in one."""
    parts = dotted.split(".")
    here = (ROOT / "export" if parts[0] == "msld_export" else ROOT) / parts[0]
    for part in parts[1:]:
        if (here / part).is_dir():
            here = here / part
        elif (here / f"{part}.py").is_file():
            here = here / f"{part}.py"
        else:
            source = here / "__init__.py" if here.is_dir() else here
            return re.search(rf"\b{re.escape(part)}\b", source.read_text(encoding="utf-8")) is not None
    return True


@pytest.mark.parametrize("md", _newcomer_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_names_exist(md):
    names = set(re.findall(r"\b((?:msld_sdk|msld_export)(?:\.\w+)+)", _current_text(md))) - BUILT_MODULES
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{md.relative_to(ROOT)} names modules or objects that do not exist: {missing}"


def _cli_options() -> dict:
    from msld_sdk.cli.main import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}
    for name, module in (("export", "msld_export.plan_writing.export_plan"), ("import", "msld_export.reference.importer")):
        try:   # their parsers live on the torch side; without it their flags are not checked
            main = __import__(module, fromlist=["main"]).main
        except ImportError:
            options.pop(name)
            continue
        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
            main(["--help"])
        options[name] = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", help_text.getvalue()))
    return options


def test_cli_flags_in_the_docs_exist():
    """Every `msld COMMAND ... --flag` the docs show is an option of that command."""
    options = _cli_options()
    command = re.compile(r"\bmsld (%s)\b([^`|\n]*)" % "|".join(options))
    wrong = []
    for md in _docs():
        text = md.read_text(encoding="utf-8").replace("\\\n", " ")   # shell line continuations
        for m in command.finditer(text):
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2).split(" #")[0]):
                if flag not in options[m.group(1)]:
                    wrong.append(f"{md.relative_to(ROOT)}: msld {m.group(1)} {flag}")
    assert not wrong, f"flags the commands do not have: {wrong}"


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
