"""The best trial -> an experiment file that ``load_experiment`` reads again and ``drcaps train --config`` reruns.

``best_experiment`` and ``export_best`` are pure: no Ray, no MLflow. ``export_from_tracking`` (``drcaps export-best``)
asks search.tracking for the latest search and its best trial (imported when called, so importing this module stays
light) and writes them down through the two. The file holds the full explicit ``model``/``data``/``train`` sections
(no preset), the source's ``search`` and ``tracking`` sections, and a ``result`` section (metrics, params, MLflow run
id, model URI, trial id).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from drcapsnet.config import RunConfig
from search.experiment import Experiment, dump_experiment, experiment_from_dict, parse_override, to_plain
from search.space import apply_params, trial_run


def precision_of(run: RunConfig) -> str:
    """``bf16`` or ``fp32``: what ``run`` computes in on this machine (drcapsnet/precision.py: CPU bf16 only where the
    CPU has it natively)."""
    import torch

    from drcapsnet.precision import resolve_precision

    device = "cuda" if run.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    return resolve_precision(torch.device(device), run.train.bf16).name


def versions() -> dict[str, str]:
    """What this process runs under: drcaps, torch, Python, and CUDA/cuDNN where torch has them."""
    import importlib.metadata
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    try:
        out["drcaps"] = importlib.metadata.version("drcaps")
    except importlib.metadata.PackageNotFoundError:
        out["drcaps"] = "unknown"
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    if torch.backends.cudnn.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def best_experiment(exp: Experiment, params: Mapping[str, Any], *, metrics: Mapping[str, float],
                    run_id: str | None, model_uri: str | None, trial_id: str | None = None,
                    run: RunConfig | None = None, extra: Mapping[str, Any] | None = None) -> Experiment:
    """``exp`` with the best trial's config and a ``result`` section describing that trial. ``run``: the config the
    trial trained, exactly (``search.space.trial_run``: its thread count and device included), so ``drcaps train
    --config`` of the export reproduces its numbers; default: ``params`` applied to ``exp``. ``extra``: more of the
    result section (the search's value, the confirmation)."""
    result = {
        "metrics": to_plain(dict(metrics)),
        "params": to_plain(dict(params)),
        "mlflow_run_id": run_id,
        "model_uri": model_uri,
        "trial_id": trial_id,
        "source_experiment": exp.name,
        "versions": versions(),
        "precision": precision_of(run if run is not None else apply_params(exp, params)),
        **to_plain(dict(extra or {})),
    }
    return dataclasses.replace(exp, run=run if run is not None else apply_params(exp, params), result=result)


def export_best(best: Experiment, out: Path, fmt: Literal["yaml", "json"] = "yaml") -> Path:
    """Write ``best`` to ``out`` as YAML or JSON; ``load_experiment(out)`` gives it back (JSON included)."""
    result = best.result or {}
    source = result.get("source_experiment", best.name)
    comment = (f"Best trial of experiment '{source}'"
               + (f" (MLflow run {result['mlflow_run_id']})" if result.get("mlflow_run_id") else "") + ".\n"
               + f"Retrain it: drcaps train --config {out.name}\n"
               + "Search again around it: drcaps search " + out.name)
    return dump_experiment(best, Path(out), fmt=fmt, comment=comment)


def export_from_tracking(uri: str, experiment: str, out: Path, fmt: Literal["yaml", "json"] | None = None,
                         csv: Path | None = None) -> tuple[Path, Experiment]:
    """The best trial of the latest search of ``experiment`` (an MLflow experiment name) in the store at ``uri`` ->
    an experiment file ``drcaps train --config`` takes, at ``out`` (``fmt``: from ``out``'s suffix, else yaml); with
    ``csv``, every trial of that search as a CSV too. Returns the path written and the experiment it holds.
    Raises TrackingError when ``experiment`` has no search in the store."""
    import json

    from search import tracking

    parent = tracking.latest_search_run(uri, experiment)
    if parent is None:
        raise tracking.TrackingError(f"--experiment: no search of '{experiment}' in {uri}; run 'drcaps search' first, "
                                     "or pass the --tracking-uri the search used")
    source = json.loads(tracking.read_text_artifact(uri, parent.run_id, "resolved_experiment.json"))
    exp = experiment_from_dict(source, source=f"run {parent.run_id}")
    best = tracking.best_trial_run(uri, experiment, exp.search.metric, exp.search.mode, parent_run_id=parent.run_id)
    params = {k: parse_override(f"{k}={best.params[k]}")[1] for k in exp.search.space if k in best.params}
    s = exp.search
    chosen = best_experiment(exp, params, metrics=best.metrics, run_id=best.run_id,
                             model_uri=parent.tags.get("drcaps.model_uri") or None,
                             trial_id=best.tags.get("drcaps.trial_id"),
                             run=trial_run(exp, params, s.resources.cpu, s.resources.gpu))
    path = export_best(chosen, out, fmt or ("json" if out.suffix.lower() == ".json" else "yaml"))
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        tracking.trials_dataframe(uri, parent.run_id).to_csv(csv, index=False)
    return path, chosen
