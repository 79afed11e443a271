"""The report's figures of a multi-objective search (issue 18): the Pareto front (front trials by rank, dominated
and infeasible trials apart, the pick marked) and the front's hypervolume over the trials. Drawn only for a search
with several objectives; the values are those ``search/publish/front.py`` decided and tagged on each trial run
(``drcaps.objectives``, ``drcaps.pareto_rank``; the parent's ``drcaps.pareto.*``), so report, summary and YAML agree.

Optuna's own plots take one target: for a study of several objectives, ``first_objective_study`` gives them the
first objective (a completed trial's first value; a stopped one counts with its best first-objective value at any
epoch, from the trial user attr ``intermediate.<metric>`` where drcaps keeps vector intermediates).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from search import pareto, ranking
from search.report.data import SearchData, Section, run_label
from search.storage import curve_attr

if TYPE_CHECKING:
    import optuna

FRONT_KEY, HYPERVOLUME_KEY = "pareto_front", "hypervolume"


def first_objective_study(study: optuna.Study, metric: str, mode: str) -> optuna.Study:
    """An in-memory single-objective copy of a study of several objectives: each finished trial with its first
    objective (see the module docstring); the study itself when it has one objective."""
    import optuna

    from search.report.study import _in_memory_study

    if len(study.directions) == 1:
        return study
    copy = _in_memory_study(study.directions[0])
    done, stopped = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    for t in study.get_trials(deepcopy=False, states=(done, stopped)):
        curve = [(int(e), float(v)) for e, v in t.user_attrs.get(curve_attr(metric), [])]
        found = ranking.best_epoch(curve, mode)
        value = t.values[0] if t.state == done and t.values else (found[1] if found else None)
        if value is None or not math.isfinite(value):
            continue
        copy.add_trial(optuna.trial.create_trial(       # a stopped trial counts with its best value
            params=t.params, distributions=t.distributions, value=value, user_attrs=t.user_attrs,
            intermediate_values=dict(curve)))
    return copy


def _number(run: Any) -> int:
    parts = (run.tags.get("mlflow.runName") or "").split()
    return int(parts[1]) if len(parts) > 1 and parts[0] == "trial" and parts[1].isdigit() else 10 ** 9


def _tagged(data: SearchData) -> list[tuple[Any, dict[str, float]]]:
    """(trial run, its values) for each trial publish tagged, in trial-number order."""
    rows = [(t, json.loads(t.tags["drcaps.objectives"])) for t in data.trials if t.tags.get("drcaps.objectives")]
    return sorted(rows, key=lambda row: _number(row[0]))


def front_sections(data: SearchData) -> list[Section]:
    """The front and the hypervolume over trials; none for a search of one objective."""
    s = data.experiment.search
    if not s.multi_objective:
        return []
    rows = _tagged(data)
    if not rows:
        return [Section(FRONT_KEY, "Pareto front", "", None, "Not drawn: no trial has its objective values recorded "
                        "(the search did not reach its end)")]
    return [_front_figure(data, rows), _hypervolume_figure(data, rows)]


def _front_figure(data: SearchData, rows: list[tuple[Any, dict[str, float]]]) -> Section:
    import plotly.graph_objects as go

    s = data.experiment.search
    (y_name, y_mode), (x_name, x_mode) = s.objective_pairs[0], s.objective_pairs[1]
    picked = data.parent.tags.get("drcaps.best_run_id")
    groups: dict[str, list[tuple[Any, dict[str, float]]]] = {"front": [], "dominated": [], "infeasible": []}
    for run, values in rows:
        group = "front" if run.tags.get("drcaps.pareto_rank") else (
            "infeasible" if not pareto.feasible(values, s.constraints) else "dominated")
        groups[group].append((run, values))
    groups["front"].sort(key=lambda row: int(row[0].tags["drcaps.pareto_rank"]))
    style = {"front": {"size": 11, "color": "#1f77b4"}, "dominated": {"size": 8, "color": "#aaaaaa"},
             "infeasible": {"size": 8, "color": "#d62728", "symbol": "x"}}
    fig: go.Figure = go.Figure()
    for group, members in groups.items():
        fig.add_scatter(x=[v.get(x_name) for _, v in members], y=[v.get(y_name) for _, v in members],
                        mode="lines+markers" if group == "front" else "markers", name=group, marker=style[group],
                        line={"shape": "hv", "dash": "dot"} if group == "front" else None,
                        text=[f"{run_label(r)}" + (f" (pareto-{r.tags['drcaps.pareto_rank']})" if group == "front"
                                                   else "") for r, _ in members])
    pick = [(r, v) for r, v in rows if r.run_id == picked]
    if pick:
        fig.add_scatter(x=[pick[0][1].get(x_name)], y=[pick[0][1].get(y_name)], mode="markers", name="pick",
                        marker={"size": 20, "symbol": "star", "color": "gold", "line": {"width": 1}})
    fig.update_layout(xaxis_title=f"{x_name} ({x_mode})", yaxis_title=f"{y_name} ({y_mode})")
    more = f" Only the first two of the {len(s.objective_pairs)} objectives are drawn." \
        if len(s.objective_pairs) > 2 else ""
    caption = (f"Each trial at its values ({y_name} at the epoch where it was best; costs as measured): the Pareto "
               f"front (feasible trials no other dominates, in the order of the pick rule "
               f"{data.parent.tags.get('drcaps.pareto.pick_rule', 'knee')}), the dominated trials, the trials outside "
               f"search.constraints, and the pick (star).{more}")
    return Section(FRONT_KEY, "Pareto front", caption, fig)


def _hypervolume_figure(data: SearchData, rows: list[tuple[Any, dict[str, float]]]) -> Section:
    import plotly.graph_objects as go

    s = data.experiment.search
    pairs = s.objective_pairs
    tagged = json.loads(data.parent.tags.get("drcaps.pareto.reference") or "{}")
    if set(tagged) != {m for m, _ in pairs}:
        return Section(HYPERVOLUME_KEY, "Hypervolume over trials", "", None, "Not drawn: the search run holds no "
                       "reference point (drcaps.pareto.reference)")
    reference = pareto.minimized([[tagged[m] for m, _ in pairs]], [mode for _, mode in pairs])[0]
    values = [v for _, v in rows]
    curve = []
    for k in range(1, len(values) + 1):
        front = pareto.pareto_front(values[:k], pairs, s.constraints)
        curve.append(pareto.hypervolume(pareto.objective_points([values[i] for i in front], pairs), reference))
    fig: go.Figure = go.Figure()
    fig.add_scatter(x=[_number(r) for r, _ in rows], y=curve, mode="lines+markers", name="hypervolume",
                    line={"shape": "hv"})
    fig.update_layout(xaxis_title="trial (Optuna number)", yaxis_title="hypervolume of the front so far")
    reference_text = ", ".join(f"{m} {tagged[m]:.4g}" for m, _ in pairs)
    caption = (f"The hypervolume dominated by the front of the trials up to each one (feasible trials only), in the "
               f"minimised space against the reference point {reference_text} (fixed once from every trial, so the "
               f"values compare): does the search still push the front out?")
    return Section(HYPERVOLUME_KEY, "Hypervolume over trials", caption, fig)
