"""search/tune/objectives_run.py and the multi-objective wiring of search/tune/searcher.py: what a trial measures,
the constraints Optuna's sampler checks, the searcher and scheduler a search of several objectives gets."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import optuna
import pytest

from drcapsnet.config import RunConfig
from drcapsnet.model import CapsNet, count_parameters
from search.experiment import experiment_from_dict
from search.tune.moasha import MOASHAScheduler
from search.tune.objectives_run import LATENCY_BATCH, LATENCY_REPEATS, LATENCY_WARMUP, StudyConstraints, TrialCosts
from search.tune.searcher import make_scheduler, make_searcher, nsga2_population


class _Tags:
    """Where TrialCosts writes how it measured (a TrialLogger's ``set_tags`` seam)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def set_tags(self, tags: dict[str, str]) -> None:
        self.calls.append(dict(tags))


def _run() -> RunConfig:
    return RunConfig.from_dict({"model": {"image_size": 8, "conv_channels": 8, "conv_kernel": 3, "primary_types": 4,
                                          "primary_dim": 4, "primary_kernel": 3, "units": 4, "decoder": False},
                                "train": {"device": "cpu", "bf16": False}})


def _experiment(tmp: Path, **search: object) -> object:
    raw = {"name": "mo", "model": {"preset": "tiny"}, "data": {"dataset": "digits"},
           "train": {"epochs": 4, "device": "cpu"},
           "search": {"objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}],
                      "num_samples": 12, "space": {"model.units": {"type": "categorical", "choices": [4, 8]}},
                      **search},
           "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}}
    return experiment_from_dict(raw, base_dir=tmp)


def test_costs_are_measured_once_with_the_stated_settings_and_added_to_every_report():
    run = _run()
    costs, tags = TrialCosts(("params", "flops", "latency_ms", "train_s_per_epoch"), run), _Tags()
    first = costs.add({"epoch": 1, "val_acc": 0.5, "epoch_s": 2.5}, tags)
    assert first["params"] == count_parameters(CapsNet(run.model))
    assert first["flops"] > 0 and first["latency_ms"] > 0 and first["train_s_per_epoch"] == 2.5
    assert first["val_acc"] == 0.5                                        # the epoch's own metrics kept
    assert len(tags.calls) == 1
    settings = tags.calls[0]
    assert settings["drcaps.latency_batch"] == str(LATENCY_BATCH) == "32"
    assert settings["drcaps.latency_repeats"] == str(LATENCY_REPEATS) == "20"
    assert settings["drcaps.latency_warmup"] == str(LATENCY_WARMUP) == "5"
    assert settings["drcaps.latency_device"].startswith("cpu") and settings["drcaps.latency_precision"] == "fp32"
    second = costs.add({"epoch": 2, "val_acc": 0.6, "epoch_s": 1.5}, tags)
    assert len(tags.calls) == 1                                           # measured once per attempt
    assert (second["params"], second["latency_ms"]) == (first["params"], first["latency_ms"])
    assert second["train_s_per_epoch"] == 1.5                             # each epoch's own time


def test_a_search_without_cost_objectives_measures_nothing():
    costs = TrialCosts((), _run())
    assert costs.add({"epoch": 1, "val_acc": 0.5}) == {"epoch": 1, "val_acc": 0.5}
    assert costs.measured == {}


def test_params_alone_skip_the_latency_measurement():
    costs, tags = TrialCosts(("params",), _run()), _Tags()
    out = costs.add({"epoch": 1}, tags)
    assert set(out) == {"epoch", "params"} and tags.calls == []


def test_study_constraints_read_the_told_values_and_the_kept_costs():
    honour = StudyConstraints({"params": {"max": 1.5e6}, "val_acc": {"min": 0.5}}, ["val_acc", "latency_ms"])
    trial = optuna.trial.create_trial(values=[0.4, 2.0], user_attrs={"cost.params": 2.0e6},
                                      distributions={}, params={})
    assert honour(trial) == pytest.approx([0.5e6, 0.1])
    missing = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, distributions={}, params={})
    assert all(v > 0 and math.isfinite(v) for v in honour(missing))      # unknown: infeasible, never NaN
    assert pickle.loads(pickle.dumps(honour))(trial) == honour(trial)    # travels with the pickled searcher


def test_multi_objective_searcher_has_one_direction_per_objective_and_a_constrained_sampler(tmp_path):
    exp = _experiment(tmp_path, sampler="nsga2", constraints={"latency_ms": {"max": 2.0}})
    searcher = make_searcher(exp, "mo-study", None)
    assert searcher.metric == ["val_acc", "params"] and searcher.mode == ["max", "min"]
    study = searcher.study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["val_acc", "params"]
    sampler = study.sampler
    assert isinstance(sampler, optuna.samplers.NSGAIISampler)
    assert sampler._population_size == nsga2_population(12) == 4
    assert isinstance(sampler._constraints_func, StudyConstraints)
    assert searcher._keep == ("latency_ms",)           # constrained, not an objective: kept for the sampler
    pickle.loads(pickle.dumps(searcher.__getstate__()))


@pytest.mark.parametrize(("samples", "population"), [(3, 4), (12, 4), (30, 10), (600, 50)])
def test_nsga2_population_is_sized_to_the_budget(samples, population):
    assert nsga2_population(samples) == population


def test_scheduler_is_mo_asha_for_several_objectives_and_asha_for_one(tmp_path):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    mo = make_scheduler(_experiment(tmp_path, scheduler={"name": "asha", "grace_period": 1}), 4)
    assert isinstance(mo, MOASHAScheduler) and mo.objectives == (("val_acc", "max"), ("params", "min"))
    assert mo.milestones == [1, 2, 4]
    none = make_scheduler(_experiment(tmp_path, scheduler={"name": "none"}), 4)
    assert type(none) is FIFOScheduler
    single = experiment_from_dict({"name": "one", "model": {"preset": "tiny"}, "data": {"dataset": "digits"},
                                   "search": {"space": {"model.units": {"type": "categorical", "choices": [4, 8]}},
                                              "scheduler": {"name": "asha"}}}, base_dir=tmp_path)
    assert type(make_scheduler(single, 4)) is AsyncHyperBandScheduler


def test_confirm_with_several_objectives_is_accepted_and_its_other_checks_kept(tmp_path):
    from drcapsnet.errors import ConfigError

    assert _experiment(tmp_path, confirm={"top_k": 2, "seeds": 2}).search.confirm.top_k == 2
    for confirm, name in (({"top_k": 13}, "search.confirm.top_k"), ({"seeds": 0}, "search.confirm.seeds")):
        with pytest.raises(ConfigError) as e:
            _experiment(tmp_path, confirm=confirm)
        lines = str(e.value).splitlines()[1:]                             # the file, then one line per problem
        assert [line.split(":")[0].strip() for line in lines] == [name]
