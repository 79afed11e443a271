"""What a search leaves: its trials ranked (the one ranking, search/ranking.py), every MLflow run closed with its
outcome, the best model registered, the parent run's outcome metrics and tags, the report, and a
:class:`SearchResult` in plain Python (export and the CLI never see a Ray object).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drcapsnet.checkpoint import LAST, load_model
from drcapsnet.config import RunConfig
from drcapsnet.model import CapsNetClassifier
from search import ranking, tracking
from search.errors import SearchFailedError
from search.experiment import Experiment
from search.progress import format_params
from search.space import apply_params
from search.tune.searcher import split_config
from search.tune.trial import FAILURE_KEY


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    metric: float                     # the trial's best value of the search metric over its epochs
    epochs: int
    outcome: str                      # finished | stopped_early | failed
    metrics: dict[str, float] = field(default_factory=dict)   # the epoch where the metric was best
    error: str | None = None
    number: int | None = None         # the Optuna trial number (MLflow run name "trial N ...")


@dataclass(frozen=True)
class SearchResult:
    """A finished search in plain Python: export and the CLI never see a Ray object."""

    experiment: Experiment
    best: TrialSummary
    trials: list[TrialSummary]
    best_config: RunConfig
    tracking_uri: str
    parent_run_id: str
    best_run_id: str | None
    model_uri: str | None
    study_name: str
    storage_url: str
    experiment_path: str
    problems: tuple[str, ...] = ()    # what failed at the very end (registration) without losing the search
    report_path: str | None = None    # the search's HTML report (search/report/), also on its parent run


def summaries(results: Any, metric: str, mode: str, epochs: int) -> list[TrialSummary]:
    sign = 1.0 if mode == "max" else -1.0
    out = []
    for r in results:
        df = r.metrics_dataframe
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        params, number = split_config(dict(r.config or {}))
        if failure := (r.metrics or {}).get(FAILURE_KEY):            # ended itself as failed (diverged)
            ran = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
            out.append(TrialSummary(str(trial_id), params, -sign * math.inf, ran, "failed", error=str(failure),
                                    number=number))
            continue
        if df is None or metric not in df or df[metric].dropna().empty:
            # No epoch reported: it failed before its first, or the search ended first (time budget): not a failure.
            out.append(TrialSummary(str(trial_id), params, -sign * math.inf, 0,
                                    "failed" if r.error else "stopped_early",
                                    error=str(r.error) if r.error else None, number=number))
            continue
        best_row = df.loc[(df[metric] * sign).idxmax()]
        row = {k: float(v) for k, v in best_row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        ran = int(df["epoch"].max())
        outcome = "failed" if r.error else ("finished" if ran >= epochs else "stopped_early")
        out.append(TrialSummary(str(trial_id), params, float(best_row[metric]), ran, outcome, row,
                                error=str(r.error) if r.error else None, number=number))
    return ranking.rank(out, lambda t: t.metric, mode)      # the one ranking (search/ranking.py)


def finish(exp: Experiment, results: Any, uri: str, mlflow_experiment: str, parent_run_id: str,
            study_name: str, storage_url: str, experiment_path: str) -> SearchResult:
    """Rank the trials, close any MLflow run Ray left open, register the best model, tag the parent run."""
    s = exp.search
    trials = summaries(results, s.metric, s.mode, exp.run.train.epochs)
    runs = {r.tags.get("drcaps.trial_id"): r for r in tracking.child_runs(uri, parent_run_id)}
    for t in trials:
        # A trial killed hard never reached its `finally`; one the scheduler stopped ended KILLED in the worker
        # (it cannot tell the scheduler from Ctrl-C). Stopping early is an outcome, not a failure: FINISHED with
        # drcaps.outcome=stopped_early (docs/notes.md: "Trial status in MLflow").
        r = runs.get(t.trial_id)
        status = {"finished": "FINISHED", "stopped_early": "FINISHED"}.get(t.outcome, "FAILED")
        if r is not None and (r.status == "RUNNING" or r.status != status
                              or r.tags.get("drcaps.outcome") != t.outcome):
            tracking.end_run(uri, r.run_id, status, {"drcaps.outcome": t.outcome})
    ranked_ids = {t.trial_id for t in trials}
    for trial_id, r in runs.items():              # a trial lost with a killed driver: Ray restarted it anew
        if r.status == "RUNNING" and trial_id not in ranked_ids:
            tracking.end_run(uri, r.run_id, "KILLED", {"drcaps.outcome": "interrupted"})
    scored = [t for t in trials if t.outcome != "failed" and math.isfinite(t.metric)]
    if not scored:
        tracking.end_run(uri, parent_run_id, "FAILED", {"drcaps.failure_reason": "no trial reported a metric"})
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials[:3])
        raise SearchFailedError(f"search: every trial failed ({errors}); each trial's record is in MLflow "
                                f"(parent run {parent_run_id} at {uri})")
    best = scored[0]
    best_config = apply_params(exp, best.params)
    best_run = runs.get(best.trial_id)
    model_uri = None
    problems: list[str] = []
    checkpoint = next(r for r in results if str((r.metrics or {}).get("trial_id")) == best.trial_id
                      ).get_best_checkpoint(s.metric, s.mode)
    if checkpoint is not None and best_run is not None:
        with checkpoint.as_directory() as d:
            capsnet, _, _ = load_model(Path(d) / LAST)
        example = torch.rand(2, capsnet.cfg.in_channels, capsnet.cfg.image_size, capsnet.cfg.image_size)
        registered = exp.tracking.registered_model or f"{mlflow_experiment}-capsnet"
        try:                  # the search's results must outlive a registry that fails now, at its very end
            model_uri = tracking.log_and_register_model(
                uri, best_run.run_id, CapsNetClassifier(capsnet).eval(), example, registered_name=registered,
                description=f"Best trial (trial {best.number}, {best.trial_id}) of search {study_name}: "
                            f"{s.metric} = {best.metric:.4f} at its best epoch; {format_params(best.params)}")
        except Exception as e:
            problems.append(f"could not register the best model as {registered!r} ({type(e).__name__}: {e}); its "
                            f"checkpoint is artifact checkpoint/best.pt of MLflow run {best_run.run_id}")
    counts = {o: sum(t.outcome == o for t in trials) for o in ("finished", "stopped_early", "failed")}
    tracking.log_metrics(uri, parent_run_id, {
        f"best_{s.metric}": best.metric, "trials_finished": counts["finished"],
        "trials_stopped_early": counts["stopped_early"], "trials_failed": counts["failed"],
        "trial_epochs": sum(t.epochs for t in trials), "wall_time_s": tracking.run_age_s(uri, parent_run_id)})
    tracking.end_run(uri, parent_run_id, "FINISHED", {f"drcaps.best.{k}": str(v) for k, v in best.params.items()} | {
        "drcaps.best_trial_id": best.trial_id, "drcaps.best_run_id": best_run.run_id if best_run else "",
        f"drcaps.best_{s.metric}": f"{best.metric:.6f}", "drcaps.model_uri": model_uri or ""}
        | ({"drcaps.registration_error": problems[0]} if problems else {}))
    prune_checkpoints(Path(experiment_path))
    report = _write_report(uri, mlflow_experiment, parent_run_id, Path(experiment_path), problems)
    return SearchResult(exp, best, trials, best_config, uri, parent_run_id, best_run.run_id if best_run else None,
                        model_uri, study_name, storage_url, experiment_path, problems=tuple(problems),
                        report_path=report)


def _write_report(uri: str, mlflow_experiment: str, parent_run_id: str, experiment_path: Path,
                  problems: list[str]) -> str | None:
    """Every search ends with its HTML report: in its Ray folder (a temporary one for remote storage) and on its
    parent run (``report/``). The search is recorded whatever happens here: a failure is a problem to report."""
    from search.report import report_search

    folder = experiment_path if experiment_path.is_dir() else Path(tempfile.mkdtemp(prefix="drcaps-report-"))
    try:
        return str(report_search(uri, mlflow_experiment, parent_run_id, folder / "report.html"))
    except Exception as e:     # noqa: BLE001 (said, with the command that makes it later)
        problems.append(f"the report could not be written ({type(e).__name__}: {e}); make it later with: "
                        f"drcaps report {mlflow_experiment} --tracking-uri {uri}")
        return None


def prune_checkpoints(experiment_path: Path) -> None:
    """A finished search needs Ray's per-trial checkpoints no more (they exist so an interrupted search can resume):
    every trial's best weights are MLflow artifacts and the best model is registered. Ray's small files (params,
    result.json: what ``tune.ExperimentAnalysis`` reads) are kept."""
    if not experiment_path.is_dir():
        return
    for checkpoint in experiment_path.glob("*/checkpoint_*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)
