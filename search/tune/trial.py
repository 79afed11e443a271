"""One trial, in its Ray worker: train the proposed config with ``drcapsnet.train``, report every epoch to Tune and
to the trial's MLflow run, checkpoint every epoch, and say where its time went.

:func:`run_trial` is what Ray calls; a :class:`TrialRecorder` holds one trial's records (its MLflow run, its time
breakdown, the best checkpoint's upload, its end), and :class:`WorkerState` what the worker process keeps between
the trials it runs (``reuse_actors``). A confirmation run (search/tune/confirm.py) is a trial too, with role
``confirm``: the same training, another seed, its own MLflow run under the search.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drcapsnet.checkpoint import BEST, LAST
from drcapsnet.config import DataConfig, RunConfig
from drcapsnet.data import Datasets, load_datasets
from drcapsnet.errors import DivergedError, DrcapsError
from drcapsnet.train import train
from search import tracking
from search.experiment import Experiment
from search.space import trial_run
from search.tune import objectives_run, recovery
from search.tune.recovery import node_tags, remove_temp_folders
from search.tune.searcher import FAILURE_KEY, split_config, trial_run_name

CONFIRM_SEED = "drcaps_confirm_seed"   # config key of a confirmation run: its seed index (1, 2, ...)


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, pickled to the worker; every path and URI is absolute."""

    experiment: Experiment
    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str
    cpus: float
    gpus: float
    resplit: bool = False             # confirmation runs: a fresh validation split per seed


@dataclass
class WorkerState:
    """What a Ray worker process keeps between its trials: when its last trial ended, how many it ran, and the
    trials still writing their MLflow records, which an exiting worker waits for (atexit)."""

    idle_since: float | None = None
    trials: int = 0
    ending: list[threading.Event] = field(default_factory=list)

    def start(self) -> float:
        """Count a trial in; the seconds since this process started (first trial) or since its last trial."""
        self.trials += 1
        if self.idle_since is None:
            import psutil  # vendored by Ray (ray/thirdparty_files, on sys.path once ray is imported)
            atexit.register(self.wait_for_ending)
            return max(0.0, time.time() - psutil.Process().create_time())
        return time.perf_counter() - self.idle_since

    def wait_for_ending(self) -> None:
        """Ray ends an actor gracefully (atexit runs, daemon threads die with the process): let a trial stopped
        inside ``tune.report`` finish its end-of-trial upload first."""
        for done in list(self.ending):
            done.wait(timeout=60.0)


WORKER = WorkerState()   # this process's (a Ray actor runs several trials with reuse_actors)


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


class TrialRecorder:
    """One trial's records: its MLflow run (found again when Ray restarts it), the per-epoch report to MLflow and
    Tune with the checkpoint, the best checkpoint's one upload, its end (once), and the ``perf_*_s`` breakdown
    (start-up, data, train, eval, checkpoint, mlflow, tune, teardown) logged at step 0 when it closes."""

    def __init__(self, ctx: TrialContext, config: dict[str, Any], startup: float) -> None:
        from ray import tune

        self.entry = time.perf_counter()
        self.perf = {"perf_startup_s": startup, "perf_data_s": 0.0, "perf_train_s": 0.0, "perf_eval_s": 0.0,
                     "perf_ckpt_s": 0.0, "perf_mlflow_s": 0.0, "perf_tune_s": 0.0}
        self.ctx, self.trial_id = ctx, tune.get_context().get_trial_id()
        seed = config.pop(CONFIRM_SEED, None)
        self.params, self.number = split_config(config)
        self.run: RunConfig = trial_run(ctx.experiment, self.params, ctx.cpus, ctx.gpus, confirm_seed=seed,
                                        resplit=ctx.resplit)
        names = list(ctx.experiment.search.space)
        name = trial_run_name(self.number, self.params, names) if self.number is not None \
            else tune.get_context().get_trial_name()
        tags = {} if seed is None else {"drcaps.role": "confirm", "drcaps.confirm_seed": str(seed),
                                        "drcaps.confirms_trial": str(self.number)}
        with self.timing("perf_mlflow_s"):
            self.run_id = tracking.find_or_create_trial_run(
                ctx.tracking_uri, ctx.mlflow_experiment, parent_run_id=ctx.parent_run_id, trial_id=self.trial_id,
                run_name=name if seed is None else f"confirm {name.removeprefix('trial ')} seed {seed}",
                params=self.run.flat(), tags=tags, number=self.number)
        self.logger = tracking.TrialLogger(ctx.tracking_uri, self.run_id)
        self.work = Path(tempfile.mkdtemp(prefix=f"drcaps-{self.trial_id}-"))
        self.ended = self.uploaded = False
        self.logged, self.resume, self.perf_logged = 0, None, False
        self.restored: dict[str, float] = {}   # the metrics of the epoch a restored checkpoint holds
        self.mark, self.stopped_at = time.perf_counter(), None
        self.n_train, self.costs = 0, objectives_run.TrialCosts(ctx.experiment.search.measured_costs, self.run)

    @contextlib.contextmanager
    def timing(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.perf[key] += time.perf_counter() - t0

    def restore(self) -> None:
        """Ray restarted this trial: continue from its checkpoint. Epochs an earlier attempt logged to MLflow and
        the checkpoint does not hold (or every epoch, when it restarts from scratch) are trained again and logged
        once: training is deterministic for a config and thread count, so the values are the same."""
        from ray import tune

        from drcapsnet.checkpoint import load_checkpoint

        restored = tune.get_checkpoint()
        with self.timing("perf_mlflow_s"):
            self.logged = max((step for step, _ in tracking.metric_history(
                self.ctx.tracking_uri, self.run_id, "epoch")), default=0)
            self.perf_logged = bool(tracking.metric_history(self.ctx.tracking_uri, self.run_id, "perf_wall_s"))
        if restored is not None:
            with restored.as_directory() as d:
                for name in (LAST, BEST):                      # best.pt: the best epoch may precede the checkpoint
                    if (Path(d) / name).exists():
                        shutil.copy2(Path(d) / name, self.work / name)
            self.resume = self.work / LAST
            self.restored = dict(load_checkpoint(self.resume)["metrics"])
        with self.timing("perf_mlflow_s"):
            self.logger.set_tags(node_tags(self.resume))

    def data(self, shared: Datasets | None) -> Datasets:
        with self.timing("perf_data_s"):
            data = shared if shared is not None and same_data(self.ctx.experiment.run.data, self.run.data) \
                else load_datasets(self.run.data)
        self.n_train = len(data.train.labels)
        return data

    def upload_best(self) -> None:
        """The best checkpoint (``best.pt``) to MLflow, once per trial, at its end."""
        if not self.uploaded and (self.work / BEST).exists():
            with self.timing("perf_mlflow_s"):
                self.logger.log_artifact(self.work / BEST, "checkpoint")
        self.uploaded = True

    def end(self, status: str, reason: str | None = None, outcome: str | None = None) -> None:
        """The MLflow run's end, once, with the best checkpoint uploaded first."""
        if self.stopped_at is None:
            self.stopped_at = time.perf_counter()
        if not self.ended:
            self.upload_best()
            recovery.hold("uploaded", self.number)
            with self.timing("perf_mlflow_s"):
                self.logger.end(status, reason=reason, outcome=outcome)   # type: ignore[arg-type]
        self.ended = True

    def report(self, metrics: dict[str, float]) -> None:
        """``train``'s per-epoch callback. Ray may stop this trial inside ``tune.report`` (ASHA stops every trial at
        max_t, the last epoch): a trial that ran all its epochs writes everything MLflow needs BEFORE Ray gets
        control back."""
        from ray import tune

        now, metrics = time.perf_counter(), self.costs.add(metrics, self.logger)   # + the costs searched (if any)
        train_s = self.n_train / metrics["images_per_s"]
        self.perf["perf_train_s"] += train_s
        self.perf["perf_eval_s"] += max(0.0, metrics["epoch_s"] - train_s)
        self.perf["perf_ckpt_s"] += max(0.0, now - self.mark - metrics["epoch_s"])   # last.pt/best.pt by train
        if int(metrics["epoch"]) > self.logged:
            with self.timing("perf_mlflow_s"):
                self.logger.log_epoch(metrics, step=int(metrics["epoch"]))
        recovery.hold("logged", self.number, int(metrics["epoch"]))
        if metrics["epoch"] >= self.run.train.epochs:
            self.end("FINISHED")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"drcaps-{self.trial_id}-ckpt-") as d:
            for name in (LAST, BEST):    # last.pt to resume; best.pt, the weights uploaded at the end (links: no copy)
                if (self.work / name).exists():
                    os.link(self.work / name, Path(d) / name)
            checkpoint = tune.Checkpoint.from_directory(d)
            self.perf["perf_ckpt_s"] += time.perf_counter() - t0
            with self.timing("perf_tune_s"):                   # hand-off to Tune, which persists the checkpoint
                tune.report({**metrics, "mlflow_run_id": self.run_id}, checkpoint=checkpoint)
        self.mark = time.perf_counter()

    def report_last(self) -> None:
        """The restored checkpoint holds the last epoch (the trial had ended when the driver was killed, before Tune
        saved that it had): that epoch's metrics to Tune once more, so the searcher and the live view end the trial
        with its values. MLflow has them already."""
        from ray import tune

        self.end("FINISHED")
        tune.report({**self.costs.add(self.restored), "mlflow_run_id": self.run_id})

    def close(self) -> None:
        """The working folder gone and the whole breakdown logged once (an earlier attempt's stands), the trial's
        end as teardown."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.perf["perf_teardown_s"] = time.perf_counter() - (self.stopped_at or self.mark)
        self.perf["perf_wall_s"] = time.perf_counter() - self.entry + self.perf["perf_startup_s"]
        if self.perf_logged:                                  # step 0 logged once: no duplicate step
            return
        with contextlib.suppress(Exception):                  # never hide the trial's own outcome
            self.logger.log_epoch({**self.perf, "perf_worker_trials": WORKER.trials}, step=0)


def run_trial(params: dict[str, Any], ctx: TrialContext, datasets: Datasets | None = None) -> None:
    """One Ray trial: train with the proposed params, report each epoch to Tune and MLflow, checkpoint each epoch;
    a stop by Ray, a divergence and a crash each end the MLflow run once, with its outcome."""
    from ray import tune

    startup = WORKER.start()
    # A stopped trial's thread gets SystemExit inside tune.report and then uploads its best checkpoint; Tune waits
    # this long (its default: 2 s) before giving up on reusing the actor. Read by Ray in this process.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    trial = TrialRecorder(ctx, dict(params), startup)
    done = threading.Event()
    WORKER.ending.append(done)
    try:
        remove_temp_folders([trial.trial_id], keep=trial.work)   # a killed earlier attempt of this trial left them
        trial.restore()
        recovery.hold("started", trial.number)
        if trial.restored.get("epoch", 0) >= trial.run.train.epochs:
            trial.report_last()                                  # the checkpoint holds the last epoch
        else:
            data = trial.data(datasets)
            run = trial.run
            train(run.model, run.data, run.train, trial.report, checkpoint_dir=trial.work, resume=trial.resume,
                  datasets=data)
        trial.stopped_at = time.perf_counter()
    except SystemExit:                   # Ray stopped this trial inside tune.report: the scheduler, or Ctrl-C
        trial.end("KILLED", outcome="interrupted")   # the driver records a scheduler's stop as stopped_early
        raise
    except DivergedError as e:           # deterministic: a retry from the last checkpoint would diverge again
        trial.end("FAILED", reason=str(e))
        # Not raised to Ray, which would retry it (search.max_failures, -1 = forever): one last report carries the
        # metric as NaN (the searcher tells Optuna FAIL) and the reason (FAILURE_KEY: the ranking counts it failed).
        tune.report({"epoch": e.epoch, ctx.experiment.search.metric: math.nan, FAILURE_KEY: str(e),
                     "mlflow_run_id": trial.run_id})
    except BaseException as e:
        trial.end("FAILED", reason=str(e) if isinstance(e, DrcapsError) else f"{type(e).__name__}: {e}")
        raise
    finally:
        trial.close()
        WORKER.idle_since = time.perf_counter()
        done.set()
        WORKER.ending.remove(done)
