"""The conda environments under envs/ hold what the rules that use them import.

Each rule's ``conda:`` env and ``script:`` are read from workflow/rules/*.smk; the imports of the script and of every
``neuromoe`` module it reaches are walked with ``ast`` (module-level and function-level imports alike, since a lazy
import still runs inside the rule; imports under ``if TYPE_CHECKING:`` and in ``try: ... except ImportError`` are
not needed at run time and are skipped; ``importlib.util.find_spec("pkg")`` counts, as the code then reads files the
package ships). Each third-party import name is mapped to its conda package and looked up
in the env file. Rules whose env is ``PREPROC_ENV`` run in envs/preproc.yaml (python backend) or envs/fsl.yaml (fsl
backend), so they are checked against both; ``neuromoe.preproc.fsl`` (the fsl backend) only against envs/fsl.yaml.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"
RULES = REPO / "workflow" / "rules"
SCRIPTS = REPO / "workflow" / "scripts"

# import name -> accepted package names (conda, or pip under `- pip:`); others: the import name in lower case
PACKAGES = {
    "SimpleITK": {"simpleitk"},
    "sklearn": {"scikit-learn"},
    "yaml": {"pyyaml"},
    "matplotlib": {"matplotlib-base", "matplotlib"},
    "mpl_toolkits": {"matplotlib-base", "matplotlib"},
    "torch": {"pytorch", "torch"},
    "fsl": {"fslpy"},
    "PIL": {"pillow"},
    "skimage": {"scikit-image"},
}
# Modules of one backend only: checked against that backend's env alone.
BACKEND_ONLY = {"neuromoe.preproc.fsl": "fsl.yaml"}
PREPROC_ENVS = ("preproc.yaml", "fsl.yaml")
FSL_CHANNEL = "https://fsl.fmrib.ox.ac.uk/fsldownloads/fslconda/public/"
SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s*(?:(?P<op>==|>=|<=|=|<|>)\s*(?P<version>[A-Za-z0-9_.*+!\-]+))?$")


def load_env(name: str) -> dict:
    return yaml.safe_load((ENVS / name).read_text())


def env_packages(name: str) -> dict[str, str | None]:
    """{package: pinned version or None} of an env file, pip packages included."""
    out: dict[str, str | None] = {}
    for dep in load_env(name)["dependencies"]:
        specs = dep["pip"] if isinstance(dep, dict) else [dep]
        for spec in specs:
            m = SPEC.match(spec.strip())
            assert m, f"envs/{name}: cannot parse the dependency {spec!r}"
            out[m.group("name").lower()] = m.group("version")
    return out


ENV_FILES = sorted(p.name for p in ENVS.glob("*.yaml"))


@pytest.mark.parametrize("name", ENV_FILES)
def test_env_file_parses(name):
    env = load_env(name)
    assert isinstance(env.get("channels"), list) and env["channels"], f"envs/{name}: no channels list"
    assert all(isinstance(c, str) for c in env["channels"])
    assert "nodefaults" in env["channels"], f"envs/{name}: add nodefaults (reproducible channel set)"
    deps = env.get("dependencies")
    assert isinstance(deps, list) and deps, f"envs/{name}: no dependencies list"
    names: list[str] = []
    for dep in deps:
        if isinstance(dep, dict):
            assert set(dep) == {"pip"} and isinstance(dep["pip"], list), f"envs/{name}: odd entry {dep}"
            assert "pip" in deps, f"envs/{name}: a pip: section needs `pip` among the conda dependencies"
            for spec in dep["pip"]:
                m = SPEC.match(spec)
                assert m and m.group("op") == "==", f"envs/{name}: pin pip packages with ==, got {spec!r}"
                names.append(m.group("name").lower())
            continue
        assert isinstance(dep, str), f"envs/{name}: odd entry {dep!r}"
        m = SPEC.match(dep)
        assert m, f"envs/{name}: cannot parse {dep!r}"
        if m.group("op"):  # conda pins use one '=' (exact version, any build)
            assert m.group("op") == "=", f"envs/{name}: pin {dep!r} as name=version"
            assert re.fullmatch(r"\d+(\.\d+)*", m.group("version")), f"envs/{name}: odd version in {dep!r}"
        names.append(m.group("name").lower())
    dup = sorted({n for n in names if names.count(n) > 1})
    assert not dup, f"envs/{name}: listed twice: {dup}"
    assert env_packages(name).get("python"), f"envs/{name}: pin python"


def test_fsl_env_installs_fsl_from_its_channel():
    env = load_env("fsl.yaml")
    assert FSL_CHANNEL in env["channels"], "envs/fsl.yaml: FSL's packages come from FSL's own conda channel"
    pkgs = env_packages("fsl.yaml")
    for pkg in ("fsl-bet2", "fsl-flirt", "fsl-mcflirt", "fsl-fdt", "fsl-eddy", "fsl-avwutils", "fsl-fnirt",
                "nipype", "fslpy"):
        assert pkg in pkgs, f"envs/fsl.yaml lacks {pkg}"
    # The Python side of the stage pins the same versions as the python backend's env.
    pre = env_packages("preproc.yaml")
    differ = {k: (v, pre[k]) for k, v in pkgs.items() if k in pre and v != pre[k]}
    assert not differ, f"envs/fsl.yaml and envs/preproc.yaml pin different versions: {differ}"


# ------------------------------------------------------------------------------------------------ rules -> imports
def rule_envs() -> dict[str, tuple[list[str], Path | None]]:
    """{rule: (env files, script path)} for every rule with a ``conda:`` directive."""
    out = {}
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        blocks = re.split(r"(?m)^rule\s+", text)[1:]
        for block in blocks:
            name = block.split(":", 1)[0].strip()
            body = block.split("\n", 1)[1] if "\n" in block else ""
            conda = re.search(r"(?m)^\s+conda:\s*\n\s+(.+?)\s*$", body)
            if not conda:
                continue
            value = conda.group(1).strip().rstrip(",")
            if value == "PREPROC_ENV":
                envs = list(PREPROC_ENVS)
            else:
                m = re.fullmatch(r"f?[\"'](?:\.\./)*envs/([\w.\-]+\.yaml)[\"']", value)
                assert m, f"{smk.name}: rule {name}: cannot resolve conda env {value!r}"
                envs = [m.group(1)]
            script = re.search(r"(?m)^\s+script:\s*\n\s+f?[\"'](?:\{SCRIPTS\}|\.\./scripts)/([\w.\-]+\.py)[\"']", body)
            out[name] = (envs, SCRIPTS / script.group(1) if script else None)
    return out


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``if TYPE_CHECKING:`` or a ``try`` that catches ImportError."""
    child, p = node, parents.get(node)
    while p is not None:
        if isinstance(p, ast.If) and child in p.body and "TYPE_CHECKING" in ast.unparse(p.test):
            return True
        if isinstance(p, ast.Try) and child in p.body:
            caught = " ".join(ast.unparse(h.type) for h in p.handlers if h.type is not None)
            if "ImportError" in caught or "ModuleNotFoundError" in caught:
                return True
        child, p = p, parents.get(p)
    return False


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports_of(path: Path, module: str | None) -> set[str]:
    """Absolute names imported at run time by one file (relative imports resolved against ``module``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    names: set[str] = set()
    for node in ast.walk(tree):
        # importlib.util.find_spec("pkg"): the code reads files the package ships (e.g. nilearn's templates)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
                and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "find_spec"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
            continue
        if not isinstance(node, ast.Import | ast.ImportFrom) or _optional(node, parents):
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if module else []
            if path.name != "__init__.py":
                pkg = pkg[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names.add(base)
        names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return names


def third_party_imports(roots: list[tuple[Path, str | None]], skip: set[str]) -> dict[str, str]:
    """{top-level third-party import: first file importing it} over ``roots`` and the neuromoe modules they reach."""
    seen: set[str] = set()
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        path, module = todo.pop()
        for name in sorted(imports_of(path, module)):
            top = name.split(".")[0]
            if top == "neuromoe":
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # parent packages run their __init__ too
                    sub = ".".join(parts[:i])
                    f = _module_file(sub)
                    if f is not None and sub not in seen and not any(sub == m or sub.startswith(m + ".")
                                                                     for m in skip):
                        seen.add(sub)
                        todo.append((f, sub))
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault(top, str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))
    return found


def _cases() -> list[tuple[str, str, Path]]:
    return [(rule, env, script) for rule, (envs, script) in sorted(rule_envs().items()) if script for env in envs]


def test_rules_with_conda_envs_are_found():
    envs = rule_envs()
    assert {"anat", "dwi", "func"} <= set(envs), f"preprocessing rules not found in {sorted(envs)}"
    assert envs["anat"][0] == list(PREPROC_ENVS)
    for rule, (files, script) in envs.items():
        for f in files:
            assert (ENVS / f).is_file(), f"rule {rule}: envs/{f} does not exist"
        assert script is None or script.is_file(), f"rule {rule}: {script} does not exist"


@pytest.mark.parametrize(("rule", "env", "script"), _cases(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_rule_env_has_every_import(rule, env, script):
    skip = {m for m, only in BACKEND_ONLY.items() if only != env}
    roots: list[tuple[Path, str | None]] = [(script, None)]
    if rule_envs()[rule][0] == list(PREPROC_ENVS):  # the scripts dispatch to the backend module of their env
        roots += [(p, ".".join(p.relative_to(REPO).with_suffix("").parts))
                  for m, only in BACKEND_ONLY.items() if only == env
                  for p in sorted(REPO.joinpath(*m.split(".")).rglob("*.py"))]
    imports = third_party_imports(roots, skip)
    pkgs = env_packages(env)
    missing = {name: src for name, src in imports.items() if not (PACKAGES.get(name, {name.lower()}) & set(pkgs))}
    assert not missing, (f"rule {rule} ({script.name}) runs in envs/{env}, which lacks: "
                         + ", ".join(f"{n} (imported by {s}; conda package "
                                     f"{' or '.join(sorted(PACKAGES.get(n, {n.lower()})))})"
                                     for n, s in sorted(missing.items())))


def test_import_walk_sees_lazy_imports_and_skips_optional_ones(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import SimpleITK\n"
                   "try:\n    import torch\nexcept ImportError:\n    pass\n"
                   "def f():\n    import nibabel\n    from sklearn.linear_model import Ridge\n"
                   "import importlib.util\nDATA = importlib.util.find_spec('nilearn')\n")
    assert set(third_party_imports([(src, None)], set())) == {"nibabel", "sklearn", "nilearn"}
