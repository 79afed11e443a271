"""The commands that read what searches recorded in MLflow and write nothing there: ``drcaps export-best`` (through
search.export.export_from_tracking), ``drcaps report`` (search.report) and ``drcaps ui`` (MLflow's own UI).
A read-only command never creates an empty store.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from drcapsnet.errors import UsageError
from search.preflight import check_output


def export_best_command(experiment: str, out: Path, *, tracking_uri: str | None = None,
                        fmt: Literal["yaml", "json"] | None = None, csv: Path | None = None) -> int:
    """Write the best trial of the latest search of the MLflow experiment ``experiment`` to ``out`` as an experiment
    file (``fmt``: default from ``out``'s suffix, else yaml); with ``csv``, every trial of that search too."""
    from search import tracking
    from search.export import export_from_tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_store_exists(uri)             # reading never creates an empty store
    check_output("--out", out.resolve())
    check_output("--csv", csv.resolve() if csv else None)
    path, chosen = export_from_tracking(uri, experiment, out.resolve(), fmt, csv)
    result = chosen.result or {}
    print(f"exported best config of '{experiment}' (run {result.get('mlflow_run_id')}): {path}")
    if csv:
        print(f"all trials: {csv}")
    return 0


def report_command(experiment: str, *, tracking_uri: str | None = None, out: Path | None = None) -> int:
    """Write the HTML report of the latest search of the MLflow experiment ``experiment`` to ``out`` (default:
    ``<experiment>.report.html`` here)."""
    from search import tracking
    from search.report import write_report

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_store_exists(uri)             # reading never creates an empty store
    out = (out or Path.cwd() / f"{experiment}.report.html").resolve()
    check_output("--out", out)
    path = write_report(uri, experiment, out)   # TrackingError (no such experiment or search) -> exit 2
    print(f"report of the latest search of '{experiment}': {path}")
    return 0


def ui_command(*, tracking_uri: str | None = None, port: int = 5000) -> int:
    """Replace this process with the MLflow UI on ``127.0.0.1:port`` over the store at ``tracking_uri``."""
    from search import tracking

    if not 0 < port < 65536:
        raise UsageError(f"--port: must be in 1..65535, got {port}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}; run "
                         "'drcaps search experiments/quickstart.yaml' first or pass --tracking-uri")
    tracking.check_tracking_uri(uri, writing=False)   # reading: no free-space floor (search/stores.py)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    print(f"MLflow UI on http://127.0.0.1:{port} over {uri} (Ctrl-C to stop)", flush=True)
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)])
    return 0   # not reached: exec replaces this process
