"""Nothing lost, one truth (issue 7), end to end with real Ray, Optuna and MLflow in a temporary folder:

- one ranking: the printed table, the registered model, the export at the end of ``drcaps search`` and
  ``drcaps export-best`` name the same trial, params and model (and a trial that peaks then declines wins);
- a diverged trial (NaN loss) ends FAILED with "diverged at epoch E" in MLflow, FAIL in Optuna, failed in the table;
- ``--smoke-test`` in the same folder touches none of the real search's records, alias or export;
- two searches at once: of different experiments in a fresh folder both finish (no schema-creation crash); of the
  same experiment in the same folder the second is refused with a clear message.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from search import ranking, tracking
from search.cli import main
from search.export import export_from_tracking

DRCAPS = Path(sys.executable).parent / "drcaps"

EXPERIMENT = """\
name: {name}
model: {{preset: tiny, routing_iterations: 1}}
data: {{dataset: digits, batch_size: 32, limit_train: {limit}, shift_pixels: 0}}
train: {{epochs: {epochs}, device: cpu, optimizer: sgd, lr: 0.1, momentum: 0.9, lr_decay: 1.0}}
search:
  num_samples: {samples}
  max_concurrent: 1
  max_failures: 0
  seed: 0
  scheduler: {{name: none}}
  resources: {{cpu: 1}}
  space:
    model.reconstruction_weight: {{type: categorical, choices: [5.0e-4, 1.0e+30]}}
  enqueue:
    - {{model.reconstruction_weight: 5.0e-4}}
    - {{model.reconstruction_weight: 1.0e+30}}
"""


def _write(folder: Path, name: str, *, samples: int = 2, epochs: int = 2, limit: int = 200) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(EXPERIMENT.format(name=name, samples=samples, epochs=epochs, limit=limit))
    return path


# ---------------------------------------------------------------------------------------------------- fast

def test_train_that_diverges_exits_1_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "tiny", "--dataset", "digits", "--epochs", "3", "--no-progress",
                 "--optimizer", "sgd", "--lr", "0.1", "--set", "data.limit_train=100",
                 "--set", "model.reconstruction_weight=1.0e+30", "--set", "train.num_threads=1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: diverged at epoch ") and len(err.strip().splitlines()) == 1, err


def test_one_ranking_prefers_a_peak_over_a_later_lower_last_value() -> None:
    peaked = [(1, 0.90), (2, 0.97), (3, 0.95)]
    steady = [(1, 0.91), (2, 0.96)]
    assert ranking.best_epoch(peaked, "max") == (2, 0.97)
    assert ranking.best_epoch([(1, float("nan")), (2, 0.5)], "max") == (2, 0.5)
    assert ranking.best_epoch([(1, float("nan"))], "max") is None
    trials = {"B": steady, "A": peaked}
    assert ranking.rank(list(trials), lambda t: ranking.best_epoch(trials[t], "max")[1], "max") == ["A", "B"]
    assert ranking.rank(["x", "y"], lambda t: {"x": 0.3, "y": 0.2}[t], "min") == ["y", "x"]


def test_export_best_takes_the_peak_trial_and_its_best_epoch(tmp_path: Path) -> None:
    """MLflow records of trial A at val_acc [0.90, 0.97, 0.95] and B at [0.91, 0.96] (the issue's case): the
    export names A, with A's params and the metrics of A's epoch 2, not B (whose LAST value is higher)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_yaml = yaml.safe_load(EXPERIMENT.format(name="peak", samples=2, epochs=3, limit=100))
    exp_yaml["search"]["space"] = {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0}}
    exp_yaml["search"].pop("enqueue")
    import json

    from search.experiment import experiment_from_dict, experiment_to_dict

    resolved = experiment_to_dict(experiment_from_dict(exp_yaml))
    parent = tracking.start_search_run(uri, "peak", run_name="s", params={}, tags={},
                                       artifacts={"resolved_experiment.json": json.dumps(resolved)})
    runs = {}
    for trial, lr, history in (("A", 0.3, [0.90, 0.97, 0.95]), ("B", 0.05, [0.91, 0.96])):
        run_id = tracking.find_or_create_trial_run(uri, "peak", parent_run_id=parent, trial_id=trial,
                                                   run_name=trial, params={"train.lr": lr})
        logger = tracking.TrialLogger(uri, run_id)
        for epoch, value in enumerate(history, start=1):
            logger.log_epoch({"epoch": epoch, "val_acc": value, "val_loss": 1 - value}, step=epoch)
        logger.end("FINISHED")
        runs[trial] = run_id
    tracking.end_run(uri, parent, "FINISHED")
    path, chosen = export_from_tracking(uri, "peak", tmp_path / "best.yaml")
    assert chosen.result["mlflow_run_id"] == runs["A"] and chosen.result["trial_id"] == "A"
    assert chosen.run.train.lr == 0.3 and chosen.result["metrics"]["val_acc"] == 0.97
    assert chosen.result["metrics"]["epoch"] == 2
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 0.3


# ---------------------------------------------------------------------------------------------------- slow

@pytest.fixture(scope="module")
def real_then_smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A real search (2 trials: one trains, one diverges) then a smoke test of the same file in the same folder."""
    import ray

    folder = tmp_path_factory.mktemp("iso")
    exp = _write(folder, "iso")
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["search", str(exp)])
        real_export = (folder / "iso.best.yaml").read_text() if (folder / "iso.best.yaml").exists() else None
        smoke_out = io.StringIO()
        with contextlib.redirect_stdout(smoke_out):
            smoke_code = main(["search", str(exp), "--smoke-test"])
    finally:
        os.chdir(cwd)
        ray.shutdown()
    return {"folder": folder, "uri": f"sqlite:///{folder / 'mlflow.db'}", "code": code, "out": out.getvalue(),
            "real_export": real_export, "smoke_code": smoke_code, "smoke_out": smoke_out.getvalue()}


@pytest.mark.slow
def test_table_registry_export_and_export_best_name_the_same_trial(real_then_smoke: dict) -> None:
    it = real_then_smoke
    assert it["code"] == 0, it["out"]
    uri = it["uri"]
    parent = tracking.latest_search_run(uri, "iso")
    best_trial, best_run = parent.tags["drcaps.best_trial_id"], parent.tags["drcaps.best_run_id"]
    from mlflow import MlflowClient

    name = MlflowClient(uri, uri).get_run(best_run).info.run_name                       # "trial N lr=..."
    number = name.split()[1] if name.startswith("trial ") else best_trial
    best_lines = [line for line in it["out"].splitlines() if "best" in line.lower()]
    assert any(f"trial {number}" in line or best_trial in line for line in best_lines), it["out"]   # the table
    exported = yaml.safe_load(it["real_export"])
    assert exported["result"]["trial_id"] == best_trial and exported["result"]["mlflow_run_id"] == best_run
    assert exported["model"]["reconstruction_weight"] == 5.0e-4                          # the trial that trained
    version = MlflowClient(uri, uri).get_model_version_by_alias("iso-capsnet", "best")
    assert version.run_id == best_run                                                    # the registered model
    _, again = export_from_tracking(uri, "iso", it["folder"] / "again.yaml")            # drcaps export-best
    assert again.result["mlflow_run_id"] == best_run and again.run == yaml_run(exported)


def yaml_run(raw: dict) -> object:
    from search.experiment import experiment_from_dict

    return experiment_from_dict(raw).run


@pytest.mark.slow
def test_a_diverged_trial_fails_everywhere_with_its_reason(real_then_smoke: dict) -> None:
    it = real_then_smoke
    uri = it["uri"]
    parent = tracking.latest_search_run(uri, "iso")
    children = tracking.child_runs(uri, parent.run_id)
    diverged = [c for c in children if c.params.get("model.reconstruction_weight") == "1e+30"]
    assert len(children) == 2 and len(diverged) == 1, [c.params for c in children]
    run = diverged[0]
    assert run.status == "FAILED", run.status
    assert run.tags["drcaps.failure_reason"].startswith("diverged at epoch "), run.tags
    study = optuna.load_study(study_name=parent.tags["drcaps.study_name"],
                              storage=f"sqlite:///{it['folder'] / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "FAIL"], states
    assert "failed" in it["out"], it["out"]


@pytest.mark.slow
def test_smoke_test_touches_none_of_the_real_records(real_then_smoke: dict) -> None:
    it = real_then_smoke
    assert it["smoke_code"] == 0, it["smoke_out"]
    uri, folder = it["uri"], it["folder"]
    real = tracking.latest_search_run(uri, "iso")
    assert real.tags.get(tracking.SMOKE_TAG) != "true"
    assert (folder / "iso.best.yaml").read_text() == it["real_export"]                  # no export over the real one
    assert (folder / "iso-smoke.best.yaml").exists()
    smoke = tracking.latest_search_run(uri, "iso-smoke")                                  # its own experiment
    assert smoke is not None and smoke.tags[tracking.SMOKE_TAG] == "true" and smoke.run_id != real.run_id
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    assert client.get_model_version_by_alias("iso-capsnet", "best").run_id == real.tags["drcaps.best_run_id"]
    assert client.get_model_version_by_alias("iso-capsnet-smoke", "best") is not None
    _, exported = export_from_tracking(uri, "iso", folder / "after-smoke.yaml")
    assert exported.result["mlflow_run_id"] == real.tags["drcaps.best_run_id"]


def _start(folder: Path, experiment: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(DRCAPS), "search", str(experiment), *extra], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_two_searches_of_different_experiments_at_once_in_a_fresh_folder(tmp_path: Path) -> None:
    a, b = _write(tmp_path, "one", samples=1, epochs=1, limit=100), _write(tmp_path, "two", samples=1, epochs=1,
                                                                             limit=100)
    procs = [_start(tmp_path, a), _start(tmp_path, b)]
    outs = [p.communicate(timeout=420) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = {tracking.latest_search_run(uri, n).tags["drcaps.study_name"] for n in ("one", "two")}
    assert len(names) == 2


@pytest.mark.slow
def test_a_second_search_of_the_same_experiment_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    exp = _write(tmp_path, "same", samples=1, epochs=2, limit=200)
    first = _start(tmp_path, exp)
    lock = tmp_path / "drcaps-runs" / "same" / "drcaps-search.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = subprocess.run([str(DRCAPS), "search", str(exp)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    _, err = first.communicate(timeout=420)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "another search of 'same' is running" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert len(tracking.search_runs(uri, "same")) == 1                                    # the second wrote nothing


def test_diverged_error_survives_pickling_and_copying() -> None:
    """Ray copies and pickles a trial's exception: an error whose __init__ differs from its args must still."""
    import copy
    import pickle

    from drcapsnet.errors import DivergedError

    error = DivergedError(3, "train_loss is nan")
    for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert str(again) == str(error) and again.epoch == 3 and str(again).startswith("diverged at epoch 3")
