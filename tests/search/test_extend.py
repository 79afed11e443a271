"""``drcaps search --extend N`` and ``search.warm_start`` on real small searches (embedded Ray, Optuna and MLflow in
SQLite): one search of 2 trials extended by 2 (one study, one parent run, no duplicate runs or metric steps, the
report, the export and CSV rewritten), a running or interrupted search refused with the --resume hint, a warm start
from it into a narrower space (the right trials taken, the rest counted by reason, none crowned), and a warm start
whose dataset differs refused before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
    "model.units": {"type": "categorical", "choices": [4, 8]},
}


def experiment(name: str = "ext", space: dict[str, Any] | None = None, **search: Any) -> dict[str, Any]:
    return {"name": name, "model": {"preset": "tiny"},
            "data": {"dataset": "digits", "batch_size": 32, "limit_train": 200, "shift_pixels": 0},
            "train": {"epochs": 2, "device": "cpu", "optimizer": "adam"},
            "search": {"num_samples": 2, "max_concurrent": 1, "seed": 3, "resources": {"cpu": 1},
                       "scheduler": {"name": "none"}, "space": space or SPACE, **search},
            "tracking": {"uri": "sqlite:///mlflow.db"}}


def drcaps(tmp: Path, raw: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
    """``drcaps search`` as a user runs it (its own process), in ``tmp`` with Ray's results under ``tmp/ray``.
    (Not in this process: the search's up-front checks read the SQLite files' headers, which would drop the SQLite
    locks of the connections this process holds to them, search/stores.py sqlite_problem.)"""
    import yaml

    path = tmp / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return subprocess.run([str(Path(sys.executable).with_name("drcaps")), "search", path.name, "--storage-path",
                           "ray", *flags], cwd=tmp, capture_output=True, text=True, timeout=900)


@dataclass(frozen=True)
class Searched:
    tmp: Path
    uri: str
    parent_run_id: str
    study_name: str
    first_trials: int
    first_best_run_id: str
    first_best: float
    extended: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Searched:
    from search import tracking

    tmp = tmp_path_factory.mktemp("extend")
    first = drcaps(tmp, experiment())
    assert first.returncode == 0, first.stderr
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    parent = tracking.latest_search_run(uri, "ext")
    assert parent is not None
    trials = len(tracking.child_runs(uri, parent.run_id))
    second = drcaps(tmp, experiment(), "--extend", "2")
    assert second.returncode == 0, second.stderr
    return Searched(tmp, uri, parent.run_id, parent.tags["drcaps.study_name"], trials,
                    parent.tags["drcaps.best_run_id"], float(parent.tags["drcaps.best_val_acc"]), second)


def test_extend_adds_trials_to_the_same_study_parent_run_and_ranking(searched: Searched) -> None:
    import optuna

    from search import tracking

    uri, parent_run_id = searched.uri, searched.parent_run_id
    assert searched.first_trials == 2
    assert [r.run_id for r in tracking.search_runs(uri, "ext")] == [parent_run_id]     # one parent run
    parent = tracking.get_run(uri, parent_run_id)
    assert parent.status == "FINISHED" and parent.tags["drcaps.extensions"] == "1"
    assert parent.tags["drcaps.study_name"] == searched.study_name
    study = optuna.load_study(study_name=searched.study_name, storage=f"sqlite:///{searched.tmp / 'optuna.db'}")
    assert [(t.number, t.state.name) for t in study.trials] == [(n, "COMPLETE") for n in range(4)]
    runs = tracking.child_runs(uri, parent_run_id)
    assert len(runs) == 4 and len({r.tags["drcaps.trial_id"] for r in runs}) == 4
    assert sorted(r.tags["mlflow.runName"].split()[1] for r in runs) == ["0", "1", "2", "3"]
    for r in runs:                                                         # no epoch logged twice
        assert [step for step, _ in tracking.metric_history(uri, r.run_id, "val_acc")] == [1, 2], r.run_id
    assert [s for s, _ in tracking.metric_history(uri, parent_run_id, "best_val_acc")] == [0, 1]
    assert [s for s, _ in tracking.metric_history(uri, parent_run_id, "trials_finished")] == [0, 1]
    assert tracking.metric_history(uri, parent_run_id, "trials_finished")[-1][1] == 4
    folders = {p.name for p in (searched.tmp / "ray" / "ext").iterdir() if p.is_dir()}
    assert folders == {searched.study_name, f"{searched.study_name}-extend-1"}
    best_run_id = parent.tags["drcaps.best_run_id"]
    best = tracking.best_trial_run(uri, "ext", "val_acc", "max", parent_run_id)
    assert best.run_id == best_run_id and float(parent.tags["drcaps.best_val_acc"]) >= searched.first_best
    version = tracking.model_version(uri, "ext-capsnet", "best")
    assert version["run_id"] == best_run_id
    assert version["version"] == ("1" if best_run_id == searched.first_best_run_id else "2")   # no duplicate
    out = searched.extended.stdout
    assert "trials ranked by their best val_acc (all 4)" in out


def test_extend_rewrites_the_report_export_and_csv(searched: Searched) -> None:
    import pandas as pd

    from search import tracking
    from search.experiment import load_experiment

    parent = tracking.get_run(searched.uri, searched.parent_run_id)
    exported = load_experiment(searched.tmp / "ext.best.yaml")
    assert exported.result["mlflow_run_id"] == parent.tags["drcaps.best_run_id"]
    assert len(pd.read_csv(searched.tmp / "ext.best.trials.csv")) == 4
    assert "4 trials (" in (searched.tmp / "ext.report.html").read_text()


def test_extend_of_a_running_or_interrupted_search_points_to_resume(searched: Searched) -> None:
    from search import state, tracking

    tracking.end_run(searched.uri, searched.parent_run_id, "KILLED")
    try:
        refused = drcaps(searched.tmp, experiment(), "--extend", "1")
    finally:
        tracking.end_run(searched.uri, searched.parent_run_id, "FINISHED")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(
        f"error: --extend: the latest search of 'ext' ({searched.study_name}) did not finish (its MLflow run is "
        "KILLED); continue it first with: drcaps search ext.yaml --resume --storage-path ray"), refused.stderr
    held = state.SearchLock(searched.tmp / "ray" / "ext" / state.LOCK_FILE).acquire("ext")
    try:
        busy = drcaps(searched.tmp, experiment(), "--extend", "1")
    finally:
        held.release()
    assert busy.returncode == 2 and busy.stderr.startswith("error: --extend: the search of 'ext' in "), busy.stderr
    assert "is still running; wait for it to end" in busy.stderr and "--resume" in busy.stderr
    assert len(tracking.child_runs(searched.uri, searched.parent_run_id)) == 4     # nothing ran


def test_warm_start_takes_the_trials_that_fit_a_narrower_space(searched: Searched) -> None:
    import optuna

    from search import tracking
    from search.storage import WARM_START_ATTR

    storage = f"sqlite:///{searched.tmp / 'optuna.db'}"
    old = optuna.load_study(study_name=searched.study_name, storage=storage).trials
    lrs = sorted(t.params["train.lr"] for t in old)
    low = lrs[1] * 0.999                              # the smallest lr falls outside; so do the units=4 trials
    narrow = {"train.lr": {"type": "float", "low": low, "high": 1.0e-1, "log": True},
              "model.units": {"type": "categorical", "choices": [8]}}
    expected = {t.number for t in old if t.params["train.lr"] >= low and t.params["model.units"] == 8}
    enqueue = [dict(old[min(expected)].params)] if expected else []     # a point a taken trial ran: not again
    done = drcaps(searched.tmp, experiment("narrow", narrow, num_samples=1, enqueue=enqueue), "--warm-start", "ext")
    assert done.returncode == 0, done.stderr
    parent = tracking.latest_search_run(searched.uri, "narrow")
    assert parent is not None
    study = optuna.load_study(study_name=parent.tags["drcaps.study_name"], storage=storage)
    copies = [t for t in study.trials if WARM_START_ATTR in t.user_attrs]
    assert {int(t.user_attrs[WARM_START_ATTR].rpartition("#")[2]) for t in copies} == expected
    for t in copies:                                  # values and per-epoch values kept
        source = old[int(t.user_attrs[WARM_START_ATTR].rpartition("#")[2])]
        assert (t.value, t.intermediate_values) == (source.value, source.intermediate_values)
    lr_out = sum(t.params["train.lr"] < low for t in old)
    units_out = sum(t.params["train.lr"] >= low and t.params["model.units"] != 8 for t in old)
    line = next(line for line in done.stdout.splitlines() if line.startswith("warm start from ext"))
    assert f"took {len(expected)} of 4 trials" in line
    assert f"{lr_out} with train.lr outside the new space" in line
    assert (f"{units_out} with model.units outside the new space" in line) == bool(units_out)
    own = [t for t in study.trials if WARM_START_ATTR not in t.user_attrs]
    assert len(own) == 1 and all(own[0].params != old[n].params for n in expected)
    runs = tracking.child_runs(searched.uri, parent.run_id)
    assert len(runs) == 1 and parent.tags["drcaps.best_run_id"] == runs[0].run_id      # never crowned
    assert "taken from an earlier search without retraining" in done.stdout
    assert done.stdout.count(f" <- {searched.study_name}#") == len(expected)
    report = (searched.tmp / "narrow.report.html").read_text()
    assert 'data-key="warm_start"' in report and f"{searched.study_name}#" in report


def test_warm_start_whose_dataset_differs_is_refused_before_ray(searched: Searched) -> None:
    raw = experiment("other", warm_start={"experiment": "ext"})
    raw["data"]["dataset"] = "mnist"
    refused = drcaps(searched.tmp, raw)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(
        "error: search.warm_start: the search of 'ext' ran with other settings that change what its metric means "
        "(data.dataset: 'digits' -> 'mnist'); name them in search.warm_start.allow_changed"), refused.stderr
    assert not (searched.tmp / "ray" / "other").exists()
