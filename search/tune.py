"""The one module that imports Ray: a search is a Ray Tune ``Tuner`` whose trials each run ``drcapsnet.train``.

Optuna (through Ray's ``OptunaSearch``, seeded, persisted in an RDB storage) proposes the hyperparameters, a
``ConcurrencyLimiter`` bounds the trials in flight, a Tune scheduler (ASHA by default) stops weak trials, and every
trial records itself in MLflow through ``search.tracking`` (one child run per trial, found again by its trial id
when Ray restarts it). Ray is imported inside functions, so ``import search.tune`` stays cheap.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drcapsnet.checkpoint import BEST, LAST, load_model
from drcapsnet.config import DataConfig, RunConfig
from drcapsnet.data import Datasets, load_datasets
from drcapsnet.errors import ClusterError, DivergedError, DrcapsError, SearchFailedError
from drcapsnet.model import CapsNetClassifier
from drcapsnet.train import train
from search import preflight, ranking, tracking
from search.experiment import Experiment, experiment_to_dict
from search.preflight import STATE_FILE
from search.progress import SearchProgress, format_params
from search.space import apply_params, make_sampler, to_distributions

__all__ = ["STATE_FILE", "ClusterError", "SearchResult", "TrialSummary", "check_search", "run_search"]


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, pickled to the worker; every path and URI is absolute."""

    experiment: Experiment
    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    metric: float                     # the trial's best value of the search metric over its epochs
    epochs: int
    outcome: str                      # finished | stopped_early | failed
    metrics: dict[str, float] = field(default_factory=dict)   # the epoch where the metric was best
    error: str | None = None
    number: int | None = None         # the Optuna trial number (MLflow run name "trial N ...")


@dataclass(frozen=True)
class SearchResult:
    """A finished search in plain Python: export and the CLI never see a Ray object."""

    experiment: Experiment
    best: TrialSummary
    trials: list[TrialSummary]
    best_config: RunConfig
    tracking_uri: str
    parent_run_id: str
    best_run_id: str | None
    model_uri: str | None
    study_name: str
    storage_url: str
    experiment_path: str
    problems: tuple[str, ...] = ()    # what failed at the very end (registration) without losing the search
    report_path: str | None = None    # the search's HTML report (search/report.py), also on its parent run


# Worker-process state (a Ray actor runs several trials with reuse_actors): when its last trial ended, how many it
# ran, and the trials still writing their MLflow records, which an exiting actor waits for (see _trial).
_WORKER: dict[str, Any] = {"idle_since": None, "trials": 0}
_ENDING: list[threading.Event] = []


def _wait_for_ending_trials() -> None:
    """atexit in a trial worker: Ray ends an actor gracefully (atexit runs, daemon threads die with the process);
    let a trial stopped inside ``tune.report`` finish its end-of-trial upload first."""
    for done in list(_ENDING):
        done.wait(timeout=60.0)


def _same_data(a: DataConfig, b: DataConfig) -> bool:
    """Whether two data configs load the same images (batching and augmentation do not change them)."""
    return dataclasses.replace(a, batch_size=1, shift_pixels=0) == dataclasses.replace(b, batch_size=1, shift_pixels=0)


def _shared_datasets(exp: Experiment) -> Datasets | None:
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


def _trial(params: dict[str, Any], ctx: TrialContext, datasets: Datasets | None = None) -> None:
    """One Ray trial: train with the proposed params, report each epoch to Tune and MLflow, checkpoint each epoch.

    Fixed cost kept low (issue 9, benchmarks/trial_overhead.py): the data comes from the driver through the object
    store when it is the same for every trial; the weights-only best checkpoint is uploaded to MLflow once, at the
    trial's end; Ray keeps the actor for the next trial (``reuse_actors``). Cumulative ``perf_*_s`` counters in
    every report say where the trial's time went (start-up, data, train, eval, checkpoint, mlflow, tune)."""
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
    _remove_temp_folders([trial_id])                          # a killed earlier attempt of this trial left them
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
        logger.set_tags(_node_tags(resume))
    with timing("perf_data_s"):
        data = datasets if datasets is not None and _same_data(ctx.experiment.run.data, run.data) \
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
                tune.report({**metrics, **perf, "perf_worker_trials": _WORKER["trials"], "mlflow_run_id": run_id},
                            checkpoint=checkpoint)
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


def _remove_temp_folders(trial_ids: list[str]) -> None:
    """Delete this machine's temporary folders of these trials (``drcaps-<trial id>-*``), e.g. of a killed try."""
    for trial_id in trial_ids:
        for path in Path(tempfile.gettempdir()).glob(f"drcaps-{trial_id}-*"):
            shutil.rmtree(path, ignore_errors=True)


def trial_dirname(trial: Any) -> str:
    """A trial's folder under the search's Ray folder: ``trial-003-<ray trial id>`` (short; the number is Optuna's)."""
    _, number = split_config(dict(trial.config))
    return f"trial-{number:03d}-{trial.trial_id}" if number is not None else f"trial-{trial.trial_id}"


def trial_run_name(number: int, params: dict[str, Any], names: list[str]) -> str:
    """``trial 3 lr=0.3 momentum=0.9 units=16``: the MLflow run name of a trial (number and searched values)."""
    return f"trial {number} {format_params(params, names)}".strip()


def search_params(exp: Experiment) -> dict[str, Any]:
    """The parent run's params: how the search was set up and what it searched (``space.<field>``), not the base
    config's values of searched fields (those are in its ``resolved_experiment.json`` artifact)."""
    s = exp.search
    space = {f"space.{name}": (f"{spec.type} {list(spec.choices)}" if spec.type == "categorical" else
                               f"{spec.type} [{spec.low}, {spec.high}]" + (" log" if spec.log else ""))
             for name, spec in s.space.items()}
    return {"search.sampler": s.sampler, "search.scheduler": s.scheduler.name, "search.seed": s.seed,
            "search.num_samples": s.num_samples, "search.metric": s.metric, "search.mode": s.mode,
            "search.max_concurrent": s.max_concurrent, "data.dataset": exp.run.data.dataset,
            "train.epochs": exp.run.train.epochs} | space


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def optuna_storage_url(exp: Experiment, tracking_uri: str) -> str:
    """The experiment's ``search.storage``, else ``$DRCAPS_OPTUNA_STORAGE`` (this machine's), else SQLite next to
    a local MLflow store, else ./optuna.db."""
    if exp.search.storage:
        return exp.search.storage
    if os.environ.get(OPTUNA_STORAGE_ENV):              # the machine's own (docker-compose.yml sets it)
        return os.environ[OPTUNA_STORAGE_ENV]
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def _scheduler(exp: Experiment, max_t: int) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    sched = exp.search.scheduler
    if sched.name == "asha":
        return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=max_t,
                                       grace_period=min(sched.grace_period, max_t),
                                       reduction_factor=sched.reduction_factor)
    if sched.name == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=sched.grace_period,
                                  min_samples_required=3)
    return FIFOScheduler()


TRIAL_NUMBER = "drcaps_trial"   # config key carrying the Optuna trial number to the trial (not a searched field)


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A Ray trial's config -> (the searched params, the Optuna trial number)."""
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER}
    number = config.get(TRIAL_NUMBER)
    return params, int(number) if number is not None else None


def _searcher_class() -> type:
    """Ray's ``OptunaSearch``, made to tell Optuna what drcaps ranks by (built lazily: Ray is imported here).

    - value of a trial = the best value of the metric at any epoch (the one ranking of drcaps), not the last;
    - every epoch's value is an intermediate value, the last one included (Ray's class skips the final result);
    - a trial the scheduler stopped before ``max_epochs`` is PRUNED, a failed or diverged one FAIL;
    - the objective carries the metric's name, each trial its MLflow run id (user attribute ``mlflow_run_id``);
    - the Optuna trial number travels to the trial in its config (``drcaps_trial``), so Ray, MLflow and Optuna
      call a trial by the same number.
    """
    global _Searcher
    if _Searcher is not None:
        return _Searcher
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class DrcapsOptunaSearch(OptunaSearch):
        def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
            self._max_epochs = max_epochs
            self._best: dict[str, float] = {}
            self._steps: dict[str, int] = {}
            super().__init__(*args, **kwargs)

        def _setup_study(self, mode: Any) -> None:
            super()._setup_study(mode)
            if self._ot_study is not None and self._metric:
                self._ot_study.set_metric_names([self._metric])

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            if params is not None:
                params[TRIAL_NUMBER] = self._ot_trials[trial_id].number
            return params

        def _record(self, trial_id: str, result: dict) -> None:
            value, step = result.get(self._metric), result.get("epoch", result.get("training_iteration"))
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or not isinstance(value, int | float) or step is None:
                return
            try:
                if isinstance(result.get("mlflow_run_id"), str):
                    ot_trial.set_user_attr("mlflow_run_id", result["mlflow_run_id"])
                if not math.isfinite(value):
                    return
                if self._steps.get(trial_id, 0) < int(step):
                    ot_trial.report(float(value), int(step))
                    self._steps[trial_id] = int(step)
            except optuna.exceptions.UpdateFinishedTrialError:
                # --resume after a killed driver: Ray's older snapshot re-runs a trial that driver had already told
                # Optuna about. Optuna's record stands; nothing more is sent for it.
                self._completed_trials.add(trial_id)
                return
            best = self._best.get(trial_id)
            if best is None or (value > best if self._mode == "max" else value < best):
                self._best[trial_id] = float(value)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self._completed_trials:
                self._record(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            if result:
                self._record(trial_id, result)
            epochs = int((result or {}).get("epoch", self._steps.get(trial_id, 0)))
            best = self._best.get(trial_id)
            state, value = optuna.trial.TrialState.COMPLETE, best
            if error or best is None or (result and not math.isfinite(result.get(self._metric, 0.0))):
                state, value = optuna.trial.TrialState.FAIL, None
            elif epochs < self._max_epochs:
                state = optuna.trial.TrialState.PRUNED
            try:
                self._ot_study.tell(self._ot_trials[trial_id], value if state != optuna.trial.TrialState.PRUNED
                                    else None, state=state)
            except Exception as e:                           # e.g. the study was changed by hand meanwhile
                import logging
                logging.getLogger(__name__).warning("optuna: could not record trial %s: %s", trial_id, e)
            self._completed_trials.add(trial_id)

    _Searcher = DrcapsOptunaSearch
    return _Searcher


_Searcher: type | None = None


def make_searcher(exp: Experiment, study_name: str, storage_url: str | None) -> Any:
    """Ray's ``OptunaSearch`` (see ``_searcher_class``) over the experiment's space: seeded sampler, enqueued
    known-good points, and the study persisted in ``storage_url`` (an RDB URL; None keeps it in memory) so Optuna
    Dashboard can open it."""
    import optuna

    s = exp.search
    return _searcher_class()(space=to_distributions(s.space), metric=s.metric, mode=s.mode,
                             sampler=make_sampler(s.sampler, s.seed), study_name=study_name,
                             storage=optuna.storages.RDBStorage(storage_url) if storage_url else None,
                             points_to_evaluate=[dict(p) for p in s.enqueue] or None,
                             max_epochs=exp.run.train.epochs)


# Messages a user can do nothing about in the default (live view) mode; shown again under -v.
_QUIET_LOGGERS = {"ray._private.authentication.authentication_token_setup": "ERROR",   # a local Ray's token
                  "mlflow.store.db.utils": "WARNING",       # "Creating initial MLflow database tables..."
                  "alembic.runtime.migration": "WARNING", "optuna": "WARNING"}  # "A new study created in RDB"


@contextlib.contextmanager
def _quiet_logs(verbose: int) -> Iterator[None]:
    """Raise the level of the chatty library loggers for the block, then put every level back as it was."""
    import logging

    import optuna  # configures its logger on import: import first, then set the level

    if verbose >= 2:
        yield
        return
    loggers = {name: logging.getLogger(name) for name in _QUIET_LOGGERS}
    before = {name: lg.level for name, lg in loggers.items()}
    for name, lg in loggers.items():
        lg.setLevel(_QUIET_LOGGERS[name])
    # Tune's new output engine prints its configuration box, the results folder and a TensorBoard hint even at
    # verbose=0; its legacy engine is silent at 0. The switch is an environment variable Tune reads in fit().
    try:
        with warnings.catch_warnings(), _scoped_env({"RAY_AIR_NEW_OUTPUT": "0"}):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)   # set_metric_names
            yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(before[name])


@contextlib.contextmanager
def _scoped_env(values: dict[str, str], *, keep_users: bool = False) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there (``keep_users``: leave a variable
    the user set alone)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if not (keep_users and saved[k] is not None):
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_ray(address: str | None, verbose: int) -> None:
    import ray

    if ray.is_initialized():
        return
    # No --address: a fresh embedded Ray ("local"), never a cluster someone else started on this machine (plain
    # ray.init() would attach to the last one in /tmp/ray). RAY_ADDRESS, Ray's own convention, still selects one.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # Through Ray Client the cluster forks a server per client, and ~7% of those die at start-up (a gRPC fork race
    # in Ray's proxier, ray-project/ray#63202, open): "Initialization failure from server". Worth two more tries.
    tries = 3 if address.startswith("ray://") else 1
    try:
        for attempt in range(1, tries + 1):
            try:
                # Trials print nothing worth reading (metrics reach Tune's table and MLflow); their logs stay in
                # Ray's session folder instead of repeating "Checkpoint successfully created" on the terminal.
                ray.init(address=address, log_to_driver=False,
                         include_dashboard=False if address == "local" else None, configure_logging=verbose > 1)
                break
            except ConnectionAbortedError as e:
                if attempt == tries or "Initialization failure from server" not in str(e):
                    raise
                ray.shutdown()                     # drop the half-made client connection before the next try
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        if _auth_refused(e):
            raise ClusterError(
                f"--address: the Ray cluster at {address!r} requires token authentication and this process sent "
                "no token; export RAY_AUTH_MODE=token (the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                "or ~/.ray/auth_token, the same as the head's), or use --address auto on the head node") from None
        raise ClusterError(f"--address: cannot reach the Ray cluster at {address!r} ({type(e).__name__}: {e}); "
                           "start it (ray start --head) or leave --address out to run Ray here") from None


def _auth_refused(error: BaseException) -> bool:
    """Whether ``ray.init`` failed because the cluster wants a token (Ray >= 2.5x: a head started where
    ``~/.ray/auth_token`` exists turns token authentication on; a driver given an explicit address never does).
    Ray wraps the ``AuthenticationError`` in a RuntimeError's text, so look through the causes and their text."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def smoke_experiment(exp: Experiment) -> Experiment:
    """2 trials x 1 epoch on at most 256 training images: checks the wiring in a minute."""
    run = exp.run
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, epochs=1),
                              data=dataclasses.replace(run.data, limit_train=min(run.data.limit_train or 256, 256)))
    search = dataclasses.replace(exp.search, num_samples=2, time_budget_s=None)
    # Apart from the real searches: its own name (Ray folder, lock, export file), MLflow experiment and registered
    # model, and its parent run tagged drcaps.smoke_test, so no "latest"/"best" lookup of the real experiment sees it.
    smoke_tracking = dataclasses.replace(exp.tracking, experiment=f"{exp.mlflow_experiment}-smoke",
                                         registered_model=f"{exp.registered_model}-smoke")
    return dataclasses.replace(exp, name=f"{exp.name}-smoke", run=run, search=search, tracking=smoke_tracking)


_PROGRESS: SearchProgress | None = None   # the live view of the search running in this process, if any


def _progress_callback(max_epochs: int) -> Any:
    """A Tune callback that forwards trial events to this process's live view (``_PROGRESS``). It holds no
    reference to it, so Tune can pickle it with the experiment state and a resumed search shows its own view."""
    from ray.tune import Callback

    def view() -> SearchProgress | None:
        import search.tune as this

        return this._PROGRESS

    def error_line(trial: Any) -> str:
        err = getattr(trial, "error_message", None) or ""
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        return lines[-1][:160] if lines else "error"

    class DrcapsProgress(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (v := view()) is not None:
                params, number = split_config(dict(trial.config))
                v.started(trial.trial_id, number if number is not None else len(v.trials), params)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if (v := view()) is not None:
                v.result(trial.trial_id, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (v := view()) is not None:
                epochs = int((trial.last_result or {}).get("epoch", 0))
                if failure := (trial.last_result or {}).get(FAILURE_KEY):
                    v.ended(trial.trial_id, "failed", str(failure))
                    return
                v.ended(trial.trial_id, "finished" if epochs >= max_epochs else "stopped_early")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (v := view()) is not None:
                v.ended(trial.trial_id, "failed", error_line(trial))

    return DrcapsProgress()


def _summaries(results: Any, metric: str, mode: str, epochs: int) -> list[TrialSummary]:
    sign = 1.0 if mode == "max" else -1.0
    out = []
    for r in results:
        df = r.metrics_dataframe
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        params, number = split_config(dict(r.config or {}))
        if failure := (r.metrics or {}).get(FAILURE_KEY):            # ended itself as failed (diverged)
            ran = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
            out.append(TrialSummary(str(trial_id), params, -sign * math.inf, ran, "failed", error=str(failure),
                                    number=number))
            continue
        if df is None or metric not in df or df[metric].dropna().empty:
            # No epoch reported: it failed before its first, or the search ended first (time budget): not a failure.
            out.append(TrialSummary(str(trial_id), params, -sign * math.inf, 0,
                                    "failed" if r.error else "stopped_early",
                                    error=str(r.error) if r.error else None, number=number))
            continue
        best_row = df.loc[(df[metric] * sign).idxmax()]
        row = {k: float(v) for k, v in best_row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        ran = int(df["epoch"].max())
        outcome = "failed" if r.error else ("finished" if ran >= epochs else "stopped_early")
        out.append(TrialSummary(str(trial_id), params, float(best_row[metric]), ran, outcome, row,
                                error=str(r.error) if r.error else None, number=number))
    return ranking.rank(out, lambda t: t.metric, mode)      # the one ranking (search/ranking.py)


def run_search(exp: Experiment, *, address: str | None = None, tracking_uri: str | None = None,
               storage_path: str | Path | None = None, resume: bool = False, smoke_test: bool = False,
               verbose: int = 1) -> SearchResult:
    """Run the experiment's search and return the ranked trials, the best config and its registered model.

    ``verbose``: 0 silent, 1 the live view (search/progress.py), 2 also Ray Tune's own tables and library logs.
    """
    if smoke_test:
        exp = smoke_experiment(exp)
    uri = tracking.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    storage_root = Path(storage_path or Path.cwd() / "drcaps-runs").resolve()
    check_search(exp, uri, storage_root, resume)          # nothing written, Ray not started
    preflight.SearchLock(storage_root / exp.name / preflight.LOCK_FILE).check_free(exp.name)   # before Ray's start
    if address is None and not os.environ.get("RAY_ADDRESS"):     # a local Ray gets this machine's CPUs/GPUs
        preflight.check_resources(dataclasses.asdict(exp.search.resources),
                                  {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}, None)
    # Trials checkpoint every epoch, so Tune snapshots its state often and, with sub-second GPU epochs, warns every
    # few seconds, burying the progress view (seen on an H200): off for the search unless the user set it.
    with _quiet_logs(verbose), _scoped_env({"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"},
                                           keep_users=True):
        preflight.check_address(address)      # seconds, not Ray's minutes of retries that ignore Ctrl-C
        _init_ray(address, verbose)
        preflight.check_resources(dataclasses.asdict(exp.search.resources), _cluster_resources(), address)
        lock = preflight.SearchLock(storage_root / exp.name / preflight.LOCK_FILE).acquire(exp.name)
        try:
            _create_optuna_schema(optuna_storage_url(exp, uri))
            return _run_search(exp, address=address, tracking_uri=uri, storage_path=storage_root,
                               resume=resume, smoke_test=smoke_test, verbose=verbose)
        finally:
            lock.release()


def check_search(exp: Experiment, uri: str, storage_root: Path, resume: bool) -> None:
    """Every check of a search that needs neither Ray nor a record: tracking store and names, storage folder,
    resume state, Optuna storage, the metric in every epoch's report. Raises a DrcapsError; writes nothing."""
    tracking.check_tracking_uri(uri)
    tracking.check_names(exp.mlflow_experiment, exp.registered_model)
    preflight.check_storage(storage_root, exp.name, resume)
    preflight.check_optuna_storage(optuna_storage_url(exp, uri))
    s = exp.search
    preflight.check_metric_every_epoch(s.metric, exp.run.train.epochs, exp.run.train.eval_interval, s.space,
                                       s.scheduler.name)


def _create_optuna_schema(storage_url: str) -> None:
    """Create a SQLite Optuna storage's tables under an exclusive lock on its folder: two searches started at once
    in a fresh folder would otherwise race in SQLAlchemy's create_all ("table ... already exists")."""
    if not storage_url.startswith("sqlite:///"):
        return
    import fcntl

    import optuna

    folder = Path(storage_url.removeprefix("sqlite:///").partition("?")[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        optuna.storages.RDBStorage(storage_url)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def _run_search(exp: Experiment, *, address: str | None, tracking_uri: str | None,
                storage_path: str | Path | None, resume: bool, smoke_test: bool, verbose: int) -> SearchResult:
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    s = exp.search                        # run_search has applied --smoke-test and made every check
    uri = tracking.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    mlflow_experiment = exp.tracking.experiment or exp.name
    # One Ray folder per search, <storage>/<experiment>/<study>/: running the same experiment again starts afresh
    # beside the earlier searches instead of mixing into their folder.
    storage = Path(storage_path or Path.cwd() / "drcaps-runs").resolve() / exp.name
    state_file = storage / STATE_FILE

    _init_ray(address, verbose)               # before any MLflow run exists: a bad --address leaves nothing behind
    if resume:
        state = json.loads(state_file.read_text())
        parent_run_id, study_name = state["parent_run_id"], state["study_name"]
        tracking.reopen_run(uri, parent_run_id)
    else:
        study_name = preflight.study_name(exp.name)
        resolved = experiment_to_dict(exp)
        parent_run_id = tracking.start_search_run(
            uri, mlflow_experiment, run_name=study_name, params=search_params(exp),
            tags={"drcaps.study_name": study_name, "drcaps.experiment_file": str(exp.path or ""),
                  **({tracking.SMOKE_TAG: "true"} if smoke_test else {}),
                  "git.commit": _git_commit(), "version.ray": ray.__version__, "version.optuna": optuna.__version__,
                  "version.torch": torch.__version__, "version.python": platform.python_version()},
            artifacts={"experiment.yaml": exp.path.read_text() if exp.path and exp.path.exists() else "",
                       "resolved_experiment.json": json.dumps(resolved, indent=2, default=str),
                       "search_space.json": json.dumps({k: dataclasses.asdict(v) for k, v in s.space.items()},
                                                       indent=2, default=str)})
    storage_url = optuna_storage_url(exp, uri)
    exp_dir = storage / study_name

    ctx = TrialContext(exp, uri, mlflow_experiment, parent_run_id, s.resources.cpu, s.resources.gpu)
    resources = {"cpu": s.resources.cpu, "gpu": s.resources.gpu}
    # The data every trial trains on goes into Ray's object store once (with_parameters puts each argument there),
    # so a trial does not load it again; reuse_actors keeps a trial worker (its imports, its process) for the next.
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx, datasets=_shared_datasets(exp)), resources)
    try:
        if resume:
            _reconcile_study(storage_url, study_name, exp_dir)
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            searcher = make_searcher(exp, study_name, storage_url)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=s.metric, mode=s.mode, num_samples=s.num_samples, time_budget_s=s.time_budget_s,
                    reuse_actors=True, trial_dirname_creator=trial_dirname,
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
                    scheduler=_scheduler(exp, exp.run.train.epochs)),
                run_config=tune.RunConfig(
                    # Ray's own tables only under -v (verbose 2): the live view (search/progress.py) is the default.
                    name=study_name, storage_path=str(storage), verbose=0 if verbose < 2 else 2,
                    callbacks=[_progress_callback(exp.run.train.epochs)],
                    failure_config=tune.FailureConfig(max_failures=s.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints,
                                                            checkpoint_score_attribute=s.metric,
                                                            checkpoint_score_order=s.mode)))
            storage.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"parent_run_id": parent_run_id, "study_name": study_name,
                                              "storage_url": storage_url, "tracking_uri": uri}))
        # Through Ray Client (ray://) fit() runs on the cluster: no Tune handler here, Ctrl-C raises as usual.
        tune_catches = (not ray.util.client.ray.is_connected()
                        and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")))   # the switch Tune reads
        global _PROGRESS
        _PROGRESS = SearchProgress(s.num_samples, s.metric, s.mode, exp.run.train.epochs, list(s.space),
                                   live=None if verbose == 1 else False) if verbose >= 1 else None
        try:
            with _tune_interrupt_watch(tune_catches) as interrupted, _PROGRESS or contextlib.nullcontext():
                results = tuner.fit()
        finally:
            _PROGRESS = None
        # Ray Tune handles the first SIGINT itself: it saves the experiment state, stops the trials (in memory they
        # all read TERMINATED now) and fit() RETURNS as if the search had ended. That is an interrupt, to be
        # continued with --resume. Where the watch stays out (Ray Client, TUNE_DISABLE_SIGINT_HANDLER=1, where Tune
        # still stops on SIGUSR1), the saved state showing a trial that had not ended says so instead.
        if interrupted() or (exp_dir.exists() and any(t.status not in ("TERMINATED", "ERROR")
                                                      for t in tune.ExperimentAnalysis(str(exp_dir)).trials)):
            raise KeyboardInterrupt
    except BaseException:
        tracking.end_run(uri, parent_run_id, "KILLED")
        raise
    # Every trial of this search, those a killed driver lost included (they have an MLflow run, no Ray result).
    _remove_temp_folders([str((r.metrics or {}).get("trial_id")) for r in results if (r.metrics or {}).get("trial_id")]
                         + [r.tags["drcaps.trial_id"] for r in tracking.child_runs(uri, parent_run_id)
                            if r.tags.get("drcaps.trial_id")])
    _close_study(storage_url, study_name, results, s.metric, s.mode)
    return _finish(exp, results, uri, mlflow_experiment, parent_run_id, study_name, storage_url, str(exp_dir))


def _reconcile_study(storage_url: str, study_name: str, exp_dir: Path) -> None:
    """Before a resume: an Optuna trial the killed driver had asked for but Ray never saved (a SIGKILL between the
    two) is RUNNING in the study with no Ray trial. Hand it back as WAITING: the resumed search's next ask() takes
    it again, with its params, so the study ends with exactly num_samples trials and no duplicate proposal."""
    import optuna
    from ray import tune

    try:
        known = {int(t.config[TRIAL_NUMBER]) for t in tune.ExperimentAnalysis(str(exp_dir)).trials
                 if TRIAL_NUMBER in (t.config or {})}
        storage = optuna.storages.RDBStorage(storage_url)
        study_id = storage.get_study_id_from_name(study_name)
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in known:
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.WAITING)
    except Exception as e:                       # never let bookkeeping stop a resume; say what was left
        warnings.warn(f"resume: could not reconcile Optuna study {study_name!r} with Ray's state: {e}", stacklevel=2)


def _close_study(storage_url: str, study_name: str, results: Any, metric: str, mode: str) -> None:
    """After fit: no Optuna trial stays RUNNING or WAITING. One whose Ray trial reported (a resumed driver never
    told Optuna about a trial that ended before the kill) gets its best value (search/ranking.py), else FAIL."""
    import optuna

    try:
        storage = optuna.storages.RDBStorage(storage_url)
        study = optuna.load_study(study_name=study_name, storage=storage)
    except Exception as e:
        warnings.warn(f"could not open Optuna study {study_name!r} to close it: {e}", stacklevel=2)
        return
    best: dict[int, float] = {}
    for r in results:
        number = (r.config or {}).get(TRIAL_NUMBER)
        df = r.metrics_dataframe
        if number is None or df is None or metric not in df or "epoch" not in df:
            continue
        found = ranking.best_epoch(zip(df["epoch"], df[metric], strict=True), mode)
        if found is not None and not r.error and not (r.metrics or {}).get(FAILURE_KEY):
            best[int(number)] = found[1]
    open_states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    for trial in study.get_trials(deepcopy=False, states=open_states):
        if trial.state == optuna.trial.TrialState.WAITING and not trial.params:
            continue                             # an enqueued point the search never reached: not a trial yet
        try:
            if trial.state == optuna.trial.TrialState.WAITING:   # tell() takes RUNNING trials only
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.RUNNING)
            if trial.number in best:
                study.tell(trial.number, best[trial.number])
            else:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except Exception as e:                   # e.g. finished meanwhile by another process
            warnings.warn(f"could not close Optuna trial {trial.number}: {e}", stacklevel=2)


def _prune_checkpoints(experiment_path: Path) -> None:
    """A finished search needs Ray's per-trial checkpoints no more (they exist so an interrupted search can resume):
    every trial's best weights are MLflow artifacts and the best model is registered. Ray's small files (params,
    results, progress.csv: what ``tune.ExperimentAnalysis`` reads) are kept."""
    if not experiment_path.is_dir():
        return
    for checkpoint in experiment_path.glob("*/checkpoint_*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)


def _sigint_after_tune(signum: int, frame: Any) -> None:
    """What a second Ctrl-C meets while Tune saves its state after the first: stop now, as Python would."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def _tune_interrupt_watch(tune_catches: bool) -> Iterator[Callable[[], bool]]:
    """Tell, once the block is left, whether ``Tuner.fit`` inside it ended because of SIGINT / SIGUSR1.

    Tune's handler records the signal in a local flag and restores the SIGINT handler that was in place when the
    run began, so a marker handler installed here is back in place after ``fit`` exactly when the signal came,
    whatever state the trials were in (the one that had just finished, the next one not yet started). The
    previous handler is restored on the way out. ``tune_catches``: whether Tune installs its handler in this
    process at all (not through Ray Client, not with ``TUNE_DISABLE_SIGINT_HANDLER=1``).
    """
    if not tune_catches or threading.current_thread() is not threading.main_thread():   # handlers: main only
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, _sigint_after_tune)
    seen = [False]
    try:
        yield lambda: seen[0]
    finally:
        # Read before restoring: the answer is which handler is in place when fit() has returned.
        seen[0] = signal.getsignal(signal.SIGINT) is _sigint_after_tune
        signal.signal(signal.SIGINT, previous)


def _finish(exp: Experiment, results: Any, uri: str, mlflow_experiment: str, parent_run_id: str,
            study_name: str, storage_url: str, experiment_path: str) -> SearchResult:
    """Rank the trials, close any MLflow run Ray left open, register the best model, tag the parent run."""
    s = exp.search
    trials = _summaries(results, s.metric, s.mode, exp.run.train.epochs)
    runs = {r.tags.get("drcaps.trial_id"): r for r in tracking.child_runs(uri, parent_run_id)}
    for t in trials:
        # A trial killed hard never reached its `finally`; one the scheduler stopped ended KILLED in the worker
        # (it cannot tell the scheduler from Ctrl-C). Stopping early is an outcome, not a failure: FINISHED with
        # drcaps.outcome=stopped_early (docs/notes.md: "Trial status in MLflow").
        r = runs.get(t.trial_id)
        status = {"finished": "FINISHED", "stopped_early": "FINISHED"}.get(t.outcome, "FAILED")
        if r is not None and (r.status == "RUNNING" or r.status != status
                              or r.tags.get("drcaps.outcome") != t.outcome):
            tracking.end_run(uri, r.run_id, status, {"drcaps.outcome": t.outcome})
    ranked_ids = {t.trial_id for t in trials}
    for trial_id, r in runs.items():              # a trial lost with a killed driver: Ray restarted it anew
        if r.status == "RUNNING" and trial_id not in ranked_ids:
            tracking.end_run(uri, r.run_id, "KILLED", {"drcaps.outcome": "interrupted"})
    scored = [t for t in trials if t.outcome != "failed" and math.isfinite(t.metric)]
    if not scored:
        tracking.end_run(uri, parent_run_id, "FAILED", {"drcaps.failure_reason": "no trial reported a metric"})
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials[:3])
        raise SearchFailedError(f"search: every trial failed ({errors}); each trial's record is in MLflow "
                                f"(parent run {parent_run_id} at {uri})")
    best = scored[0]
    best_config = apply_params(exp, best.params)
    best_run = runs.get(best.trial_id)
    model_uri = None
    problems: list[str] = []
    checkpoint = next(r for r in results if str((r.metrics or {}).get("trial_id")) == best.trial_id
                      ).get_best_checkpoint(s.metric, s.mode)
    if checkpoint is not None and best_run is not None:
        with checkpoint.as_directory() as d:
            capsnet, _, _ = load_model(Path(d) / LAST)
        example = torch.rand(2, capsnet.cfg.in_channels, capsnet.cfg.image_size, capsnet.cfg.image_size)
        registered = exp.tracking.registered_model or f"{mlflow_experiment}-capsnet"
        try:                  # the search's results must outlive a registry that fails now, at its very end
            model_uri = tracking.log_and_register_model(
                uri, best_run.run_id, CapsNetClassifier(capsnet).eval(), example, registered_name=registered,
                description=f"Best trial (trial {best.number}, {best.trial_id}) of search {study_name}: "
                            f"{s.metric} = {best.metric:.4f} at its best epoch; {format_params(best.params)}")
        except Exception as e:
            problems.append(f"could not register the best model as {registered!r} ({type(e).__name__}: {e}); its "
                            f"checkpoint is artifact checkpoint/best.pt of MLflow run {best_run.run_id}")
    counts = {o: sum(t.outcome == o for t in trials) for o in ("finished", "stopped_early", "failed")}
    tracking.log_metrics(uri, parent_run_id, {
        f"best_{s.metric}": best.metric, "trials_finished": counts["finished"],
        "trials_stopped_early": counts["stopped_early"], "trials_failed": counts["failed"],
        "trial_epochs": sum(t.epochs for t in trials), "wall_time_s": tracking.run_age_s(uri, parent_run_id)})
    tracking.end_run(uri, parent_run_id, "FINISHED", {f"drcaps.best.{k}": str(v) for k, v in best.params.items()} | {
        "drcaps.best_trial_id": best.trial_id, "drcaps.best_run_id": best_run.run_id if best_run else "",
        f"drcaps.best_{s.metric}": f"{best.metric:.6f}", "drcaps.model_uri": model_uri or ""}
        | ({"drcaps.registration_error": problems[0]} if problems else {}))
    _prune_checkpoints(Path(experiment_path))
    report = _write_report(uri, mlflow_experiment, parent_run_id, Path(experiment_path), problems)
    return SearchResult(exp, best, trials, best_config, uri, parent_run_id, best_run.run_id if best_run else None,
                        model_uri, study_name, storage_url, experiment_path, problems=tuple(problems),
                        report_path=report)


def _write_report(uri: str, mlflow_experiment: str, parent_run_id: str, experiment_path: Path,
                  problems: list[str]) -> str | None:
    """Every search ends with its HTML report: in its Ray folder (a temporary one for remote storage) and on its
    parent run (``report/``). The search is recorded whatever happens here: a failure is a problem to report."""
    from search.report import report_search

    folder = experiment_path if experiment_path.is_dir() else Path(tempfile.mkdtemp(prefix="drcaps-report-"))
    try:
        return str(report_search(uri, mlflow_experiment, parent_run_id, folder / "report.html"))
    except Exception as e:     # noqa: BLE001 (said, with the command that makes it later)
        problems.append(f"the report could not be written ({type(e).__name__}: {e}); make it later with: "
                        f"drcaps report {mlflow_experiment} --tracking-uri {uri}")
        return None


# ================================================================ Ray Client: the search driver as a task on the head
#
# `drcaps search --address ray://HOST:10001` makes this process a Ray Client only: the machine it runs on need not
# reach the MLflow server, PostgreSQL or Ray's storage folder. The whole command (search.commands.search_on_head:
# every check, run_search, the export) runs as ONE Ray task pinned to the head node, where URIs and paths are as the
# cluster sees them (the head's MLFLOW_TRACKING_URI, DRCAPS_OPTUNA_STORAGE and DRCAPS_STORAGE_PATH, which
# docker-compose.yml sets). The task returns plain data. Tune's own Ray Client support is not enough: it moves only
# Tuner.fit to the head, leaving the parent run, the Optuna study and the export here, against URIs this machine may
# not reach (issue 6: "unable to open database file" on the head, after a parent run was already made here).
# A Ctrl-C here cancels the task: Ray raises KeyboardInterrupt in it, Tune saves its state and the search ends as on
# a terminal (parent run KILLED); this side waits for that, then exits with code 130.

OPTUNA_STORAGE_ENV = "DRCAPS_OPTUNA_STORAGE"   # the Optuna storage URL as the driver's machine sees it
HEAD_RESOURCE = "node:__internal_head__"       # a resource only the head node has
CANCEL_WAIT_S = 120.0                          # how long a Ctrl-C waits for the head task to save and close its runs


def is_ray_client(address: str | None) -> bool:
    """Whether a search joins its cluster through Ray Client (``--address ray://...``, or ``RAY_ADDRESS``)."""
    return (address or os.environ.get("RAY_ADDRESS") or "").startswith("ray://")


def _on_head(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def run_on_head(address: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` as one Ray task on the head node of the cluster at ``address`` (``ray://HOST:PORT``); its
    result. ``fn`` must be importable on the cluster (drcaps installed there, the same version) and return plain
    data. The task asks for no CPU (the head of docker-compose.yml offers none to trials) and is never retried."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    _init_ray(address, 0)
    try:
        task = ray.remote(num_cpus=0, max_retries=0, resources={HEAD_RESOURCE: 0.001})(_on_head)
        ref = task.remote(fn, *args)
        try:
            return ray.get(ref)
        except KeyboardInterrupt:
            ray.cancel(ref)                       # KeyboardInterrupt in the task: the search stops and saves
            with contextlib.suppress(RayError, GetTimeoutError, KeyboardInterrupt):
                ray.get(ref, timeout=CANCEL_WAIT_S)
            raise
    finally:
        ray.shutdown()


def _node_tags(resumed_from: Path | None) -> dict[str, str]:
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
