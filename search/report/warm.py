"""The report's list of the trials a warm start took from an earlier search (``search.warm_start``): each one's
number in this study, where it came from (``<old study>#<old number>``), its value and its MLflow run (in the earlier
search). They are in the study's plots with the new trials; this table marks them. Drawn only for a warm start."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from search import tracking
from search.report.data import SearchData, Section
from search.storage import MLFLOW_RUN_ATTR, WARM_START_ATTR

if TYPE_CHECKING:
    import optuna

KEY = "warm_start"


def _link(uri: str, run_id: Any) -> str:
    try:
        return tracking.run_url(uri, str(run_id)) if run_id else "-"
    except Exception:                            # the earlier run deleted since: say so, keep the report
        return f"{run_id} (not found)"


def warm_start_section(data: SearchData, study: optuna.Study, uri: str) -> Section | None:
    """None when no trial of the study was taken from another search."""
    import plotly.graph_objects as go

    taken = [t for t in study.get_trials(deepcopy=False) if WARM_START_ATTR in t.user_attrs]
    if not taken:
        return None
    metric = data.experiment.search.metric
    values = [f"{t.values[0]:.4f}" if t.values and math.isfinite(t.values[0]) else "stopped early" for t in taken]
    figure = go.Figure(go.Table(
        header={"values": ["trial", "taken from", metric, "MLflow run (earlier search)"]},
        cells={"values": [[t.number for t in taken], [t.user_attrs[WARM_START_ATTR] for t in taken], values,
                          [_link(uri, t.user_attrs.get(MLFLOW_RUN_ATTR)) for t in taken]]}))
    source = data.parent.tags.get("drcaps.warm_start", "an earlier search")
    return Section(KEY, f"Trials taken from {source}",
                   f"{len(taken)} trials of {source} whose values fit this search's space, copied into its study with "
                   "their per-epoch values before the first suggestion, without retraining. They inform the sampler "
                   "and appear in the plots above; they are never crowned: their runs and checkpoints belong to the "
                   "earlier search.", figure)
