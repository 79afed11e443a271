"""Fixtures shared by more than one test module.

``searched``: the one real search of the slow suite (embedded Ray, Optuna in SQLite, MLflow in SQLite), run once per
session and read by tests/search/test_tune.py, test_trial_reuse.py and test_report.py; each reads it and writes
only under its own ``tmp_path`` or new files, so the order of the modules does not matter.
``store``: an existing MLflow store for the commands that read one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from search.publish import SearchResult

# What the three modules assert of the shared search: its name (e2e, model e2e-capsnet), 4 trials numbered 0-3,
# at most 2 epochs each, these 4 searched fields (units in the run names), trials that run all epochs and trials
# ASHA stops after one (both ends of a trial), trials run one at a time so later ones reuse the first's worker
# (and ASHA's decisions, hence the outcomes, do not depend on timing). Seed 4: the 4 proposals (TPE's random
# start-up) reach val_acc 0.750, 0.478, 0.294, 0.678 after epoch 1 (a plain training of each), so ASHA stops trials
# 1 and 2 and the LAST trial runs every epoch: Tune force-kills its workers 5 s after the search ends, which can cut
# short the end of a trial stopped last (its best.pt upload, its perf_* metrics), seen under load with seed 7.
E2E_SPACE: dict[str, dict[str, Any]] = {
    "model.routing_iterations": {"type": "int", "low": 1, "high": 3},
    "model.units": {"type": "categorical", "choices": [4, 8]},
    "train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    "train.momentum": {"type": "float", "low": 0.5, "high": 0.95},
}
E2E_TRIALS = 4

# The small experiment file the bad-input tables write (tests/search/test_preflight.py, test_bad_stores.py).
TINY_EXPERIMENT = """\
name: pre
model: {preset: tiny}
data: {dataset: digits, batch_size: 32, limit_train: 100}
train: {epochs: 2, device: cpu}
search:
  num_samples: 2
  resources: {cpu: 1}
  space:
    train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
E2E_EPOCHS = 2
E2E_SEED = 4


def e2e_experiment(tmp: Path, **search: Any) -> Any:
    """The experiment of the shared search, its MLflow store in ``tmp``; ``search`` overrides its search fields."""
    from search.experiment import experiment_from_dict

    return experiment_from_dict({
        "name": "e2e",
        "model": {"preset": "tiny"},
        "data": {"dataset": "digits", "batch_size": 32, "limit_train": 400, "shift_pixels": 0},
        "train": {"epochs": E2E_EPOCHS, "device": "cpu", "optimizer": "adam"},
        "search": {"num_samples": E2E_TRIALS, "max_concurrent": 1, "seed": E2E_SEED, "resources": {"cpu": 1},
                   "scheduler": {"name": "asha", "grace_period": 1}, "space": E2E_SPACE, **search},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "e2e"},
    }, base_dir=tmp)


@pytest.fixture(scope="session")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchResult, Path]:
    """The shared real search and its folder (``mlflow.db``, ``optuna.db``, Ray's storage under ``ray/``)."""
    from tests.searches import search_once

    tmp = tmp_path_factory.mktemp("e2e")
    return search_once(e2e_experiment(tmp), tmp), tmp


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An existing MLflow SQLite store with one experiment, ``x``, and no search in it. Tests may register models
    in it (under names of their own) but never add a search to ``x``."""
    from search import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "x")
    return uri
