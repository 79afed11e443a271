"""``drcaps train``, ``drcaps evaluate`` and ``drcaps validate``: one model, one checkpoint, one experiment file.

Typed functions over the library (drcapsnet.train, drcapsnet.checkpoint, search.experiment); each prints what a
person reads and returns the exit code. Every check that can be made before work starts raises a DrcapsError first.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from drcapsnet.errors import ConfigError, UsageError
from search.preflight import check_output

if TYPE_CHECKING:
    from drcapsnet.checkpoint import ResumeConflicts
    from drcapsnet.config import RunConfig

DATASET_SHAPES = {"cifar10": (3, 32)}   # (channels, image size) where it is not MNIST's (1, 28)


def _fit_model_to_dataset(run: RunConfig) -> RunConfig:
    """``--dataset cifar10`` on the default (MNIST-shaped) model: take the dataset's channels and image size."""
    shape = DATASET_SHAPES.get(run.data.dataset)
    if shape is None or (run.model.in_channels, run.model.image_size) != (1, 28):
        return run
    return dataclasses.replace(run, model=dataclasses.replace(run.model, in_channels=shape[0], image_size=shape[1]))


def _epoch_line(epochs: int) -> Callable[[dict[str, float]], None]:
    def report(m: dict[str, float]) -> None:
        parts = [f"epoch {int(m['epoch'])}/{epochs}", f"train_loss {m['train_loss']:.4f}"]
        if "val_acc" in m:
            parts += [f"val_loss {m['val_loss']:.4f}", f"val_acc {100 * m['val_acc']:.2f}%"]
        if "test_acc" in m:
            parts += [f"test_acc {100 * m['test_acc']:.2f}%"]
        parts += [f"{m['images_per_s']:.0f} img/s", f"{m['epoch_s']:.1f} s"]
        print("  ".join(parts), flush=True)
    return report


def _preset_asked(overrides: list[str]) -> str | None:
    """The model preset the command line asks for (``--preset`` or ``--set model.preset=``), if any."""
    asked = [text.partition("=")[2].strip() for text in overrides if text.partition("=")[0].strip() == "model.preset"]
    return asked[-1] if asked else None


# Fields a resume cannot change, and what of the checkpoint fixes them: the data the model was trained and validated
# on (another split makes its best epoch incomparable), and what drcapsnet.train restores from the checkpoint (the
# optimizer's and the lr scheduler's state carry lr, momentum, weight decay and decay; the RNG state replaces the seed).
RESUME_FIXED = {**dict.fromkeys(("data.dataset", "data.limit_train", "data.val_fraction", "data.test_fraction",
                                 "data.split_seed"), "its training data and split"),
                **dict.fromkeys(("train.optimizer", "train.lr", "train.momentum", "train.weight_decay",
                                 "train.lr_decay"), "its optimizer state"),
                "train.seed": "its random state"}


def _differences(state: dict[str, Any], run: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted field, checkpoint's value, run's value)`` for every data and train field the run changes."""
    from drcapsnet.config import RunConfig

    saved = RunConfig.from_dict(state["config"])
    return [(f"{section}.{f.name}", getattr(getattr(saved, section), f.name), getattr(getattr(run, section), f.name))
            for section in ("data", "train") for f in dataclasses.fields(getattr(saved, section))
            if getattr(getattr(saved, section), f.name) != getattr(getattr(run, section), f.name)]


def _resume_note(checkpoint: Path, state: dict[str, Any], run: RunConfig) -> str:
    """What a resume keeps and what it changes, in one line; a change of RESUME_FIXED is refused instead."""
    changes = _differences(state, run)
    for field, old, new in changes:
        if field in RESUME_FIXED:
            raise ConfigError(f"{field}: {new!r}, but {checkpoint} holds {old!r} ({RESUME_FIXED[field]}), which a "
                              f"resume continues; leave it out or set it to {old!r}, or train a new model without "
                              "--load-model")
    shown = ", ".join(f"{field} {old!r} -> {new!r}" for field, old, new in changes)
    return (f"resuming {checkpoint} at epoch {int(state['epoch'])}: its model, data split, optimizer and random "
            "state kept" + (f"; changed: {shown}" if shown else ""))


def _refuse_resume(checkpoint: Path, conflicts: ResumeConflicts, preset: str | None = None) -> None:
    """The conflicts of ``--load-model`` with the run, as the one error a person reads (the model's first)."""
    if conflicts.model_changes:
        changed = [f"{c.field}={c.run!r} (checkpoint: {c.checkpoint!r})" for c in conflicts.model_changes]
        flag = f"--preset {preset}" if preset else "--load-model"
        raise ConfigError(f"{flag}: {checkpoint} holds another model: {', '.join(changed)}; "
                          "drop the flags that change the model, or train a new one without --load-model")
    if conflicts.finished_epoch is not None:
        raise ConfigError(f"--epochs: {checkpoint} already holds {conflicts.finished_epoch} epochs; "
                          f"pass --epochs N with N > {conflicts.finished_epoch} to train further")


def train_command(config: Path | None, overrides: list[str], *, save_model: Path | None = None,
                  load_model: Path | None = None, checkpoint_dir: Path | None = None, progress: bool = True) -> int:
    """Train one model: from the experiment file ``config`` (else the defaults, or with ``load_model`` and no
    ``config`` the checkpoint's own config) with the dotted ``overrides``; resume ``load_model``; write ``last.pt``
    and ``best.pt`` to ``checkpoint_dir`` and the final checkpoint to ``save_model``."""
    from drcapsnet.checkpoint import LAST, load_checkpoint, resume_conflicts
    from drcapsnet.data import load_datasets
    from drcapsnet.train import check_compatible, resolve_device, train
    from search.experiment import load_run_config, run_config_from_dict

    check_output("--save-model", save_model)
    check_output("--checkpoint-dir", checkpoint_dir, folder=True)
    state = load_checkpoint(load_model) if load_model is not None else None
    if state is not None and config is None:     # resume: the checkpoint's config, then the flags
        saved = state["config"]
        if _preset_asked(overrides):             # the preset typed defines the model, not the checkpoint's fields
            saved = {**saved, "model": {}}
        run = run_config_from_dict(saved, source=str(load_model), overrides=overrides)
    else:
        run = load_run_config(config, overrides)
    run = _fit_model_to_dataset(run)
    resolve_device(run.train.device)
    if state is not None and load_model is not None:
        _refuse_resume(load_model, resume_conflicts(state, run), _preset_asked(overrides))
        print(_resume_note(load_model, state, run))
    datasets = load_datasets(run.data)
    check_compatible(run.model, datasets)
    if config is not None and (note := _retrain_note(config, run)):
        print(note)
    print(f"training {run.model.routing} routing x{run.model.routing_iterations}, units {run.model.units} on "
          f"{run.data.dataset}: {len(datasets.train)} train / {len(datasets.val)} val / {len(datasets.test)} test")
    with tempfile.TemporaryDirectory(prefix="drcaps-train-") as tmp:
        ckpt_dir = checkpoint_dir or (Path(tmp) if save_model else None)
        metrics = train(run.model, run.data, run.train, _epoch_line(run.train.epochs), checkpoint_dir=ckpt_dir,
                        resume=load_model, datasets=datasets, progress=progress)
        if save_model is not None and ckpt_dir is not None:
            save_model.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ckpt_dir / LAST, save_model)
            print(f"saved checkpoint: {save_model}")
    if "test_acc" in metrics:
        print(f"done: best val_acc {100 * metrics['best_val_acc']:.2f}% (epoch {int(metrics['best_epoch'])}), "
              f"test_acc {100 * metrics['test_acc']:.2f}%")
    return 0


def _retrain_note(config: Path, run: RunConfig) -> str | None:
    """One line before a retrain of an exported trial (a file with ``result.versions``, search/export.py): what
    differs from the trial (versions, threads, device, precision), or that nothing does."""
    from search.experiment import load_experiment
    from search.export import versions

    try:
        exp = load_experiment(config)
    except (ConfigError, OSError):
        return None
    result = exp.result or {}
    if not isinstance(result.get("versions"), dict):
        return None
    now = versions()
    diffs = [f"{k} {v} here {now.get(k, 'none')}" for k, v in result["versions"].items() if str(now.get(k)) != str(v)]
    diffs += [f"train.{f} {getattr(exp.run.train, f)!r} -> {getattr(run.train, f)!r}"
              for f in ("num_threads", "device", "bf16", "seed") if getattr(exp.run.train, f) != getattr(run.train, f)]
    from search.export import precision_of

    if result.get("precision") and (here := precision_of(run)) != result["precision"]:
        diffs.append(f"precision {result['precision']} here {here}")
    trial = f"trial {result.get('trial_id') or '?'} of '{result.get('source_experiment', exp.name)}'"
    if diffs:
        return f"note: this run differs from {trial} ({'; '.join(diffs)}): its numbers may differ from the trial's"
    return f"reproducing {trial}: same versions and settings, so on the same kind of machine the per-epoch numbers " \
           "match the trial's"


def evaluate_command(*, checkpoint: Path | None = None, model_uri: str | None = None,
                     tracking_uri: str | None = None, dataset: str | None = None, data_dir: str | None = None,
                     split: Literal["test", "val"] = "test", batch_size: int = 256, cuda: bool = True) -> int:
    """The accuracy of one model (a ``checkpoint`` file, or exactly one registered ``model_uri`` in the store at
    ``tracking_uri``) on a split of ``dataset`` (default: the checkpoint's, else digits)."""
    import torch

    from drcapsnet.config import DataConfig
    from drcapsnet.data import load_datasets
    from drcapsnet.train import evaluate
    from search import tracking

    if (checkpoint is None) == (model_uri is None):
        raise UsageError("--checkpoint/--model-uri: pass exactly one of them")
    if batch_size < 1:
        raise UsageError(f"--batch-size: must be an integer >= 1, got {batch_size}")
    if checkpoint is not None:
        from drcapsnet.checkpoint import load_model

        capsnet, run, _ = load_model(checkpoint)
        data_cfg = run.data
    else:
        assert model_uri is not None
        uri = tracking.resolve_tracking_uri(tracking_uri)
        tracking.check_store_exists(uri)     # reading never creates an empty store
        capsnet = tracking.load_model(uri, model_uri).capsnet     # a CapsNetClassifier: its CapsNet
        data_cfg = DataConfig()
    cfg = capsnet.cfg
    changes: dict[str, Any] = {"limit_train": None}
    if dataset:
        changes["dataset"] = dataset
    if data_dir:
        changes["data_dir"] = os.path.abspath(data_dir)
    data_cfg = dataclasses.replace(data_cfg, **changes)
    datasets = load_datasets(data_cfg)
    if (datasets.in_channels, datasets.image_size) != (cfg.in_channels, cfg.image_size):
        raise ConfigError(f"--dataset: {data_cfg.dataset} has {datasets.in_channels}x{datasets.image_size}px "
                          f"images but the model takes {cfg.in_channels}x{cfg.image_size}px; pick a matching dataset")
    device = torch.device("cuda" if torch.cuda.is_available() and cuda else "cpu")
    data = getattr(datasets, split).to(device)
    _, accuracy = evaluate(capsnet.to(device), data, batch_size, device=device, bf16=False)   # full precision
    correct = round(accuracy * len(data))
    print(f"{checkpoint or model_uri}: accuracy {100 * correct / len(data):.2f}% on the {data_cfg.dataset} {split} "
          f"split ({correct}/{len(data)})")
    return 0


def validate_command(experiment: Path, overrides: list[str], *, show_samples: int = 0) -> int:
    """Load and check the experiment file with ``overrides`` applied, without running it; print its outline and
    the sampler's first ``show_samples`` proposals."""
    from search.experiment import load_experiment
    from search.space import sample_space

    if show_samples < 0:
        raise UsageError(f"--show-samples: must be an integer >= 0, got {show_samples}")
    exp = load_experiment(experiment, overrides)
    s = exp.search
    print(f"ok: {experiment} (experiment '{exp.name}': {s.num_samples} trials, {s.sampler} sampler, "
          f"{s.scheduler.name} scheduler, {len(s.space)} searched fields: {', '.join(s.space)})")
    proposals = sample_space(s.space, s.seed, show_samples, s.sampler) if show_samples else []
    for i, params in enumerate(proposals):
        print(f"  proposal {i}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return 0
