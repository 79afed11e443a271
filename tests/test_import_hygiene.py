"""drcapsnet is pure PyTorch: importing any of its modules must not pull in ray, optuna or mlflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULES = ("drcapsnet", "drcapsnet.model", "drcapsnet.train", "drcapsnet.data", "drcapsnet.routing",
           "drcapsnet.losses", "drcapsnet.config")


def test_importing_drcapsnet_leaves_search_dependencies_unloaded() -> None:
    code = (f"import {', '.join(MODULES)}; import sys; "
            "print(sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"drcapsnet imported {result.stdout.strip()}"
