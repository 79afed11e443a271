"""The earlier search a new run builds on, found and checked before any work (search/plan.py): the finished search
that ``--extend N`` continues, and the search whose trials ``search.warm_start`` copies (search/warm_start.py says
which). Read-only: MLflow through ``search.tracking``, the state file, the Optuna study's name; nothing is written.

After the run, :func:`taken_trials` reads back which trials of a study were copied from another one (the summary and
the report mark them; they are never crowned: their runs and checkpoints belong to the other search). Before the
first new trial, :func:`taken_curves` reads their per-epoch values, which start ASHA's rungs (search/tune/searcher.py
``make_scheduler``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drcapsnet.errors import TrackingError, UsageError
from search import state, tracking
from search.errors import BusyError
from search.experiment import Experiment, experiment_to_dict
from search.storage import MLFLOW_RUN_ATTR, WARM_START_ATTR, curve_attr, trial_curve
from search.warm_start import changed_settings, space

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

STUDY_TAG = "drcaps.study_name"              # on a search's parent run: its Optuna study
STORAGE_TAG = "drcaps.optuna_storage"        # on a search's parent run: its storage URL, any password as ***


@dataclass(frozen=True)
class EarlierSearch:
    """A search recorded before this one: its MLflow experiment and parent run, its Optuna study and storage, and
    the experiment it ran (``experiment_to_dict``'s mapping, from its ``resolved_experiment.json``)."""

    experiment: str
    parent_run_id: str
    study_name: str
    storage_url: str
    settings: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TakenTrial:
    """A trial of this search's study copied from an earlier search (not retrained)."""

    number: int                       # its number in this study
    source: str                       # "<old study>#<old number>"
    value: float | None               # its value (None: stopped early, PRUNED)
    run_id: str | None                # its MLflow run, in the earlier search


def _settings(uri: str, run_id: str) -> dict[str, Any]:
    return json.loads(tracking.read_text_artifact(uri, run_id, "resolved_experiment.json"))


def finished_search(exp: Experiment, folder: Path, uri: str, storage_url: str, resume_command: str) -> EarlierSearch:
    """The latest search of ``exp`` in ``folder`` (its state file), for ``--extend``: it must have finished (not
    running, not interrupted) and have run the same experiment."""
    saved_file = folder / state.STATE_FILE
    if not saved_file.is_file():
        raise UsageError(f"--extend: no search of '{exp.name}' in {folder} to extend; run it without --extend "
                         "first, or pass the --storage-path it used")
    saved = json.loads(saved_file.read_text())
    try:
        state.SearchLock(folder / state.LOCK_FILE).check_free(exp.name)
    except BusyError:
        raise UsageError(f"--extend: the search of '{exp.name}' in {folder} is still running; wait for it to end, "
                         f"then extend it (an interrupted one continues with: {resume_command})") from None
    run = tracking.get_run(uri, saved["parent_run_id"])
    if run.status != "FINISHED":
        raise UsageError(f"--extend: the latest search of '{exp.name}' ({saved['study_name']}) did not finish (its "
                         f"MLflow run is {run.status}); continue it first with: {resume_command}")
    earlier = EarlierSearch(exp.mlflow_experiment, run.run_id, saved["study_name"], storage_url,
                            _settings(uri, run.run_id))
    new = experiment_to_dict(exp)
    changed = [f"{name}: {a!r} -> {b!r}" for name, a, b in changed_settings(earlier.settings, new)]
    if space(earlier.settings) != space(new):
        changed.append("search.space")
    if changed:
        raise UsageError(f"--extend: the experiment differs from the search it extends ({'; '.join(changed)}); "
                         "extend it with the same settings, or start a new search (search.warm_start takes its "
                         "trials)")
    return earlier


def warm_start_source(exp: Experiment, uri: str, storage_url: str) -> EarlierSearch | None:
    """The latest search of ``search.warm_start.experiment``, its fixed settings checked against ``exp``'s (those
    that change what the metric means must be equal or named in ``allow_changed``); None without a warm start."""
    ws = exp.search.warm_start
    if not ws:
        return None
    name = ws["experiment"]
    # Never create a store to look in it. (Not check_store_exists: its header read would drop this process's SQLite
    # locks on a store it may hold open, search/stores.py sqlite_problem.)
    db = Path(uri.removeprefix("sqlite:///").partition("?")[0]) if uri.startswith("sqlite:///") else None
    try:
        run = None if db is not None and not db.is_file() else tracking.latest_search_run(uri, name)
    except TrackingError:
        run = None
    if run is None or not run.tags.get(STUDY_TAG):
        raise UsageError(f"search.warm_start.experiment: no search of {name!r} at {uri}; run one first, or name an "
                         "experiment that has one (--tracking-uri: the store it was recorded in)")
    tagged = run.tags.get(STORAGE_TAG, "")
    earlier = EarlierSearch(name, run.run_id, run.tags[STUDY_TAG],
                            tagged if tagged and "***" not in tagged else storage_url, _settings(uri, run.run_id))
    changed = changed_settings(earlier.settings, experiment_to_dict(exp), ws.get("allow_changed", ()))
    if changed:
        shown = "; ".join(f"{n}: {a!r} -> {b!r}" for n, a, b in changed)
        raise UsageError(f"search.warm_start: the search of {name!r} ran with other settings that change what its "
                         f"metric means ({shown}); name them in search.warm_start.allow_changed to take its trials "
                         "anyway, or warm-start from another experiment")
    _check_study(earlier)
    return earlier


def _check_study(earlier: EarlierSearch) -> None:
    import optuna

    from search.storage import tuned_optuna_storage
    from search.stores import masked

    try:
        optuna.load_study(study_name=earlier.study_name, storage=tuned_optuna_storage(earlier.storage_url))
    except Exception as e:                       # KeyError (no such study), a store that cannot be opened
        raise UsageError(f"search.warm_start.experiment: cannot open the study {earlier.study_name!r} of "
                         f"{earlier.experiment!r} in {masked(earlier.storage_url)} ({type(e).__name__}); set "
                         "search.storage to the storage it used") from None


def taken_trials(storage_url: str, study_name: str) -> list[TakenTrial]:
    """The trials of a study that a warm start copied from another study (``warm_start.from``), by number."""
    import optuna

    from search.storage import tuned_optuna_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=tuned_optuna_storage(storage_url))
        trials = study.get_trials(deepcopy=False)
    except Exception:                            # no study to read: nothing marked
        return []
    return [TakenTrial(t.number, str(t.user_attrs[WARM_START_ATTR]), t.values[0] if t.values else None,
                       t.user_attrs.get(MLFLOW_RUN_ATTR)) for t in trials if WARM_START_ATTR in t.user_attrs]


def taken_curves(storage_url: str, study_name: str,
                 metrics: Sequence[str]) -> list[dict[int, tuple[float, ...]] | None]:
    """Each trial of a study that a warm start copied, by number: its :func:`rung_curve` over ``metrics`` (the
    search's objectives), None where it has none. No study yet (nothing was copied into it): none."""
    import optuna

    from search.storage import tuned_optuna_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=tuned_optuna_storage(storage_url))
    except KeyError:
        return []
    return [rung_curve(t, metrics) for t in study.get_trials(deepcopy=False) if WARM_START_ATTR in t.user_attrs]


def rung_curve(trial: FrozenTrial, metrics: Sequence[str]) -> dict[int, tuple[float, ...]] | None:
    """``{epoch: one value per metric}`` of a trial, at the epochs where every metric is known (the values a rung
    would have seen); None where an objective has no value at all: that trial is left out of ASHA's prior.

    Where the values are: the first metric (the search's ``metric``, the same in both searches) in drcaps' per-epoch
    user attr ``intermediate.<metric>`` (several objectives) or Optuna's intermediate values (one); any other
    objective in its ``intermediate.<metric>`` (a trial reports its costs with every epoch, search/tune/
    objectives_run.py), and failing that, for a cost reported once (``params``, ``flops``, ``latency_ms``: one per
    trial), the value the trial was told with (COMPLETE only; a PRUNED trial has none)."""
    from search.experiment.objectives import MODEL_COSTS

    sources: list[dict[int, float] | float] = []      # per metric: {epoch: value}, or one value for every epoch
    for i, metric in enumerate(metrics):
        if i == 0 or curve_attr(metric) in trial.user_attrs:
            sources.append(trial_curve(trial, metric))
        elif metric in MODEL_COSTS and trial.values is not None and len(trial.values) == len(metrics):
            sources.append(float(trial.values[i]))
        else:
            return None
    per_epoch = [set(c) for c in sources if isinstance(c, dict)]
    epochs = sorted(set.intersection(*per_epoch))
    return {e: tuple(float(c[e]) if isinstance(c, dict) else c for c in sources) for e in epochs} or None
