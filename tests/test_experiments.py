"""Every experiment file in the repository loads, and every point its sampler may propose is a valid config."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.experiment import experiment_from_dict, experiment_to_dict, load_experiment
from search.space import apply_params, sample_space

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


def test_there_are_experiment_files() -> None:
    assert {p.name for p in EXPERIMENTS} >= {"quickstart.yaml", "mnist-paper.yaml", "mnist-packed.yaml",
                                              "cifar10.yaml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_file_loads(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.name == path.stem.removesuffix(".best")
    assert experiment_from_dict(experiment_to_dict(exp)) == exp


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if not p.name.endswith(".best.yaml")], ids=lambda p: p.name)
def test_experiment_file_says_what_it_is_and_how_to_run_it(path: Path) -> None:
    head = path.read_text().split("\nname:")[0]
    assert head.startswith("# ") and f"drcaps search experiments/{path.name}" in head


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_sampled_and_enqueued_points_are_valid_configs(path: Path) -> None:
    exp = load_experiment(path)
    for params in [*exp.search.enqueue, *sample_space(exp.search.space, seed=0, n=5, sampler="random")]:
        apply_params(exp, params)


def test_quickstart_fits_a_two_core_machine() -> None:
    exp = load_experiment(Path(__file__).parents[1] / "experiments" / "quickstart.yaml")
    assert exp.run.train.device == "cpu" and exp.search.resources.gpu == 0
    assert exp.search.resources.cpu * exp.search.max_concurrent <= 2
    assert exp.search.time_budget_s is not None and exp.search.time_budget_s < 600
