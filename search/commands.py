"""What each ``drcaps`` command does, over library functions. Setup problems (config, flags, data path, checkpoint,
tracking server, cluster address) become :class:`UserError` BEFORE any work starts; ``cli.main`` prints them as one
``error: ...`` line with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from drcapsnet.config import RunConfig

DATASET_SHAPES = {"cifar10": (3, 32)}   # (channels, image size) where it is not MNIST's (1, 28)


class UserError(Exception):
    """The user's mistake, said in one line that names the bad value and the fix."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's "your input is wrong" exceptions into :class:`UserError`."""
    from drcapsnet.checkpoint import CheckpointError
    from drcapsnet.data import DataError
    from search.experiment import ConfigError
    from search.tracking import TrackingError

    try:
        yield
    except (ConfigError, DataError, CheckpointError, TrackingError) as e:
        raise UserError(str(e)) from None
    except ValueError as e:            # config dataclasses: "section.key: must be ..., got ..."
        raise UserError(str(e)) from None


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


def train_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from drcapsnet.checkpoint import LAST, load_checkpoint
    from drcapsnet.data import load_datasets
    from drcapsnet.train import check_compatible, resolve_device, train
    from search.experiment import load_run_config, run_config_from_dict

    with user_errors():
        state = load_checkpoint(args.load_model) if args.load_model is not None else None
        if state is not None and args.config is None:     # resume: the checkpoint's config, then the flags
            run = run_config_from_dict(state["config"], source=str(args.load_model), overrides=overrides)
        else:
            run = load_run_config(args.config, overrides)
        run = _fit_model_to_dataset(run)
        resolve_device(run.train.device)
        if state is not None:
            saved = RunConfig.from_dict(state["config"]).model
            changed = [f"model.{f.name}={getattr(run.model, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
                       for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(run.model, f.name)]
            if changed:
                raise UserError(f"--load-model: {args.load_model} holds another model: {', '.join(changed)}; "
                                "drop the flags that change the model, or train a new one without --load-model")
            if state["epoch"] >= run.train.epochs:
                raise UserError(f"--epochs: {args.load_model} already holds {state['epoch']} epochs; "
                                f"pass --epochs N with N > {state['epoch']} to train further")
        datasets = load_datasets(run.data)
        check_compatible(run.model, datasets)
    print(f"training {run.model.routing} routing x{run.model.routing_iterations}, units {run.model.units} on "
          f"{run.data.dataset}: {len(datasets.train)} train / {len(datasets.val)} val / {len(datasets.test)} test")
    with tempfile.TemporaryDirectory(prefix="drcaps-train-") as tmp:
        ckpt_dir = args.checkpoint_dir or (Path(tmp) if args.save_model else None)
        metrics = train(run.model, run.data, run.train, _epoch_line(run.train.epochs), checkpoint_dir=ckpt_dir,
                        resume=args.load_model, datasets=datasets, progress=not args.no_progress)
        if args.save_model is not None and ckpt_dir is not None:
            args.save_model.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ckpt_dir / LAST, args.save_model)
            print(f"saved checkpoint: {args.save_model}")
    if "test_acc" in metrics:
        print(f"done: best val_acc {100 * metrics['best_val_acc']:.2f}% (epoch {int(metrics['best_epoch'])}), "
              f"test_acc {100 * metrics['test_acc']:.2f}%")
    return 0


def evaluate_command(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from drcapsnet.checkpoint import load_model
    from drcapsnet.config import DataConfig
    from drcapsnet.data import iterate_batches, load_datasets
    from search import tracking

    with user_errors():
        if args.checkpoint is not None:
            capsnet, run, _ = load_model(args.checkpoint)
            model: torch.nn.Module = capsnet
            data_cfg = run.data
            cfg = capsnet.cfg
        else:
            uri = tracking.resolve_tracking_uri(args.tracking_uri)
            tracking.check_tracking_uri(uri)
            model = tracking.load_model(uri, args.model_uri)
            cfg = model.capsnet.cfg
            data_cfg = DataConfig()
        changes: dict[str, Any] = {"limit_train": None}
        if args.dataset:
            changes["dataset"] = args.dataset
        if args.data_dir:
            changes["data_dir"] = os.path.abspath(args.data_dir)
        data_cfg = dataclasses.replace(data_cfg, **changes)
        datasets = load_datasets(data_cfg)
        if (datasets.in_channels, datasets.image_size) != (cfg.in_channels, cfg.image_size):
            raise UserError(f"--dataset: {data_cfg.dataset} has {datasets.in_channels}x{datasets.image_size}px "
                            f"images but the model takes {cfg.in_channels}x{cfg.image_size}px; pick a matching dataset")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    model = model.to(device).eval()
    split = getattr(datasets, args.split).to(device)
    correct = 0
    with torch.no_grad():
        for x, y in iterate_batches(split, args.batch_size, shuffle=False, device=device):
            out = model(x)
            lengths = out.lengths if hasattr(out, "lengths") else out
            correct += int((lengths.argmax(dim=1) == y).sum())
    source = args.checkpoint or args.model_uri
    print(f"{source}: accuracy {100 * correct / len(split):.2f}% on the {data_cfg.dataset} {args.split} split "
          f"({correct}/{len(split)})")
    return 0


def validate_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search.experiment import load_experiment
    from search.space import sample_space

    with user_errors():
        exp = load_experiment(args.experiment, overrides)
    s = exp.search
    print(f"ok: {args.experiment} (experiment '{exp.name}': {s.num_samples} trials, {s.sampler} sampler, "
          f"{s.scheduler.name} scheduler, {len(s.space)} searched fields: {', '.join(s.space)})")
    proposals = sample_space(s.space, s.seed, args.show_samples, s.sampler) if args.show_samples else []
    for i, params in enumerate(proposals):
        print(f"  proposal {i}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return 0


def _preflight_data(run: RunConfig) -> None:
    """Bad data paths fail here, in one line, not inside every trial."""
    from drcapsnet.data import load_datasets

    if run.data.dataset in ("digits", "idx") or not run.data.download:
        load_datasets(run.data)


def export_from_tracking(uri: str, experiment: str, out: Path, fmt: str | None = None,
                         csv: Path | None = None) -> tuple[Path, Any]:
    """The best trial of the latest search of ``experiment`` -> an experiment file ``drcaps train --config`` takes."""
    import json

    from search import tracking
    from search.experiment import experiment_from_dict, parse_override
    from search.export import best_experiment, export_best

    parent = tracking.latest_search_run(uri, experiment)
    if parent is None:
        raise UserError(f"--experiment: no search of '{experiment}' in {uri}; run 'drcaps search' first, "
                        "or pass the --tracking-uri the search used")
    source = json.loads(tracking.read_text_artifact(uri, parent.run_id, "resolved_experiment.json"))
    exp = experiment_from_dict(source, source=f"run {parent.run_id}")
    best = tracking.best_trial_run(uri, experiment, exp.search.metric, exp.search.mode, parent_run_id=parent.run_id)
    params = {k: parse_override(f"{k}={best.params[k]}")[1] for k in exp.search.space if k in best.params}
    chosen = best_experiment(exp, params, metrics=best.metrics, run_id=best.run_id,
                             model_uri=parent.tags.get("drcaps.model_uri") or None,
                             trial_id=best.tags.get("drcaps.trial_id"))
    fmt = fmt or ("json" if out.suffix.lower() == ".json" else "yaml")
    path = export_best(chosen, out, fmt)
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        tracking.trials_dataframe(uri, parent.run_id).to_csv(csv, index=False)
    return path, chosen


def _print_ranking(result: Any, top: int = 10) -> None:
    metric = result.experiment.search.metric
    names = list(result.experiment.search.space)
    print(f"\ntop trials by {metric} ({len(result.trials)} run):")
    header = ["rank", "trial", metric, "epochs", "outcome", *names]
    rows = [[str(i), t.trial_id, f"{t.metric:.4f}", str(t.epochs), t.outcome,
             *(_fmt(t.params.get(n)) for n in names)] for i, t in enumerate(result.trials[:top], start=1)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def search_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search import tracking
    from search.experiment import load_experiment
    from search.tune import ClusterError, run_search

    with user_errors():
        exp = load_experiment(args.experiment, overrides)
        uri = tracking.resolve_tracking_uri(args.tracking_uri or exp.tracking.uri)
        tracking.check_tracking_uri(uri)
        _preflight_data(exp.run)
    try:
        result = run_search(exp, address=args.address, tracking_uri=uri, storage_path=args.storage_path,
                            resume=args.resume, smoke_test=args.smoke_test)
    except ClusterError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        again = f"drcaps search {args.experiment} --resume" + "".join(
            f" {flag} {value}" for flag, value in (("--storage-path", args.storage_path),
                                                   ("--tracking-uri", args.tracking_uri),
                                                   ("--address", args.address)) if value)
        print(f"interrupted: the search's state is saved; continue it with\n  {again}", file=sys.stderr)
        return 130
    _print_ranking(result)
    out = (args.out or Path.cwd() / f"{exp.name}.best.yaml").resolve()
    path, _ = export_from_tracking(uri, exp.mlflow_experiment, out, csv=out.with_suffix(".trials.csv"))
    best = result.best
    print(f"\nbest trial {best.trial_id}: {exp.search.metric} = {best.metric:.4f} after {best.epochs} epochs")
    for name, value in best.params.items():
        print(f"  {name} = {_fmt(value)}")
    print(f"exported best config: {path}  (all trials: {out.with_suffix('.trials.csv')})")
    if result.model_uri:
        print(f"registered model: {result.model_uri}")
    print(f"retrain from it:   drcaps train --config {path}")
    ui = "drcaps ui" if args.tracking_uri is None and exp.tracking.uri is None else f"drcaps ui --tracking-uri {uri}"
    print(f"open the MLflow UI: {ui}   (then http://127.0.0.1:5000)")
    return 0


def export_best_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search import tracking

    with user_errors():
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_tracking_uri(uri)
        path, chosen = export_from_tracking(uri, args.experiment, args.out.resolve(), args.format, args.csv)
    result = chosen.result or {}
    print(f"exported best config of '{args.experiment}' (run {result.get('mlflow_run_id')}): {path}")
    if args.csv:
        print(f"all trials: {args.csv}")
    return 0


def report_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search import tracking
    from search.report import write_report

    with user_errors():
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_tracking_uri(uri)
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            raise UserError(f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}; run "
                            "'drcaps search' first or pass the --tracking-uri the search used")
    out = (args.out or Path.cwd() / f"{args.experiment}.report.html").resolve()
    try:
        path = write_report(uri, args.experiment, out)
    except tracking.TrackingError as e:      # no such experiment or search; not the figures' own errors
        raise UserError(str(e)) from None
    print(f"report of the latest search of '{args.experiment}': {path}")
    return 0


def ui_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search import tracking

    with user_errors():
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise UserError(f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}; run "
                        "'drcaps search experiments/quickstart.yaml' first or pass --tracking-uri")
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    print(f"MLflow UI on http://127.0.0.1:{args.port} over {uri} (Ctrl-C to stop)", flush=True)
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])
    return 0   # not reached: exec replaces this process
