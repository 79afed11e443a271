"""A real multi-objective search on the digits (embedded Ray, Optuna, MLflow; MO-ASHA, TPE): the front in the
summary, NAME.pareto.yaml, NAME.best.yaml, the MLflow tags and aliases, the Optuna study and the report all agree;
the search (``search.confirm: {top_k: 2, seeds: 2}``) confirms its first front members and crowns by the rule on
their confirmed values; and a multi-objective search stopped by Ctrl-C, then ``--resume``, ends with every trial and
a front."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from search import tracking
from search.experiment import experiment_from_dict
from search.plan import make_plan
from search.publish import SearchResult, publish
from search.publish.outputs import write_outputs
from search.state import STATE_FILE
from search.tune import run_search

DRCAPS = Path(sys.executable).parent / "drcaps"
CONFIRM = {"top_k": 2, "seeds": 2}
SEARCH = {
    "objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}],
    "num_samples": 6, "max_concurrent": 2, "seed": 5, "resources": {"cpu": 1},
    "scheduler": {"name": "asha", "grace_period": 1},
    "space": {"model.units": {"type": "categorical", "choices": [4, 8, 16]},
              "model.conv_channels": {"type": "categorical", "choices": [8, 16, 32]},
              "train.lr": {"type": "float", "low": 3.0e-3, "high": 1.0e-2, "log": True}},
}


def _raw(tmp: Path, name: str) -> dict:
    return {"name": name, "model": {"preset": "tiny"},
            "data": {"dataset": "digits", "batch_size": 32, "limit_train": 300, "shift_pixels": 0},
            "train": {"epochs": 2, "device": "cpu", "optimizer": "adam"}, "search": SEARCH,
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": name}}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchResult, Path, str]:
    """The search, published and written out as ``drcaps search`` does; its printed summary."""
    import contextlib
    import io

    import ray

    tmp = tmp_path_factory.mktemp("mo")
    raw = _raw(tmp, "mo-e2e")
    raw["search"] = {**SEARCH, "confirm": CONFIRM}        # the front confirmed before its pick is crowned
    exp = experiment_from_dict(raw, base_dir=tmp)
    printed = io.StringIO()
    try:
        plan = make_plan(exp, storage_path=tmp / "ray", out=tmp / "mo-e2e.best.yaml")
        result = publish(plan, run_search(plan, verbose=0))
        with contextlib.redirect_stdout(printed):
            assert write_outputs(plan, result) == 0
    finally:
        ray.shutdown()
    return result, tmp, printed.getvalue()


def _front_rows(summary: str) -> list[tuple[int, int]]:
    """(rank, trial) of each row of the summary's front table."""
    block = summary.split("Pareto front (", 1)[1].split("\n\n", 1)[0]
    return [(int(m[1]), int(m[2])) for m in re.finditer(r"^  (\d+)\*? +(\d+) ", block, re.M)]


@pytest.mark.slow
def test_summary_yaml_and_best_export_agree_on_the_front_and_the_pick(searched):
    result, tmp, summary = searched
    front = result.front
    assert front is not None and len(front.members) >= 2, summary
    assert len({json.dumps(m.params, sort_keys=True) for m in front.members}) == len(front.members)  # distinct
    assert _front_rows(summary) == [(n, m.number) for n, m in enumerate(front.members, start=1)]
    assert f"best: trial {result.best.number}," in summary.split("Pareto front (", 1)[1]   # the pick, after
    data = yaml.safe_load((tmp / "mo-e2e.pareto.yaml").read_text())
    assert [m["trial"] for m in data["front"]] == [m.number for m in front.members]
    assert [m["values"] for m in data["front"]] == [front.values[m.trial_id] for m in front.members]
    assert data["picked_trial"] == result.best.number
    best = yaml.safe_load((tmp / "mo-e2e.best.yaml").read_text())
    assert best["result"]["trial_id"] == result.best.trial_id
    # Every trial that reported measured its parameter count from its first epoch on.
    assert all("params" in t.metrics and t.metrics["params"] > 0 for t in result.trials if t.epochs)


@pytest.mark.slow
def test_mlflow_holds_the_ranks_aliases_and_hypervolume(searched):
    result, _, _ = searched
    uri, front, name = result.tracking_uri, result.front, result.experiment.registered_model
    runs = {r.run_id: r for r in tracking.child_runs(uri, result.parent_run_id)}
    for n, member in enumerate(front.members, start=1):
        assert runs[member.run_id].tags["drcaps.pareto_rank"] == str(n)
        assert tracking.model_version(uri, name, f"pareto-{n}")["run_id"] == member.run_id
    others = [r for r in runs.values() if r.run_id not in {m.run_id for m in front.members}]
    assert all(not r.tags.get("drcaps.pareto_rank") for r in others)
    assert tracking.model_version(uri, name, "best")["run_id"] == result.best.run_id
    parent = tracking.get_run(uri, result.parent_run_id)
    assert parent.metrics["pareto_hypervolume"] == pytest.approx(front.hypervolume)
    assert json.loads(parent.tags["drcaps.pareto.reference"]) == pytest.approx(front.reference)
    assert parent.tags["drcaps.pareto.front"] == ",".join(str(m.number) for m in front.members)


@pytest.mark.slow
def test_publishing_the_front_again_adds_no_model_version(searched):
    """What ``--extend`` does at its end: the front recorded again points its aliases at the versions it has."""
    from mlflow import MlflowClient

    from search.publish.front import record_front
    from search.tune import SearchRecords

    result, _, _ = searched
    uri, name = result.tracking_uri, result.experiment.registered_model
    before = sorted(int(v.version) for v in MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{name}'"))
    records = SearchRecords(result.experiment, result.trials, uri, result.parent_run_id, result.study_name,
                            result.storage_url, result.experiment_path)
    problems: list[str] = []
    again = record_front(records, result.best, result.model_uri, problems)
    after = sorted(int(v.version) for v in MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{name}'"))
    assert not problems and after == before, (problems, before, after)
    for n, member in enumerate(again.members, start=1):
        assert tracking.model_version(uri, name, f"pareto-{n}")["run_id"] == member.run_id


@pytest.mark.slow
def test_optuna_holds_vector_values_and_per_epoch_curves(searched):
    result, tmp, _ = searched
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{tmp / 'optuna.db'}")
    assert len(study.directions) == 2 and study.metric_names == ["val_acc", "params"]
    by_number = {t.number: t for t in result.trials}
    for t in study.trials:
        assert "intermediate.val_acc" in t.user_attrs and not t.intermediate_values
        if t.state == optuna.trial.TrialState.COMPLETE:
            summary = by_number[t.number]
            assert t.values == pytest.approx([summary.metrics["val_acc"], summary.metrics["params"]])
        else:
            assert t.state == optuna.trial.TrialState.PRUNED and by_number[t.number].outcome == "stopped_early"


@pytest.mark.slow
def test_report_draws_the_same_front_and_marks_the_pick(searched):
    result, _, _ = searched
    page = Path(result.report_path).read_text()
    figures = {m[1]: json.loads(m[2]) for m in re.finditer(
        r'data-key="([a-z_]+)">(.*?)</script>', page, re.S)}
    assert {"pareto_front", "hypervolume", "optimization_history"} <= set(figures)
    traces = {t["name"]: t for t in figures["pareto_front"]["data"]}
    members = result.front.members
    assert traces["front"]["y"] == pytest.approx([result.front.values[m.trial_id]["val_acc"] for m in members])
    assert traces["front"]["x"] == pytest.approx([result.front.values[m.trial_id]["params"] for m in members])
    picked = result.front.values[result.best.trial_id]
    assert traces["pick"]["x"] == pytest.approx([picked["params"]])
    assert figures["hypervolume"]["data"][0]["y"][-1] == pytest.approx(result.front.hypervolume)


# ---------------------------------------------------------------- the front confirmed before its pick is crowned

@pytest.fixture(scope="module")
def confirmed(searched: tuple[SearchResult, Path, str]) -> tuple[SearchResult, Path, str]:
    """The module's search: it confirms (``search.confirm: {top_k: 2, seeds: 2}``), so one search serves both (a
    second search of its own cost about 90 s of the suite)."""
    return searched


@pytest.mark.slow
def test_the_first_front_members_are_confirmed_and_the_rule_picks_on_their_confirmed_values(confirmed):
    from search import pareto, ranking

    result, tmp, summary = confirmed
    uri, parent, front = result.tracking_uri, result.parent_run_id, result.front
    assert front is not None and len(front.members) >= CONFIRM["top_k"], summary
    ranked = tracking.get_run(uri, parent).tags["drcaps.pareto.front"].split(",")     # the search's rank order
    first = [int(n) for n in ranked[: CONFIRM["top_k"]]]
    runs = tracking.child_runs(uri, parent, role="confirm")
    assert sorted((int(r.tags["drcaps.confirms_trial"]), int(r.tags["drcaps.confirm_seed"])) for r in runs) == \
        sorted((n, seed) for n in first for seed in (1, 2))
    means: dict[int, list[float]] = {}
    for r in runs:
        found = ranking.best_epoch(tracking.metric_history(uri, r.run_id, "val_acc"), "max")
        assert r.status == "FINISHED" and found is not None
        means.setdefault(int(r.tags["drcaps.confirms_trial"]), []).append(found[1])
    by_number = {m.number: m for m in front.members}
    rows = [{**front.values[by_number[n].trial_id], "val_acc": sum(means[n]) / 2} for n in first]   # costs kept
    expected = first[pareto.pick(rows, front.objectives, "knee")]
    assert result.best.number == expected and result.confirmed[expected]["n"] == 2
    mean = sum(means[expected]) / 2
    # @best, the export, NAME.pareto.yaml, the parent run and the summary agree on the confirmed pick.
    assert tracking.model_version(uri, "mo-e2e-capsnet", "best")["run_id"] == result.best.run_id
    export = yaml.safe_load((tmp / "mo-e2e.best.yaml").read_text())
    assert export["result"]["trial_id"] == result.best.trial_id
    assert export["result"]["confirmed"]["mean"] == pytest.approx(mean) and export["result"]["confirmed"]["n"] == 2
    data = yaml.safe_load((tmp / "mo-e2e.pareto.yaml").read_text())
    assert data["picked_trial"] == expected
    assert {m["trial"]: m["confirmed"]["mean"] for m in data["front"] if "confirmed" in m} == \
        pytest.approx({n: sum(v) / 2 for n, v in means.items()})
    run = tracking.get_run(uri, parent)
    assert run.tags["drcaps.best_trial"] == str(expected) and run.tags["drcaps.confirmed"] == "true"
    assert run.metrics["confirmed_val_acc_mean"] == pytest.approx(mean)
    assert "confirmation of the first 2 Pareto front members by search.pick knee" in summary
    assert f"best: trial {expected}," in summary and f"confirmed {mean:.4f}" in summary
    assert len(tracking.child_runs(uri, parent)) == SEARCH["num_samples"]    # confirmation runs are not trials


# ---------------------------------------------------------------- an interrupted multi-objective search, resumed

def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
def test_interrupted_multi_objective_search_resumes_to_every_trial_and_a_front(tmp_path):
    raw = _raw(tmp_path, "mo-resume")
    raw["search"] = {**SEARCH, "num_samples": 4, "max_concurrent": 1}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    uri = raw["tracking"]["uri"]
    cmd = [str(DRCAPS), "search", str(tmp_path / "exp.yaml"), "--storage-path", str(tmp_path / "ray")]
    state_file = tmp_path / "ray" / "mo-resume" / STATE_FILE
    out, err = tmp_path / "first.out", tmp_path / "first.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=o, stderr=e, start_new_session=True)
    try:
        finished, deadline = 0, time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and finished < 1:
            if state_file.exists():
                with_parent = tracking.latest_search_run(uri, "mo-resume")
                try:
                    finished = sum(r.status == "FINISHED" for r in tracking.child_runs(uri, with_parent.run_id)) \
                        if with_parent else 0
                except Exception:         # SQLite busy while a trial writes: ask again
                    finished = 0
            time.sleep(0.5)
        assert proc.poll() is None and finished >= 1, f"not interrupted mid-way:\n{_tail(out)}\n{_tail(err)}"
        os.killpg(proc.pid, signal.SIGINT)                  # Ctrl-C in a terminal
        assert proc.wait(timeout=90) == 130, _tail(err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                             start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Pareto front (" in resumed.stdout, resumed.stdout[-3000:]
    parent = tracking.latest_search_run(uri, "mo-resume")
    runs = tracking.child_runs(uri, parent.run_id)
    assert parent.status == "FINISHED" and len(runs) == 4
    assert all(r.status == "FINISHED" and r.tags.get("drcaps.objectives") for r in runs), [r.tags for r in runs]
    front = yaml.safe_load((tmp_path / "mo-resume.pareto.yaml").read_text())["front"]
    ranked = sorted((int(r.tags["drcaps.pareto_rank"]), r.run_id) for r in runs if r.tags.get("drcaps.pareto_rank"))
    assert [m["mlflow_run_id"] for m in front] == [run_id for _, run_id in ranked] and front
