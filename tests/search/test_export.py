from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from search import tracking
from search.experiment import Experiment, experiment_from_dict, load_experiment
from search.export import best_experiment, export_best, export_from_tracking
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
    versions = b.result.pop("versions")
    assert b.result.pop("precision") in ("bf16", "fp32")
    assert b.result == {"metrics": METRICS, "params": PARAMS, "mlflow_run_id": "r123",
                        "model_uri": "models:/src-capsnet/1", "trial_id": "t_0001", "source_experiment": "src"}
    assert {"python", "torch", "drcaps"} <= versions.keys() and all(isinstance(v, str) for v in versions.values())


def test_the_export_carries_the_config_the_trial_trained_exactly() -> None:
    """The trial ran on 1 CPU thread and the CPU: the export says so, so a retrain sums in the same order."""
    from search.space import trial_run

    exp = source()
    run = trial_run(exp, PARAMS, cpus=1, gpus=0)
    b = best_experiment(exp, PARAMS, metrics=METRICS, run_id="r", model_uri=None, run=run,
                        extra={"search_value": 0.9,
                               "confirmed": {"metric": "val_acc", "mean": 0.8, "std": 0.1, "n": 3}})
    assert b.run.train.num_threads == 1 and b.run.train.device == "cpu" and b.run == run
    assert b.result["search_value"] == 0.9 and b.result["confirmed"]["n"] == 3
    confirmed = trial_run(exp, PARAMS, cpus=2, gpus=0, confirm_seed=2, resplit=True)
    assert confirmed.train.seed == exp.run.train.seed + 2000 and confirmed.data.split_seed == \
        exp.run.data.split_seed + 2000 and confirmed.train.num_threads == 2


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


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """A stand-in for the MLflow store: one search of ``src-exp`` (parent run p1) whose best trial is r123."""
    import pandas as pd

    calls: list[tuple[str, ...]] = []
    parent = SimpleNamespace(run_id="p1", tags={"drcaps.model_uri": "models:/src-capsnet/1"})
    trial = SimpleNamespace(run_id="r123", params={k: str(v) for k, v in PARAMS.items()}, metrics=METRICS,
                            tags={"drcaps.trial_id": "t_0001"})
    monkeypatch.setattr(tracking, "latest_search_run",
                        lambda uri, name: parent if name == "src-exp" else None)
    monkeypatch.setattr(tracking, "read_text_artifact",
                        lambda uri, run_id, path: calls.append(("artifact", run_id, path)) or
                        json.dumps(yaml.safe_load(SOURCE)))
    monkeypatch.setattr(tracking, "best_trial_run",
                        lambda uri, name, metric, mode, parent_run_id: calls.append(
                            ("best", name, metric, mode, parent_run_id)) or trial)
    monkeypatch.setattr(tracking, "trials_dataframe", lambda uri, run_id: pd.DataFrame({"run_id": ["r123", "r9"]}))
    return calls


def test_export_from_tracking_writes_the_best_trial_of_the_latest_search(tmp_path: Path,
                                                                         recorded: list[tuple[str, ...]]) -> None:
    path, chosen = export_from_tracking("sqlite:///x.db", "src-exp", tmp_path / "b.json", csv=tmp_path / "t.csv")
    assert recorded == [("artifact", "p1", "resolved_experiment.json"), ("best", "src-exp", "val_acc", "max", "p1")]
    from search.space import trial_run

    s = source().search        # the export holds what the trial trained: its threads and device too
    expected = dataclasses.replace(best(), run=trial_run(source(), PARAMS, s.resources.cpu, s.resources.gpu))
    assert chosen.run.train.num_threads == max(1, int(s.resources.cpu)) and chosen.run.train.device == "cpu"
    assert chosen == expected and load_experiment(path) == expected
    assert path.read_text().startswith("{")                        # the format follows the suffix
    assert (tmp_path / "t.csv").read_text().splitlines() == ["run_id", "r123", "r9"]


def test_export_from_tracking_without_a_search_names_the_experiment(tmp_path: Path,
                                                                    recorded: list[tuple[str, ...]]) -> None:
    with pytest.raises(tracking.TrackingError, match="no search of 'nope' in sqlite:///x.db"):
        export_from_tracking("sqlite:///x.db", "nope", tmp_path / "b.yaml")
    assert list(tmp_path.iterdir()) == [] and recorded == []
