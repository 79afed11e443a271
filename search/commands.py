"""What each ``drcaps`` command does, over library functions. Every check that can be made before work starts is
made first and raises a :class:`~drcapsnet.errors.DrcapsError` (``search/cli.py`` maps it to an exit code and one
``error: ...`` line); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drcapsnet.config import RunConfig
from drcapsnet.errors import ConfigError, UsageError
from search.preflight import writable_file_problem, writable_folder_problem

DATASET_SHAPES = {"cifar10": (3, 32)}   # (channels, image size) where it is not MNIST's (1, 28)
SHAPE_FIELDS = ("in_channels", "image_size", "num_classes")   # model fields the data alone decides

def _check_output(flag: str, path: Path | None, folder: bool = False) -> None:
    """An output the command will write must be writable BEFORE any work (a file, or a folder with ``folder``)."""
    if path is None:
        return
    problem = writable_folder_problem(path) if folder else writable_file_problem(path)
    if problem:
        raise UsageError(f"{flag}: cannot write {path}: {problem}; pass a writable path")


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

    _check_output("--save-model", args.save_model)
    _check_output("--checkpoint-dir", args.checkpoint_dir, folder=True)
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
            raise ConfigError(f"--load-model: {args.load_model} holds another model: {', '.join(changed)}; "
                              "drop the flags that change the model, or train a new one without --load-model")
        if state["epoch"] >= run.train.epochs:
            raise ConfigError(f"--epochs: {args.load_model} already holds {state['epoch']} epochs; "
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

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be an integer >= 1, got {args.batch_size}")
    if args.checkpoint is not None:
        capsnet, run, _ = load_model(args.checkpoint)
        model: torch.nn.Module = capsnet
        data_cfg = run.data
        cfg = capsnet.cfg
    else:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_store_exists(uri)     # reading never creates an empty store
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
        raise ConfigError(f"--dataset: {data_cfg.dataset} has {datasets.in_channels}x{datasets.image_size}px "
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

    if args.show_samples < 0:
        raise UsageError(f"--show-samples: must be an integer >= 0, got {args.show_samples}")
    exp = load_experiment(args.experiment, overrides)
    s = exp.search
    print(f"ok: {args.experiment} (experiment '{exp.name}': {s.num_samples} trials, {s.sampler} sampler, "
          f"{s.scheduler.name} scheduler, {len(s.space)} searched fields: {', '.join(s.space)})")
    proposals = sample_space(s.space, s.seed, args.show_samples, s.sampler) if args.show_samples else []
    for i, params in enumerate(proposals):
        print(f"  proposal {i}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return 0


MAX_CORNERS = 4096   # space corners tried up front: every combination of each field's ends (or choices)


def _check_space_corners(exp: Any) -> None:
    """Fields that are fine alone can clash together (``model.conv_kernel`` and ``model.primary_kernel`` both at
    their highs leave no capsule grid): try every combination of each searched field's ends or choices, so a
    config error surfaces here, once, and not inside trials that Ray would retry."""
    import itertools

    from search.space import apply_params

    space = exp.search.space
    candidates = [list(spec.choices) if spec.type == "categorical" else [spec.low, spec.high]
                  for spec in space.values()]
    if not candidates or math.prod(len(c) for c in candidates) > MAX_CORNERS:
        return
    for values in itertools.product(*candidates):
        params = dict(zip(space, values))
        try:
            apply_params(exp, params)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"search.space: the combination {shown} is rejected ({e}); narrow those "
                              "ranges") from None


def _preflight_data(run: RunConfig, space: dict[str, Any]) -> None:
    """Load the data once up front (a torchvision dataset is downloaded here, once, not by every trial) and check
    that the model and every value the search may propose fit it."""
    from drcapsnet.data import load_datasets
    from drcapsnet.train import check_compatible

    datasets = load_datasets(run.data)
    check_compatible(run.model, datasets)
    for name in SHAPE_FIELDS:
        spec = space.get(f"model.{name}")
        if spec is None:
            continue
        want = getattr(datasets, name)
        values = list(spec.choices) if spec.type == "categorical" else [spec.low, spec.high]
        if any(v != want for v in values):
            raise ConfigError(f"search.space.model.{name}: the data ({run.data.dataset}) fixes model.{name} at "
                              f"{want}, but the space proposes {values}; remove model.{name} from search.space")


def export_from_tracking(uri: str, experiment: str, out: Path, fmt: str | None = None,
                         csv: Path | None = None) -> tuple[Path, Any]:
    """The best trial of the latest search of ``experiment`` -> an experiment file ``drcaps train --config`` takes."""
    import json

    from search import tracking
    from search.experiment import experiment_from_dict, parse_override
    from search.export import best_experiment, export_best

    parent = tracking.latest_search_run(uri, experiment)
    if parent is None:
        raise tracking.TrackingError(f"--experiment: no search of '{experiment}' in {uri}; run 'drcaps search' first, "
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


def search_command(args: argparse.Namespace, overrides: list[str]) -> int:
    for flag, value in (("--tracking-uri", args.tracking_uri), ("--address", args.address)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag}: empty; leave it out for the default, or give a value")
    from search.tune import is_ray_client

    if is_ray_client(args.address):            # the whole command runs on the cluster's head (docs/cluster.md)
        return search_through_ray_client(args, overrides)
    _node_defaults(args, overrides)
    from search import preflight, tracking
    from search.experiment import load_experiment
    from search.export import best_experiment, export_best
    from search.progress import summary_lines
    from search.tune import check_search, run_search, smoke_experiment

    exp = load_experiment(args.experiment, overrides)
    checked = smoke_experiment(exp) if args.smoke_test else exp   # names, folders and export of what will run
    uri = tracking.resolve_tracking_uri(args.tracking_uri or exp.tracking.uri)
    storage_root = Path(args.storage_path or Path.cwd() / "drcaps-runs").resolve()
    out = (args.out or Path.cwd() / f"{checked.name}.best.yaml").resolve()
    csv = out.with_suffix(".trials.csv")
    _check_output("--out", out)
    _check_output("--out", csv)
    check_search(checked, uri, storage_root, args.resume)
    preflight.SearchLock(storage_root / checked.name / preflight.LOCK_FILE).check_free(checked.name)
    preflight.check_address(args.address)
    _check_space_corners(checked)
    _preflight_data(checked.run, dict(checked.search.space))
    try:
        result = run_search(exp, address=args.address, tracking_uri=uri, storage_path=storage_root,
                            resume=args.resume, smoke_test=args.smoke_test, verbose=1 + args.verbose)
    except KeyboardInterrupt:
        again = f"drcaps search {args.experiment} --resume" + "".join(
            f" {flag} {value}" for flag, value in (("--storage-path", args.storage_path),
                                                   ("--tracking-uri", args.tracking_uri),
                                                   ("--address", args.address)) if value) + (
            " --smoke-test" if args.smoke_test else "")
        print(f"interrupted: the search's state is saved; continue it with\n  {again}", file=sys.stderr)
        return 130
    best = result.best
    chosen = best_experiment(result.experiment, best.params, metrics=best.metrics, run_id=result.best_run_id,
                             model_uri=result.model_uri, trial_id=best.trial_id)
    code = 0
    try:                      # the search is recorded; a failed export must not lose it
        path = export_best(chosen, out)
        csv.parent.mkdir(parents=True, exist_ok=True)
        tracking.trials_dataframe(uri, result.parent_run_id).to_csv(csv, index=False)
    except OSError as e:
        name = result.experiment.mlflow_experiment
        print(f"error: --out: could not write {out} ({e.strerror or e}); the search is recorded in MLflow (parent "
              f"run {result.parent_run_id} at {uri}): drcaps export-best --experiment {name} --tracking-uri {uri} "
              "--out FILE", file=sys.stderr)
        path, code = out, 1
    report = _copy_report(result, out.with_name(f"{result.experiment.name}.report.html"))
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print("\n".join(summary_lines(result, export_path=path, csv_path=csv, links=_links(args, exp, result),
                                   report_path=report)))
    return code


def _copy_report(result: Any, out: Path) -> Path | None:
    """The search's report (written by the search into its Ray folder and logged to its parent run), copied beside
    the exported config where a person looks for it."""
    if result.report_path is None:
        return None
    try:
        shutil.copyfile(result.report_path, out)
        return out
    except OSError as e:
        print(f"warning: could not copy the report to {out} ({e.strerror or e}); it is at {result.report_path}",
              file=sys.stderr)
        return Path(result.report_path)


def _links(args: argparse.Namespace, exp: Any, result: Any) -> dict[str, str]:
    """Where to look next: the MLflow UI (and the pages of the search run and the best trial), Optuna Dashboard."""
    from search import tracking

    uri = result.tracking_uri
    local = not uri.startswith(("http://", "https://"))
    links = {}
    if local:
        links["MLflow UI"] = ("drcaps ui" if args.tracking_uri is None and exp.tracking.uri is None
                              else f"drcaps ui --tracking-uri {uri}") + "   (then open the links below)"
    links["search run (MLflow)"] = tracking.run_url(uri, result.parent_run_id)
    if result.best_run_id:
        links["best trial (MLflow)"] = tracking.run_url(uri, result.best_run_id)
    links["Optuna Dashboard"] = f"optuna-dashboard {result.storage_url}   (pip install optuna-dashboard)"
    return links


def export_best_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_store_exists(uri)             # reading never creates an empty store
    _check_output("--out", args.out.resolve())
    _check_output("--csv", args.csv.resolve() if args.csv else None)
    path, chosen = export_from_tracking(uri, args.experiment, args.out.resolve(), args.format, args.csv)
    result = chosen.result or {}
    print(f"exported best config of '{args.experiment}' (run {result.get('mlflow_run_id')}): {path}")
    if args.csv:
        print(f"all trials: {args.csv}")
    return 0


def report_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search import tracking
    from search.report import write_report

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_store_exists(uri)             # reading never creates an empty store
    out = (args.out or Path.cwd() / f"{args.experiment}.report.html").resolve()
    _check_output("--out", out)
    path = write_report(uri, args.experiment, out)   # TrackingError (no such experiment or search) -> exit 2
    print(f"report of the latest search of '{args.experiment}': {path}")
    return 0


def ui_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from search import tracking

    if not 0 < args.port < 65536:
        raise UsageError(f"--port: must be in 1..65535, got {args.port}")
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}; run "
                         "'drcaps search experiments/quickstart.yaml' first or pass --tracking-uri")
    tracking.check_tracking_uri(uri)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    print(f"MLflow UI on http://127.0.0.1:{args.port} over {uri} (Ctrl-C to stop)", flush=True)
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])
    return 0   # not reached: exec replaces this process


# ---------------------------------------------------------------- search on a Ray cluster (docs/cluster.md)

NODE_TRACKING_ENV = "MLFLOW_TRACKING_URI"   # MLflow's own variable; docker-compose.yml sets it on every Ray node
NODE_STORAGE_ENV = "DRCAPS_STORAGE_PATH"     # Ray's storage_path as the cluster's nodes see it (a shared volume)


def _node_defaults(args: argparse.Namespace, overrides: list[str]) -> None:
    """What the machine the search driver runs on says when the command line and the experiment do not: the
    tracking URI from ``MLFLOW_TRACKING_URI``, Ray's storage folder from ``DRCAPS_STORAGE_PATH`` (and the Optuna
    storage from ``DRCAPS_OPTUNA_STORAGE``: search.tune.optuna_storage_url). On a node of docker-compose.yml they
    name the stack's MLflow server, its shared ``runs`` volume and its PostgreSQL; elsewhere they are usually unset."""
    from search.experiment import load_experiment

    if args.tracking_uri is None and os.environ.get(NODE_TRACKING_ENV) \
            and load_experiment(args.experiment, overrides).tracking.uri is None:
        args.tracking_uri = os.environ[NODE_TRACKING_ENV]
    if args.storage_path is None and os.environ.get(NODE_STORAGE_ENV):
        args.storage_path = Path(os.environ[NODE_STORAGE_ENV])


def search_through_ray_client(args: argparse.Namespace, overrides: list[str]) -> int:
    """``drcaps search --address ray://HOST:10001``: this machine is only a Ray Client; it need not reach MLflow,
    PostgreSQL or Ray's storage folder. The whole command (:func:`search_on_head`: every check, the search, the
    export) runs as one task on the cluster's head, with every URI and path as the cluster sees it. Here: the checks
    that need nothing but this machine, then the exported files are written here and the summary printed.
    Ctrl-C cancels the search on the cluster (its state saved, parent run KILLED) and exits with code 130."""
    from search import preflight, tracking
    from search.experiment import load_experiment
    from search.tune import run_on_head

    exp = load_experiment(args.experiment, overrides)
    if explicit := args.tracking_uri or exp.tracking.uri:
        tracking.check_tracking_uri_from_client(tracking.resolve_tracking_uri(explicit),
                                                "--tracking-uri" if args.tracking_uri else "tracking.uri")
    storage = exp.search.storage or ""
    if storage.startswith("sqlite:"):
        raise ConfigError(f"search.storage: {storage} is a SQLite file on this machine, which the Ray cluster's head "
                          "(where a search started with --address ray://... runs) cannot open; use a postgresql:// "
                          "server the cluster reaches, or leave it out to use the head's DRCAPS_OPTUNA_STORAGE, or "
                          "run the search inside the stack (docker compose exec ray-head drcaps search ... "
                          "--address auto)")
    out = (args.out or Path.cwd() / "placeholder").resolve().parent
    _check_output("--out", out, folder=True)
    preflight.check_address(args.address)       # last of the local checks: seconds, not Ray Client's 30 s timeout
    print(f"running the search on the Ray cluster at {args.address}: the whole driver runs on its head node "
          "(follow the trials in the MLflow UI); its output follows when it ends", flush=True)
    remote = argparse.Namespace(**{**vars(args), "address": None})
    try:
        outcome = run_on_head(args.address, search_on_head, remote, overrides, Path(args.experiment).read_text())
    except KeyboardInterrupt:
        again = f"drcaps search {args.experiment} --resume --address {args.address}" + "".join(
            f" {flag} {value}" for flag, value in (("--storage-path", args.storage_path),
                                                   ("--tracking-uri", args.tracking_uri)) if value) + (
            " --smoke-test" if args.smoke_test else "")
        print(f"interrupted: the search's state is saved on the cluster; continue it with\n  {again}",
              file=sys.stderr)
        return 130
    if outcome["error"] is not None:
        raise outcome["error"]
    for name, content in outcome["files"].items():           # the exported config, all trials, ...
        (out / name).write_bytes(content)
    here = {outcome["out"]: str(out), outcome["experiment"]: str(Path(args.experiment).resolve().parent)}
    for text, stream in ((outcome["stdout"], sys.stdout), (outcome["stderr"], sys.stderr)):
        for there, path in here.items():                      # the paths it printed, as they are on this machine
            text = text.replace(there, path)
        stream.write(text)
    return outcome["code"]


def search_on_head(args: argparse.Namespace, overrides: list[str], experiment_text: str) -> dict[str, Any]:
    """``drcaps search`` as a task on the head node (search.tune.run_on_head): the same command over a copy of the
    experiment file (``experiment_text``), its files written to a temporary folder and its output captured, all
    returned as plain data: ``error`` (a DrcapsError, raised again on the client), else ``code``, ``stdout``,
    ``stderr``, ``files`` ({name: bytes}) and the temporary folders (``out``, ``experiment``) the output names.
    A Ctrl-C on the client arrives here as KeyboardInterrupt: the search stops as it would on a terminal."""
    import contextlib
    import io

    from drcapsnet.errors import DrcapsError
    from search.experiment import load_experiment
    from search.tune import smoke_experiment

    stdout, stderr = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory(prefix="drcaps-out-") as out, \
            tempfile.TemporaryDirectory(prefix="drcaps-exp-") as folder:
        experiment = Path(folder) / Path(args.experiment).name
        experiment.write_text(experiment_text)
        try:
            exp = load_experiment(experiment, overrides)
            name = args.out.name if args.out else \
                f"{(smoke_experiment(exp) if args.smoke_test else exp).name}.best.yaml"
            local = argparse.Namespace(**{**vars(args), "experiment": experiment, "out": Path(out) / name})
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = search_command(local, overrides)
        except DrcapsError as e:
            return {"error": e}
        files = {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}
    return {"error": None, "code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "files": files,
            "out": out, "experiment": folder}
