"""The best trial -> an experiment file that ``load_experiment`` reads again and ``drcaps train --config`` reruns.

Pure: no Ray, no MLflow. ``search/tracking.py`` finds the run and its model URI; this module only writes them down.
The file holds the full explicit ``model``/``data``/``train`` sections (no preset), the source's ``search`` and
``tracking`` sections, and a ``result`` section (metrics, params, MLflow run id, model URI, trial id).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from search.experiment import Experiment, dump_experiment, to_plain
from search.space import apply_params


def best_experiment(exp: Experiment, params: Mapping[str, Any], *, metrics: Mapping[str, float],
                    run_id: str | None, model_uri: str | None, trial_id: str | None = None) -> Experiment:
    """``exp`` with the best trial's ``params`` applied and a ``result`` section describing that trial."""
    result = {
        "metrics": to_plain(dict(metrics)),
        "params": to_plain(dict(params)),
        "mlflow_run_id": run_id,
        "model_uri": model_uri,
        "trial_id": trial_id,
        "source_experiment": exp.name,
    }
    return dataclasses.replace(exp, run=apply_params(exp, params), result=result)


def export_best(best: Experiment, out: Path, fmt: Literal["yaml", "json"] = "yaml") -> Path:
    """Write ``best`` to ``out`` as YAML or JSON; ``load_experiment(out)`` gives it back (JSON included)."""
    result = best.result or {}
    source = result.get("source_experiment", best.name)
    comment = (f"Best trial of experiment '{source}'"
               + (f" (MLflow run {result['mlflow_run_id']})" if result.get("mlflow_run_id") else "") + ".\n"
               + f"Retrain it: drcaps train --config {out.name}\n"
               + "Search again around it: drcaps search " + out.name)
    return dump_experiment(best, Path(out), fmt=fmt, comment=comment)
