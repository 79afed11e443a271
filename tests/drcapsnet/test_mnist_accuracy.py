"""The `small` preset on real MNIST (the 10,000-image test set beside the project, split 7,000 / 1,000 / 2,000).

docs/benchmarks.md records the full run (15 epochs: 99.15% test accuracy); this guards the >= 97% claim in CI with
3 epochs of the same recipe (~1-2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drcapsnet.config import DataConfig, TrainConfig, model_preset
from drcapsnet.train import train

MNIST_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist-test"


def _require_mnist() -> None:
    """The data lives beside the project on the development machines only: a user's fresh clone skips (with the
    reason), CI (CI=true) must have it and fails without it."""
    if MNIST_TEST.is_dir():
        return
    reason = f"the real MNIST test set is not at {MNIST_TEST}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}, and CI must run this test")
    pytest.skip(f"{reason} (a development-machine dataset; CI=true makes its absence a failure)")


@pytest.mark.slow
def test_small_preset_reaches_97_percent_on_held_out_mnist():
    _require_mnist()
    history: list[dict[str, float]] = []
    metrics = train(model_preset("small"),
                    DataConfig(dataset="idx", data_dir=str(MNIST_TEST), batch_size=32),
                    TrainConfig(epochs=3, optimizer="sgd", lr=0.3, momentum=0.9, lr_decay=0.9, seed=0,
                                device="cpu", num_threads=2),
                    report=history.append)
    assert len(history) == 3
    assert metrics["test_acc"] >= 0.97, metrics


def test_missing_mnist_skips_on_a_users_clone_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(f"{__name__}.MNIST_TEST", tmp_path / "absent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not at .*absent"):
        _require_mnist()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test"):
        _require_mnist()
