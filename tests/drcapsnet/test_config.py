"""Config dataclasses report their problems as data: the dotted field and what is wrong, every one at once."""

from __future__ import annotations

import pickle

import pytest

from drcapsnet.config import DataConfig, ModelConfig, TrainConfig
from drcapsnet.errors import ConfigError, Problem


def test_every_problem_of_a_config_comes_as_field_and_message() -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(units=0, routing_iterations=11, routing="bogus")
    fields = [p.field for p in info.value.problems]
    assert fields == ["model.units", "model.routing_iterations", "model.routing"]
    assert info.value.problems[0] == Problem("model.units", "must be an integer >= 1, got 0")
    assert str(info.value) == "model.units: must be an integer >= 1, got 0"          # the message: the first


def test_checks_that_build_on_a_bad_value_do_not_run() -> None:
    # A bad fraction must not also raise a TypeError from the sum check, nor report the sum.
    problems = DataConfig.__new__(DataConfig)
    object.__setattr__(problems, "dataset", "digits")
    for name, value in (("data_dir", None), ("batch_size", 1), ("val_fraction", "x"), ("test_fraction", 0.2),
                        ("shift_pixels", 0), ("limit_train", None), ("split_seed", 0), ("download", False)):
        object.__setattr__(problems, name, value)
    assert [p.field for p in problems.problems()] == ["data.val_fraction"]


def test_a_combination_is_one_problem_naming_both_fields() -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(val_fraction=0.5, test_fraction=0.5)
    assert [p.field for p in info.value.problems] == ["data.val_fraction + data.test_fraction"]


def test_valid_configs_have_no_problems() -> None:
    assert ModelConfig().problems() == [] and DataConfig().problems() == [] and TrainConfig().problems() == []


def test_config_error_keeps_its_problems_through_pickle() -> None:
    # Ray ships a trial's exception to the driver by pickling it.
    with pytest.raises(ConfigError) as info:
        TrainConfig(lr=0, epochs=0)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.problems == info.value.problems
    assert [p.field for p in again.problems] == ["train.epochs", "train.lr"]
