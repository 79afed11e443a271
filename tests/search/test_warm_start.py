"""search.warm_start and --extend without a search: which old trials fit the new space and why not (pure), the
``search.warm_start`` section's validation, and the bad inputs refused in one line (exit code 2) before Ray."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from ray.tune.experiment import Trial

from drcapsnet.errors import ConfigError
from search.cli import main
from search.experiment import experiment_from_dict
from search.warm_start import OldTrial, changed_settings, fits, select

OLD: dict[str, Any] = {
    "model": {"units": 8, "routing_iterations": 2, "conv_channels": 16},
    "data": {"dataset": "digits", "limit_train": 400, "data_dir": "/a"},
    "train": {"epochs": 2, "lr": 0.01, "momentum": 0.9, "device": "cpu", "seed": 0},
    "search": {"metric": "val_acc", "mode": "max", "space": {
        "train.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
        "model.units": {"type": "categorical", "choices": [4, 8, 16]}}},
}


def _new(**space: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(OLD)
    new["search"]["space"] = space
    return new


def test_fits_bounds_steps_choices_and_types() -> None:
    assert fits(0.01, {"type": "float", "low": 1e-3, "high": 0.1})
    assert not fits(0.2, {"type": "float", "low": 1e-3, "high": 0.1})
    assert fits(4, {"type": "int", "low": 2, "high": 8, "step": 2})
    assert not fits(5, {"type": "int", "low": 2, "high": 8, "step": 2})
    assert not fits(2.5, {"type": "int", "low": 1, "high": 5})
    assert fits(8, {"type": "categorical", "choices": [4, 8]})
    assert not fits(True, {"type": "categorical", "choices": [1, 4]})       # YAML's true is not 1
    assert not fits(float("nan"), {"type": "float", "low": 0.0, "high": 1.0})


def test_narrower_space_takes_what_fits_and_counts_the_rest_by_reason() -> None:
    new = _new(**{"train.lr": {"type": "float", "low": 5e-3, "high": 5e-2, "log": True},
                  "model.units": {"type": "categorical", "choices": [8, 16]}})
    trials = [OldTrial(0, "COMPLETE", {"train.lr": 0.01, "model.units": 8}),
              OldTrial(1, "PRUNED", {"train.lr": 0.02, "model.units": 16}),
              OldTrial(2, "COMPLETE", {"train.lr": 0.09, "model.units": 8}),      # lr outside
              OldTrial(3, "COMPLETE", {"train.lr": 0.01, "model.units": 4}),      # units outside
              OldTrial(4, "COMPLETE", {"train.lr": 0.002, "model.units": 8}),     # lr outside
              OldTrial(5, "FAIL", {"train.lr": 0.01, "model.units": 8}),
              OldTrial(6, "RUNNING", {"train.lr": 0.01, "model.units": 8})]
    chosen = select(trials, OLD, new)
    assert chosen.taken == {0: {"train.lr": 0.01, "model.units": 8}, 1: {"train.lr": 0.02, "model.units": 16}}
    assert dict(chosen.skipped) == {"with train.lr outside the new space": 2,
                                    "with model.units outside the new space": 1, "failed or unfinished": 2}
    assert chosen.line("old (s)") == ("warm start from old (s): took 2 of 7 trials; not taken: 2 with train.lr "
                                      "outside the new space; 2 failed or unfinished; 1 with model.units outside "
                                      "the new space")


def test_a_field_the_old_search_varied_and_the_new_fixes_is_a_reason() -> None:
    new = _new(**{"train.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}})
    chosen = select([OldTrial(0, "COMPLETE", {"train.lr": 0.01, "model.units": 8})], OLD, new)
    assert not chosen.taken and dict(chosen.skipped) == {"searched model.units, which the new search fixes": 1}


def test_a_field_the_old_search_fixed_is_filled_in_where_it_fits() -> None:
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
             "model.units": {"type": "categorical", "choices": [4, 8, 16]}}
    fits_it = _new(**space, **{"train.momentum": {"type": "float", "low": 0.5, "high": 0.95}})
    outside = _new(**space, **{"train.momentum": {"type": "float", "low": 0.5, "high": 0.8}})
    trial = OldTrial(0, "COMPLETE", {"train.lr": 0.01, "model.units": 8})
    assert select([trial], OLD, fits_it).taken == {0: {"train.lr": 0.01, "model.units": 8, "train.momentum": 0.9}}
    assert dict(select([trial], OLD, outside).skipped) == {
        "with train.momentum fixed at 0.9 before, outside the new space": 1}


def test_changed_settings_names_what_changes_the_metric_not_runtime_or_searched_fields() -> None:
    new = copy.deepcopy(OLD)
    new["data"] |= {"dataset": "mnist", "data_dir": "/b"}                  # data_dir: where, not what
    new["train"] |= {"epochs": 3, "device": "cuda", "seed": 5, "lr": 0.5}  # lr is searched: per trial
    new["model"]["conv_channels"] = 32
    new["search"]["metric"] = "val_loss"
    assert changed_settings(OLD, new) == [("data.dataset", "digits", "mnist"), ("model.conv_channels", 16, 32),
                                          ("search.metric", "val_acc", "val_loss"), ("train.epochs", 2, 3)]
    assert changed_settings(OLD, new, ["data.dataset", "model.conv_channels", "search.metric", "train.epochs"]) == []


def _experiment(tmp: Path, **search: Any) -> dict[str, Any]:
    return {"name": "ws", "model": {"preset": "tiny"}, "data": {"dataset": "digits", "limit_train": 200},
            "train": {"epochs": 2, "device": "cpu"},
            "search": {"num_samples": 2, "scheduler": {"name": "none"},
                       "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, **search},
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}}


def test_warm_start_section_every_problem_at_once_with_suggestions(tmp_path: Path) -> None:
    raw = _experiment(tmp_path, warm_start={"experimnt": "old", "allow_changed": ["data.datset", "train.epochs"]})
    with pytest.raises(ConfigError) as caught:
        experiment_from_dict(raw)
    text = str(caught.value)
    assert "search.warm_start.experimnt: unknown key (did you mean 'experiment'?)" in text
    assert "search.warm_start.experiment: required" in text
    assert "search.warm_start.allow_changed: 'data.datset' is not a setting (did you mean 'data.dataset'?)" in text
    ok = experiment_from_dict(_experiment(tmp_path, warm_start={"experiment": "old",
                                                                "allow_changed": ["train.epochs"]}))
    assert ok.search.warm_start == {"experiment": "old", "allow_changed": ["train.epochs"]}


@pytest.fixture
def exp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import yaml

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(_experiment(tmp_path)))
    return path


@pytest.mark.parametrize(("flags", "message"), [
    (["--extend", "0"], "error: --extend: 0 trials; give the number of trials to add, 1 or more"),
    (["--extend", "-2"], "error: --extend: -2 trials; give the number of trials to add, 1 or more"),
    (["--extend", "2", "--resume"], "error: --extend: cannot be combined with --resume"),
    (["--extend", "2"], "error: --extend: no search of 'ws' in "),
    (["--warm-start", "nothing"], "error: search.warm_start.experiment: no search of 'nothing' at sqlite:///"),
], ids=["zero", "negative", "with-resume", "no-search", "warm-start-no-search"])
def test_bad_extend_and_warm_start_are_one_line_exit_2_before_any_work(
        exp_file: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    before = sorted(p.name for p in exp_file.parent.iterdir())
    assert main(["search", str(exp_file), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert sorted(p.name for p in exp_file.parent.iterdir()) == before      # no store, no Ray folder written


def test_an_extensions_folder_names_its_round() -> None:
    from search.tune.extend import round_of

    assert [round_of(n) for n in ("q-20261206-1-abc", "q-20261206-1-abc-extend-1", "q-1-abc-extend-12")] == [0, 1, 12]


def test_the_summary_marks_taken_trials_and_says_they_are_not_crowned() -> None:
    from types import SimpleNamespace

    from search.earlier import TakenTrial
    from search.publish.outputs import TOP_TAKEN, taken_lines

    taken = tuple(TakenTrial(n, f"old-study#{n}", 0.5 if n % 2 else None, None) for n in range(TOP_TAKEN + 2))
    result = SimpleNamespace(taken=taken, tracking_uri="sqlite:///x.db",
                             experiment=SimpleNamespace(search=SimpleNamespace(metric="val_acc")))
    lines = taken_lines(result)
    assert "never crowned here" in lines[1] and f"({TOP_TAKEN + 2};" in lines[1]
    assert lines[2] == "  trial 0 <- old-study#0  stopped early  no MLflow run recorded"
    assert lines[3] == "  trial 1 <- old-study#1  val_acc 0.5000  no MLflow run recorded"
    assert lines[-1] == "  ... and 2 more (the report lists every one)"
    assert taken_lines(SimpleNamespace(taken=())) == []


# ------------------------------------------------------------------------------------ ASHA's rungs start informed

def _asha(tmp: Path, **search: Any) -> Any:
    raw = _experiment(tmp, scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}, **search)
    raw["train"]["epochs"] = 4
    return experiment_from_dict(raw)


def test_without_taken_trials_asha_stays_rays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from search.tune.searcher import make_scheduler

    assert type(make_scheduler(_asha(tmp_path), 4)) is AsyncHyperBandScheduler
    # Taken trials that never reached the first rung inform nothing: Ray's ASHA, and the line says 0.
    assert type(make_scheduler(_asha(tmp_path), 4, [None])) is AsyncHyperBandScheduler
    assert capsys.readouterr().out == "warm start: ASHA's rungs start with 0 of the 1 taken trials\n"


def test_taken_trials_start_the_rungs_and_the_line_says_how_many(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.tune.moasha import STOP, MOASHAScheduler
    from search.tune.searcher import make_scheduler

    taken = [{1: (0.8,), 2: (0.85,), 3: (0.86,), 4: (0.9,)}, {1: (0.7,)}, None, {1: (0.75,), 2: (0.8,)}]
    s = make_scheduler(_asha(tmp_path), 4, taken)
    assert isinstance(s, MOASHAScheduler) and s.objectives == (("val_acc", "max"),)
    assert s.prior_sizes == {1: 3, 2: 2, 4: 1} and list(s.rungs[2].values()) == [(0.85,), (0.8,)]
    assert capsys.readouterr().out == ("warm start: ASHA's rungs start with 3 of the 4 taken trials (3 at epoch 1, "
                                       "2 at epoch 2, 1 at epoch 4)\n")
    assert s.on_trial_result(None, Trial("fn", trial_id="new", stub=True),
                             {"training_iteration": 1, "val_acc": 0.6}) == STOP
    s_min = make_scheduler(_asha(tmp_path, metric="val_loss", mode="min"), 4, [{1: (0.3,)}])
    assert s_min.objectives == (("val_loss", "min"),)
    pareto = _asha(tmp_path, objectives=[{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}])
    s_two = make_scheduler(pareto, 4, [{1: (0.8, 1e5), 2: (0.9, 1e5)}, None])
    assert s_two.objectives == (("val_acc", "max"), ("params", "min")) and s_two.rungs[2] == {"prior/2/0": (0.9, 1e5)}
    assert capsys.readouterr().out.splitlines()[-1] == (
        "warm start: MO-ASHA's rungs start with 1 of the 2 taken trials (1 at epoch 1, 1 at epoch 2)")


def test_rung_curve_reads_what_the_taken_trials_recorded() -> None:
    import optuna

    from search.earlier import rung_curve
    from search.storage import curve_attr

    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)}
    one = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"train.lr": 0.01},
                                    distributions=dist, intermediate_values={1: 0.5, 2: 0.6})
    assert rung_curve(one, ["val_acc"]) == {1: (0.5,), 2: (0.6,)}
    curves = {curve_attr("val_acc"): [[1, 0.5], [2, 0.6], [3, 0.7]], curve_attr("latency_ms"): [[1, 2.0], [2, 2.1]]}
    both = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"train.lr": 0.01},
                                     distributions=dist, user_attrs=curves)
    assert rung_curve(both, ["val_acc", "latency_ms"]) == {1: (0.5, 2.0), 2: (0.6, 2.1)}   # both known
    # A cost without a per-epoch record: the value the trial was told with, at every epoch (COMPLETE only).
    acc_only = {curve_attr("val_acc"): curves[curve_attr("val_acc")]}
    complete = optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, values=[0.7, 3.0],
                                         params={"train.lr": 0.01}, distributions=dist, user_attrs=acc_only)
    assert rung_curve(complete, ["val_acc", "latency_ms"]) == {1: (0.5, 3.0), 2: (0.6, 3.0), 3: (0.7, 3.0)}
    pruned = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"train.lr": 0.01},
                                       distributions=dist, user_attrs=acc_only)
    assert rung_curve(pruned, ["val_acc", "latency_ms"]) is None                 # left out of the prior
    assert rung_curve(complete, ["val_acc", "val_loss"]) is None                 # an epoch metric: no stand-in


def _small(tmp: Path, name: str, lrs: list[float], **search: Any) -> dict[str, Any]:
    """Real trials of 2 epochs on 200 digits, one at a time, the ``lrs`` enqueued (Adam: 2-5e-3 reaches 0.4-0.7
    val_acc at epoch 1, 1e-5 about 0.1)."""
    return {"name": name, "model": {"preset": "tiny"},
            "data": {"dataset": "digits", "batch_size": 32, "limit_train": 200, "shift_pixels": 0},
            "train": {"epochs": 2, "device": "cpu", "optimizer": "adam"},
            "search": {"num_samples": len(lrs), "max_concurrent": 1, "seed": 3, "resources": {"cpu": 1},
                       "space": {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}},
                       "enqueue": [{"train.lr": lr} for lr in lrs], **search},
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}}


@pytest.mark.slow
def test_a_warm_started_asha_search_judges_its_first_trials_against_the_taken_ones(tmp_path: Path) -> None:
    import optuna
    import ray.cloudpickle

    from search import tracking
    from search.storage import WARM_START_ATTR
    from search.tune.moasha import STOP, rung_decision
    from tests.search.test_extend import drcaps

    first = drcaps(tmp_path, _small(tmp_path, "first", [0.002, 0.003, 0.005], scheduler={"name": "none"}))
    assert first.returncode == 0, first.stderr
    asha = {"name": "asha", "grace_period": 1, "reduction_factor": 2}
    warm = drcaps(tmp_path, _small(tmp_path, "warm", [1e-5, 0.004], scheduler=asha, warm_start={"experiment": "first"}))
    assert warm.returncode == 0, warm.stderr
    assert "warm start from first (" in warm.stdout
    assert "warm start: ASHA's rungs start with 3 of the 3 taken trials (3 at epoch 1, 3 at epoch 2)" in warm.stdout
    parent = tracking.latest_search_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "warm")
    assert parent is not None
    study = optuna.load_study(study_name=parent.tags["drcaps.study_name"], storage=f"sqlite:///{tmp_path}/optuna.db")
    taken_at_1 = [t.intermediate_values[1] for t in study.trials if WARM_START_ATTR in t.user_attrs]
    own = {t.params["train.lr"]: t for t in study.trials if WARM_START_ATTR not in t.user_attrs}
    bad, good = own[1e-5], own[0.004]                 # run in this order (max_concurrent 1)
    # The first new trial is below every taken trial at rung 1: with the taken trials there (keep 2 of 4) it stops
    # after epoch 1; Ray's ASHA, its rungs empty, would have let the first trial of the search run on.
    assert len(taken_at_1) == 3 and bad.intermediate_values[1] < min(taken_at_1), (taken_at_1, bad)
    assert bad.state == optuna.trial.TrialState.PRUNED and list(bad.intermediate_values) == [1]
    # What --resume restores (Tune's tuner.pkl, written as the search starts) holds the taken trials at the rungs.
    saved = ray.cloudpickle.loads((tmp_path / "ray" / "warm" / study.study_name / "tuner.pkl").read_bytes())
    scheduler = saved["_tune_config"].scheduler
    assert scheduler.prior_sizes == {1: 3, 2: 3} and sorted(v for (v,) in scheduler.rungs[1].values()) == sorted(
        taken_at_1)
    # The second is judged against the three and the first (top 3 of 5 go on), whichever way its value falls.
    decision = rung_decision([(v,) for v in [*taken_at_1, bad.intermediate_values[1]]],
                             (good.intermediate_values[1],), ["max"], 2)
    assert (good.state.name, list(good.intermediate_values)) == (
        ("PRUNED", [1]) if decision == STOP else ("COMPLETE", [1, 2])), (taken_at_1, bad, good)
