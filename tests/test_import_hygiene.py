"""Who imports what: drcapsnet is pure PyTorch; in search/, Ray is imported by one package and MLflow by one; the
modules a user touches to load, validate and export an experiment stay light (no Ray, MLflow or Optuna loaded)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "optuna", "mlflow")
OWNER = {"ray": "search/tune/", "mlflow": "search/tracking/"}   # the one package of search/ that imports each


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("modules", [
    ("drcapsnet", "drcapsnet.model", "drcapsnet.train", "drcapsnet.data", "drcapsnet.routing", "drcapsnet.losses",
     "drcapsnet.config", "drcapsnet.checkpoint", "drcapsnet.errors", "drcapsnet.diagnostics"),
    ("search.experiment", "search.space", "search.export", "search.progress", "search.tune", "search.tracking"),
])
def test_importing_leaves_ray_optuna_and_mlflow_unloaded(modules: tuple[str, ...]) -> None:
    code = f"import sys, {', '.join(modules)}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{modules} imported {result.stdout.strip()}"


def test_drcapsnet_never_imports_the_search_stack() -> None:
    for path in sorted((REPO_ROOT / "drcapsnet").rglob("*.py")):                    # drcapsnet/data/ too
        assert not _imported_roots(path) & {*HEAVY, "search"}, path.name


@pytest.mark.parametrize("library", sorted(OWNER))
def test_one_package_of_search_imports_each_of_ray_and_mlflow(library: str) -> None:
    importers = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "search").rglob("*.py")
                       if library in _imported_roots(p))
    assert importers and all(p.startswith(OWNER[library]) for p in importers), importers


def test_importing_search_changes_no_environment_variable_or_logger_level() -> None:
    code = ("import logging, os, sys, ray, optuna, mlflow; before = dict(os.environ); "   # what they do is theirs
            "levels = {n: logging.getLogger(n).level for n in list(logging.root.manager.loggerDict)}; "
            "import search.cli, search.commands, search.tune, search.tracking, search.report, search.progress; "
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)); "
            "moved = sorted(n for n, lv in levels.items() if logging.getLogger(n).level != lv); "
            "print(changed, moved)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


# ---------------------------------------------------------------------------------------------------- the layout

PACKAGES = ("drcapsnet", "search")
MAX_LINES = 300                                  # house style: a module is one concept, under 300 lines


def _module_paths() -> dict[str, Path]:
    """Every module of drcapsnet/ and search/ by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: never run, so no dependency at run time."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the two packages that importing (or calling into) ``name`` imports: module-level and
    function-level imports, relative ones resolved, ``from package import submodule`` as the submodule. Importing
    ``a.b.c`` also runs the ``__init__`` of each package above it that ``name`` is not itself inside."""
    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None)

    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets |= {t for alias in node.names if (t := resolve(alias.name))}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else resolve(base)
                if target:
                    targets.add(target)
    out = set()
    for target in targets:
        parts = target.split(".")
        out |= {p for n in range(1, len(parts) + 1) if (p := ".".join(parts[:n])) in modules
                and not (name == p or name.startswith(p + "."))}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_shortest_cycle(graph, component) for component in components]


def _shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """The shortest way from the component's first module back to itself, through the component (breadth first)."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    for v in queue:                                  # the queue grows while it is read
        if start in graph[v]:
            return [*paths[v], start]
        for w in sorted(graph[v] & inside):
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(f"{start} is in a cycle but no way back was found")


def test_the_imports_of_drcapsnet_and_search_have_no_cycle() -> None:
    modules = _module_paths()
    graph = {name: _imports_of(name, path, modules) for name, path in modules.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_module_of_drcapsnet_or_search_is_over_300_lines() -> None:
    long = {str(path.relative_to(REPO_ROOT)): n for path in _module_paths().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in sorted(long.items()))
