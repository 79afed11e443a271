"""The README's main job as a new user runs it: the real `drcaps` binary, in an empty folder, nothing started before.

`--smoke-test` keeps it to 2 trials x 1 epoch; everything else (embedded Ray, SQLite MLflow store, Optuna storage,
export, model registration, the closing lines) is the path `make demo` takes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from search.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]
DRCAPS = Path(sys.executable).parent / "drcaps"


@pytest.mark.slow
def test_quickstart_search_runs_and_ends_with_best_config_export_and_ui_command(tmp_path):
    proc = subprocess.run([str(DRCAPS), "search", str(REPO / "experiments/quickstart.yaml"), "--smoke-test"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # A smoke test records apart from the real search (its own MLflow experiment, model name and export files).
    exported = tmp_path / "quickstart-smoke.best.yaml"
    assert f"exported best config: {exported}" in out
    assert "best: trial " in out and "model.routing_iterations = " in out and "train.lr = " in out
    assert "MLflow UI:            drcaps ui" in out
    assert "registered model:     models:/quickstart-capsnet-smoke@best" in out
    for name in ("mlflow.db", "optuna.db", "drcaps-runs", "quickstart-smoke.best.trials.csv",
                 "quickstart-smoke.report.html"):
        assert (tmp_path / name).exists(), name
    best = load_experiment(exported)
    assert best.result is not None and best.result["model_uri"] == "models:/quickstart-capsnet-smoke@best"

    # What a person watching sees: short, with the live counts, the best value and where to look next.
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 40, "\n".join(lines)            # 2 trials; the full 10-trial quickstart prints ~45 lines
    assert any(line.startswith("[2/2] trial ") for line in lines)
    assert re.search(r"^best: trial \d+, val_acc \d\.\d{4} at its best epoch", out, re.MULTILINE)
    assert f"report:               {tmp_path / 'quickstart-smoke.report.html'}" in out
    for link in ("search run (MLflow):  http://127.0.0.1:5000/#/experiments/", "best trial (MLflow):  http://",
                 "Optuna Dashboard:     optuna-dashboard sqlite:///"):
        assert link in out
    assert not any("WARNING" in line or "tensorboard" in line.lower() for line in lines)

    # ... and the follow-up commands it prints work from the same folder.
    retrain = subprocess.run([str(DRCAPS), "train", "--config", str(exported), "--epochs", "1", "--no-progress",
                              "--set", "data.limit_train=128"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    assert "epoch 1/1" in retrain.stdout
    evaluate = subprocess.run([str(DRCAPS), "evaluate", "--model-uri", "models:/quickstart-capsnet-smoke@best"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "accuracy" in evaluate.stdout and "digits test split" in evaluate.stdout
