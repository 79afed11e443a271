"""drcapsnet.checkpoint: last.pt every epoch, best.pt only on improvement, atomic writes, loud failures on bad
paths, and a rebuilt model that scores exactly what the trained one reported."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from drcapsnet.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    FieldChange,
    ResumeConflicts,
    load_checkpoint,
    load_model,
    resume_conflicts,
    save_checkpoint,
)
from drcapsnet.config import DataConfig, RunConfig, TrainConfig, model_preset
from drcapsnet.data import Datasets, load_datasets
from drcapsnet.train import evaluate, train

DATA = DataConfig(dataset="digits", limit_train=200, batch_size=32)
MODEL = model_preset("tiny")


@pytest.fixture(scope="module")
def small() -> Datasets:
    return load_datasets(DATA)


def _watching(folder: Path, seen: list[dict]) -> object:
    """A report callback that records, per epoch, what last.pt and best.pt hold at the moment of the report."""
    def report(metrics: dict[str, float]) -> None:
        best = folder / BEST
        seen.append({"metrics": metrics, "last": load_checkpoint(folder / LAST),
                     "best": load_checkpoint(best) if best.exists() else None})
    return report


def test_best_follows_improvements_and_last_follows_every_epoch(tmp_path: Path, small: Datasets) -> None:
    seen: list[dict] = []
    cfg = TrainConfig(epochs=3, optimizer="adam", lr=3.0e-3, device="cpu", num_threads=1)
    train(MODEL, DATA, cfg, _watching(tmp_path, seen), checkpoint_dir=tmp_path, datasets=small)

    assert [s["last"]["epoch"] for s in seen] == [1, 2, 3]
    for i, s in enumerate(seen):
        m, best = s["metrics"], s["best"]
        assert s["last"]["metrics"] == m
        assert best is not None
        assert best["best_val_acc"] == max(x["metrics"]["val_acc"] for x in seen[: i + 1]) == m["best_val_acc"]
        assert best["epoch"] == best["best_epoch"] == m["best_epoch"]
        assert best["metrics"]["val_acc"] == best["best_val_acc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST, LAST]     # no *.tmp left behind


def test_best_is_not_rewritten_without_an_improvement(tmp_path: Path, small: Datasets) -> None:
    # eval_interval=2: epoch 1 has no validation, so no best.pt yet. lr=1e-12 leaves the weights (and so
    # val_acc) unchanged, so epoch 3 ties epoch 2 and must not replace it.
    seen: list[dict] = []
    cfg = TrainConfig(epochs=3, optimizer="adam", lr=1.0e-12, eval_interval=2, device="cpu", num_threads=1)
    train(MODEL, DATA, cfg, _watching(tmp_path, seen), checkpoint_dir=tmp_path, datasets=small)

    assert "val_acc" not in seen[0]["metrics"] and seen[0]["best"] is None
    assert seen[1]["metrics"]["val_acc"] == seen[2]["metrics"]["val_acc"]
    assert [s["best"]["epoch"] for s in seen[1:]] == [2, 2]
    assert [s["last"]["epoch"] for s in seen] == [1, 2, 3]
    assert seen[2]["metrics"]["best_epoch"] == 2


def test_rebuilt_model_scores_what_training_reported(tmp_path: Path, small: Datasets) -> None:
    cfg = TrainConfig(epochs=2, optimizer="adam", lr=3.0e-3, device="cpu", num_threads=1, seed=5)
    metrics = train(MODEL, DATA, cfg, checkpoint_dir=tmp_path, datasets=small)

    model, run, state = load_model(tmp_path / LAST)
    assert not model.training
    assert run == RunConfig(MODEL, DATA, cfg)
    assert state["epoch"] == 2
    val_loss, val_acc = evaluate(model, small.val, DATA.batch_size, device=torch.device("cpu"))
    test_loss, test_acc = evaluate(model, small.test, DATA.batch_size, device=torch.device("cpu"))
    assert (val_acc, test_acc) == (metrics["val_acc"], metrics["test_acc"])
    assert (val_loss, test_loss) == pytest.approx((metrics["val_loss"], metrics["test_loss"]), rel=1e-6)
    # a folder means its last.pt
    assert load_checkpoint(tmp_path)["epoch"] == 2


def test_missing_and_garbage_checkpoints_raise_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=re.escape(str(missing)) + ".*does not exist"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / LAST))):       # a folder without last.pt
        load_checkpoint(tmp_path)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\x00\x01")
    with pytest.raises(CheckpointError, match=re.escape(f"{garbage} is not a readable drcaps checkpoint")):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match=re.escape(str(garbage))):
        load_model(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match=re.escape(f"{foreign} is not a drcaps checkpoint")):
        load_checkpoint(foreign)
    assert issubclass(CheckpointError, ValueError)


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / LAST
    good = {"model": {"w": torch.arange(3.0)}, "config": RunConfig().to_dict(), "epoch": 1}
    assert save_checkpoint(good, path) == path                            # creates the folder
    with pytest.raises(Exception):                                        # noqa: B017 (any pickling error)
        save_checkpoint({**good, "epoch": 2, "bad": lambda: None}, path)   # a lambda cannot be pickled
    assert [p.name for p in path.parent.iterdir()] == [LAST]
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.arange(3.0))


def test_checkpoint_of_a_changed_config_round_trips(tmp_path: Path) -> None:
    run = RunConfig(model_preset("tiny", units=4, routing="attention"), dataclasses.replace(DATA, shift_pixels=0),
                    TrainConfig(lr=1.0e-2, device="cpu"))
    model = torch.nn.Linear(1, 1)                 # any state dict: load_checkpoint only checks the keys
    save_checkpoint({"model": model.state_dict(), "config": run.to_dict(), "epoch": 0}, tmp_path / "c.pt")
    assert RunConfig.from_dict(load_checkpoint(tmp_path / "c.pt")["config"]) == run


def test_resume_conflicts_name_each_changed_model_field_and_a_finished_checkpoint() -> None:
    saved = RunConfig(model_preset("tiny", units=8), DATA, TrainConfig(epochs=3, device="cpu"))
    state = {"config": saved.to_dict(), "epoch": 2}
    assert not resume_conflicts(state, saved)                                # 2 of 3 epochs: it can go on
    assert resume_conflicts(state, saved) == ResumeConflicts()
    more = dataclasses.replace(saved, train=dataclasses.replace(saved.train, lr=0.5, epochs=4))
    assert not resume_conflicts(state, more)                                 # training fields may change
    other = dataclasses.replace(saved, model=dataclasses.replace(saved.model, units=4, routing_iterations=1),
                                train=dataclasses.replace(saved.train, epochs=2))
    conflicts = resume_conflicts(state, other)
    assert conflicts and conflicts.finished_epoch == 2
    assert conflicts.model_changes == (FieldChange("model.units", 4, 8), FieldChange("model.routing_iterations", 1,
                                                                                     saved.model.routing_iterations))
