"""What a search's report is made of: the figures it holds (``FIGURES``), a :class:`Section` per figure, and the
search as read back from MLflow (:class:`SearchData`: the parent run, its trial runs, their metric histories, the
best trial), through ``search.tracking`` only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search import ranking, tracking

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from search.experiment import Experiment

REPORT_ARTIFACT = "report"          # the parent run's artifact folder holding report.html
TOP_CURVES = 10                     # learning curves drawn: the best trials
DIAGNOSTIC_IMAGES = 256             # test images for the coupling entropy (one routing pass per iteration count)
RECONSTRUCTIONS = 10                # inputs shown beside their reconstructions
FIGURES = ("optimization_history", "parallel_coordinates", "param_importances", "learning_curves",
           "confusion_matrix", "coupling_entropy", "capsule_lengths", "reconstructions", "perturbation_grid")


@dataclass(frozen=True)
class Section:
    key: str                        # one of FIGURES
    title: str
    caption: str                    # what the figure shows and how to read it
    figure: go.Figure | None
    note: str = ""                  # why there is no figure, or what it is built from


@dataclass(frozen=True)
class SearchData:
    """What the report needs from MLflow about one search."""

    experiment: Experiment
    parent: tracking.RunRecord
    trials: list[tracking.RunRecord]
    histories: dict[str, list[tuple[int, float]]]      # run id -> [(epoch, metric)]
    best: tracking.RunRecord | None


def load(uri: str, experiment: str, parent_run_id: str | None) -> SearchData:
    from search.experiment import experiment_from_dict

    if parent_run_id is None:
        latest = tracking.latest_search_run(uri, experiment)      # smoke tests do not count
        if latest is None:
            raise tracking.TrackingError(f"EXPERIMENT: no search of {experiment!r} at {uri}; run 'drcaps search' "
                                         "first, or pass the --tracking-uri the search used")
        parent = latest
    else:
        parent = tracking.get_run(uri, parent_run_id)
    raw = json.loads(tracking.read_text_artifact(uri, parent.run_id, "resolved_experiment.json"))
    exp = experiment_from_dict(raw, source=f"run {parent.run_id}")
    trials = tracking.child_runs(uri, parent.run_id)
    histories = {t.run_id: tracking.metric_history(uri, t.run_id, exp.search.metric) for t in trials}
    best_id = parent.tags.get("drcaps.best_run_id")
    best = next((t for t in trials if t.run_id == best_id), None)
    if best is None:
        scored = [t for t in trials if t.status != "FAILED"]
        best = ranking.best_of(scored, lambda t: best_value(histories[t.run_id], exp.search.mode), exp.search.mode)
    return SearchData(exp, parent, trials, histories, best)


def best_value(history: list[tuple[int, float]], mode: str) -> float | None:
    """A trial's value in the one ranking (``search.ranking``): its best finite value at any epoch, or None."""
    best = ranking.best_epoch(history, mode)
    return None if best is None else best[1]


def trial_params(exp: Experiment, run: tracking.RunRecord) -> dict[str, Any]:
    """The searched params of a trial run, typed back from MLflow's strings."""
    from search.experiment import parse_override

    return {k: parse_override(f"{k}={run.params[k]}")[1] for k in exp.search.space if k in run.params}


def run_label(run: tracking.RunRecord) -> str:
    return run.tags.get("mlflow.runName") or run.tags.get("drcaps.trial_id") or run.run_id[:8]


def run_outcome(run: tracking.RunRecord) -> str:
    return run.tags.get("drcaps.outcome") or {"FINISHED": "finished", "KILLED": "stopped_early"}.get(
        run.status, "failed")
