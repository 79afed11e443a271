"""What a run of a search recorded, in plain Python (publish, export and the CLI never see a Ray object): its trials
ranked by the one ranking (search/ranking.py), every MLflow trial run closed with its outcome, and the
confirmation runs of the top-k (search/tune/confirm.py).
"""

from __future__ import annotations

import math
import numbers
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search import ranking, tracking
from search.errors import SearchFailedError
from search.experiment import Experiment
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
    run_id: str | None = None         # its MLflow run


@dataclass(frozen=True)
class ConfirmRun:
    """One confirmation run: the search trial it confirms (``number``), its seed index, its best value of the
    search metric at any epoch (NaN when it failed or diverged), its outcome and MLflow run."""

    number: int
    seed: int
    value: float
    outcome: str
    run_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class SearchRecords:
    """A run of a search, as recorded: what search/publish.py crowns, registers, reports and exports."""

    experiment: Experiment
    trials: list[TrialSummary]        # ranked, best first
    tracking_uri: str
    parent_run_id: str
    study_name: str
    storage_url: str
    folder: str                       # Tune's folder of the search
    confirmations: tuple[ConfirmRun, ...] = ()


def summaries(results: Any, metric: str, mode: str, epochs: int) -> list[TrialSummary]:
    """Tune's results -> one TrialSummary per trial, ranked (the one ranking: best value at any epoch)."""
    out = []
    for r in results:
        last = r.metrics or {}
        df = _history(r.metrics_dataframe, last)
        trial_id = str(last.get("trial_id") or Path(r.path).name)
        params, number = split_config(dict(r.config or {}))
        run_id = last.get("mlflow_run_id") if isinstance(last.get("mlflow_run_id"), str) else None
        if failure := last.get(FAILURE_KEY):                            # ended itself as failed (diverged)
            ran = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
            out.append(TrialSummary(trial_id, params, math.nan, ran, "failed", error=str(failure), number=number,
                                    run_id=run_id))
            continue
        found = ranking.best_epoch(zip(df["epoch"], df[metric], strict=True), mode) \
            if df is not None and metric in df and "epoch" in df else None
        if found is None:
            # No epoch reported: it failed before its first, or the search ended first (time budget): not a failure.
            out.append(TrialSummary(trial_id, params, math.nan, 0, "failed" if r.error else "stopped_early",
                                    error=str(r.error) if r.error else None, number=number, run_id=run_id))
            continue
        best_row = df[df["epoch"] == found[0]].iloc[0]
        row = {k: float(v) for k, v in best_row.items()
               if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))}
        ran = int(df["epoch"].max())
        outcome = "failed" if r.error else ("finished" if ran >= epochs else "stopped_early")
        out.append(TrialSummary(trial_id, params, found[1], ran, outcome, row,
                                error=str(r.error) if r.error else None, number=number, run_id=run_id))
    return ranking.rank(out, lambda t: t.metric if t.outcome != "failed" else None, mode)


def _history(df: Any, last: dict[str, Any]) -> Any:
    """A trial's per-epoch results: Tune's result file, plus its last result when the file lags behind it. A driver
    killed after Tune's experiment state recorded an epoch but before the trial's result file reached the storage
    folder leaves the file an epoch short; the restored trial's last result still has it (seen in the kill-point
    test: a trial that ran every epoch was counted as stopped early)."""
    import pandas as pd

    epoch = last.get("epoch")
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return df
    if df is not None and "epoch" in df and len(df) and float(df["epoch"].max()) >= float(epoch):
        return df
    row = pd.DataFrame([{k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))}])
    return row if df is None or not len(df) else pd.concat([df, row], ignore_index=True)


def close_trial_runs(uri: str, parent_run_id: str, trials: list[TrialSummary]) -> list[TrialSummary]:
    """Every trial's MLflow run ended with its outcome; the trials with their run ids. A trial killed hard never
    reached its ``finally``; one the scheduler stopped ended KILLED in the worker (it cannot tell the scheduler from
    Ctrl-C). Stopping early is an outcome, not a failure: FINISHED with drcaps.outcome=stopped_early."""
    import dataclasses

    runs = {r.tags.get("drcaps.trial_id"): r for r in tracking.child_runs(uri, parent_run_id)}
    for t in trials:
        r = runs.get(t.trial_id)
        status = {"finished": "FINISHED", "stopped_early": "FINISHED"}.get(t.outcome, "FAILED")
        if r is not None and (r.status == "RUNNING" or r.status != status
                              or r.tags.get("drcaps.outcome") != t.outcome):
            tracking.end_run(uri, r.run_id, status, {"drcaps.outcome": t.outcome})
    ranked_ids = {t.trial_id for t in trials}
    for trial_id, r in runs.items():              # a trial lost with a killed driver: Ray restarted it anew
        if r.status == "RUNNING" and trial_id not in ranked_ids:
            tracking.end_run(uri, r.run_id, "KILLED", {"drcaps.outcome": "interrupted"})
    return [dataclasses.replace(t, run_id=runs[t.trial_id].run_id) if t.trial_id in runs else t for t in trials]


def recorded_trial_ids(uri: str, parent_run_id: str) -> list[str]:
    """Every Ray trial id the search's trial runs were recorded under: each run's own and the earlier ones of a
    trial a resumed search brought back under a new id (``drcaps.earlier_trial_ids``)."""
    return [i for r in tracking.child_runs(uri, parent_run_id)
            for i in (r.tags.get("drcaps.trial_id"), *r.tags.get("drcaps.earlier_trial_ids", "").split(",")) if i]


def scored(trials: list[TrialSummary]) -> list[TrialSummary]:
    """The trials that count for the ranking (not failed, a finite value), best first."""
    return [t for t in trials if t.outcome != "failed" and math.isfinite(t.metric)]


def fail_if_none_scored(uri: str, parent_run_id: str, trials: list[TrialSummary]) -> None:
    """Every trial failed: the parent run FAILED, and one error saying where the records are."""
    if scored(trials):
        return
    tracking.end_run(uri, parent_run_id, "FAILED", {"drcaps.failure_reason": "no trial reported a metric"})
    errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials[:3])
    raise SearchFailedError(f"search: every trial failed ({errors}); each trial's record is in MLflow "
                            f"(parent run {parent_run_id} at {uri})")


def prune_checkpoints(experiment_path: Path) -> None:
    """A finished search needs Ray's per-trial checkpoints no more (they exist so an interrupted search can resume):
    every trial's best weights are MLflow artifacts and the best model is registered. Ray's small files (params,
    result.json: what ``tune.ExperimentAnalysis`` reads) are kept."""
    if not experiment_path.is_dir():
        return
    for checkpoint in experiment_path.glob("**/checkpoint_*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)
