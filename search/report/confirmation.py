"""The report's confirmation figure (issue 16): each confirmed top-k config's value in the search beside the mean
and spread of its confirmation runs (new seeds), the crowned pick marked. Drawn only for a search that confirmed."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from search import ranking, tracking
from search.report.data import SearchData, Section, best_value

if TYPE_CHECKING:
    import plotly.graph_objects as go

KEY = "confirmation"


def _number(run: tracking.RunRecord) -> int | None:
    """The Optuna trial number of a trial run, from its name ``trial N ...``."""
    parts = (run.tags.get("mlflow.runName") or "").split()
    return int(parts[1]) if len(parts) > 1 and parts[0] == "trial" and parts[1].isdigit() else None


def confirmation_section(data: SearchData, uri: str) -> Section | None:
    """None when the search did not confirm its winner."""
    import plotly.graph_objects as go

    runs = tracking.child_runs(uri, data.parent.run_id, role="confirm")
    if not runs:
        return None
    s = data.experiment.search
    values: dict[int, list[float]] = {}
    for r in runs:
        v = best_value(tracking.metric_history(uri, r.run_id, s.metric), s.mode)
        if v is not None:
            values.setdefault(int(r.tags["drcaps.confirms_trial"]), []).append(v)
    searched = {n: best_value(data.histories[t.run_id], s.mode) for t in data.trials if (n := _number(t)) is not None}
    numbers = ranking.rank(list(values), searched.get, s.mode)        # best first; no search value: last
    picked = data.parent.tags.get("drcaps.best_trial")
    labels = [f"trial {n}" + (" (crowned)" if str(n) == picked else "") for n in numbers]
    fig: go.Figure = go.Figure()
    fig.add_bar(name="search value", x=labels, y=[searched.get(n) for n in numbers])
    fig.add_bar(name="confirmed mean", x=labels, y=[statistics.fmean(values[n]) for n in numbers],
                error_y={"type": "data", "array": [statistics.stdev(values[n]) if len(values[n]) > 1 else 0.0
                                                   for n in numbers]})
    for n, label in zip(numbers, labels, strict=True):
        fig.add_scatter(x=[label] * len(values[n]), y=values[n], mode="markers", marker={"color": "black"},
                        name=f"runs of trial {n}", showlegend=False)
    fig.update_layout(barmode="group", yaxis_title=s.metric)
    which = (f"The first {len(numbers)} members of the Pareto front by search.pick" if s.multi_objective
             else f"The top {len(numbers)} configs by the search's ranking")
    rule = ("The pick rule, applied to the confirmed means (costs as measured), crowned one." if s.multi_objective
            else "The crowned config has the best confirmed mean.")
    caption = (f"{which}: their best {s.metric} in the search (the luckiest of many trials is biased upward) beside "
               f"the mean of their confirmation runs with new seeds (bars: one standard deviation; dots: each run). "
               f"{rule}")
    return Section(KEY, "Confirmation of the top configs", caption, fig)
