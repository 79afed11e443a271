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
