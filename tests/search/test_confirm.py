"""A best config a user can trust (issue 16): the export retrains to the numbers of the trial it names, and the
winner is confirmed over new seeds before @best, the export and the report crown it.

The pick rule is tested on hand-made records; one real small search with ``search.confirm`` (embedded Ray, Optuna
and MLflow in SQLite) checks the records end to end, and a subprocess search interrupted during its confirmation
checks ``--resume``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from search import ranking, tracking
from search.publish import pick
from search.tune import ConfirmRun, SearchRecords, TrialSummary
from tests.conftest import e2e_experiment

REPO = Path(__file__).resolve().parents[2]
DRCAPS = [sys.executable, "-m", "search.cli"]


def _records(values: list[float], confirmations: list[tuple[int, int, float, str]]) -> SearchRecords:
    exp = e2e_experiment(Path("/tmp"))
    trials = ranking.rank([TrialSummary(f"t{i}", {"train.lr": 0.001 * (i + 1)}, v, 2, "finished", number=i,
                                        run_id=f"r{i}") for i, v in enumerate(values)], lambda t: t.metric, "max")
    runs = tuple(ConfirmRun(n, s, v, o) for n, s, v, o in confirmations)
    return SearchRecords(exp, trials, "sqlite:///x", "p", "study", "sqlite:///y", "/tmp", runs)


def test_without_confirmation_the_raw_best_is_crowned() -> None:
    best, stats, problems = pick(_records([0.90, 0.95, 0.80], []))
    assert best.number == 1 and stats == {} and problems == []


def test_the_best_mean_over_new_seeds_is_crowned_not_the_luckiest_trial() -> None:
    records = _records([0.90, 0.95, 0.80], [(1, 1, 0.85, "finished"), (1, 2, 0.87, "finished"),
                                            (0, 1, 0.91, "finished"), (0, 2, 0.89, "finished")])
    best, stats, problems = pick(records)
    assert best.number == 0 and stats[0]["mean"] == pytest.approx(0.90) and stats[1]["mean"] == pytest.approx(0.86)
    assert stats[0]["n"] == 2 and stats[0]["std"] == pytest.approx(math.sqrt(2e-4)) and problems == []


def test_a_config_that_fails_in_confirmation_is_reported_and_never_crowned() -> None:
    records = _records([0.90, 0.95], [(1, 1, 0.99, "finished"), (1, 2, math.nan, "failed"),
                                      (0, 1, 0.80, "finished"), (0, 2, 0.82, "finished")])
    best, stats, problems = pick(records)
    assert best.number == 0 and stats[1]["failed"] == 1
    assert any("trial 1 failed 1 of its confirmation runs" in p for p in problems)


def test_ties_go_to_the_better_search_value() -> None:
    records = _records([0.90, 0.95], [(1, 1, 0.9, "finished"), (0, 1, 0.9, "finished")])
    assert pick(records)[0].number == 1


@pytest.mark.parametrize(("setting", "message"), [
    ("search.confirm={top_k: 0}", "search.confirm.top_k: must be an integer >= 1"),
    ("search.confirm={seeds: 0}", "search.confirm.seeds: must be an integer >= 1"),
    ("search.confirm={top_k: 50}", "search.confirm.top_k: 50 is above search.num_samples"),
    ("search.confirm={top_k: 2, seed: 3}", "search.confirm.seed: unknown key (did you mean 'seeds'?)"),
    ("search.confirm={resplit: 2}", "search.confirm.resplit: expected true or false, got 2"),
])
def test_bad_confirm_settings_are_one_line_and_exit_2_before_any_work(tmp_path: Path, setting: str,
                                                                       message: str) -> None:
    out = subprocess.run([*DRCAPS, "search", str(REPO / "experiments/quickstart.yaml"), "--set", setting],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- a real confirmed search

CONFIRM = {"top_k": 2, "seeds": 2}


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    import ray

    from search.plan import make_plan
    from search.publish import publish
    from search.publish.outputs import write_outputs
    from search.tune import run_search

    tmp = tmp_path_factory.mktemp("confirm")
    exp = e2e_experiment(tmp, num_samples=3, max_concurrent=2, scheduler={"name": "none"}, confirm=CONFIRM)
    plan = make_plan(exp, storage_path=tmp / "ray", out=tmp / "e2e.best.yaml")
    try:
        result = publish(plan, run_search(plan, verbose=0))
    finally:
        ray.shutdown()
    assert write_outputs(plan, result) == 0
    return result, tmp


def _confirm_values(uri: str, parent: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in tracking.child_runs(uri, parent, role="confirm"):
        found = ranking.best_epoch(tracking.metric_history(uri, r.run_id, "val_acc"), "max")
        assert found is not None and r.status == "FINISHED"
        out.setdefault(int(r.tags["drcaps.confirms_trial"]), []).append(found[1])
    return out


@pytest.mark.slow
def test_confirmation_runs_are_recorded_and_the_pick_is_their_best_mean(confirmed) -> None:
    import optuna

    result, tmp = confirmed
    uri, parent = result.tracking_uri, result.parent_run_id
    runs = tracking.child_runs(uri, parent, role="confirm")
    assert len(runs) == CONFIRM["top_k"] * CONFIRM["seeds"]
    top = [t.number for t in result.trials[: CONFIRM["top_k"]]]
    assert sorted((int(r.tags["drcaps.confirms_trial"]), r.tags["drcaps.confirm_seed"]) for r in runs) == \
        sorted((n, str(s)) for n in top for s in (1, 2))
    assert len(tracking.child_runs(uri, parent)) == 3                      # trial runs apart from confirmation runs
    values = _confirm_values(uri, parent)
    means = {n: sum(v) / len(v) for n, v in values.items()}
    expected = ranking.best_of([t for t in result.trials if t.number in means], lambda t: means[t.number], "max")
    assert result.best.number == expected.number
    assert result.confirmed[result.best.number]["mean"] == pytest.approx(means[result.best.number])
    # @best, the parent run, the export and the study agree on it
    tags = tracking.get_run(uri, parent).tags
    assert tags["drcaps.best_run_id"] == result.best_run_id and tags["drcaps.best_trial"] == str(result.best.number)
    assert tracking.model_version(uri, "e2e-capsnet", "best")["run_id"] == result.best_run_id
    export = yaml.safe_load((tmp / "e2e.best.yaml").read_text())
    assert export["result"]["mlflow_run_id"] == result.best_run_id
    assert export["result"]["confirmed"]["mean"] == pytest.approx(means[result.best.number])
    assert export["result"]["confirmed"]["n"] == 2
    assert tracking.get_run(uri, parent).metrics["confirmed_val_acc_mean"] == pytest.approx(means[result.best.number])
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    assert study.user_attrs[f"confirm.{result.best.number}"]["val_acc"]["n"] == 2
    assert len(study.trials) == 3                                           # no duplicate trials for the sampler
    report = Path(result.report_path).read_text()
    assert 'id="confirmation"' in report and f"trial {result.best.number} (crowned)" in report


@pytest.mark.slow
def test_the_export_retrains_to_the_trials_per_epoch_metrics(confirmed, tmp_path: Path) -> None:
    result, tmp = confirmed
    out = subprocess.run([*DRCAPS, "train", "--config", str(tmp / "e2e.best.yaml"), "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "reproducing trial" in out.stdout, out.stdout
    epochs = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    uri = result.tracking_uri
    train_loss = [v for _, v in tracking.metric_history(uri, result.best_run_id, "train_loss")]
    val_acc = [v for _, v in tracking.metric_history(uri, result.best_run_id, "val_acc")]
    assert len(epochs) == len(train_loss) == result.experiment.run.train.epochs
    for line, loss, acc in zip(epochs, train_loss, val_acc, strict=True):
        assert f"train_loss {loss:.4f}" in line and f"val_acc {100 * acc:.2f}%" in line, (line, loss, acc)


@pytest.mark.slow
def test_resume_during_confirmation_neither_loses_nor_repeats_a_run(tmp_path: Path) -> None:
    exp = e2e_experiment(tmp_path, num_samples=2, max_concurrent=2, scheduler={"name": "none"},
                         confirm={"top_k": 2, "seeds": 2})
    exp_file = tmp_path / "e2e.yaml"
    from search.experiment import dump_experiment

    dump_experiment(exp, exp_file)
    cmd = [*DRCAPS, "search", str(exp_file), "--storage-path", str(tmp_path / "ray")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:      # a confirmation run has logged an epoch
        confirm_dirs = list((tmp_path / "ray" / "e2e").glob("*-confirm/confirm-*"))
        if confirm_dirs and any((d / "result.json").exists() and (d / "result.json").stat().st_size for d in
                                confirm_dirs):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, text
    out = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    parent = tracking.latest_search_run(uri, "e2e")
    assert parent is not None
    runs = tracking.child_runs(uri, parent.run_id, role="confirm")
    pairs = sorted((r.tags["drcaps.confirms_trial"], r.tags["drcaps.confirm_seed"]) for r in runs)
    assert len(pairs) == 4 and len(set(pairs)) == 4, pairs                  # one run per (trial, seed)
    for r in runs:
        assert r.status == "FINISHED", r.tags
        steps = [s for s, _ in tracking.metric_history(uri, r.run_id, "val_acc")]
        assert steps == sorted(set(steps)) == [1, 2], steps                  # no step logged twice
    assert "confirmed" in out.stdout
