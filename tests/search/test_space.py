from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.experiment import SAMPLERS, Experiment, ParamSpec, experiment_from_dict
from search.space import apply_params, make_sampler, sample_space, to_distributions

SPACE = {
    "train.lr": ParamSpec("float", 1e-4, 1e-1, log=True),
    "train.momentum": ParamSpec("float", 0.5, 0.9, step=0.1),
    "model.routing_iterations": ParamSpec("int", 1, 5),
    "data.batch_size": ParamSpec("int", 16, 64, step=16),
    "model.units": ParamSpec("categorical", choices=(8, 12, 16)),
    "train.optimizer": ParamSpec("categorical", choices=("sgd", "adam")),
}


def experiment() -> Experiment:
    return experiment_from_dict(yaml.safe_load("""
name: s
model: {preset: tiny}
search:
  space:
    train.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
"""))


def test_to_distributions_types_and_bounds() -> None:
    d = to_distributions(SPACE)
    assert list(d) == list(SPACE)
    assert d["train.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["train.momentum"] == FloatDistribution(0.5, 0.9, step=0.1)
    assert d["model.routing_iterations"] == IntDistribution(1, 5)
    assert d["data.batch_size"] == IntDistribution(16, 64, step=16)
    assert d["model.units"] == CategoricalDistribution([8, 12, 16])
    assert d["train.optimizer"] == CategoricalDistribution(["sgd", "adam"])


def test_apply_params_changes_exactly_the_named_fields() -> None:
    exp = experiment()
    params = {"train.lr": 0.02, "model.units": 12, "data.batch_size": 32, "train.optimizer": "sgd"}
    run = apply_params(exp, params)
    before, after = exp.run.flat(), run.flat()
    assert {k for k in after if after[k] != before[k]} == set(params)
    assert all(after[k] == v for k, v in params.items())
    assert run.model.conv_channels == 16                          # the preset stays
    assert apply_params(exp, {}) == exp.run


def test_apply_params_converts_numpy_and_matches_field_types() -> None:
    run = apply_params(experiment(), {"model.routing_iterations": np.int64(4), "train.lr": np.float32(0.5),
                                      "data.batch_size": 64.0, "train.momentum": 0, "train.bf16": np.bool_(False)})
    assert type(run.model.routing_iterations) is int and run.model.routing_iterations == 4
    assert type(run.train.lr) is float and run.train.lr == 0.5
    assert type(run.data.batch_size) is int and run.data.batch_size == 64
    assert type(run.train.momentum) is float
    assert run.train.bf16 is False


def test_apply_params_accepts_nested_params() -> None:
    assert apply_params(experiment(), {"train": {"lr": 0.3}}).train.lr == 0.3


@pytest.mark.parametrize("name", ["train.lrr", "optim.lr", "preset", "model.preset"])
def test_apply_params_unknown_name_is_a_key_error_with_the_name(name: str) -> None:
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        apply_params(experiment(), {name: 1})


def test_apply_params_value_the_config_rejects() -> None:
    with pytest.raises(ValueError, match=r"model\.routing_iterations: must be an integer in \[1, 10\], got 11"):
        apply_params(experiment(), {"model.routing_iterations": 11})


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "qmc"])
def test_same_seed_same_suggestions_different_seed_different(sampler: str) -> None:
    n = 12 if sampler != "gp" else 11           # past TPE's and GP's 10 random start-up trials
    first = sample_space(SPACE, seed=3, n=n, sampler=sampler)
    assert sample_space(SPACE, seed=3, n=n, sampler=sampler) == first
    assert sample_space(SPACE, seed=4, n=n, sampler=sampler) != first


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "qmc"])
def test_samples_stay_in_the_space_and_apply(sampler: str) -> None:
    exp = experiment()
    for params in sample_space(SPACE, seed=0, n=15, sampler=sampler):
        assert set(params) == set(SPACE)
        assert 1e-4 <= params["train.lr"] <= 1e-1
        assert any(math.isclose(params["train.momentum"], m) for m in (0.5, 0.6, 0.7, 0.8, 0.9))
        assert type(params["model.routing_iterations"]) is int and 1 <= params["model.routing_iterations"] <= 5
        assert params["data.batch_size"] in (16, 32, 48, 64)
        assert params["model.units"] in (8, 12, 16) and params["train.optimizer"] in ("sgd", "adam")
        apply_params(exp, params)


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_name_builds(name: str) -> None:
    assert isinstance(make_sampler(name, seed=0), optuna.samplers.BaseSampler)


def test_unknown_sampler_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="must be one of tpe, random, cmaes, gp, qmc, nsga2, got 'bayes'"):
        make_sampler("bayes", seed=0)
