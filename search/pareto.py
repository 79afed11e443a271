"""Pareto fronts of trials over several objectives: non-dominated sorting, crowding distance, hypervolume, the knee,
feasibility under ``search.constraints`` and the pick rule ``search.pick``.

Pure: no Ray, no Optuna, no MLflow, no numpy. Two layers:

- **Vectors** (``non_dominated_sort``, ``crowding_distance``, ``nsga2_order``, ``hypervolume``, ``knee``): points as
  sequences of floats, every objective MINIMISED. ``minimized(points, modes)`` turns ``max`` objectives into
  minimised ones (negated) and NaN into ``+inf`` (the worst value), so every layer above compares one way.
- **Trials** (``feasible``, ``constraint_values``, ``pareto_front``, ``rank_front``, ``pick``): each trial a mapping
  ``metric -> value`` (its objective values, however the caller summarised them), objectives as ``(metric, mode)``
  pairs, constraints as ``{metric: {max: V, min: V}}`` and the pick rule as ``"knee"`` or
  ``{maximize|minimize: metric, subject_to: {metric: {max|min: V}}}``: the experiment file's forms, as they are.

Definitions (what the tests check):

- ``a`` dominates ``b``: ``a <= b`` in every objective and ``a < b`` in at least one. Equal points do not dominate
  each other, so duplicates share a front.
- Non-dominated sorting (Deb et al. 2002, NSGA-II): front 0 holds the points no point dominates; front k those that
  only points of fronts < k dominate.
- Crowding distance (NSGA-II), within one set of points: per objective, the DISTINCT points are sorted by that
  objective (ties by the whole point, so the order does not depend on the input order); the first and last get
  ``inf``, each other adds ``(next - previous) / (max - min)`` (nothing when ``max - min`` is 0 or not finite).
  A duplicate gets the distance of the point it duplicates.
- Hypervolume: the measure of the region dominated by the points and bounded by the reference point (minimised
  space; points not strictly better than the reference in every objective add nothing). 2-D: an exact sweep.
  n-D: exact, by slicing (HSO, While et al. 2006): sorted on the last objective, each slab between consecutive
  values is the (n-1)-D hypervolume of the points at or below it times the slab's thickness; O(N^(n-1)), meant for
  the tens to hundreds of trials of a search, not for thousands of points in many objectives.
- Knee: each objective normalised over the given points to [0, 1] (0 = the best value among them, 1 = the worst);
  the knee is the point with the largest distance below the hyperplane through the unit points ``(1, 0, ...),
  (0, 1, ...)``, i.e. the smallest sum of normalised objectives. In 2-D the two extreme points of a front are exactly
  ``(0, 1)`` and ``(1, 0)`` after normalising, so this is the front point farthest from the line through the
  extreme points (Das 1999; Branke et al. 2004, "Finding knees in multi-objective optimization"). Ties: the better
  first objective, then the earlier point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Point = tuple[float, ...]
Objectives = Sequence[tuple[str, str]]          # (metric, mode) pairs, mode "max" or "min"
Constraints = Mapping[str, Mapping[str, float]]  # {metric: {"max": V} and/or {"min": V}}


# ---------------------------------------------------------------------------------------------------- vectors

def minimized(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[Point]:
    """``points`` with every ``max`` objective negated and NaN made ``+inf`` (the worst): all objectives minimised."""
    for mode in modes:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    out = []
    for p in points:
        if len(p) != len(modes):
            raise ValueError(f"a point has {len(p)} values for {len(modes)} objectives: {tuple(p)!r}")
        out.append(tuple(math.inf if math.isnan(v) else (-v if m == "max" else float(v)) for v, m in zip(p, modes)))
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` (minimised): no worse in every objective, better in one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_sort(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Fronts of point indices, the non-dominated front first, indices ascending within each (Deb's fast sort)."""
    n = len(points)
    dominated_by_me: list[list[int]] = [[] for _ in range(n)]
    count = [0] * n                                        # how many points dominate point i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominated_by_me[i].append(j)
                count[j] += 1
            elif dominates(points[j], points[i]):
                dominated_by_me[j].append(i)
                count[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in range(n) if count[i] == 0]
    while current:
        fronts.append(sorted(current))
        following = []
        for i in current:
            for j in dominated_by_me[i]:
                count[j] -= 1
                if count[j] == 0:
                    following.append(j)
        current = following
    return fronts


def crowding_distance(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance of each point among ``points`` (one front); see the module docstring."""
    distinct = sorted({tuple(map(float, p)) for p in points})
    dist = dict.fromkeys(distinct, 0.0)
    if not distinct:
        return []
    for m in range(len(distinct[0])):
        order = sorted(distinct, key=lambda p: (p[m], p))
        span = order[-1][m] - order[0][m]
        dist[order[0]] = dist[order[-1]] = math.inf
        if span <= 0 or not math.isfinite(span):
            continue
        for prev, here, nxt in zip(order, order[1:], order[2:]):
            dist[here] += (nxt[m] - prev[m]) / span
    return [dist[tuple(map(float, p))] for p in points]


def nsga2_order(points: Sequence[Sequence[float]]) -> list[int]:
    """Point indices best first: by front, then by crowding distance within the front (larger first), then by
    index (earlier first). MO-ASHA's rung ranking (``search/tune/moasha.py``)."""
    key: dict[int, tuple[int, float, int]] = {}
    for rank, front in enumerate(non_dominated_sort(points)):
        for i, d in zip(front, crowding_distance([points[i] for i in front])):
            key[i] = (rank, -d, i)
    return sorted(key, key=key.__getitem__)


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The hypervolume the minimised ``points`` dominate up to ``reference`` (exact; 2-D sweep, n-D slicing)."""
    ref = tuple(float(r) for r in reference)
    inside = [tuple(map(float, p)) for p in points if len(p) == len(ref) and all(x < r for x, r in zip(p, ref))]
    if not inside:
        return 0.0
    return _hv(sorted(set(inside), key=lambda p: p[-1]), ref)


def _hv(points: list[Point], ref: Point) -> float:
    """Hypervolume of distinct ``points`` sorted by their last objective, all strictly inside ``ref``."""
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in points)
    if len(ref) == 2:                                      # sweep on y: the x frontier only improves
        area, best_x = 0.0, math.inf
        for here, nxt in zip(points, [*points[1:], None]):
            best_x = min(best_x, here[0])
            top = ref[1] if nxt is None else nxt[1]
            area += (ref[0] - best_x) * (top - here[1])
        return area
    volume = 0.0
    for k, here in enumerate(points):                      # slab [here.z, next.z): points 0..k dominate it
        top = ref[-1] if k + 1 == len(points) else points[k + 1][-1]
        if top > here[-1]:
            below = sorted({p[:-1] for p in points[:k + 1]}, key=lambda p: p[-1])
            volume += _hv(below, ref[:-1]) * (top - here[-1])
    return volume


def reference_point(points: Sequence[Sequence[float]], margin: float = 0.1) -> Point:
    """A reference point for the minimised ``points``: the worst finite value of each objective plus ``margin`` times
    that objective's finite range (plus ``margin * max(1, |worst|)`` when the range is 0). Fix it once per search
    (from all its trials) so that hypervolumes over time compare."""
    if not points:
        raise ValueError("reference_point needs at least one point")
    out = []
    for m in range(len(points[0])):
        values = [p[m] for p in points if math.isfinite(p[m])]
        if not values:
            raise ValueError(f"objective {m} has no finite value")
        worst, span = max(values), max(values) - min(values)
        out.append(worst + margin * (span if span > 0 else max(1.0, abs(worst))))
    return tuple(out)


def _normalized_sums(points: Sequence[Sequence[float]]) -> list[float]:
    lows = [min(p[m] for p in points) for m in range(len(points[0]))]
    highs = [max(p[m] for p in points) for m in range(len(points[0]))]
    return [sum((v - lo) / (hi - lo) for v, lo, hi in zip(p, lows, highs) if math.isfinite(hi - lo) and hi > lo)
            for p in points]


def knee(points: Sequence[Sequence[float]]) -> int:
    """Index of the knee of the minimised ``points`` (meant for a front; see the module docstring)."""
    if not points:
        raise ValueError("knee of no points")
    sums = _normalized_sums(points)
    return min(range(len(points)), key=lambda i: (sums[i], points[i][0], i))


# ---------------------------------------------------------------------------------------------------- trials

def _value(metrics: Mapping[str, Any], name: str) -> float:
    v = metrics.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def constraint_values(metrics: Mapping[str, Any], constraints: Constraints) -> list[float]:
    """One value per bound, in ``constraints``' order (``max`` before ``min``): ``value - max`` or ``min - value``,
    feasible when <= 0 (Optuna's ``constraints_func`` convention). A missing or NaN metric gives ``inf``."""
    out = []
    for name, bounds in constraints.items():
        v = _value(metrics, name)
        for side in ("max", "min"):
            if side in bounds:
                out.append(math.inf if math.isnan(v) else (v - bounds[side] if side == "max" else bounds[side] - v))
    return out


def feasible(metrics: Mapping[str, Any], constraints: Constraints) -> bool:
    """Whether ``metrics`` meet every bound of ``constraints`` (a missing or NaN metric does not)."""
    return all(c <= 0 for c in constraint_values(metrics, constraints))


def objective_points(trials: Sequence[Mapping[str, Any]], objectives: Objectives) -> list[Point]:
    """Each trial's objective values as a minimised point (a missing or NaN value: ``inf``), ready for
    ``hypervolume`` and ``reference_point``. ``minimized`` is its own inverse on finite values: apply it to a
    minimised point (a reference point, say) with the same modes to get it back in the metrics' own units."""
    modes = [mode for _, mode in objectives]
    return minimized([[_value(t, name) for name, _ in objectives] for t in trials], modes)


def pareto_front(trials: Sequence[Mapping[str, Any]], objectives: Objectives,
                 constraints: Constraints | None = None) -> list[int]:
    """Indices (ascending) of the feasible trials with a finite value for every objective that no other such trial
    dominates: the Pareto front of the search."""
    points = objective_points(trials, objectives)
    usable = [i for i, (t, p) in enumerate(zip(trials, points))
              if all(math.isfinite(v) for v in p) and feasible(t, constraints or {})]
    fronts = non_dominated_sort([points[i] for i in usable])
    return [usable[k] for k in fronts[0]] if fronts else []


def _rule(rule: str | Mapping[str, Any]) -> tuple[str, str, Constraints] | None:
    """``(metric, mode, subject_to)`` of a ``maximize``/``minimize`` rule; None for ``knee``."""
    if rule == "knee":
        return None
    if not isinstance(rule, Mapping):
        raise ValueError(f"pick rule must be 'knee' or a mapping, got {rule!r}")
    goals = [(rule[k], "max" if k == "maximize" else "min") for k in ("maximize", "minimize") if k in rule]
    if len(goals) != 1:
        raise ValueError(f"pick rule needs exactly one of maximize, minimize, got {dict(rule)!r}")
    return goals[0][0], goals[0][1], rule.get("subject_to") or {}


def rank_front(trials: Sequence[Mapping[str, Any]], objectives: Objectives, rule: str | Mapping[str, Any] = "knee",
               constraints: Constraints | None = None) -> list[int]:
    """The Pareto front's trial indices ranked by the pick rule, the pick first.

    ``knee``: by distance below the normalised hyperplane (the knee first; module docstring). ``{maximize: m,
    subject_to: ...}``: the trials that meet ``subject_to`` first, by ``m`` (best first), then the others by ``m``;
    ties by the objectives in order, then by index."""
    front = pareto_front(trials, objectives, constraints)
    if not front:
        return []
    points = objective_points([trials[i] for i in front], objectives)
    parsed = _rule(rule)
    if parsed is None:
        sums = _normalized_sums(points)
        order = sorted(range(len(front)), key=lambda k: (sums[k], points[k], front[k]))
    else:
        metric, mode, subject_to = parsed
        goal = minimized([[_value(trials[i], metric)] for i in front], [mode])
        order = sorted(range(len(front)), key=lambda k: (not feasible(trials[front[k]], subject_to), goal[k],
                                                          points[k], front[k]))
    return [front[k] for k in order]


def pick(trials: Sequence[Mapping[str, Any]], objectives: Objectives, rule: str | Mapping[str, Any] = "knee",
         constraints: Constraints | None = None) -> int | None:
    """Index of the trial the pick rule chooses from the Pareto front; None when the front is empty or no front
    trial meets the rule's ``subject_to``."""
    ranked = rank_front(trials, objectives, rule, constraints)
    parsed = _rule(rule)
    if not ranked or (parsed is not None and not feasible(trials[ranked[0]], parsed[2])):
        return None
    return ranked[0]
