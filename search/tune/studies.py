"""The Optuna side of a search: where its study lives (an RDB storage: SQLite beside a local MLflow store, or the
cluster's PostgreSQL), its tables created safely, and its trials kept in step with Ray's (a resumed search hands
back what a killed driver had asked for; a finished one leaves no trial RUNNING or WAITING).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from search import ranking
from search.experiment import Experiment
from search.sqlite_tuning import tuned_optuna_storage
from search.tune.searcher import TRIAL_NUMBER
from search.tune.trial import FAILURE_KEY

OPTUNA_STORAGE_ENV = "DRCAPS_OPTUNA_STORAGE"   # the Optuna storage URL as the driver's machine sees it


def optuna_storage_url(exp: Experiment, tracking_uri: str) -> str:
    """The experiment's ``search.storage``, else ``$DRCAPS_OPTUNA_STORAGE`` (this machine's), else SQLite next to
    a local MLflow store, else ./optuna.db."""
    if exp.search.storage:
        return exp.search.storage
    if os.environ.get(OPTUNA_STORAGE_ENV):              # the machine's own (docker-compose.yml sets it)
        return os.environ[OPTUNA_STORAGE_ENV]
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def create_optuna_schema(storage_url: str) -> None:
    """Create a SQLite Optuna storage's tables under an exclusive lock on its folder: two searches started at once
    in a fresh folder would otherwise race in SQLAlchemy's create_all ("table ... already exists")."""
    if not storage_url.startswith("sqlite:///"):
        return
    import fcntl


    folder = Path(storage_url.removeprefix("sqlite:///").partition("?")[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tuned_optuna_storage(storage_url)        # a fresh file starts in WAL mode (search/sqlite_tuning.py)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def reconcile_study(storage_url: str, study_name: str, exp_dir: Path) -> None:
    """Before a resume: an Optuna trial the killed driver had asked for but Ray never saved (a SIGKILL between the
    two) is RUNNING in the study with no Ray trial. Hand it back as WAITING: the resumed search's next ask() takes
    it again, with its params, so the study ends with exactly num_samples trials and no duplicate proposal."""
    import optuna
    from ray import tune

    try:
        known = {int(t.config[TRIAL_NUMBER]) for t in tune.ExperimentAnalysis(str(exp_dir)).trials
                 if TRIAL_NUMBER in (t.config or {})}
        storage = tuned_optuna_storage(storage_url)
        study_id = storage.get_study_id_from_name(study_name)
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in known:
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.WAITING)
    except Exception as e:                       # never let bookkeeping stop a resume; say what was left
        warnings.warn(f"resume: could not reconcile Optuna study {study_name!r} with Ray's state: {e}", stacklevel=2)


def close_study(storage_url: str, study_name: str, results: Any, metric: str, mode: str) -> None:
    """After fit: no Optuna trial stays RUNNING or WAITING. One whose Ray trial reported (a resumed driver never
    told Optuna about a trial that ended before the kill) gets its best value (search/ranking.py), else FAIL."""
    import optuna

    try:
        storage = tuned_optuna_storage(storage_url)
        study = optuna.load_study(study_name=study_name, storage=storage)
    except Exception as e:
        warnings.warn(f"could not open Optuna study {study_name!r} to close it: {e}", stacklevel=2)
        return
    best: dict[int, float] = {}
    for r in results:
        number = (r.config or {}).get(TRIAL_NUMBER)
        df = r.metrics_dataframe
        if number is None or df is None or metric not in df or "epoch" not in df:
            continue
        found = ranking.best_epoch(zip(df["epoch"], df[metric], strict=True), mode)
        if found is not None and not r.error and not (r.metrics or {}).get(FAILURE_KEY):
            best[int(number)] = found[1]
    open_states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    for trial in study.get_trials(deepcopy=False, states=open_states):
        if trial.state == optuna.trial.TrialState.WAITING and not trial.params:
            continue                             # an enqueued point the search never reached: not a trial yet
        try:
            if trial.state == optuna.trial.TrialState.WAITING:   # tell() takes RUNNING trials only
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.RUNNING)
            if trial.number in best:
                study.tell(trial.number, best[trial.number])
            else:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except Exception as e:                   # e.g. finished meanwhile by another process
            warnings.warn(f"could not close Optuna trial {trial.number}: {e}", stacklevel=2)
