"""The import graph of msld_sdk/ and export/msld_export/, read with ``ast`` (no module is run).

* no cycle between modules: every import counts, at any level (inside functions too), relative
  ones resolved; ``from P import name`` is an edge to module ``P.name`` when that is a module,
  else to ``P`` (a package's compiled submodule, e.g. ``_native``, is no edge);
* nothing under msld_sdk/ imports torch or msld_export: the runtime never needs them (the
  torch-side commands load msld_export by name, after ``require_export_extra``);
* outside segmenter.py, no module of msld_sdk/ reaches into a Segmenter's private attributes
  (``seg._x``, ``segmenter._x``, ``self.seg._x`` ...): callers use its public methods.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = {"msld_sdk": ROOT / "msld_sdk", "msld_export": ROOT / "export" / "msld_export"}
SEGMENTER_NAMES = {"seg", "segmenter", "seg_o", "sdk"}   # how the code names Segmenter objects


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, root in PACKAGES.items():
        for f in sorted(root.rglob("*.py")):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _owning_module(name: str) -> str | None:
    """``name`` if it is one of our modules, else its longest prefix that is."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _imports(mod: str) -> set[str]:
    """Every module name ``mod`` imports (ours resolved to modules, others as written)."""
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    here = mod if _is_package(mod) else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:
                    out.add(sub)
                elif target in MODULES and _is_package(target) and a.name not in _defined_names(target):
                    pass   # a compiled submodule (e.g. _native); only its package, already loaded
                else:
                    out.add(target)
    return out


def _defined_names(mod: str) -> set[str]:
    """Names a module binds at its top level (assignments, defs, classes, imports)."""
    names = set()
    for node in ast.parse(MODULES[mod].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _graph() -> dict[str, set[str]]:
    g = {}
    for mod in MODULES:
        g[mod] = {t for t in (_owning_module(n) for n in _imports(mod)) if t is not None and t != mod}
    return g


def _find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(g, WHITE)
    stack: list[str] = []

    def visit(u):
        colour[u] = GREY
        stack.append(u)
        for v in sorted(g[u]):
            if colour[v] == GREY:
                return stack[stack.index(v):] + [v]
            if colour[v] == WHITE:
                c = visit(v)
                if c:
                    return c
        stack.pop()
        colour[u] = BLACK
        return None

    for u in sorted(g):
        if colour[u] == WHITE:
            c = visit(u)
            if c:
                return c
    return None


def test_the_graph_is_read():
    g = _graph()
    assert len(MODULES) > 40
    assert "msld_sdk.segmenter" in g["msld_sdk"] and "msld_sdk.errors" in g["msld_sdk.segmenter"]
    assert "msld_sdk.clinical.volume" in g["msld_sdk.roi"] or "msld_sdk.roi" in g["msld_sdk.clinical.volume"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_runtime_never_imports_torch_or_msld_export():
    bad = {mod: sorted(n for n in _imports(mod) if n.split(".")[0] in ("torch", "msld_export"))
           for mod in MODULES if mod.split(".")[0] == "msld_sdk"}
    bad = {mod: names for mod, names in bad.items() if names}
    assert not bad, f"msld_sdk modules importing torch or msld_export: {bad}"


def _private_segmenter_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and v.id in SEGMENTER_NAMES:
                found.append(f"line {node.lineno}: {v.id}.{node.attr}")
            elif isinstance(v, ast.Attribute) and v.attr in SEGMENTER_NAMES:
                found.append(f"line {node.lineno}: ….{v.attr}.{node.attr}")
    return sorted(found)


def test_no_private_segmenter_access_outside_segmenter():
    assert _private_segmenter_uses(ast.parse("seg._model_input(x); self.segmenter._alphas; seg.run(x)")) == \
        ["line 1: seg._model_input", "line 1: ….segmenter._alphas"]
    bad = {}
    for mod, f in MODULES.items():
        if mod.startswith("msld_sdk") and mod != "msld_sdk.segmenter":
            uses = _private_segmenter_uses(ast.parse(f.read_text(), str(f)))
            if uses:
                bad[mod] = uses
    assert not bad, f"private Segmenter attributes used outside segmenter.py: {bad}"
