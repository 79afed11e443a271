"""search/pareto.py against brute forces and hand-computed cases."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from search.pareto import (
    constraint_values,
    crowding_distance,
    dominates,
    feasible,
    hypervolume,
    knee,
    minimized,
    non_dominated_sort,
    nsga2_order,
    objective_points,
    pareto_front,
    pick,
    rank_front,
    reference_point,
)


def random_points(seed: int, n: int, dims: int) -> list[tuple[float, ...]]:
    """Small integers (many ties) plus a few exact duplicates."""
    rng = random.Random(seed)
    points = [tuple(float(rng.randint(0, 5)) for _ in range(dims)) for _ in range(n)]
    return points + [rng.choice(points) for _ in range(n // 4)]


# ---------------------------------------------------------------------------------------------------- brute forces

def brute_fronts(points: list[tuple[float, ...]]) -> list[list[int]]:
    """Peel: the points no remaining point dominates, again and again (numpy comparisons, not pareto.dominates)."""
    arr = np.array(points)
    remaining, fronts = set(range(len(points))), []
    while remaining:
        front = [i for i in sorted(remaining)
                 if not any(np.all(arr[j] <= arr[i]) and np.any(arr[j] < arr[i]) for j in remaining)]
        fronts.append(front)
        remaining -= set(front)
    return fronts


def brute_crowding(points: list[tuple[float, ...]]) -> list[float]:
    """For each point and objective, find the neighbours in the (value, whole point) order by scanning."""
    distinct = set(points)
    out = []
    for p in points:
        total = 0.0
        for m in range(len(p)):
            key = (p[m], p)
            lower = [q for q in distinct if (q[m], q) < key]
            upper = [q for q in distinct if (q[m], q) > key]
            if not lower or not upper:
                total = math.inf
                continue
            prev = max(lower, key=lambda q: (q[m], q))
            nxt = min(upper, key=lambda q: (q[m], q))
            span = max(q[m] for q in distinct) - min(q[m] for q in distinct)
            total += (nxt[m] - prev[m]) / span
        out.append(total)
    return out


def brute_hypervolume(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Inclusion-exclusion over every non-empty subset: exact, exponential (a handful of points only)."""
    inside = [p for p in points if all(x < r for x, r in zip(p, ref))]
    total = 0.0
    for k in range(1, len(inside) + 1):
        for subset in itertools.combinations(inside, k):
            corner = [max(p[m] for p in subset) for m in range(len(ref))]
            total += (-1) ** (k + 1) * math.prod(r - c for r, c in zip(ref, corner))
    return total


# ---------------------------------------------------------------------------------------------------- sorting

@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dims", [2, 3])
def test_non_dominated_sort_matches_the_brute_force(seed: int, dims: int) -> None:
    points = random_points(seed, 24, dims)
    assert len(set(points)) < len(points)                   # duplicates present
    fronts = non_dominated_sort(points)
    assert fronts == brute_fronts(points)
    assert sorted(i for f in fronts for i in f) == list(range(len(points)))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dims", [2, 3])
def test_crowding_distance_matches_the_brute_force_on_every_front(seed: int, dims: int) -> None:
    points = random_points(100 + seed, 24, dims)
    for front in non_dominated_sort(points):
        members = [points[i] for i in front]
        assert crowding_distance(members) == pytest.approx(brute_crowding(members))


def test_crowding_distance_textbook_front_and_duplicates() -> None:
    front = [(1.0, 5.0), (2.0, 3.0), (4.0, 2.0), (5.0, 1.0)]
    assert crowding_distance(front) == [math.inf, 1.5, 1.25, math.inf]      # (4-1)/4 + (5-2)/4; (5-2)/4 + (3-1)/4
    assert crowding_distance([*front, (2.0, 3.0)])[-1] == 1.5               # a duplicate shares its twin's distance
    assert crowding_distance([(3.0, 3.0), (3.0, 3.0)]) == [math.inf, math.inf]


@pytest.mark.parametrize("seed", range(4))
def test_order_does_not_depend_on_input_order(seed: int) -> None:
    points = random_points(200 + seed, 20, 3)
    perm = list(range(len(points)))
    random.Random(seed).shuffle(perm)
    shuffled = [points[i] for i in perm]
    assert crowding_distance(shuffled) == [crowding_distance(points)[i] for i in perm]
    ranks = {i: r for r, f in enumerate(non_dominated_sort(points)) for i in f}
    assert {perm[k]: r for r, f in enumerate(non_dominated_sort(shuffled)) for k in f} == ranks


def test_nsga2_order_is_front_then_crowding_then_index() -> None:
    points = [(2.0, 3.0), (1.0, 5.0), (3.0, 4.0), (4.0, 2.0), (5.0, 1.0), (2.0, 3.0)]
    # front 0: 0, 1, 3, 4, 5 (5 duplicates 0); front 1: 2. Ends 1 and 4 inf, then 0/5 and 3 by crowding.
    d = crowding_distance([points[i] for i in (0, 1, 3, 4, 5)])
    assert d[0] == d[4] > d[2]
    assert nsga2_order(points) == [1, 4, 0, 5, 3, 2]


def test_minimized_negates_max_and_makes_nan_worst() -> None:
    assert minimized([(0.9, 2.0), (math.nan, 1.0)], ["max", "min"]) == [(-0.9, 2.0), (math.inf, 1.0)]
    assert dominates((-0.9, 2.0), (math.inf, 2.0))
    with pytest.raises(ValueError, match="mode"):
        minimized([(1.0,)], ["maximize"])


# ---------------------------------------------------------------------------------------------------- hypervolume

def test_hypervolume_2d_by_hand() -> None:
    # Staircase (1,3), (2,2), (3,1) under (4,4): rows y in [1,2) width 1, [2,3) width 2, [3,4) width 3 -> 6.
    pts = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]
    assert hypervolume(pts, (4.0, 4.0)) == 6.0
    extra = [*pts, (3.0, 3.0), (2.0, 2.0), (5.0, 0.0), (4.0, 1.0)]    # dominated, duplicate, outside, on the edge
    assert hypervolume(extra, (4.0, 4.0)) == 6.0
    assert hypervolume([(0.0, 0.0)], (2.0, 3.0)) == 6.0
    assert hypervolume([], (1.0, 1.0)) == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dims", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(seed: int, dims: int) -> None:
    rng = random.Random(seed)
    pts = [tuple(rng.uniform(0, 1) for _ in range(dims)) for _ in range(7)]
    ref = tuple(1.0 for _ in range(dims))
    assert hypervolume(pts, ref) == pytest.approx(brute_hypervolume(pts, ref), rel=1e-12, abs=1e-12)


def test_hypervolume_3d_against_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    pts = [tuple(p) for p in rng.uniform(0.1, 0.9, size=(12, 3))]
    ref = (1.0, 1.2, 1.0)
    samples = rng.uniform(0, 1, size=(400_000, 3)) * np.array(ref)
    covered = np.zeros(len(samples), dtype=bool)
    for p in pts:
        covered |= np.all(samples >= np.array(p), axis=1)
    box = math.prod(ref)
    estimate, sd = covered.mean() * box, box * math.sqrt(covered.mean() * (1 - covered.mean()) / len(samples))
    assert abs(hypervolume(pts, ref) - estimate) < 4 * sd, (hypervolume(pts, ref), estimate, sd)


def test_reference_point_is_past_the_worst_value() -> None:
    assert reference_point([(0.0, 10.0), (2.0, 20.0)]) == pytest.approx((2.2, 21.0))
    assert reference_point([(-0.5, 3.0), (-0.5, math.inf)]) == pytest.approx((-0.5 + 0.1, 3.3))


# ---------------------------------------------------------------------------------------------------- knee

def test_knee_is_farthest_from_the_line_through_the_extremes() -> None:
    front = [(0.0, 1.0), (0.2, 0.3), (0.5, 0.2), (1.0, 0.0)]           # distances below x + y = 1: 0, .5, .3, 0
    assert knee(front) == 1
    scaled = [(x * 1000.0, y * 0.001 + 7.0) for x, y in front]         # each objective normalised on its own
    assert knee(scaled) == 1
    assert knee([(1.0, 2.0)]) == 0
    assert knee([(0.0, 1.0), (1.0, 0.0)]) == 0                         # a tie: the better first objective


# ---------------------------------------------------------------------------------------------------- trials

TRIALS = [
    {"val_acc": 0.95, "latency_ms": 3.0, "params": 900},   # 0 front, slowest
    {"val_acc": 0.93, "latency_ms": 1.2, "params": 500},   # 1 front, the knee
    {"val_acc": 0.80, "latency_ms": 1.0, "params": 100},   # 2 front, fastest
    {"val_acc": 0.90, "latency_ms": 2.0, "params": 600},   # 3 dominated by 1
    {"val_acc": 0.97, "latency_ms": 5.0, "params": 950},   # 4 infeasible under latency_ms <= 4
    {"val_acc": 0.99, "params": 10},                       # 5 no latency: never on the front
]
OBJ = [("val_acc", "max"), ("latency_ms", "min")]


def test_constraints_and_feasibility() -> None:
    assert constraint_values(TRIALS[4], {"latency_ms": {"max": 4.0}, "val_acc": {"min": 0.9, "max": 1.0}}) == \
        pytest.approx([1.0, 0.97 - 1.0, 0.9 - 0.97])
    assert not feasible(TRIALS[4], {"latency_ms": {"max": 4.0}})
    assert feasible(TRIALS[0], {"latency_ms": {"max": 4.0}})
    assert constraint_values(TRIALS[5], {"latency_ms": {"max": 4.0}}) == [math.inf]


def test_front_excludes_dominated_infeasible_and_incomplete_trials() -> None:
    assert pareto_front(TRIALS, OBJ) == [0, 1, 2, 4]
    assert pareto_front(TRIALS, OBJ, {"latency_ms": {"max": 4.0}}) == [0, 1, 2]
    assert pareto_front([], OBJ) == []


def test_pick_knee_and_maximize_subject_to() -> None:
    limit = {"latency_ms": {"max": 4.0}}
    assert pick(TRIALS, OBJ, "knee", limit) == 1
    assert rank_front(TRIALS, OBJ, "knee", limit)[0] == 1
    assert pick(TRIALS, OBJ, {"maximize": "val_acc"}, limit) == 0
    rule = {"maximize": "val_acc", "subject_to": {"latency_ms": {"max": 1.5}}}
    assert rank_front(TRIALS, OBJ, rule, limit) == [1, 2, 0]          # those meeting subject_to first
    assert pick(TRIALS, OBJ, rule, limit) == 1
    assert pick(TRIALS, OBJ, {"minimize": "latency_ms"}, limit) == 2
    assert pick(TRIALS, OBJ, {"maximize": "val_acc", "subject_to": {"latency_ms": {"max": 0.5}}}, limit) is None
    assert pick([TRIALS[4]], OBJ, "knee", limit) is None
    with pytest.raises(ValueError, match="exactly one"):
        pick(TRIALS, OBJ, {"maximize": "val_acc", "minimize": "latency_ms"})


def test_front_hypervolume_in_the_metrics_units() -> None:
    points = objective_points([TRIALS[i] for i in pareto_front(TRIALS, OBJ, {"latency_ms": {"max": 4.0}})], OBJ)
    assert points == [(-0.95, 3.0), (-0.93, 1.2), (-0.80, 1.0)]
    # Reference val_acc 0, latency 4 ms -> (-0, 4). Rows by latency: [1.0, 1.2) width 0.80, [1.2, 3) 0.93, [3, 4) 0.95.
    assert hypervolume(points, (0.0, 4.0)) == pytest.approx(0.80 * 0.2 + 0.93 * 1.8 + 0.95 * 1.0)
    assert minimized([(-0.5, 4.0)], ["max", "min"]) == [(0.5, 4.0)]            # back in the metrics' own units
    assert objective_points([TRIALS[5]], OBJ) == [(-0.99, math.inf)]
