"""Reading what searches recorded: runs as ``RunRecord`` values, a search's trial runs, the latest search, the best
trial (ranked by ``search.ranking``), metric histories, a trials table, and a run's artifacts copied back.

Read-only: nothing here creates a run or an experiment. Layout read: one parent run per search (tag
``drcaps.role=search``, ``drcaps.smoke_test=true`` on a smoke test's), one child run per trial (``drcaps.role=trial``,
``drcaps.trial_id``, ``mlflow.parentRunId``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drcapsnet.errors import TrackingError
from search import ranking
from search.tracking.client import experiment_id, mlflow_client, quiet_mlflow

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run

SMOKE_TAG = "drcaps.smoke_test"   # ="true" on a smoke test's parent run: every "latest"/"best" lookup skips it


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]      # the last logged value (highest step) of each metric
    tags: dict[str, str]
    status: str
    artifact_uri: str
    start_time: int | None = None  # ms since the epoch, as MLflow keeps them
    end_time: int | None = None    # None while the run is RUNNING


def _record(run: Run) -> RunRecord:
    return RunRecord(run.info.run_id, dict(run.data.params), dict(run.data.metrics), dict(run.data.tags),
                     run.info.status, run.info.artifact_uri, run.info.start_time, run.info.end_time)


def quoted(value: str) -> str:
    """A run or trial id as a quoted value of an MLflow filter string; ``ValueError`` if it holds a quote."""
    if "'" in value or "\\" in value:
        raise ValueError(f"run and trial ids must not contain quotes or backslashes, got {value!r}")
    return f"'{value}'"


def _search_all(uri: str, exp_id: str, filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = mlflow_client(uri).search_runs([exp_id], filter_string, max_results=1000,
                                              order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(uri: str, parent_run_id: str, role: str | None = "trial") -> list[RunRecord]:
    """The trial runs of one search, oldest first (``role``: ``confirm`` for its confirmation runs, None for
    every child run)."""
    from mlflow.exceptions import MlflowException

    try:
        exp_id = mlflow_client(uri).get_run(parent_run_id).info.experiment_id
    except MlflowException as e:
        raise TrackingError(f"no MLflow run {parent_run_id!r} at {uri}: {e.message}") from e
    where = f"tags.mlflow.parentRunId = {quoted(parent_run_id)}"
    if role is not None:
        where += f" and tags.`drcaps.role` = {quoted(role)}"
    return [_record(r) for r in _search_all(uri, exp_id, where)]


def latest_search_run(uri: str, experiment: str) -> RunRecord | None:
    """The newest search (parent) run of ``experiment``. Smoke tests (tag ``drcaps.smoke_test``) never count where
    a real search exists (a smoke test records in its own ``<experiment>-smoke``, where only smoke runs are)."""
    exp_id = experiment_id(uri, experiment)
    runs = mlflow_client(uri).search_runs([exp_id], "tags.`drcaps.role` = 'search'", max_results=50,
                                          order_by=["attributes.start_time DESC"])
    real = [r for r in runs if r.data.tags.get(SMOKE_TAG) != "true"] or runs
    return _record(real[0]) if real else None


def best_trial_run(uri: str, experiment: str, metric: str, mode: str,
                   parent_run_id: str | None = None) -> RunRecord:
    """The best trial run of ``parent_run_id`` (default: the latest search), ranked as everywhere in drcaps
    (``search.ranking``): by the best value of ``metric`` at ANY epoch, not the last. The search's own choice
    (its ``drcaps.best_run_id`` tag, written from the same ranking) wins when present; FAILED runs are left out.
    The record's ``metrics`` are those of the trial's best epoch."""
    ranking.sign(mode)                                       # ValueError for a bad mode
    if parent_run_id is None:
        parent = latest_search_run(uri, experiment)
        if parent is None:
            raise TrackingError(f"tracking.experiment: {experiment!r} at {uri} has no search run yet")
        parent_run_id = parent.run_id
    runs = child_runs(uri, parent_run_id)
    chosen_id = mlflow_client(uri).get_run(parent_run_id).data.tags.get("drcaps.best_run_id")
    best: dict[str, tuple[int, float] | None] = {
        r.run_id: ranking.best_epoch(metric_history(uri, r.run_id, metric), mode)
        for r in runs if r.status != "FAILED" and metric in r.metrics}
    scored = [r for r in runs if best.get(r.run_id) is not None]
    if not scored:
        seen = sorted({k for r in runs for k in r.metrics})
        raise TrackingError(f"search run {parent_run_id}: none of its {len(runs)} trial runs logged {metric!r} "
                            f"without failing (metrics logged: {seen})")
    pick = next((r for r in scored if r.run_id == chosen_id), None)
    if pick is None:
        pick = ranking.rank(scored, lambda r: best[r.run_id][1], mode)[0]   # type: ignore[index]
    epoch = best[pick.run_id][0]                                              # type: ignore[index]
    at_best = {key: value for key in pick.metrics
               for step, value in metric_history(uri, pick.run_id, key) if step == epoch}
    return dataclasses.replace(pick, metrics=pick.metrics | at_best)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` sorted by step (for trials: step = epoch)."""
    history = mlflow_client(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def trials_dataframe(uri: str, parent_run_id: str) -> pd.DataFrame:
    """One row per trial: run_id, trial_id, status, outcome, ``params.*`` (strings) and ``metrics.*`` (last values)."""
    import pandas as pd

    rows = [{"run_id": r.run_id, "trial_id": r.tags.get("drcaps.trial_id"), "status": r.status,
             "outcome": r.tags.get("drcaps.outcome")}
            | {f"params.{k}": v for k, v in sorted(r.params.items())}
            | {f"metrics.{k}": v for k, v in sorted(r.metrics.items())}
            for r in child_runs(uri, parent_run_id)]
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "trial_id", "status", "outcome"])


def search_runs(uri: str, experiment: str) -> list[RunRecord]:
    """Every search (parent) run of ``experiment``, newest first (search/report/)."""
    exp_id = experiment_id(uri, experiment)
    return [_record(r) for r in reversed(_search_all(uri, exp_id, "tags.`drcaps.role` = 'search'"))]


def get_run(uri: str, run_id: str) -> RunRecord:
    """One run by id; ``TrackingError`` if the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return _record(mlflow_client(uri).get_run(run_id))
    except MlflowException as e:
        raise TrackingError(f"no MLflow run {run_id!r} at {uri}: {e.message}") from e


def has_artifact(uri: str, run_id: str, artifact_path: str) -> bool:
    """Whether run ``run_id`` holds the artifact file ``artifact_path`` (e.g. ``checkpoint/best.pt``)."""
    folder, _, _ = artifact_path.rpartition("/")
    return any(f.path == artifact_path for f in mlflow_client(uri).list_artifacts(run_id, folder or None))


def download_artifacts(uri: str, run_id: str, artifact_path: str, dst: Path) -> Path:
    """Copy a run's artifact (file or folder) into ``dst``; returns the local path."""
    import mlflow.artifacts

    with quiet_mlflow():
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst),
                                                    tracking_uri=uri)
    return Path(local)


def read_text_artifact(uri: str, run_id: str, artifact_path: str) -> str:
    """The text of one small artifact of a run (e.g. the search's ``resolved_experiment.json``)."""
    with tempfile.TemporaryDirectory(prefix="drcaps-artifact-") as tmp:
        return download_artifacts(uri, run_id, artifact_path, Path(tmp)).read_text(encoding="utf-8")
