"""best.pt is weights-only (issue 9: a trial uploads it once, so it carries no optimizer, scheduler or RNG state),
and holds exactly the weights of the best epoch; last.pt keeps everything resuming needs."""

from __future__ import annotations

from pathlib import Path

import torch

from drcapsnet.checkpoint import BEST, LAST, load_checkpoint, load_model
from drcapsnet.config import DataConfig, TrainConfig, model_preset
from drcapsnet.data import load_datasets
from drcapsnet.train import train

DATA = DataConfig(dataset="digits", limit_train=200, batch_size=32)


def test_best_is_weights_only_and_equals_the_best_epochs_full_checkpoint(tmp_path: Path) -> None:
    snapshots: dict[int, dict] = {}

    def report(metrics: dict[str, float]) -> None:
        snapshots[int(metrics["epoch"])] = load_checkpoint(tmp_path / LAST)

    cfg = TrainConfig(epochs=3, optimizer="adam", lr=3.0e-3, device="cpu", num_threads=1)
    train(model_preset("tiny"), DATA, cfg, report, checkpoint_dir=tmp_path, datasets=load_datasets(DATA))
    best = load_checkpoint(tmp_path / BEST)
    assert {"optimizer", "scheduler", "rng"} & best.keys() == set()
    assert {"optimizer", "scheduler", "rng"} <= snapshots[3].keys()
    full = snapshots[best["best_epoch"]]
    assert best["epoch"] == full["epoch"] and best["metrics"] == full["metrics"]
    for key, value in full["model"].items():
        assert torch.equal(best["model"][key], value), key
    model, _, _ = load_model(tmp_path / BEST)
    assert not model.training
