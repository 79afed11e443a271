"""The Optuna study kept in step with Ray's trials: a resumed search hands back what a killed driver had asked for,
a finished one leaves no trial RUNNING or WAITING. Optuna's public API only (the storage's own trial ids come from
``get_trial_id_from_study_id_trial_number``). Where the study lives and how it is opened: search/storage.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from search import ranking
from search.storage import tuned_optuna_storage
from search.tune.searcher import FAILURE_KEY, TRIAL_NUMBER


def reconcile_study(storage_url: str, study_name: str, exp_dir: Path) -> None:
    """Before a resume: an Optuna trial the killed driver had asked for but Ray never saved (a SIGKILL between the
    two) is RUNNING in the study with no Ray trial. Hand it back (``release_orphans``): the resumed search's next
    ask() takes it again, with its params, so the study ends with exactly num_samples trials and no duplicate
    proposal. What Ray saved is its experiment state (the trials it will re-run), read here."""
    from ray import tune

    try:
        known = {int(t.config[TRIAL_NUMBER]) for t in tune.ExperimentAnalysis(str(exp_dir)).trials
                 if TRIAL_NUMBER in (t.config or {})}
        release_orphans(storage_url, study_name, known)
    except Exception as e:                       # never let bookkeeping stop a resume; say what was left
        warnings.warn(f"resume: could not reconcile Optuna study {study_name!r} with Ray's state: {e}", stacklevel=2)


def release_orphans(storage_url: str, study_name: str, known: set[int]) -> list[int]:
    """Set WAITING every RUNNING trial of the study whose number is not in ``known`` (the trials Ray holds), so
    the next ``ask()`` takes it again with the params it has. Returns their numbers."""
    import optuna

    storage = tuned_optuna_storage(storage_url)
    study_id = storage.get_study_id_from_name(study_name)
    released = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.number not in known:
            storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                           optuna.trial.TrialState.WAITING)
            released.append(trial.number)
    return released


def close_study(storage_url: str, study_name: str, results: Any, metric: str, mode: str) -> None:
    """After fit: no Optuna trial stays RUNNING or WAITING. One whose Ray trial reported (a resumed driver never
    told Optuna about a trial that ended before the kill) gets its best value (search/ranking.py), else FAIL."""
    import optuna

    try:
        storage = tuned_optuna_storage(storage_url)
        study = optuna.load_study(study_name=study_name, storage=storage)
        study_id = storage.get_study_id_from_name(study_name)
    except Exception as e:
        warnings.warn(f"could not open Optuna study {study_name!r} to close it: {e}", stacklevel=2)
        return
    best: dict[int, float | list[float]] = {}
    names = (study.metric_names or [metric]) if len(study.directions) > 1 else [metric]   # several objectives
    for r in results:
        number = (r.config or {}).get(TRIAL_NUMBER)
        df = r.metrics_dataframe
        if number is None or df is None or metric not in df or "epoch" not in df:
            continue
        found = ranking.best_epoch(zip(df["epoch"], df[metric], strict=True), mode)
        if found is not None and not r.error and not (r.metrics or {}).get(FAILURE_KEY):
            row = df[df["epoch"] == found[0]].iloc[0]                   # at the epoch where the first was best
            best[int(number)] = found[1] if len(names) == 1 else [float(row.get(n, math.nan)) for n in names]
    open_states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    for trial in study.get_trials(deepcopy=False, states=open_states):
        if trial.state == optuna.trial.TrialState.WAITING and not trial.params:
            continue                             # an enqueued point the search never reached: not a trial yet
        try:
            if trial.state == optuna.trial.TrialState.WAITING:   # tell() takes RUNNING trials only
                storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                               optuna.trial.TrialState.RUNNING)
            if trial.number in best:
                study.tell(trial.number, best[trial.number])
            else:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except Exception as e:                   # e.g. finished meanwhile by another process
            warnings.warn(f"could not close Optuna trial {trial.number}: {e}", stacklevel=2)
