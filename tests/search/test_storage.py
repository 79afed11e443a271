"""search/storage.py: the search's SQLite stores end up in WAL mode with synchronous=NORMAL, and nothing is lost or
changed on the way (real Optuna RDB storage, real MLflow SQLite store, drcaps' own searcher; no Ray cluster); where
the study lives."""

from __future__ import annotations

import dataclasses
import math
import pickle
import sqlite3
from pathlib import Path

import optuna
import pytest
from sqlalchemy import text

from search import storage, tracking
from search.experiment import experiment_from_dict
from search.tune import TRIAL_NUMBER, make_searcher

NORMAL = 1   # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL (SQLite's default)


def _journal_mode(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        con.close()


def _synchronous(engine: object) -> int:
    with engine.connect() as con:   # type: ignore[attr-defined]
        return int(con.execute(text("PRAGMA synchronous")).scalar())


def _experiment(tmp: Path) -> object:
    return experiment_from_dict({
        "name": "wal", "model": {"preset": "tiny"}, "data": {"dataset": "digits"},
        "train": {"epochs": 3, "device": "cpu"},
        "search": {"num_samples": 4, "max_concurrent": 2, "seed": 0,
                   "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}}},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "wal"}}, base_dir=tmp)


def test_the_searchers_study_is_in_wal_mode_and_every_value_round_trips(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    searcher = make_searcher(_experiment(tmp_path), "wal", f"sqlite:///{db}")
    curves = {"t0": [0.5, 0.7, 0.6], "t1": [0.2], "t2": [0.4, 0.45, 0.5]}     # t1: stopped after 1 of 3 epochs
    for trial_id, curve in curves.items():
        assert TRIAL_NUMBER in searcher.suggest(trial_id)
        for epoch, acc in enumerate(curve, 1):
            searcher.on_trial_result(trial_id, {"val_acc": acc, "epoch": epoch, "mlflow_run_id": f"run-{trial_id}"})
        searcher.on_trial_complete(trial_id, {"val_acc": curve[-1], "epoch": len(curve)})

    assert _journal_mode(db) == "wal"
    assert _synchronous(searcher.storage.engine) == NORMAL
    assert searcher.running == {}    # the driver keeps nothing per trial once it has ended (issue 9, driver memory)

    # Read back through a plain storage (another process would see the same): values, states, curves, attributes.
    trials = optuna.load_study(study_name="wal", storage=f"sqlite:///{db}").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                         optuna.trial.TrialState.COMPLETE]
    assert [t.value for t in trials] == [0.7, 0.2, 0.5]    # best epoch, not last (pruned: Optuna takes its last)
    for t, curve in zip(trials, curves.values(), strict=True):
        assert t.intermediate_values == {e: v for e, v in enumerate(curve, 1)}
        assert math.isfinite(t.params["train.lr"])
    assert [t.user_attrs["mlflow_run_id"] for t in trials] == ["run-t0", "run-t1", "run-t2"]


def test_a_restored_searcher_opens_its_storage_tuned_again(tmp_path: Path) -> None:
    """Tune pickles the searcher and unpickles it on --resume: it holds the URL, and opens a new engine, tuned too."""
    searcher = make_searcher(_experiment(tmp_path), "wal", f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher.suggest("t0")
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.storage.engine is not searcher.storage.engine and _synchronous(restored.storage.engine) == NORMAL


def test_the_mlflow_store_is_in_wal_mode_and_metrics_round_trip(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.start_search_run(uri, "wal", run_name="s", params={"a": 1}, tags={})
    run_id = tracking.find_or_create_trial_run(uri, "wal", parent_run_id=parent, trial_id="t0", run_name="trial 0",
                                               params={"train.lr": 0.1})
    logger = tracking.TrialLogger(uri, run_id)
    for epoch in (1, 2, 3):
        logger.log_epoch({"epoch": epoch, "val_acc": epoch / 10}, step=epoch)
    logger.end("FINISHED")

    assert _journal_mode(tmp_path / "mlflow.db") == "wal"
    assert tracking.metric_history(uri, run_id, "val_acc") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [r.run_id for r in tracking.child_runs(uri, parent)] == [run_id]


def test_drcaps_sqlite_tuning_0_leaves_sqlites_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.DISABLE_ENV, "0")
    rdb = storage.tuned_optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="plain", storage=rdb).optimize(lambda t: t.suggest_float("x", 0, 1), 2)
    assert _journal_mode(tmp_path / "optuna.db") == "delete"
    assert _synchronous(rdb.engine) == 2                           # FULL


def test_every_optuna_storage_drcaps_opens_is_tuned(tmp_path: Path) -> None:
    """The schema created before a search already puts a fresh file in WAL mode, as the searcher's storage does:
    one way to open the study's storage."""
    db = tmp_path / "optuna.db"
    storage.create_optuna_schema(f"sqlite:///{db}")
    assert _journal_mode(db) == "wal"


@pytest.mark.parametrize("search_storage, env, tracking_uri, expected", [
    ("postgresql://h/db", "sqlite:////env/optuna.db", "sqlite:////m/mlflow.db", "postgresql://h/db"),
    (None, "sqlite:////env/optuna.db", "sqlite:////m/mlflow.db", "sqlite:////env/optuna.db"),
    (None, None, "sqlite:////m/mlflow.db", "sqlite:////m/optuna.db"),
    (None, None, "http://mlflow:5000", "sqlite:///{cwd}/optuna.db"),
])
def test_the_study_lives_where_the_experiment_then_the_machine_then_mlflow_say(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, search_storage: str | None, env: str | None,
        tracking_uri: str, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    if env is None:
        monkeypatch.delenv(storage.OPTUNA_STORAGE_ENV, raising=False)
    else:
        monkeypatch.setenv(storage.OPTUNA_STORAGE_ENV, env)
    exp = _experiment(tmp_path)
    if search_storage:
        exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, storage=search_storage))
    assert storage.optuna_storage_url(exp, tracking_uri) == expected.format(cwd=tmp_path)
