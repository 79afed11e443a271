"""The one ranking of trials: a trial's value is the BEST value of the search metric it reached at any epoch.

The printed table (search/tune/results.py), the registered model, the export at the end of ``drcaps search`` and
``drcaps export-best`` all rank by this rule. Ties keep the earlier epoch and the earlier trial. NaN and infinite
values never count. Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def sign(mode: str) -> float:
    """+1 for ``max``, -1 for ``min``: ``sign * value`` is larger for a better value."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return 1.0 if mode == "max" else -1.0


def best_epoch(history: Iterable[tuple[int, float]], mode: str) -> tuple[int, float] | None:
    """``(epoch, value)`` of the best finite value in ``[(epoch, value), ...]`` (the first such epoch on ties);
    None when there is none."""
    s = sign(mode)
    best: tuple[int, float] | None = None
    for epoch, value in sorted(history, key=lambda p: p[0]):
        if value is None or not math.isfinite(value):
            continue
        if best is None or s * value > s * best[1]:
            best = (int(epoch), float(value))
    return best


def rank(items: Sequence[T], value: Callable[[T], float | None], mode: str) -> list[T]:
    """``items`` best first by ``value(item)`` (stable: ties keep their order); items without a finite value last."""
    s = sign(mode)

    def key(item: T) -> float:
        v = value(item)
        return -s * v if v is not None and math.isfinite(v) else math.inf

    return sorted(items, key=key)


def better(a: float | None, b: float | None, mode: str) -> bool:
    """Whether ``a`` is strictly better than ``b`` under ``mode`` (a finite value beats a missing or non-finite one;
    ties are not better, so the earlier one stays best)."""
    s = sign(mode)
    if a is None or not math.isfinite(a):
        return False
    return b is None or not math.isfinite(b) or s * a > s * b


def best_of(items: Iterable[T], value: Callable[[T], float | None], mode: str) -> T | None:
    """The best item by ``value(item)`` (the first on ties), or None when no item has a finite value."""
    best: T | None = None
    for item in items:
        if better(value(item), value(best) if best is not None else None, mode):
            best = item
    return best
