from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from search.experiment import Experiment, experiment_from_dict, load_experiment
from search.export import best_experiment, export_best
from search.space import apply_params

SOURCE = """\
name: src
model: {preset: small}
data: {dataset: digits, batch_size: 64}
train: {epochs: 3, lr: 5.0e-2}
search:
  num_samples: 4
  space:
    train.lr: {type: float, low: 1.0e-6, high: 1.0e-1, log: true}
    model.reconstruction_weight: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
    model.units: {type: categorical, choices: [8, 12, 16]}
    model.routing_iterations: {type: int, low: 1, high: 5}
tracking: {experiment: src-exp}
"""
PARAMS = {"train.lr": 1.2345e-5, "model.reconstruction_weight": 3e-6, "model.units": 12,
          "model.routing_iterations": 2}
METRICS = {"val_acc": 0.875, "val_loss": 0.31, "train_loss": 2.5e-5}


def source() -> Experiment:
    return experiment_from_dict(yaml.safe_load(SOURCE))


def best(params: dict = PARAMS) -> Experiment:
    return best_experiment(source(), params, metrics=METRICS, run_id="r123", model_uri="models:/src-capsnet/1",
                           trial_id="t_0001")


def test_best_experiment_applies_params_and_records_the_result() -> None:
    b = best()
    assert b.run == apply_params(source(), PARAMS)
    assert b.search == source().search and b.tracking == source().tracking and b.name == "src"
    assert b.result == {"metrics": METRICS, "params": PARAMS, "mlflow_run_id": "r123",
                        "model_uri": "models:/src-capsnet/1", "trial_id": "t_0001", "source_experiment": "src"}


def test_numpy_values_become_plain_python() -> None:
    b = best({"train.lr": np.float64(1e-3), "model.units": np.int64(8)})
    assert type(b.result["params"]["train.lr"]) is float and type(b.result["params"]["model.units"]) is int
    assert type(b.run.model.units) is int


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_then_load_gives_the_same_experiment(tmp_path: Path, fmt: str) -> None:
    b = best()
    out = export_best(b, tmp_path / "sub" / f"src.best.{fmt}", fmt=fmt)
    assert out.exists()
    again = load_experiment(out)
    assert again == b
    assert again.run == apply_params(source(), PARAMS)
    assert again.result["params"] == PARAMS and again.result["metrics"] == METRICS
    assert type(again.run.train.lr) is float and again.run.train.lr == 1.2345e-5       # tiny floats stay floats
    assert type(again.result["metrics"]["train_loss"]) is float


def test_json_content_loads_whatever_the_suffix(tmp_path: Path) -> None:
    out = export_best(best(), tmp_path / "best.yaml", fmt="json")
    assert out.read_text().startswith("{") and load_experiment(out) == best()


def test_exported_yaml_is_explicit_and_says_how_to_rerun(tmp_path: Path) -> None:
    out = export_best(best(), tmp_path / "src.best.yaml")
    text = out.read_text()
    assert text.startswith("# Best trial of experiment 'src' (MLflow run r123).")
    assert "drcaps train --config src.best.yaml" in text
    raw = yaml.safe_load(text)
    assert "preset" not in raw["model"] and raw["model"]["conv_channels"] == 64 and raw["model"]["units"] == 12
    assert set(raw) == {"name", "model", "data", "train", "search", "tracking", "result"}
    assert raw["tracking"]["experiment"] == "src-exp"
    assert "3.0e-06" in text and "1.2345e-05" in text                # a dot in the mantissa: YAML reads a float
    assert all(isinstance(v, float) for v in (raw["train"]["lr"], raw["model"]["reconstruction_weight"]))


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be one of yaml, json"):
        export_best(best(), tmp_path / "x.toml", fmt="toml")  # type: ignore[arg-type]
