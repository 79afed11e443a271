"""The search end to end: real local Ray, real Optuna (SQLite storage), real MLflow (SQLite store).

One module-scoped search of 4 trials x 2 epochs of a tiny DR-CapsNet on the bundled digits; each test then checks
one thing a user relies on. Marked slow: Ray's start and 4 trainings take a minute or two on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import optuna
import pytest
import torch

from drcapsnet.checkpoint import load_model
from drcapsnet.data import load_datasets
from drcapsnet.train import evaluate
from search import tracking
from search.errors import ClusterError
from search.experiment import experiment_from_dict, load_experiment
from search.export import export_from_tracking
from search.publish import SearchResult
from search.space import trial_run
from search.tune import init_ray, make_searcher, tune_interrupt_watch
from tests.conftest import E2E_SEED

SPACE = {
    "model.routing_iterations": {"type": "int", "low": 1, "high": 3},
    "model.units": {"type": "categorical", "choices": [4, 8]},
    "train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    "train.momentum": {"type": "float", "low": 0.5, "high": 0.95},
}


def _experiment(tmp: Path, **search: object) -> object:
    raw = {
        "name": "e2e",
        "model": {"preset": "tiny"},
        "data": {"dataset": "digits", "batch_size": 32, "limit_train": 400, "shift_pixels": 0},
        "train": {"epochs": 2, "device": "cpu", "optimizer": "adam"},
        "search": {"num_samples": 4, "max_concurrent": 2, "seed": 7, "resources": {"cpu": 1},
                   "scheduler": {"name": "asha", "grace_period": 1}, "space": SPACE, **search},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "e2e"},
    }
    return experiment_from_dict(raw, base_dir=tmp)


@pytest.fixture(scope="module")
def searched(searched: tuple[SearchResult, Path]) -> tuple[SearchResult, Path]:
    """The session's one real search (tests/conftest.py): this module's experiment, one trial at a time."""
    result, tmp = searched
    assert result.experiment == _experiment(tmp, max_concurrent=1, seed=E2E_SEED), "tests/conftest.py's is not e2e"
    return searched


@pytest.mark.slow
def test_mlflow_holds_one_parent_and_one_child_per_trial(searched):
    result, _ = searched
    uri = result.tracking_uri
    parent = tracking.latest_search_run(uri, "e2e")
    assert parent is not None and parent.run_id == result.parent_run_id and parent.status == "FINISHED"
    children = tracking.child_runs(uri, result.parent_run_id)
    assert len(children) == len(result.trials) == 4
    assert {c.tags["drcaps.trial_id"] for c in children} == {t.trial_id for t in result.trials}
    for child in children:
        assert set(SPACE) <= set(child.params)                       # dotted names, as in the YAML
        assert child.status in ("FINISHED", "KILLED")
        assert child.tags["drcaps.outcome"] in ("finished", "stopped_early")
        steps = [step for step, _ in tracking.metric_history(uri, child.run_id, "val_acc")]
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 2   # the epoch is the step
    assert parent.tags["drcaps.best_trial_id"] == result.best.trial_id


@pytest.mark.slow
def test_optuna_study_holds_the_same_trials(searched):
    result, _ = searched
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    assert len(study.trials) == 4
    proposed = sorted(tuple(sorted(t.params.items())) for t in study.trials)
    ran = sorted(tuple(sorted(t.params.items())) for t in result.trials)
    assert proposed == ran


@pytest.mark.slow
def test_best_checkpoint_reproduces_reported_validation_accuracy(searched, tmp_path):
    result, _ = searched
    best_run = next(c for c in tracking.child_runs(result.tracking_uri, result.parent_run_id)
                    if c.run_id == result.best_run_id)
    folder = tracking.download_artifacts(result.tracking_uri, best_run.run_id, "checkpoint", tmp_path)
    model, run, state = load_model(next(Path(folder).glob("*.pt")))
    assert run.model == result.best_config.model and run.data == result.best_config.data
    assert run.train == dataclasses.replace(result.best_config.train, num_threads=1)   # the trial's 1 CPU
    data = load_datasets(run.data)
    _, val_acc = evaluate(model, data.val, 64, device=torch.device("cpu"))
    assert math.isclose(val_acc, result.best.metric, abs_tol=1e-9)
    assert math.isclose(state["best_val_acc"], result.best.metric, abs_tol=1e-9)


@pytest.mark.slow
def test_registered_model_loads_and_predicts(searched):
    result, _ = searched
    assert result.model_uri == "models:/e2e-capsnet@best"
    model = tracking.load_model(result.tracking_uri, result.model_uri)
    x = load_datasets(result.best_config.data).val.images[:16].float() / 255
    lengths = model(x)
    assert lengths.shape == (16, 10) and torch.isfinite(lengths).all()


@pytest.mark.slow
def test_export_best_round_trips_through_load_experiment(searched, tmp_path):
    result, _ = searched
    path, _ = export_from_tracking(result.tracking_uri, "e2e", tmp_path / "best.yaml", csv=tmp_path / "trials.csv")
    exported = load_experiment(path)
    best_run = tracking.best_trial_run(result.tracking_uri, "e2e", "val_acc", "max", result.parent_run_id)
    assert best_run.run_id == result.best_run_id
    # what the trial trained, exactly: its params, its one CPU thread, the CPU (so a retrain sums in the same order)
    assert exported.run == result.best_config == trial_run(result.experiment, result.best.params, 1, 0)
    for name in [*SPACE, "train.num_threads", "train.device", "train.seed", "data.split_seed"]:
        assert str(exported.run.flat()[name]) == best_run.params[name], name
    assert exported.result["mlflow_run_id"] == result.best_run_id
    assert exported.result["model_uri"] == result.model_uri
    assert len((tmp_path / "trials.csv").read_text().strip().splitlines()) == 1 + 4


@pytest.mark.slow
def test_optuna_records_what_drcaps_ranks(searched):
    """Optuna and drcaps tell one story: the value is the best epoch's, a stopped trial is PRUNED with every epoch
    it ran as an intermediate value, the objective is named after the metric, each trial links its MLflow run."""
    result, _ = searched
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    assert study.metric_names == ["val_acc"]
    runs = {c.tags["drcaps.trial_id"]: c for c in tracking.child_runs(result.tracking_uri, result.parent_run_id)}
    by_number = {t.number: t for t in study.trials}
    assert sorted(by_number) == sorted(t.number for t in result.trials) == [0, 1, 2, 3]
    for t in result.trials:
        ot = by_number[t.number]
        assert ot.params == t.params
        assert sorted(ot.intermediate_values) == list(range(1, t.epochs + 1))     # the last epoch included
        assert ot.user_attrs["mlflow_run_id"] == runs[t.trial_id].run_id
        if t.outcome == "finished":
            assert ot.state == optuna.trial.TrialState.COMPLETE
            assert math.isclose(ot.value, t.metric)                               # the best epoch, not the last
            assert ot.value == max(ot.intermediate_values.values())
        else:
            assert t.outcome == "stopped_early" and ot.state == optuna.trial.TrialState.PRUNED


@pytest.mark.slow
def test_mlflow_runs_read_well(searched):
    """Trial runs are named by number and searched values; stopping early is not a failure; the parent run holds
    the search's outcome as metrics and its setup as params, not the base config's values of searched fields."""
    from mlflow import MlflowClient

    result, _ = searched
    uri = result.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    for t in result.trials:
        run = next(c for c in tracking.child_runs(uri, result.parent_run_id) if c.tags["drcaps.trial_id"] == t.trial_id)
        name = client.get_run(run.run_id).info.run_name
        assert name.startswith(f"trial {t.number} ") and "lr=" in name and "units=" in name
        assert run.status == "FINISHED" and run.tags["drcaps.outcome"] == t.outcome
    parent = client.get_run(result.parent_run_id)
    m = parent.data.metrics
    assert math.isclose(m["best_val_acc"], result.best.metric)
    assert m["trials_finished"] + m["trials_stopped_early"] + m["trials_failed"] == 4
    assert m["trial_epochs"] == sum(t.epochs for t in result.trials) and m["wall_time_s"] > 0
    assert "train.lr" not in parent.data.params and parent.data.params["space.train.lr"].startswith("float [")
    assert parent.data.tags["drcaps.best.train.lr"] == str(result.best.params["train.lr"])
    version = client.get_model_version_by_alias("e2e-capsnet", "best")
    assert version.run_id == result.best_run_id and result.study_name in version.description
    # The SQL registry keeps no model_id on a version: its source is models:/<logged model id>.
    logged = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    linked = json.loads(logged.tags["mlflow.modelVersions"])
    assert ("e2e-capsnet", str(version.version)) in {(v["name"], str(v["version"])) for v in linked}


def test_same_seed_proposes_the_same_first_configurations(tmp_path):
    """Two searchers built as run_search builds them, with the same seed, propose the same points."""
    def first(seed: int, n: int = 3) -> list[dict]:
        searcher = make_searcher(_experiment(tmp_path, seed=seed), f"s{seed}", None)
        return [searcher.suggest(f"trial_{i}") for i in range(n)]

    assert first(7) == first(7)
    assert first(7) != first(8)


@pytest.mark.slow
def test_interrupt_watch_sees_ray_tunes_own_signal_handler_fire(tmp_path):
    """Ray Tune swallows the first Ctrl-C (Tuner.fit returns); the watch must tell that apart from a finished search.
    A real fit on a real local Ray, the signal raised in the driver by a Tune callback as a trial reports."""
    import time

    import ray
    from ray import tune

    def trainable(config: dict) -> None:
        for i in range(60):
            tune.report({"x": i})
            time.sleep(0.05)

    class Signal(tune.Callback):
        def __init__(self, signum: int | None) -> None:
            self.signum, self.sent = signum, False

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if self.signum is not None and not self.sent:
                self.sent = True
                signal.raise_signal(self.signum)

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for signum in (None, signal.SIGINT, signal.SIGUSR1):
            before = signal.getsignal(signal.SIGINT)
            with tune_interrupt_watch(True) as interrupted:
                tune.Tuner(trainable, run_config=tune.RunConfig(
                    name=f"watch-{signum}", storage_path=str(tmp_path), callbacks=[Signal(signum)], verbose=0)).fit()
            assert interrupted() == (signum is not None), signum     # asked after the block, as run_search does
            assert signal.getsignal(signal.SIGINT) is before          # the handler in place before is back
    finally:
        ray.shutdown()


def test_interrupt_watch_stays_out_where_tune_installs_no_handler():
    """Through Ray Client fit() runs on the cluster: nothing here handles SIGINT, so the watch must not read the
    untouched handler as "Tune fired" (a finished search would end as interrupted)."""
    with tune_interrupt_watch(False) as interrupted:
        pass
    assert interrupted() is False


@pytest.mark.parametrize(("address", "calls"), [("ray://127.0.0.1:1", 2), ("127.0.0.1:1", 1)])
def test_ray_client_start_up_failure_is_retried_and_nothing_else_is(monkeypatch, address, calls):
    """Ray Client's per-client server dies at start-up in ~7% of connections (ray-project/ray#63202): a ray://
    address gets more tries; any other address fails at once with the usual one-line ClusterError."""
    import ray

    attempts: list[str] = []

    def flaky_init(address: str, **kwargs: object) -> None:
        attempts.append(address)
        if len(attempts) == 1:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    if calls == 1:
        with pytest.raises(ClusterError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
            init_ray(address, verbose=0)
    else:
        init_ray(address, verbose=0)
    assert attempts == [address] * calls
