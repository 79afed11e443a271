"""search/tune/study_searcher.py driven directly, as Tune drives it (suggest, on_trial_result, on_trial_complete,
save, restore), over a real Optuna SQLite storage in tmp_path; no Tune run."""

from __future__ import annotations

import itertools
import math
import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray.cloudpickle
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher

from search import storage
from search.experiment import experiment_from_dict
from search.space import make_sampler, to_distributions
from search.tune.searcher import FAILURE_KEY, TRIAL_NUMBER, make_searcher
from search.tune.studies import release_orphans
from search.tune.study_searcher import StudySearcher

SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
         "model.units": {"type": "categorical", "choices": [4, 8, 16]}}


def _experiment(tmp: Path, **search: Any) -> Any:
    return experiment_from_dict({
        "name": "s", "model": {"preset": "tiny"}, "data": {"dataset": "digits"}, "train": {"epochs": 3},
        "search": {"num_samples": 8, "seed": 3, "space": SPACE, **search},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "s"}}, base_dir=tmp)


def _url(tmp: Path, name: str = "optuna.db") -> str:
    return f"sqlite:///{tmp / name}"


def _run(searcher: Searcher, trial_id: str, curve: list[float], *, key: str = "val_acc", **last: Any) -> None:
    """One trial's epochs reported as Tune reports them, then its end (``last`` merged into the final result)."""
    result: dict[str, Any] = {}
    for epoch, value in enumerate(curve, 1):
        result = {key: value, "epoch": epoch, "mlflow_run_id": f"run-{trial_id}"}
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, {**result, **last})


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_is_a_ray_tune_searcher_that_a_concurrency_limiter_takes(tmp_path: Path) -> None:
    searcher = make_searcher(_experiment(tmp_path), "s", _url(tmp_path))
    assert isinstance(searcher, Searcher) and searcher.metric == "val_acc" and searcher.mode == "max"
    limited = ConcurrencyLimiter(searcher, max_concurrent=2)
    assert limited.suggest("a") is not None and limited.suggest("b") is not None and limited.suggest("c") is None


@pytest.mark.parametrize("storage_url", [None, "sqlite"])
def test_same_seed_same_suggestions_other_seed_other(tmp_path: Path, storage_url: str | None) -> None:
    files = itertools.count()

    def first(seed: int, n: int = 6) -> list[dict]:
        url = _url(tmp_path, f"{next(files)}.db") if storage_url else None
        searcher = make_searcher(_experiment(tmp_path, seed=seed), f"s{seed}", url)
        out = []
        for i in range(n):                       # past TPE's 5 random start-up trials
            out.append(searcher.suggest(f"t{i}"))
            _run(searcher, f"t{i}", [0.1 * i, 0.05 * i])
        return out

    assert first(3) == first(3)
    assert first(3) != first(4)
    assert [p[TRIAL_NUMBER] for p in first(3)] == list(range(6))   # the config carries the Optuna number


def test_the_enqueued_points_come_first(tmp_path: Path) -> None:
    points = [{"train.lr": 0.3, "model.units": 8}, {"train.lr": 0.01, "model.units": 16}]
    searcher = make_searcher(_experiment(tmp_path, enqueue=points), "s", _url(tmp_path))
    got = [searcher.suggest(f"t{i}") for i in range(3)]
    assert got[:2] == [{**p, TRIAL_NUMBER: i} for i, p in enumerate(points)]
    assert got[2][TRIAL_NUMBER] == 2 and set(got[2]) == {*SPACE, TRIAL_NUMBER}
    # Tune restored from its tuner.pkl alone (no searcher checkpoint): the study is not given the points again.
    again = make_searcher(_experiment(tmp_path, enqueue=points), "s", _url(tmp_path))
    assert again.suggest("t3")[TRIAL_NUMBER] == 3 and len(again.study.trials) == 4


def test_outcomes_values_curves_and_links(tmp_path: Path) -> None:
    """COMPLETE with the best epoch's value (not the last), PRUNED when stopped early, FAIL when it raised or
    reported a NaN metric with the failure key; every epoch an intermediate value; metric names; MLflow run ids."""
    url = _url(tmp_path)
    searcher = make_searcher(_experiment(tmp_path), "s", url)
    for i in range(5):
        searcher.suggest(f"t{i}")
    _run(searcher, "t0", [0.5, 0.7, 0.6])                                       # finished: best 0.7 at epoch 2
    _run(searcher, "t1", [0.2, 0.3])                                            # stopped by the scheduler
    _run(searcher, "t2", [0.4, math.nan], **{FAILURE_KEY: "diverged at epoch 2"})
    searcher.on_trial_result("t3", {"val_acc": 0.1, "epoch": 1})
    searcher.on_trial_complete("t3", None, error=True)                          # raised
    _run(searcher, "t4", [0.1, 0.2, 0.25])                                      # finished: last is best
    assert searcher.running == {}                                               # nothing kept per ended trial

    trials = _trials(url, "s")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL,
                                         TrialState.COMPLETE]
    assert trials[0].value == 0.7 and trials[4].value == 0.25
    assert trials[1].value == 0.3                       # Optuna's rule for PRUNED: its last intermediate value
    assert trials[0].intermediate_values == {1: 0.5, 2: 0.7, 3: 0.6}          # the last epoch included
    assert trials[2].intermediate_values == {1: 0.4}                            # the NaN epoch is not a value
    assert [t.user_attrs.get(storage.MLFLOW_RUN_ATTR) for t in trials] == ["run-t0", "run-t1", "run-t2", None,
                                                                           "run-t4"]
    assert optuna.load_study(study_name="s", storage=url).metric_names == ["val_acc"]


def test_min_mode_takes_the_lowest_epoch(tmp_path: Path) -> None:
    url = _url(tmp_path)
    searcher = make_searcher(_experiment(tmp_path, metric="val_loss", mode="min"), "s", url)
    searcher.suggest("t0")
    _run(searcher, "t0", [0.9, 0.4, 0.5], key="val_loss")
    assert _trials(url, "s")[0].value == 0.4


def test_a_trial_optuna_finished_already_is_not_told_again(tmp_path: Path) -> None:
    """A resumed driver re-runs a trial the killed one had told Optuna about: Optuna's record stands, no error."""
    url = _url(tmp_path)
    searcher = make_searcher(_experiment(tmp_path), "s", url)
    searcher.suggest("t0")
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    _run(searcher, "t0", [0.5, 0.6, 0.7])                                       # told COMPLETE 0.7, then killed

    resumed = make_searcher(_experiment(tmp_path), "s", url)
    resumed.restore(str(path))
    assert resumed.running == {"t0": 0}
    _run(resumed, "t0", [0.1, 0.1, 0.2])                                        # the re-run reports again
    assert resumed.running == {}
    [trial] = _trials(url, "s")
    assert trial.state == TrialState.COMPLETE and trial.value == 0.7
    assert trial.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}


def test_save_holds_the_url_and_restore_finishes_the_running_trials(tmp_path: Path) -> None:
    url = _url(tmp_path)
    searcher = make_searcher(_experiment(tmp_path), "s", url)
    for i in range(3):
        searcher.suggest(f"t{i}")
    _run(searcher, "t0", [0.2, 0.3, 0.1])
    searcher.on_trial_result("t1", {"val_acc": 0.3, "epoch": 1})
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    state = pickle.loads(path.read_bytes())
    assert state["_storage_url"] == url and state["_study"] is None and state["_backend"] is None
    assert not any(isinstance(v, optuna.storages.BaseStorage) for v in state.values())

    resumed = make_searcher(_experiment(tmp_path, seed=99), "other", None)    # whatever Tune built, then restored
    resumed.restore(str(path))
    assert resumed.running == {"t1": 1, "t2": 2}
    _run(resumed, "t1", [0.3, 0.9, 0.4])
    _run(resumed, "t2", [0.5])
    assert [(t.state, t.value) for t in _trials(url, "s")] == [(TrialState.COMPLETE, 0.3), (TrialState.COMPLETE, 0.9),
                                                              (TrialState.PRUNED, 0.5)]
    assert _trials(url, "s")[1].intermediate_values == {1: 0.3, 2: 0.9, 3: 0.4}
    with resumed.storage.engine.connect() as con:                               # reopened through search/storage.py
        assert int(con.exec_driver_sql("PRAGMA synchronous").scalar()) == 1     # NORMAL


def test_tune_can_pickle_it_before_and_after_use(tmp_path: Path) -> None:
    """Tune writes the searcher into tuner.pkl (cloudpickle) when the Tuner is built, and Ray Client ships it."""
    searcher = make_searcher(_experiment(tmp_path), "s", _url(tmp_path))
    fresh = ray.cloudpickle.loads(ray.cloudpickle.dumps(ConcurrencyLimiter(searcher, 2))).searcher
    searcher.suggest("t0")
    used = ray.cloudpickle.loads(ray.cloudpickle.dumps(searcher))
    assert fresh.running == {} and used.running == {"t0": 0}
    assert used.suggest("t1")[TRIAL_NUMBER] == 1


def test_a_restored_searcher_continues_the_same_suggestions(tmp_path: Path) -> None:
    """In memory, the study travels in the saved state, so a restored copy and the original have the same future:
    the sampler's random state came back with it."""
    searcher = make_searcher(_experiment(tmp_path), "s", None)
    for i in range(6):
        searcher.suggest(f"t{i}")
        _run(searcher, f"t{i}", [0.1 * i, 0.2 * i, 0.15 * i])
    searcher.save(str(tmp_path / "s.pkl"))
    expected = [searcher.suggest("t6"), searcher.suggest("t7")]
    resumed = make_searcher(_experiment(tmp_path), "s", None)
    resumed.restore(str(tmp_path / "s.pkl"))
    assert [t.value for t in resumed.study.trials] == [0.2 * i for i in range(6)]
    assert [resumed.suggest("t6"), resumed.suggest("t7")] == expected


def test_an_orphan_of_a_killed_driver_is_taken_again_with_its_params(tmp_path: Path) -> None:
    """The killed driver asked Optuna for trial 2 after Tune's last save: Ray never knew it. Released (what
    reconcile_study does with Ray's saved trials), the resumed searcher takes it again: same number, same params."""
    url = _url(tmp_path)
    searcher = make_searcher(_experiment(tmp_path), "s", url)
    searcher.suggest("t0")
    searcher.suggest("t1")
    searcher.save(str(tmp_path / "s.pkl"))
    orphan = searcher.suggest("t2")                                             # then SIGKILL

    assert release_orphans(url, "s", known={0, 1}) == [2]
    resumed = make_searcher(_experiment(tmp_path), "s", url)
    resumed.restore(str(tmp_path / "s.pkl"))
    assert resumed.suggest("t2-again") == orphan
    for trial_id in ("t0", "t1", "t2-again"):
        _run(resumed, trial_id, [0.5, 0.6, 0.7])
    assert [(t.number, t.state) for t in _trials(url, "s")] == [(n, TrialState.COMPLETE) for n in range(3)]


def test_vector_objectives_keep_every_epoch_in_drcaps_records(tmp_path: Path) -> None:
    url = _url(tmp_path)
    exp = _experiment(tmp_path)
    searcher = StudySearcher(to_distributions(exp.search.space), metric=["val_acc", "latency_ms"],
                             mode=["max", "min"], sampler=make_sampler("tpe", 0), study_name="mo", storage_url=url,
                             max_epochs=3, number_key=TRIAL_NUMBER, failure_key=FAILURE_KEY)
    searcher.suggest("t0")
    searcher.suggest("t1")
    for epoch, (acc, ms) in enumerate([(0.5, 3.0), (0.8, 4.0), (0.7, 2.0)], 1):
        searcher.on_trial_result("t0", {"val_acc": acc, "latency_ms": ms, "epoch": epoch})
    searcher.on_trial_complete("t0", {"val_acc": 0.7, "latency_ms": 2.0, "epoch": 3})
    searcher.on_trial_result("t1", {"val_acc": 0.4, "latency_ms": 1.0, "epoch": 1})
    searcher.on_trial_complete("t1", {"val_acc": 0.4, "latency_ms": 1.0, "epoch": 1})

    study = optuna.load_study(study_name="mo", storage=url)
    t0, t1 = study.trials
    assert study.metric_names == ["val_acc", "latency_ms"]
    assert t0.state == TrialState.COMPLETE and t0.values == [0.8, 4.0]     # the epoch where val_acc was best
    assert storage.trial_curve(t0, "val_acc") == {1: 0.5, 2: 0.8, 3: 0.7}
    assert storage.trial_curve(t0, "latency_ms") == {1: 3.0, 2: 4.0, 3: 2.0}
    assert t1.state == TrialState.PRUNED and storage.trial_curve(t1, "latency_ms") == {1: 1.0}


def test_trials_of_an_earlier_study_warm_start_a_new_one(tmp_path: Path) -> None:
    url = _url(tmp_path)
    earlier = make_searcher(_experiment(tmp_path), "earlier", url)
    for i, curve in enumerate([[0.5, 0.9, 0.7], [0.3], [0.2, 0.4, 0.6]]):
        earlier.suggest(f"t{i}")
        _run(earlier, f"t{i}", curve)
    old = _trials(url, "earlier")
    outside = optuna.trial.create_trial(params={"train.lr": 5.0, "model.units": 8}, value=0.99,
                                        distributions={"train.lr": optuna.distributions.FloatDistribution(1e-3, 10.0),
                                                       "model.units": optuna.distributions.CategoricalDistribution(
                                                           [4, 8, 16])})

    searcher = make_searcher(_experiment(tmp_path), "later", url)
    assert searcher.add_trials([*old, outside], source="earlier") == 3        # lr=5.0 lies outside this space
    copied = _trials(url, "later")
    assert [(t.state, t.value, t.params, t.intermediate_values) for t in copied] == \
        [(t.state, t.value, t.params, t.intermediate_values) for t in old]
    assert [t.user_attrs[storage.WARM_START_ATTR] for t in copied] == ["earlier#0", "earlier#1", "earlier#2"]
    assert copied[0].user_attrs[storage.MLFLOW_RUN_ATTR] == "run-t0"
    assert searcher.suggest("t3")[TRIAL_NUMBER] == 3                           # new trials number after them
