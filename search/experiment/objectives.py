"""What a search optimises when it has several objectives: ``search.objectives``, ``search.constraints`` and
``search.pick``, checked as data (:class:`~drcapsnet.errors.Problem`: the dotted field and what is wrong, with the fix).

The forms, as written in an experiment file and kept as plain values in ``SearchConfig`` (so that a dumped file
loads back equal)::

    objectives:  [{metric: val_acc, mode: max}, {metric: latency_ms, mode: min}]   # search.metric/mode: the first
    constraints: {latency_ms: {max: 2.0}, params: {max: 2.0e+6}}                   # {max: V} and/or {min: V}
    pick: knee                        # or {maximize: val_acc, subject_to: {latency_ms: {max: 1.5}}}

The metrics a trial offers: its per-epoch ones and its costs (``drcapsnet/cost.py``; ``train_s_per_epoch`` from its
epochs). ``test_*`` come once, after the last epoch: never at a rung, and a search must not choose on the test split.
The meaning of the knee and of the pick rule: ``search/pareto.py``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from drcapsnet.errors import Problem, need

EPOCH_METRICS: tuple[str, ...] = ("val_acc", "val_loss", "train_acc", "train_loss")
COST_METRICS: tuple[str, ...] = ("params", "flops", "latency_ms", "train_s_per_epoch")
MODEL_COSTS: tuple[str, ...] = ("params", "flops", "latency_ms")   # what the model is, measured once per trial
OBJECTIVE_METRICS: tuple[str, ...] = EPOCH_METRICS + COST_METRICS
MULTI_OBJECTIVE_SAMPLERS: tuple[str, ...] = ("tpe", "nsga2", "gp", "random")
_OBJECTIVE_KEYS: tuple[str, ...] = ("metric", "mode")
_PICK_KEYS: tuple[str, ...] = ("maximize", "minimize", "subject_to")
_PICK_FORMS = "knee or {maximize|minimize: METRIC, subject_to: {METRIC: {max: V}}}"


def _close(name: object, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def objective_pairs(objectives: Sequence[Any], metric: str, mode: str) -> tuple[tuple[str, str], ...]:
    """``(metric, mode)`` of each objective: ``search.objectives``, or the one ``search.metric``/``search.mode``."""
    if not objectives:
        return ((metric, mode),)
    return tuple((str(o.get("metric")), str(o.get("mode"))) for o in objectives if isinstance(o, Mapping))


def first_objective_defaults(values: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """Validation's step: with ``search.objectives`` given and ``search.metric``/``search.mode`` left out of
    ``values`` (the raw mapping), ``kwargs`` gets the first objective's (when valid: a bad one is reported once, at
    the objective)."""
    objectives = kwargs.get("objectives")
    first = objectives[0] if isinstance(objectives, (list, tuple)) and objectives else None
    if isinstance(first, Mapping):
        for key, valid in (("metric", OBJECTIVE_METRICS), ("mode", ("max", "min"))):
            if key not in values and first.get(key) in valid:
                kwargs[key] = first[key]


def _objectives_problems(objectives: Sequence[Any]) -> list[Problem]:
    out: list[Problem] = []
    seen: list[str] = []
    for i, obj in enumerate(objectives):
        where = f"search.objectives[{i}]"
        if not isinstance(obj, Mapping):
            out.append(Problem(where, f"expected a mapping {{metric: METRIC, mode: max|min}}, got {obj!r}"))
            continue
        out += [Problem(f"{where}.{key}", f"unknown key{_close(key, _OBJECTIVE_KEYS)}") for key in obj
                if key not in _OBJECTIVE_KEYS]
        metric, mode = obj.get("metric"), obj.get("mode")
        if metric is None:
            out.append(Problem(f"{where}.metric", f"required, one of {', '.join(OBJECTIVE_METRICS)}"))
        elif need(out, metric in OBJECTIVE_METRICS, f"{where}.metric", f"unknown metric {metric!r}"
                  f"{_close(metric, OBJECTIVE_METRICS)}; a trial offers {', '.join(OBJECTIVE_METRICS)}"):
            need(out, metric not in seen, f"{where}.metric", f"{metric!r} is already an objective; list it once")
            seen.append(metric)
        need(out, mode in ("max", "min"), f"{where}.mode",
             "required, max or min" if mode is None else f"must be max or min, got {mode!r}")
    return out


def _bounds_problems(where: str, metric: object, bounds: Any, produced: Sequence[str], what: str) -> list[Problem]:
    """Problems of one ``METRIC: {max: V, min: V}`` entry; ``produced``: the metrics it may name (``what`` them)."""
    out: list[Problem] = []
    need(out, metric in produced, where, f"{metric!r} is not {what}{_close(metric, produced)}; "
         f"use one of {', '.join(produced)}")
    if not (isinstance(bounds, Mapping) and bounds and all(k in ("max", "min") for k in bounds)):
        return [*out, Problem(where, f"expected {{max: V}} or {{min: V}} (or both), got {bounds!r}")]
    ok = True
    for side, value in bounds.items():
        ok &= need(out, isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                   f"{where}.{side}", f"must be a finite number, got {value!r}")
    if ok and "max" in bounds and "min" in bounds:
        need(out, bounds["min"] <= bounds["max"], where,
             f"min {bounds['min']!r} is above max {bounds['max']!r}: no trial can meet it; swap them")
    return out


def _pick_problems(pick: Any, names: Sequence[str]) -> list[Problem]:
    if pick == "knee":
        return []
    if not isinstance(pick, Mapping):
        return [Problem("search.pick", f"must be {_PICK_FORMS}, got {pick!r}")]
    out = [Problem(f"search.pick.{key}", f"unknown key{_close(key, _PICK_KEYS)}") for key in pick
           if key not in _PICK_KEYS]
    goals = [key for key in ("maximize", "minimize") if key in pick]
    if len(goals) != 1:
        return [*out, Problem("search.pick", f"needs exactly one of maximize, minimize, got {dict(pick)!r}; "
                              f"write {_PICK_FORMS}")]
    target = pick[goals[0]]
    need(out, target in names, f"search.pick.{goals[0]}",
         f"{target!r} is not an objective{_close(target, names)}; use one of {', '.join(names)}")
    subject_to = pick.get("subject_to") or {}
    if not isinstance(subject_to, Mapping):
        return [*out, Problem("search.pick.subject_to", f"expected {{METRIC: {{max: V}}}}, got {subject_to!r}")]
    for metric, bounds in subject_to.items():
        out += _bounds_problems(f"search.pick.subject_to.{metric}", metric, bounds, names, "an objective")
    return out


def objective_problems(objectives: Sequence[Any], constraints: Any, pick: Any, *, metric: str, mode: str,
                       sampler: str, scheduler: str) -> list[Problem]:
    """Every problem of ``search.objectives``/``constraints``/``pick`` and of their fit with the single
    ``metric``/``mode`` (the first objective's when objectives are given), the sampler and the scheduler."""
    out = _objectives_problems(objectives)
    pairs = objective_pairs(objectives, metric, mode)
    if objectives and not out:
        first_metric, first_mode = pairs[0]
        need(out, metric == first_metric, "search.metric", f"is the first objective's metric ({first_metric!r}) "
             f"when search.objectives is given, got {metric!r}; leave search.metric out")
        need(out, mode == first_mode, "search.mode", f"is the first objective's mode ({first_mode!r}) when "
             f"search.objectives is given, got {mode!r}; leave search.mode out")
    if len(pairs) > 1:
        need(out, sampler in MULTI_OBJECTIVE_SAMPLERS, "search.sampler", f"{sampler!r} cannot search several "
             f"objectives; use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}")
        need(out, scheduler != "median", "search.scheduler.name", "'median' stops trials on one metric; with "
             "several objectives use asha (MO-ASHA) or none")
    if not isinstance(constraints, Mapping):
        out.append(Problem("search.constraints", f"expected {{METRIC: {{max: V}}}}, got {constraints!r}"))
    else:
        for name, bounds in constraints.items():
            out += _bounds_problems(f"search.constraints.{name}", name, bounds, OBJECTIVE_METRICS,
                                    "a metric a trial produces")
    out += _pick_problems(pick, list(dict.fromkeys(m for m, _ in pairs)))
    return out


def measured_costs(objectives: Sequence[Any], constraints: Mapping[str, Any], pick: Any) -> tuple[str, ...]:
    """The cost metrics (``COST_METRICS``) the objectives, constraints or pick name: what each trial must measure."""
    named = {o.get("metric") for o in objectives if isinstance(o, Mapping)} | set(constraints)
    if isinstance(pick, Mapping):
        named |= set(pick.get("subject_to") or {})
    return tuple(m for m in COST_METRICS if m in named)
