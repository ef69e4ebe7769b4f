"""The package's shape: layers that import only downwards, no import cycle, no private names used across
modules, no module too long to read. Built from the source with ``ast`` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "neuromoe"
MAX_LINES = 750

# Lower layers never import upper ones. The core modules sit under everything; the command line on top.
LAYERS = ["core", "inputs", "preproc", "cache", "learn", "results", "cli"]
CORE = {"neuromoe", "neuromoe.errors", "neuromoe.paths", "neuromoe.config", "neuromoe.smk", "neuromoe.worker"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(mod: str) -> str:
    if mod in CORE:
        return "core"
    if mod in ("neuromoe.cli", "neuromoe.app"):  # the command lines: the BIDS App runs the whole workflow
        return "cli"
    return mod.split(".")[1]


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module an imported dotted name lives in (``neuromoe.learn.model.NeuroMoE`` -> its module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(mod: str, path: Path, known: dict[str, Path]) -> dict[str, set[str]]:
    """{imported module: names taken from it} for every neuromoe import, module-level or local."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("neuromoe") and (t := _resolve(a.name, known)):
                    out.setdefault(t, set())
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuromoe"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:  # `from neuromoe.preproc import qc`: the module itself
                    out.setdefault(sub, set())
                elif t := _resolve(node.module, known):
                    out.setdefault(t, set()).add(a.name)
    out.pop(mod, None)
    return out


def graph() -> dict[str, dict[str, set[str]]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_layers_import_only_downwards() -> None:
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if dep == "neuromoe" or mod.startswith(dep + "."):  # a package's own __init__
                continue
            if LAYERS.index(layer(dep)) > LAYERS.index(layer(mod)):
                bad.append(f"{mod} ({layer(mod)}) imports {dep} ({layer(dep)})")
    assert not bad, "upward imports (order: " + " < ".join(LAYERS) + "):\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    g = {m: set(d) for m, d in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def private_uses(path: Path, known: dict[str, Path], own: str) -> list[str]:
    """``from X import _name`` and ``X._name`` where X is another neuromoe module."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuromoe"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:
                    aliases[a.asname or a.name] = sub
                elif a.name.startswith("_") and not a.name.startswith("__") and node.module != own:
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != own):
            found.append(f"line {node.lineno}: {node.value.id}._{node.attr[1:]} ({aliases[node.value.id]})")
    return found


def test_no_private_name_used_across_modules() -> None:
    known = modules()
    files = dict(known)
    files.update({module_name(p): p for p in sorted((REPO / "studies").rglob("*.py"))})
    bad = {m: u for m, p in files.items() if (u := private_uses(p, known, m))}
    assert not bad, "private names used across modules (make them public or move the code):\n" + "\n".join(
        f"{m}: {u}" for m, us in bad.items() for u in us)


def test_no_module_too_long_to_read() -> None:
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split by concept): {long}"


def test_every_subpackage_says_what_it_owns() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(REPO)}: a docstring saying what the package owns"


def test_the_checker_sees_a_cycle_and_a_private_use(tmp_path: Path) -> None:
    """The checks above can fail: a planted private import is reported."""
    (tmp_path / "m.py").write_text("from neuromoe.paths import _M\nimport neuromoe.learn.train as T\nT._x\n")
    found = private_uses(tmp_path / "m.py", modules(), "x")
    assert len(found) == 2, found


def test_architecture_doc_names_every_module() -> None:
    """docs/architecture.md is the map of the package: a module it does not name is a module nobody finds."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.relative_to(PACKAGE)}`" not in doc]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_the_end_to_end_modules_are_listed_for_the_test_workers():
    """conftest.E2E_MODULES keeps every module that uses the end-to-end run on one pytest-xdist worker; a module
    missing there would make that run (minutes) a second time on the other worker."""
    from conftest import E2E_MODULES

    using = {p.name for p in (REPO / "tests").glob("test_*.py")
             if p.name != Path(__file__).name and "workflow_run" in p.read_text()}
    assert using == set(E2E_MODULES)
