"""Which trials of an earlier search a new search may take (``search.warm_start``), and why the others not: pure
functions over plain data (the experiments as ``experiment_to_dict`` writes them, the old trials' states and
params), so the rules are tested without Ray, Optuna or MLflow.

A taken trial keeps its value and its per-epoch values, so it must mean the same thing in the new search:

- a fixed setting of both searches that changes what the metric measures (the data, the epochs, the model's fixed
  fields, the metric itself) must be equal, or named in ``warm_start.allow_changed``: else the whole warm start is
  refused (:func:`changed_settings`);
- per trial (:func:`why_not`): it finished or was stopped early (COMPLETE or PRUNED), every value it used fits the
  new space, a field the new space searches and the old one fixed is filled in with the old fixed value (when it
  fits), and a field the old space searched and the new one fixes is a reason not to take it (its value was one
  of many, the new search holds one).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("model", "data", "train")
# Fixed settings that do not change what a trial's metric means: where and how fast it ran, its seed.
RUNTIME_FIELDS = frozenset({"data.data_dir", "data.download", "train.device", "train.num_threads",
                            "train.log_interval", "train.compile", "train.bf16", "train.seed"})
SEARCH_FIELDS = ("search.metric", "search.mode")
TAKEN_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class OldTrial:
    """One trial of the earlier study, as plain data."""

    number: int
    state: str                        # Optuna's TrialState name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: dict[str, Any]


@dataclass(frozen=True)
class Selection:
    """The old trials taken (their numbers -> params in the new space) and, by reason, how many were not."""

    taken: dict[int, dict[str, Any]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)

    def line(self, source: str) -> str:
        """``warm start from quickstart: took 5 of 8 trials; not taken: 2 with train.lr outside the new space``."""
        total = len(self.taken) + sum(self.skipped.values())
        why = "; ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"warm start from {source}: took {len(self.taken)} of {total} trials" + (
            f"; not taken: {why}" if why else "")


def rungs_line(scheduler: str, informed: int, taken: int, per_rung: Mapping[float, int]) -> str:
    """``warm start: ASHA's rungs start with 5 of the 6 taken trials (5 at epoch 1, 3 at epoch 2)``: how many taken
    trials the scheduler judges new trials against from their first rung (search/tune/moasha.py ``rung_prior``)."""
    where = ", ".join(f"{n} at epoch {m:g}" for m, n in per_rung.items() if n)
    return f"warm start: {scheduler}'s rungs start with {informed} of the {taken} taken trials" + (
        f" ({where})" if where else "")


def settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """An experiment (``experiment_to_dict``'s mapping) as ``{dotted field: value}``: every run field and the
    search's metric and mode."""
    out = {f"{section}.{key}": value for section in SECTIONS for key, value in (raw.get(section) or {}).items()}
    search = raw.get("search") or {}
    return out | {name: search.get(name.removeprefix("search.")) for name in SEARCH_FIELDS}


def space(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The experiment's search space: ``{dotted field: {type, low, high, log, step, choices}}``."""
    return {name: dict(spec) for name, spec in ((raw.get("search") or {}).get("space") or {}).items()}


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any],
                     allow: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``[(field, old value, new value)]``: the fixed settings of both searches that differ and change what the
    metric means (not a runtime field, not searched by either, not in ``allow``)."""
    before, after = settings(old), settings(new)
    searched = set(space(old)) | set(space(new))
    allowed = set(allow) | RUNTIME_FIELDS | searched
    return [(name, before.get(name), after.get(name)) for name in sorted(set(before) | set(after))
            if name not in allowed and _plain(before.get(name)) != _plain(after.get(name))]


def fits(value: Any, spec: Mapping[str, Any]) -> bool:
    """Whether the new space could have proposed ``value`` (a categorical's choices; an int or float within the
    bounds, on the step's grid)."""
    if spec.get("type") == "categorical":
        return any(_plain(value) == _plain(choice) and isinstance(value, bool) == isinstance(choice, bool)
                   for choice in spec["choices"])
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if spec.get("type") == "int" and not float(value).is_integer():
        return False
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if not low <= value <= high:
        return False
    return step is None or abs((value - low) / step - round((value - low) / step)) < 1e-8


def why_not(trial: OldTrial, old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``(params in the new space, None)`` for a trial the new search may take, else ``({}, reason)``."""
    if trial.state not in TAKEN_STATES:
        return {}, "failed or unfinished"
    old_space, new_space, fixed = space(old), space(new), settings(old)
    if dropped := sorted(set(old_space) - set(new_space)):
        return {}, f"searched {dropped[0]}, which the new search fixes"
    params: dict[str, Any] = {}
    for name, spec in new_space.items():
        if name in trial.params:
            value = trial.params[name]
            if not fits(value, spec):
                return {}, f"with {name} outside the new space"
        else:
            value = fixed.get(name)
            if not fits(value, spec):
                return {}, f"with {name} fixed at {value!r} before, outside the new space"
        params[name] = value
    return params, None


def select(trials: Iterable[OldTrial], old: Mapping[str, Any], new: Mapping[str, Any]) -> Selection:
    """The trials the new search takes, and by reason how many it does not."""
    selection = Selection()
    for trial in trials:
        params, reason = why_not(trial, old, new)
        if reason is None:
            selection.taken[trial.number] = params
        else:
            selection.skipped[reason] += 1
    return selection


def _plain(value: Any) -> Any:
    """Lists and tuples compare alike (YAML lists, dataclass tuples)."""
    return list(value) if isinstance(value, tuple) else value
