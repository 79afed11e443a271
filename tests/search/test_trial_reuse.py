"""The per-trial fixed-cost cuts (issue 9) change nothing a trial computes or records.

The session's real search (tests/conftest.py: embedded Ray, Optuna, MLflow SQLite) of 4 tiny trials, one at a time,
ASHA stopping the weak ones:
with ``reuse_actors`` the later trials run in the first trial's worker, and with the data shared through Ray's
object store no trial loads it. Each trial's per-epoch metrics must equal a plain in-process ``train`` of the same
config on freshly loaded data; each trial, stopped early or not, uploads one weights-only best checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from drcapsnet.checkpoint import BEST, load_checkpoint
from drcapsnet.config import DataConfig, TrainConfig, model_preset
from drcapsnet.data import load_datasets
from drcapsnet.train import train
from search import tracking
from search.space import apply_params
from search.tune import same_data, shared_datasets
from tests.conftest import E2E_SPACE, E2E_TRIALS, e2e_experiment

COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "best_val_acc")


@pytest.mark.slow
def test_reused_actors_and_shared_data_give_the_metrics_of_a_plain_training(searched) -> None:
    result, _ = searched
    uri = result.tracking_uri
    runs = {r.tags["drcaps.trial_id"]: r for r in tracking.child_runs(uri, result.parent_run_id)}
    assert len(runs) == E2E_TRIALS
    assert max(r.metrics["perf_worker_trials"] for r in runs.values()) > 1      # an actor did run several trials
    fresh = load_datasets(result.experiment.run.data)
    for trial in result.trials:
        run = apply_params(result.experiment, trial.params)
        cfg = dataclasses.replace(run.train, num_threads=1, device="cpu")
        seen: list[dict[str, float]] = []
        train(run.model, run.data, cfg, seen.append, datasets=fresh)
        run_id = runs[trial.trial_id].run_id
        epochs = [step for step, _ in tracking.metric_history(uri, run_id, "epoch")]
        assert epochs == list(range(1, trial.epochs + 1))
        for key in COMPARED:
            logged = [value for _, value in tracking.metric_history(uri, run_id, key)]
            assert logged == pytest.approx([m[key] for m in seen[: trial.epochs]], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_every_trial_uploads_one_weights_only_best_checkpoint(searched, tmp_path: Path) -> None:
    result, _ = searched
    uri = result.tracking_uri
    outcomes = set()
    for r in tracking.child_runs(uri, result.parent_run_id):
        outcomes.add(r.tags["drcaps.outcome"])
        folder = tracking.download_artifacts(uri, r.run_id, "checkpoint", tmp_path / r.run_id)
        assert sorted(p.name for p in folder.iterdir()) == [BEST]
        state = torch.load(folder / BEST, weights_only=True)
        assert "optimizer" not in state and "scheduler" not in state
        assert state["epoch"] == state["best_epoch"]
        assert state["best_val_acc"] == pytest.approx(r.metrics["best_val_acc"])
        for phase in ("startup", "data", "train", "eval", "ckpt", "mlflow", "tune", "teardown", "wall"):
            assert r.metrics[f"perf_{phase}_s"] >= 0.0
        assert r.metrics["perf_wall_s"] >= r.metrics["perf_train_s"] + r.metrics["perf_eval_s"]
    assert outcomes == {"finished", "stopped_early"}            # both ends of a trial were exercised


@pytest.mark.slow                                 # starts a Ray
def test_data_shared_through_the_object_store_trains_the_same_weights(tmp_path: Path) -> None:
    import ray

    data_cfg = DataConfig(dataset="digits", batch_size=32, limit_train=120)
    cfg = TrainConfig(epochs=1, device="cpu", num_threads=1, optimizer="adam")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        shared = ray.get(ray.put(load_datasets(data_cfg)))
    finally:
        if started:
            ray.shutdown()
    weights = []
    for name, data in (("shared", shared), ("loaded", load_datasets(data_cfg))):
        train(model_preset("tiny"), data_cfg, cfg, checkpoint_dir=tmp_path / name, datasets=data)
        weights.append(load_checkpoint(tmp_path / name)["model"])
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_shared_data_only_when_the_search_does_not_change_what_is_loaded(tmp_path: Path) -> None:
    a = DataConfig(dataset="digits", batch_size=32, limit_train=100)
    assert same_data(a, dataclasses.replace(a, batch_size=64, shift_pixels=0))
    assert not same_data(a, dataclasses.replace(a, limit_train=50))
    assert shared_datasets(e2e_experiment(tmp_path)) is not None
    limited = e2e_experiment(tmp_path, space={**E2E_SPACE, "data.limit_train": {"type": "int", "low": 50, "high": 100}})
    assert shared_datasets(limited) is None


@pytest.mark.slow
def test_tune_keeps_only_what_drcaps_reads_back(searched) -> None:
    """search/tune/lean.py: each trial leaves Tune's JSON results (what the ranking reads back), every epoch in them,
    and no TensorBoard or CSV file; an ended trial's per-key statistics are gone from Tune's saved state."""
    from ray import tune

    result, tmp = searched
    results = sorted((tmp / "ray").rglob("result.json"))
    assert len(results) == len(result.trials) == E2E_TRIALS
    for path in results:
        assert not (path.parent / "progress.csv").exists()
        assert not list(path.parent.glob("events.out.tfevents*"))
    epochs = sum(len(p.read_text().splitlines()) for p in results)
    assert epochs == sum(t.epochs for t in result.trials)
    [state] = list((tmp / "ray").rglob("experiment_state-*.json"))
    trials = tune.ExperimentAnalysis(str(state.parent)).trials
    assert len(trials) == E2E_TRIALS
    for trial in trials:
        assert trial.status == "TERMINATED"
        assert trial.last_result["epoch"] >= 1                   # what Tune reads back is still there
        assert trial.run_metadata.metric_analysis == {} and trial.run_metadata.metric_n_steps == {}
