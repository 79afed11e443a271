"""Training checkpoints: written atomically, loaded back to resume exactly or to rebuild the model.

A checkpoint is a dict: ``model`` and ``optimizer`` and ``scheduler`` state dicts, ``epoch`` (completed epochs),
``best_val_acc``, ``best_epoch``, ``metrics`` (the epoch's reported metrics), ``config`` (``RunConfig.to_dict()``)
and ``rng`` (torch CPU and CUDA generator states). Only tensors, numbers, strings, lists and dicts, so
``torch.load(weights_only=True)`` reads it. ``resume_conflicts`` says (as data) why a run cannot continue one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drcapsnet.config import RunConfig
from drcapsnet.errors import CheckpointError
from drcapsnet.model import CapsNet

LAST = "last.pt"   # written every epoch: what a resumed run starts from
BEST = "best.pt"   # written when validation accuracy improves


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} does not exist; pass the path of a .pt file written by drcaps train")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any unpickling failure means "not our checkpoint"
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        reason = f"{type(e).__name__}: {first[:120]}"                   # one line: torch's messages run long
        raise CheckpointError(f"checkpoint: {path} is not a readable drcaps checkpoint ({reason})") from e
    if not isinstance(state, dict) or not {"model", "config", "epoch"} <= state.keys():
        raise CheckpointError(f"checkpoint: {path} is not a drcaps checkpoint (missing model/config/epoch)")
    return state


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[CapsNet, RunConfig, dict[str, Any]]:
    """Rebuild the model of a checkpoint: ``(model in eval mode, its RunConfig, the checkpoint dict)``."""
    state = load_checkpoint(path, map_location)
    run = RunConfig.from_dict(state["config"])
    model = CapsNet(run.model)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), run, state


@dataclass(frozen=True)
class FieldChange:
    """A field the run sets to another value than the checkpoint holds."""

    field: str        # dotted, e.g. "model.units"
    run: Any          # the run's value
    checkpoint: Any   # the checkpoint's value


@dataclass(frozen=True)
class ResumeConflicts:
    """Why ``run`` cannot continue a checkpoint; falsy when it can."""

    model_changes: tuple[FieldChange, ...] = ()   # the run would build another model than the checkpoint holds
    finished_epoch: int | None = None             # the checkpoint's epoch, when it is >= the run's train.epochs

    def __bool__(self) -> bool:
        return bool(self.model_changes) or self.finished_epoch is not None


def resume_conflicts(state: Mapping[str, Any], run: RunConfig) -> ResumeConflicts:
    """What stops ``run`` from resuming the checkpoint ``state`` (a :func:`load_checkpoint` dict): every model field
    it changes (the weights would not fit), and whether the checkpoint already holds ``run.train.epochs`` or more."""
    saved = RunConfig.from_dict(state["config"]).model
    changes = tuple(FieldChange(f"model.{f.name}", getattr(run.model, f.name), getattr(saved, f.name))
                    for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(run.model, f.name))
    epoch = int(state["epoch"])
    return ResumeConflicts(changes, epoch if epoch >= run.train.epochs else None)
