"""The one module that imports Ray: a search is a Ray Tune ``Tuner`` whose trials each run ``drcapsnet.train``.

Optuna (through Ray's ``OptunaSearch``, seeded, persisted in an RDB storage) proposes the hyperparameters, a
``ConcurrencyLimiter`` bounds the trials in flight, a Tune scheduler (ASHA by default) stops weak trials, and every
trial records itself in MLflow through ``search.tracking`` (one child run per trial, found again by its trial id
when Ray restarts it). Ray is imported inside functions, so ``import search.tune`` stays cheap.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drcapsnet.checkpoint import BEST, LAST, load_model
from drcapsnet.config import RunConfig
from drcapsnet.errors import ClusterError, DrcapsError, SearchFailedError
from drcapsnet.model import CapsNetClassifier
from drcapsnet.train import train
from search import preflight, ranking, tracking
from search.experiment import Experiment, experiment_to_dict
from search.preflight import STATE_FILE
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


def _trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One Ray trial: train with the proposed params, report each epoch to Tune and MLflow, checkpoint each epoch."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run = apply_params(ctx.experiment, params)
    device = run.train.device if ctx.gpus > 0 else "cpu"
    run = dataclasses.replace(run, train=dataclasses.replace(
        run.train, num_threads=max(1, int(ctx.cpus)), device=device))
    run_id = tracking.find_or_create_trial_run(
        ctx.tracking_uri, ctx.mlflow_experiment, parent_run_id=ctx.parent_run_id, trial_id=trial_id,
        run_name=tune.get_context().get_trial_name(), params=run.flat())
    logger = tracking.TrialLogger(ctx.tracking_uri, run_id)
    _remove_temp_folders([trial_id])                          # a killed earlier attempt of this trial left them
    work = Path(tempfile.mkdtemp(prefix=f"drcaps-{trial_id}-"))
    resume = None
    restored = tune.get_checkpoint()
    # Epochs an earlier attempt logged and Ray's checkpoint does not hold are trained again: log each step once.
    logged = max((step for step, _ in tracking.metric_history(ctx.tracking_uri, run_id, "epoch")), default=0) \
        if restored is not None else 0
    if restored is not None:                                  # Ray restarted this trial: continue, don't start over
        with restored.as_directory() as d:
            shutil.copy2(Path(d) / LAST, work / LAST)
        resume = work / LAST
    logger.set_tags(_node_tags(resume))

    ended = False

    def report(metrics: dict[str, float]) -> None:
        # Ray may stop this trial inside tune.report (ASHA stops every trial at max_t, the last epoch), tearing the
        # worker down at once: everything MLflow needs is written BEFORE Ray gets control back.
        nonlocal ended
        if int(metrics["epoch"]) > logged:
            logger.log_epoch(metrics, step=int(metrics["epoch"]))
        if metrics.get("best_epoch") == metrics["epoch"]:
            logger.log_artifact(work / BEST, "checkpoint")
        if metrics["epoch"] >= run.train.epochs:
            logger.end("FINISHED")
            ended = True
        with tempfile.TemporaryDirectory(prefix=f"drcaps-{trial_id}-ckpt-") as d:   # only last.pt goes to Ray
            os.link(work / LAST, Path(d) / LAST)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        train(run.model, run.data, run.train, report, checkpoint_dir=work, resume=resume)
    except SystemExit:                                        # the scheduler stopped this trial inside tune.report
        if not ended:
            logger.end("KILLED")
        ended = True
        raise
    except BaseException as e:
        if not ended:
            logger.end("FAILED", reason=str(e) if isinstance(e, DrcapsError) else f"{type(e).__name__}: {e}")
        ended = True
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_temp_folders(trial_ids: list[str]) -> None:
    """Delete this machine's temporary folders of these trials (``drcaps-<trial id>-*``), e.g. of a killed try."""
    for trial_id in trial_ids:
        for path in Path(tempfile.gettempdir()).glob(f"drcaps-{trial_id}-*"):
            shutil.rmtree(path, ignore_errors=True)


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


def make_searcher(exp: Experiment, study_name: str, storage_url: str | None) -> Any:
    """Ray's ``OptunaSearch`` over the experiment's space: seeded sampler, enqueued known-good points, and the study
    persisted in ``storage_url`` (an RDB URL; None keeps it in memory) so Optuna Dashboard can open it."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = exp.search
    return OptunaSearch(space=to_distributions(s.space), metric=s.metric, mode=s.mode,
                        sampler=make_sampler(s.sampler, s.seed), study_name=study_name,
                        storage=optuna.storages.RDBStorage(storage_url) if storage_url else None,
                        points_to_evaluate=[dict(p) for p in s.enqueue] or None)


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
                         include_dashboard=False if address == "local" else None, configure_logging=verbose > 0)
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


def _summaries(results: Any, metric: str, mode: str, epochs: int) -> list[TrialSummary]:
    sign = 1.0 if mode == "max" else -1.0
    out = []
    for r in results:
        df = r.metrics_dataframe
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        if df is None or metric not in df or df[metric].dropna().empty:
            out.append(TrialSummary(str(trial_id), dict(r.config or {}), -sign * math.inf, 0, "failed",
                                    error=str(r.error) if r.error else "no metrics reported"))
            continue
        best_row = df.loc[(df[metric] * sign).idxmax()]
        row = {k: float(v) for k, v in best_row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        ran = int(df["epoch"].max())
        outcome = "failed" if r.error else ("finished" if ran >= epochs else "stopped_early")
        out.append(TrialSummary(str(trial_id), dict(r.config), float(best_row[metric]), ran, outcome, row,
                                error=str(r.error) if r.error else None))
    return ranking.rank(out, lambda t: t.metric, mode)      # the one ranking (search/ranking.py)


def run_search(exp: Experiment, *, address: str | None = None, tracking_uri: str | None = None,
               storage_path: str | Path | None = None, resume: bool = False, smoke_test: bool = False,
               verbose: int = 1) -> SearchResult:
    """Run the experiment's search and return the ranked trials, the best config and its registered model."""
    if smoke_test:
        exp = smoke_experiment(exp)
    uri = tracking.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    storage_root = Path(storage_path or Path.cwd() / "drcaps-runs").resolve()
    check_search(exp, uri, storage_root, resume)          # nothing written, Ray not started
    if address is None and not os.environ.get("RAY_ADDRESS"):     # a local Ray gets this machine's CPUs/GPUs
        preflight.check_resources(dataclasses.asdict(exp.search.resources),
                                  {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}, None)
    preflight.check_address(address)          # seconds, not Ray's minutes of retries that ignore Ctrl-C
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
            uri, mlflow_experiment, run_name=study_name, params=exp.run.flat() | {
                "search.sampler": s.sampler, "search.scheduler": s.scheduler.name, "search.seed": s.seed,
                "search.num_samples": s.num_samples, "search.metric": s.metric, "search.mode": s.mode},
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

    # Trials checkpoint every epoch and keep the best few, so Tune snapshots its state whenever one has checkpointed
    # keep_checkpoints times; with sub-second GPU epochs it then warns every few seconds, burying the progress
    # table (seen on an H200). The snapshot is small; the warning is off unless the user sets the variable.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ctx = TrialContext(exp, uri, mlflow_experiment, parent_run_id, s.resources.cpu, s.resources.gpu)
    resources = {"cpu": s.resources.cpu, "gpu": s.resources.gpu}
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), resources)
    try:
        if resume:
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            searcher = make_searcher(exp, study_name, storage_url)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=s.metric, mode=s.mode, num_samples=s.num_samples, time_budget_s=s.time_budget_s,
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
                    scheduler=_scheduler(exp, exp.run.train.epochs)),
                run_config=tune.RunConfig(
                    name=study_name, storage_path=str(storage), verbose=verbose,
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
        with _tune_interrupt_watch(tune_catches) as interrupted:
            results = tuner.fit()
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
    _remove_temp_folders([str((r.metrics or {}).get("trial_id") or Path(r.path).name) for r in results])
    return _finish(exp, results, uri, mlflow_experiment, parent_run_id, study_name, storage_url, str(exp_dir))


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
    for t in trials:                                          # a trial killed hard never reached its `finally`
        r = runs.get(t.trial_id)
        if r is not None and r.status == "RUNNING":
            status = {"finished": "FINISHED", "stopped_early": "KILLED"}.get(t.outcome, "FAILED")
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
            model_uri = tracking.log_and_register_model(uri, best_run.run_id, CapsNetClassifier(capsnet).eval(),
                                                        example, registered_name=registered)
        except Exception as e:
            problems.append(f"could not register the best model as {registered!r} ({type(e).__name__}: {e}); its "
                            f"checkpoint is artifact checkpoint/best.pt of MLflow run {best_run.run_id}")
    tracking.end_run(uri, parent_run_id, "FINISHED", {
        "drcaps.best_trial_id": best.trial_id, "drcaps.best_run_id": best_run.run_id if best_run else "",
        f"drcaps.best_{s.metric}": f"{best.metric:.6f}", "drcaps.model_uri": model_uri or ""}
        | ({"drcaps.registration_error": problems[0]} if problems else {}))
    return SearchResult(exp, best, trials, best_config, uri, parent_run_id, best_run.run_id if best_run else None,
                        model_uri, study_name, storage_url, experiment_path, problems=tuple(problems))


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
