"""One trial, in its Ray worker: train the proposed config with ``drcapsnet.train``, report every epoch to Tune and
to the trial's MLflow run, checkpoint every epoch, and say where its time went.

Fixed cost kept low (issue 9, benchmarks/trial_overhead.py): the data comes from the driver through Ray's object store
when every trial trains on the same images; the weights-only best checkpoint is uploaded to MLflow once, at the
trial's end; Ray keeps the worker for the next trial (``reuse_actors``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drcapsnet.checkpoint import BEST, LAST
from drcapsnet.config import DataConfig
from drcapsnet.data import Datasets, load_datasets
from drcapsnet.errors import DivergedError, DrcapsError
from drcapsnet.train import train
from search import tracking
from search.experiment import Experiment
from search.space import apply_params
from search.tune.searcher import split_config, trial_run_name


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, pickled to the worker; every path and URI is absolute."""

    experiment: Experiment
    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str
    cpus: float
    gpus: float


# Worker-process state (a Ray actor runs several trials with reuse_actors): when its last trial ended, how many it
# ran, and the trials still writing their MLflow records, which an exiting actor waits for (see _trial).
_WORKER: dict[str, Any] = {"idle_since": None, "trials": 0}
_ENDING: list[threading.Event] = []


def _wait_for_ending_trials() -> None:
    """atexit in a trial worker: Ray ends an actor gracefully (atexit runs, daemon threads die with the process);
    let a trial stopped inside ``tune.report`` finish its end-of-trial upload first."""
    for done in list(_ENDING):
        done.wait(timeout=60.0)


def same_data(a: DataConfig, b: DataConfig) -> bool:
    """Whether two data configs load the same images (batching and augmentation do not change them)."""
    return dataclasses.replace(a, batch_size=1, shift_pixels=0) == dataclasses.replace(b, batch_size=1, shift_pixels=0)


def shared_datasets(exp: Experiment) -> Datasets | None:
    """The experiment's datasets, loaded once by the driver and handed to every trial through Ray's object store
    (``tune.with_parameters`` puts them there once); None when the driver cannot load them (the trials then load
    their own, and report the problem as they always did) or when the search changes what is loaded."""
    if any(name.startswith("data.") and name not in ("data.batch_size", "data.shift_pixels")
           for name in exp.search.space):
        return None
    try:
        return load_datasets(exp.run.data)
    except DrcapsError:
        return None


def run_trial(params: dict[str, Any], ctx: TrialContext, datasets: Datasets | None = None) -> None:
    """One Ray trial: train with the proposed params, report each epoch to Tune and MLflow, checkpoint each epoch.

    Fixed cost kept low (issue 9, benchmarks/trial_overhead.py): the data comes from the driver through the object
    store when it is the same for every trial; the weights-only best checkpoint is uploaded to MLflow once, at the
    trial's end; Ray keeps the actor for the next trial (``reuse_actors``). ``perf_*_s`` counters, logged to the
    trial's MLflow run at its end (step 0), say where its time went (start-up, data, train, eval, checkpoint,
    mlflow, tune, teardown); Tune's results carry only the epoch's metrics (search/tune/lean.py)."""
    from ray import tune

    entry = time.perf_counter()
    if _WORKER["idle_since"] is None:                          # first trial of this process: since it started
        import psutil  # vendored by Ray (ray/thirdparty_files, on sys.path once ray is imported, as above)
        startup = max(0.0, time.time() - psutil.Process().create_time())
        atexit.register(_wait_for_ending_trials)
    else:
        startup = entry - _WORKER["idle_since"]
    _WORKER["trials"] += 1
    # A stopped trial's thread gets SystemExit inside tune.report and then uploads its best checkpoint; Tune waits
    # this long (its default: 2 s) before giving up on reusing the actor. Read by Ray in this process.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    perf = {"perf_startup_s": startup, "perf_data_s": 0.0, "perf_train_s": 0.0, "perf_eval_s": 0.0,
            "perf_ckpt_s": 0.0, "perf_mlflow_s": 0.0, "perf_tune_s": 0.0}

    @contextlib.contextmanager
    def timing(key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            perf[key] += time.perf_counter() - t0

    done = threading.Event()
    _ENDING.append(done)
    trial_id = tune.get_context().get_trial_id()
    params, number = split_config(params)
    run = apply_params(ctx.experiment, params)
    device = run.train.device if ctx.gpus > 0 else "cpu"
    run = dataclasses.replace(run, train=dataclasses.replace(
        run.train, num_threads=max(1, int(ctx.cpus)), device=device))
    with timing("perf_mlflow_s"):
        run_id = tracking.find_or_create_trial_run(
            ctx.tracking_uri, ctx.mlflow_experiment, parent_run_id=ctx.parent_run_id, trial_id=trial_id,
            run_name=trial_run_name(number, params, list(ctx.experiment.search.space)) if number is not None
            else tune.get_context().get_trial_name(), params=run.flat())
    logger = tracking.TrialLogger(ctx.tracking_uri, run_id)
    remove_temp_folders([trial_id])                          # a killed earlier attempt of this trial left them
    work = Path(tempfile.mkdtemp(prefix=f"drcaps-{trial_id}-"))
    resume = None
    restored = tune.get_checkpoint()
    with timing("perf_mlflow_s"):
        # Epochs an earlier attempt logged and Ray's checkpoint does not hold are trained again: log each step once.
        logged = max((step for step, _ in tracking.metric_history(ctx.tracking_uri, run_id, "epoch")), default=0) \
            if restored is not None else 0
    if restored is not None:                                  # Ray restarted this trial: continue, don't start over
        with restored.as_directory() as d:
            shutil.copy2(Path(d) / LAST, work / LAST)
        resume = work / LAST
    with timing("perf_mlflow_s"):
        logger.set_tags(node_tags(resume))
    with timing("perf_data_s"):
        data = datasets if datasets is not None and same_data(ctx.experiment.run.data, run.data) \
            else load_datasets(run.data)
    n_train = len(data.train.labels)

    ended, uploaded = False, False
    mark = time.perf_counter()

    def upload_best() -> None:                                # once per trial, at its end
        nonlocal uploaded
        if not uploaded and (work / BEST).exists():
            with timing("perf_mlflow_s"):
                logger.log_artifact(work / BEST, "checkpoint")
        uploaded = True

    def report(metrics: dict[str, float]) -> None:
        # Ray may stop this trial inside tune.report (ASHA stops every trial at max_t, the last epoch): a trial that
        # ran all its epochs writes everything MLflow needs BEFORE Ray gets control back.
        nonlocal ended, mark
        now = time.perf_counter()
        train_s = n_train / metrics["images_per_s"]
        perf["perf_train_s"] += train_s
        perf["perf_eval_s"] += max(0.0, metrics["epoch_s"] - train_s)
        perf["perf_ckpt_s"] += max(0.0, now - mark - metrics["epoch_s"])   # last.pt/best.pt written by train
        if int(metrics["epoch"]) > logged:
            with timing("perf_mlflow_s"):
                logger.log_epoch(metrics, step=int(metrics["epoch"]))
        if metrics["epoch"] >= run.train.epochs:
            upload_best()
            with timing("perf_mlflow_s"):
                logger.end("FINISHED")
            ended = True
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"drcaps-{trial_id}-ckpt-") as d:
            os.link(work / LAST, Path(d) / LAST)              # only last.pt goes to Ray
            checkpoint = tune.Checkpoint.from_directory(d)
            perf["perf_ckpt_s"] += time.perf_counter() - t0
            with timing("perf_tune_s"):                       # hand-off to Tune, which persists the checkpoint
                tune.report({**metrics, "mlflow_run_id": run_id}, checkpoint=checkpoint)
        mark = time.perf_counter()

    stopped_at = None                                         # when training ended: teardown starts there
    try:
        train(run.model, run.data, run.train, report, checkpoint_dir=work, resume=resume, datasets=data)
        stopped_at = time.perf_counter()
    except SystemExit:                   # Ray stopped this trial inside tune.report: the scheduler, or Ctrl-C
        stopped_at = time.perf_counter()
        if not ended:                    # the driver's _finish records a scheduler's stop as stopped_early
            upload_best()
            logger.end("KILLED", outcome="interrupted")
        ended = True
        raise
    except DivergedError as e:           # deterministic: a retry from the last checkpoint would diverge again
        stopped_at = time.perf_counter()
        if not ended:
            upload_best()
            logger.end("FAILED", reason=str(e))
        ended = True
        # Not raised to Ray, which would retry it (search.max_failures, -1 = forever): one last report carries the
        # metric as NaN (the searcher tells Optuna FAIL) and the reason (FAILURE_KEY: the ranking counts it failed).
        tune.report({"epoch": e.epoch, ctx.experiment.search.metric: math.nan, FAILURE_KEY: str(e),
                     "mlflow_run_id": run_id})
    except BaseException as e:
        stopped_at = time.perf_counter()
        if not ended:
            upload_best()
            logger.end("FAILED", reason=str(e) if isinstance(e, DrcapsError) else f"{type(e).__name__}: {e}")
        ended = True
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # The whole breakdown once more, with the end of the trial (upload, end of run, clean-up) as teardown.
        perf["perf_teardown_s"] = time.perf_counter() - (stopped_at or mark)
        perf["perf_wall_s"] = time.perf_counter() - entry + startup
        with contextlib.suppress(Exception):                  # never hide the trial's own outcome
            logger.log_epoch({**perf, "perf_worker_trials": _WORKER["trials"]}, step=0)
        _WORKER["idle_since"] = time.perf_counter()
        done.set()
        _ENDING.remove(done)


FAILURE_KEY = "drcaps_failure"   # in a trial's last report: why it failed without raising (e.g. diverged at epoch E)


def remove_temp_folders(trial_ids: list[str]) -> None:
    """Delete this machine's temporary folders of these trials (``drcaps-<trial id>-*``), e.g. of a killed try."""
    for trial_id in trial_ids:
        for path in Path(tempfile.gettempdir()).glob(f"drcaps-{trial_id}-*"):
            shutil.rmtree(path, ignore_errors=True)


def node_tags(resumed_from: Path | None) -> dict[str, str]:
    """Where this attempt of a trial runs (``drcaps.node``: host name, ``drcaps.node_ip``, ``drcaps.node_id``), and
    for a restarted trial the epoch its checkpoint held (``drcaps.resumed_from_epoch``)."""
    import socket

    import ray

    from drcapsnet.checkpoint import load_checkpoint

    ctx = ray.get_runtime_context()
    tags = {"drcaps.node": socket.gethostname(), "drcaps.node_ip": ray.util.get_node_ip_address(),
            "drcaps.node_id": ctx.get_node_id()}
    if resumed_from is not None:
        tags["drcaps.resumed_from_epoch"] = str(load_checkpoint(resumed_from)["epoch"])
    return tags
