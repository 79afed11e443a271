"""``drcaps``: a thin command line over the library, and the only module that knows argparse. It parses, maps the
Namespace to one typed call of search/commands/ (``_call``; RUN_FLAGS maps each typed flag of ``drcaps train`` to
its dotted field), and maps a DrcapsError to an exit code: 0 done, 2 the user's mistake (one ``error: ...`` line
naming the bad value and the fix, before any work starts), 1 a run that failed (diverged, every trial failed, an
export that could not be written), 130 interrupted (Ctrl-C or SIGTERM). Only :class:`DrcapsError` s are mapped
(``EXIT_CODES``); anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from drcapsnet.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergedError,
    DrcapsError,
    TrackingError,
    UsageError,
)
from search import commands
from search.cli_help import DESCRIPTION, EXAMPLES, EXPERIMENT_HELP, SET_HELP, TRACKING_HELP
from search.errors import BusyError, ClusterError, SearchFailedError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is ONE line (``error: ...``) and exit code 2, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


# Every typed flag of `drcaps train` and the dotted field it sets: (flag, field, type, choices, help). The one table
# both the parser and run_overrides read, so a flag cannot be added to one and forgotten in the other.
RUN_FLAGS: tuple[tuple[str, str, type, tuple[str, ...] | None, str], ...] = (
    ("--preset", "model.preset", str, None, "model preset: paper | small | tiny (default: paper, or the config's)"),
    ("--epochs", "train.epochs", int, None, "train.epochs: passes over the training split"),
    ("--batch-size", "data.batch_size", int, None, "data.batch_size: images per training step"),
    ("--lr", "train.lr", float, None, "train.lr: the learning rate (default 1e-3, the paper's Adam)"),
    ("--momentum", "train.momentum", float, None, "train.momentum: SGD's momentum (ignored by adam)"),
    ("--optimizer", "train.optimizer", str, ("sgd", "adam"), "train.optimizer (default adam)"),
    ("--seed", "train.seed", int, None, "train.seed: weights, shuffling and shifts (same seed, same run)"),
    ("--log-interval", "train.log_interval", int, None, "train.log_interval: batches between progress updates"),
    ("--eval-interval", "train.eval_interval", int, None, "train.eval_interval: epochs between validation passes"),
    ("--units", "model.units", int, None, "model.units: the digit-capsule dimension"),
    ("--num-iterations", "model.routing_iterations", int, None, "model.routing_iterations: routing passes (paper: 3)"),
    ("--routing", "model.routing", str, ("dynamic", "attention"), "model.routing: routing by agreement or attention"),
    ("--dataset", "data.dataset", str, None, "data.dataset: digits | mnist | fashion-mnist | kmnist | cifar10 | idx"),
    ("--data-dir", "data.data_dir", str, None, "data.data_dir: torchvision root, or a folder of IDX files (idx)"),
)


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the original single-run script (RUN_FLAGS), plus --config, --set and --no-cuda."""
    p.add_argument("--config", type=Path, help="an experiment YAML (e.g. one written by export-best) to start from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field by its dotted name, e.g. --set train.lr=3e-4 (repeatable)")
    for flag, _, kind, choices, text in RUN_FLAGS:
        p.add_argument(flag, type=kind, choices=list(choices) if choices else None, help=text)
    p.add_argument("--no-cuda", action="store_true", help="never use CUDA, even when available (train.device=cpu)")


def _version() -> str:
    try:
        return importlib.metadata.version("drcaps")
    except importlib.metadata.PackageNotFoundError:     # run from a source tree that was never installed
        return "unknown (not installed)"


def _command(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with ``text`` and ends with its examples."""
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", epilog=EXAMPLES[name],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="drcaps", description=DESCRIPTION, epilog=EXAMPLES["drcaps"],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"drcaps {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                title="commands (each has --help)")

    p = _command(sub, "train", "train one DR-CapsNet, with a progress bar and a line per epoch")
    _add_run_flags(p)
    p.add_argument("--save-model", type=Path, metavar="PATH",
                   help="write the final checkpoint here (last.pt/best.pt go to --checkpoint-dir)")
    p.add_argument("--load-model", type=Path, metavar="PATH", help="resume from this checkpoint (file or folder)")
    p.add_argument("--checkpoint-dir", type=Path, help="write last.pt every epoch and best.pt on improvement")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="train.compile=true: torch.compile the training step (pays for long trainings; README)")

    p = _command(sub, "evaluate", "the accuracy of a registered model or a checkpoint on a dataset's split")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-uri", help="an MLflow model URI, e.g. models:/quickstart-capsnet@best")
    src.add_argument("--checkpoint", type=Path, help="a checkpoint written by drcaps train or a search trial")
    p.add_argument("--tracking-uri", help=TRACKING_HELP + " (where --model-uri is registered)")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the checkpoint's, else digits)")
    p.add_argument("--data-dir", help="data.data_dir: torchvision root, or a folder of IDX files")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="test: the held-out split (default); val: the split a search ranks by")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--no-cuda", action="store_true", help="never use CUDA, even when available")

    p = _command(sub, "validate", "check an experiment file (every problem at once) without running it")
    p.add_argument("experiment", type=Path, help=EXPERIMENT_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--show-samples", type=int, default=0, metavar="N", help="print the sampler's first N proposals")

    p = _command(sub, "search", "run a hyperparameter search (Ray Tune + Optuna + MLflow) with a live view")
    p.add_argument("experiment", type=Path, help=EXPERIMENT_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--address", help="Ray cluster to join: auto | ray://host:10001 (default: start Ray here)")
    p.add_argument("--submit", nargs="?", const="", metavar="ADDRESS",
                   help="hand the search to Ray Jobs at ADDRESS (http://HOST:8265; default: RAY_API_SERVER_ADDRESS, "
                        "else http://127.0.0.1:8265) and return: prints the job id and how to follow and stop it")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the experiment's, else sqlite:///mlflow.db)")
    p.add_argument("--storage-path", type=Path, help="Ray Tune results folder (default: ./drcaps-runs)")
    p.add_argument("--out", type=Path, help="where to export the best config (default: <experiment>.best.yaml here)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search of this experiment (same --address)")
    p.add_argument("--extend", type=int, metavar="N", help="N more trials of the finished search (same study, @best)")
    p.add_argument("--warm-start", metavar="NAME", help="seed a new search with NAME's trials that fit its space")
    p.add_argument("--smoke-test", action="store_true",
                   help="2 trials x 1 epoch on at most 256 images, recorded apart (experiment NAME-smoke)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="also show Ray Tune's own trial tables and the libraries' logs")

    p = _command(sub, "follow", "stream a search's Ray Job log until it ends (drcaps search --submit)")
    p.add_argument("job_id", metavar="JOB_ID", help="the job id drcaps search --submit printed")
    p.add_argument("--address", help="the Ray Jobs API, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, else "
                                     "http://127.0.0.1:8265)")

    p = _command(sub, "export-best", "write the best trial's config (+ metrics, run id, model URI)")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (the experiment file's name)")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--out", type=Path, required=True,
                   help="the experiment file to write; 'drcaps train --config' and 'drcaps search' read it")
    p.add_argument("--format", choices=["yaml", "json"], help="default: from --out's suffix, else yaml")
    p.add_argument("--csv", type=Path, help="also write every trial of the search as a CSV (pandas)")

    p = _command(sub, "report", "write the HTML report (plots, capsule diagnostics) of a search")
    p.add_argument("experiment", help="MLflow experiment name (the experiment file's name); its latest search")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--out", type=Path, help="the HTML file to write (default: <experiment>.report.html here)")

    p = _command(sub, "ui", "open the MLflow UI on 127.0.0.1 over the local store")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--port", type=int, default=5000, help="the port on 127.0.0.1 (default 5000)")
    return parser


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The typed flags as ``--set`` overrides, so every value goes through one validation path."""
    out = [f"{field}={value}" for flag, field, *_ in RUN_FLAGS if (value := getattr(args, _dest(flag))) is not None]
    if args.no_cuda:
        out.append("train.device=cpu")
    if getattr(args, "compile", False):
        out.append("train.compile=true")
    return out + list(args.set)


# Every DrcapsError subclass -> its exit code; the most specific class listed wins. Not listed: 2.
EXIT_CODES: dict[type[DrcapsError], int] = {
    DivergedError: 1,        # training ran and went NaN: not a bad input, but the run failed
    SearchFailedError: 1,    # the search ran; no usable result, or its end could not be written (message: where)
    ConfigError: 2, DataError: 2, CheckpointError: 2, TrackingError: 2, ClusterError: 2, UsageError: 2,
    BusyError: 2,
}


def exit_code(error: DrcapsError) -> int:
    return next((code for cls in type(error).__mro__ for c, code in EXIT_CODES.items() if c is cls), 2)


def one_line(error: DrcapsError) -> str:
    """``error: ...``: a ConfigError of one problem ("source:" then "  key: problem") becomes one line."""
    header, *issues = str(error).split("\n")
    return f"error: {header} {issues[0].strip()}" if len(issues) == 1 else f"error: {error}"


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt          # SIGTERM stops a command the way Ctrl-C does (state saved, exit 130)


def _call(args: argparse.Namespace) -> int:
    """The parsed command line as one typed call of search/commands/."""
    if args.command == "train":
        return commands.train_command(args.config, run_overrides(args), save_model=args.save_model,
                                      load_model=args.load_model, checkpoint_dir=args.checkpoint_dir,
                                      progress=not args.no_progress)
    if args.command == "evaluate":
        return commands.evaluate_command(checkpoint=args.checkpoint, model_uri=args.model_uri,
                                         tracking_uri=args.tracking_uri, dataset=args.dataset, data_dir=args.data_dir,
                                         split=args.split, batch_size=args.batch_size, cuda=not args.no_cuda)
    if args.command == "validate":
        return commands.validate_command(args.experiment, list(args.set), show_samples=args.show_samples)
    if args.command == "search":
        from search.tune import is_ray_client

        overrides = args.set + [f"search.warm_start.experiment={json.dumps(n)}" for n in [args.warm_start] if n]
        if args.submit is not None:              # a Ray Job on the cluster's head (search/commands/jobs.py)
            return commands.submit_command(
                args.experiment, overrides, submit=args.submit, address=args.address, tracking_uri=args.tracking_uri,
                storage_path=args.storage_path, out=args.out, resume=args.resume, smoke_test=args.smoke_test,
                verbose=args.verbose, extend=args.extend)
        if is_ray_client(args.address) and args.extend is not None:
            raise UsageError("--extend: not through ray:// (the state file is on the head); run it on the head with "
                             "--address auto, e.g. docker compose exec ray-head drcaps search EXP.yaml --extend N")
        if is_ray_client(args.address):          # the same plan, run and publish, on the cluster's head
            return commands.search_through_ray_client(
                args.experiment, overrides, address=args.address, tracking_uri=args.tracking_uri,
                storage_path=args.storage_path, out=args.out, resume=args.resume, smoke_test=args.smoke_test,
                verbose=args.verbose)
        return commands.search_command(args.experiment, overrides, address=args.address,
                                       tracking_uri=args.tracking_uri, storage_path=args.storage_path, out=args.out,
                                       resume=args.resume, smoke_test=args.smoke_test, verbose=args.verbose,
                                       extend=args.extend)
    if args.command == "follow":
        return commands.follow_command(args.job_id, address=args.address)
    if args.command == "export-best":
        return commands.export_best_command(args.experiment, args.out, tracking_uri=args.tracking_uri,
                                            fmt=args.format, csv=args.csv)
    if args.command == "report":
        return commands.report_command(args.experiment, tracking_uri=args.tracking_uri, out=args.out)
    assert args.command == "ui", args.command
    return commands.ui_command(tracking_uri=args.tracking_uri, port=args.port)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return _call(args)
    except DrcapsError as e:
        print(one_line(e), file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
