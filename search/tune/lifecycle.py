"""A search run from its plan (search/plan.py), as the lifecycle reads: start Ray (or join it), open (or reopen)
the search's records, fit the tuner (a Ctrl-C is an interrupt to resume, not an end), close every trial record,
confirm the top-k (search/tune/confirm.py), and hand back what was recorded (search/tune/results.py). No registry,
no report, no export: search/publish.py does everything after.

``run_search`` is the lifecycle; each step below it is one function. Where a search keeps its state:
``<storage>/<experiment>/drcaps-search.json`` (what ``--resume`` reads), Tune's folder
``<storage>/<experiment>/<study>/`` (and ``<study>-confirm/``), the MLflow parent run and the Optuna study, both
named after the study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from search import earlier, preflight, state, tracking
from search.experiment import Experiment, experiment_to_dict
from search.plan import SearchPlan
from search.state import STATE_FILE
from search.storage import create_optuna_schema
from search.stores import masked
from search.tune import diskspace, extend, lean, live, recovery, runtime, studies
from search.tune.rescue import rescue_best_checkpoints
from search.tune.results import (
    SearchRecords,
    close_trial_runs,
    fail_if_none_scored,
    prune_checkpoints,
    recorded_trial_ids,
    summaries,
)
from search.tune.searcher import make_scheduler, trial_dirname
from search.tune.trial import TrialContext, remove_temp_folders, run_trial, shared_datasets

if TYPE_CHECKING:
    from drcapsnet.data import Datasets

T = TypeVar("T")


def run_search(plan: SearchPlan, verbose: int = 1) -> SearchRecords:
    """Run the plan's search (and its confirmation) and return what it recorded, trials ranked.

    ``verbose``: 0 silent, 1 the live view (search/progress.py), 2 also Ray Tune's own tables and library logs.
    """
    from search.tune.confirm import confirm

    with _ray_and_lock(plan, verbose, lambda: _prepare(plan)) as datasets:     # stores, data
        search = (_reopen(plan) if plan.resume else OpenSearch(plan, *extend.extension(plan)) if plan.extend
                  else _open(plan))                                            # parent run, study
        with _killed_on_exit(search):                         # error or Ctrl-C: parent run KILLED, re-raised
            results = _fit(_tuner(search, verbose, datasets), search, verbose)
        trials = _close(search, results)                      # Optuna, MLflow trial runs
        fail_if_none_scored(search.uri, search.parent_run_id, trials)
        confirmations = ()
        if plan.experiment.search.confirm is not None:
            with _killed_on_exit(search):
                confirmations = confirm(search, trials, datasets, verbose)
        prune_checkpoints(plan.folder)
        return SearchRecords(plan.experiment, trials, search.uri, search.parent_run_id, search.study_name,
                             search.storage_url, str(search.folder), confirmations)


def search_params(exp: Experiment) -> dict[str, Any]:
    """The parent run's params: how the search was set up and what it searched (``space.<field>``), not the base
    config's values of searched fields (those are in its ``resolved_experiment.json`` artifact)."""
    s = exp.search
    space = {f"space.{name}": (f"{spec.type} {list(spec.choices)}" if spec.type == "categorical" else
                               f"{spec.type} [{spec.low}, {spec.high}]" + (" log" if spec.log else ""))
             for name, spec in s.space.items()}
    confirm = {} if s.confirm is None else {"search.confirm.top_k": s.confirm.top_k,
                                            "search.confirm.seeds": s.confirm.seeds,
                                            "search.confirm.resplit": s.confirm.resplit}
    return {"search.sampler": s.sampler, "search.scheduler": s.scheduler.name, "search.seed": s.seed,
            "search.num_samples": s.num_samples, "search.metric": s.metric, "search.mode": s.mode,
            "search.max_concurrent": s.max_concurrent, "data.dataset": exp.run.data.dataset,
            "train.epochs": exp.run.train.epochs} | confirm | space


# ---------------------------------------------------------------------------------------------- the steps

@dataclass(frozen=True)
class OpenSearch:
    """One search's records, opened: its plan, the study name every record shares, the MLflow parent run (what the
    state file holds, so ``--resume`` finds them again)."""

    plan: SearchPlan
    study_name: str
    parent_run_id: str
    tune_name: str = ""               # Tune's folder when not the study's name: an extension's <study>-extend-<k>

    @property
    def exp(self) -> Experiment:
        return self.plan.experiment

    @property
    def uri(self) -> str:
        return self.plan.tracking_uri

    @property
    def storage_url(self) -> str:
        return self.plan.storage_url

    @property
    def folder(self) -> Path:     # Tune's experiment folder
        return self.plan.folder / (self.tune_name or self.study_name)


@contextlib.contextmanager
def _ray_and_lock(plan: SearchPlan, verbose: int, prepare: Callable[[], T]) -> Iterator[T]:
    """Ray started here or joined (``plan.address``), its resources checked against the search's, the libraries'
    chatter down for the block, and the one lock of this experiment's storage folder held (checked free by the plan).
    Yields what ``prepare()`` returned: it runs while a local Ray starts (seconds each: a fresh MLflow store's
    schema, the data), and after ``ray.init`` for a cluster, so a bad address leaves nothing behind."""
    exp, address = plan.experiment, plan.address
    resources = dataclasses.asdict(exp.search.resources)
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:                                 # a local Ray gets this machine's CPUs/GPUs
        preflight.check_resources(resources, {"CPU": float(os.cpu_count() or 1),
                                              "GPU": float(torch.cuda.device_count())}, None)
    # Trials checkpoint every epoch, so Tune snapshots its state often and, with sub-second GPU epochs, warns every
    # few seconds, burying the progress view (seen on an H200): off for the search unless the user set it. Tune's
    # automatic per-trial loggers are off too (search/tune/lean.py puts back the one drcaps reads).
    with runtime.quiet_logs(verbose), runtime.scoped_env(
            {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", **lean.LEAN_ENV}, keep_users=True):
        with ThreadPoolExecutor(1, thread_name_prefix="drcaps-prepare") as pool:
            prepared = pool.submit(prepare) if local else None
            runtime.init_ray(address, verbose)    # a cluster: before any record, a bad --address leaves nothing
            value = prepared.result() if prepared is not None else prepare()
        preflight.check_resources(resources, runtime.cluster_resources(), address)
        held = state.SearchLock(plan.folder / state.LOCK_FILE).acquire(exp.name)
        try:
            yield value
        finally:
            held.release()


def _prepare(plan: SearchPlan) -> Datasets | None:
    """What a search needs before its first record, in seconds each, done while Ray starts: the MLflow store's
    schema and the experiment (a fresh SQLite store takes ~10 s of migrations), the Optuna storage's tables, and
    the data every trial will share (search/tune/trial.py ``shared_datasets``)."""
    tracking.ensure_experiment(plan.tracking_uri, plan.experiment.mlflow_experiment)
    create_optuna_schema(plan.storage_url)
    return shared_datasets(plan.experiment)


def _open(plan: SearchPlan) -> OpenSearch:
    """A new search: its study name, its MLflow parent run (setup, space, versions, files)."""
    import optuna
    import ray

    exp = plan.experiment
    study_name = state.study_name(exp.name)
    parent_run_id = tracking.start_search_run(
        plan.tracking_uri, exp.mlflow_experiment, run_name=study_name, params=search_params(exp),
        tags={"drcaps.study_name": study_name, "drcaps.experiment_file": str(exp.path or ""),
              "drcaps.optuna_storage": masked(plan.storage_url),
              **({tracking.SMOKE_TAG: "true"} if plan.smoke_test else {}),
              "git.commit": _git_commit(), "version.ray": ray.__version__, "version.optuna": optuna.__version__,
              "version.torch": torch.__version__, "version.python": platform.python_version()},
        artifacts={"experiment.yaml": exp.path.read_text() if exp.path and exp.path.exists() else "",
                   "resolved_experiment.json": json.dumps(experiment_to_dict(exp), indent=2, default=str),
                   "search_space.json": json.dumps({k: dataclasses.asdict(v) for k, v in exp.search.space.items()},
                                                   indent=2, default=str)})
    return OpenSearch(plan, study_name, parent_run_id)


def _reopen(plan: SearchPlan) -> OpenSearch:
    """The interrupted search of this experiment (its state file): parent run RUNNING again, study in step."""
    saved = json.loads((plan.folder / STATE_FILE).read_text())
    recovery.stop_leftovers(saved)                            # what the killed driver's own Ray left running
    (plan.folder / STATE_FILE).write_text(json.dumps({**saved, **recovery.session_record()}))
    search = OpenSearch(plan, saved["study_name"], saved["parent_run_id"], saved.get("tune_name", ""))
    recovery.repair_tune_state(search.folder, saved.get("ray_session_dir"))   # a state cut short by the kill
    tracking.reopen_run(search.uri, search.parent_run_id)
    studies.reconcile_study(search.storage_url, search.study_name, search.folder)
    return search


@contextlib.contextmanager
def _killed_on_exit(search: OpenSearch) -> Iterator[None]:
    try:
        yield
    except BaseException:
        tracking.end_run(search.uri, search.parent_run_id, "KILLED")
        raise


def _tuner(search: OpenSearch, verbose: int, datasets: Datasets | None) -> Any:
    """Tune's ``Tuner``: restored from the search's folder, or new (searcher, scheduler, trial resources; the state
    file written). The data goes into Ray's object store once (``with_parameters``) when every trial uses the same;
    ``reuse_actors`` keeps a trial worker (its process, its imports) for the next trial."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    exp, s = search.exp, search.exp.search
    ctx = TrialContext(exp, search.uri, exp.mlflow_experiment, search.parent_run_id, s.resources.cpu, s.resources.gpu)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx, datasets=datasets),
                                    {"cpu": s.resources.cpu, "gpu": s.resources.gpu})
    if search.plan.resume:
        return tune.Tuner.restore(str(search.folder), trainable, resume_unfinished=True, resume_errored=True)
    searcher = extend.searcher(search)            # first: a warm start's taken trials, in the study, start the rungs
    taken = (earlier.taken_curves(search.storage_url, search.study_name, [m for m, _ in s.objective_pairs])
             if search.plan.warm_start is not None else [])
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, num_samples=search.plan.extend or s.num_samples,
            time_budget_s=s.time_budget_s, reuse_actors=True, trial_dirname_creator=trial_dirname,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=make_scheduler(exp, exp.run.train.epochs, taken)),
        run_config=tune.RunConfig(
            # Ray's own tables only under -v (verbose 2): the live view (search/progress.py) is the default.
            name=search.folder.name, storage_path=str(search.plan.folder), verbose=0 if verbose < 2 else 2,
            callbacks=[live.progress_callback(exp.run.train.epochs), *lean.lean_callbacks()],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints, checkpoint_score_attribute=s.metric,
                                                    checkpoint_score_order=s.mode)))
    search.plan.folder.mkdir(parents=True, exist_ok=True)
    (search.plan.folder / STATE_FILE).write_text(json.dumps({
        "parent_run_id": search.parent_run_id, "study_name": search.study_name,
        "storage_url": masked(search.storage_url), "tracking_uri": search.uri, "tune_name": search.tune_name,
        **recovery.session_record()}))
    return tuner


def _fit(tuner: Any, search: OpenSearch, verbose: int) -> Any:
    """``tuner.fit()`` under the live view; raises KeyboardInterrupt when it ended because of Ctrl-C."""
    import ray
    from ray import tune

    exp, s = search.exp, search.exp.search
    # Through Ray Client (ray://) fit() runs on the cluster: no Tune handler here, Ctrl-C raises as usual.
    tune_catches = (not ray.util.client.ray.is_connected()
                    and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")))   # the switch Tune reads
    threading.Thread(target=runtime.warm_end_of_search, name="drcaps-warm", daemon=True).start()
    view = live.make_view(search.plan.extend or s.num_samples, s.metric, s.mode, exp.run.train.epochs, list(s.space),
                          verbose)
    disks = diskspace.places_of(search.plan.storage_root, search.uri, search.storage_url)   # room kept, or stop
    with runtime.tune_interrupt_watch(tune_catches) as interrupted, live.showing(view), diskspace.watching(
            disks, search.folder, s.max_concurrent, search.plan.resume_command(), enabled=tune_catches):
        results = tuner.fit()                                 # a disk short of room: stopped as by Ctrl-C, one line
    # Ray Tune handles the first SIGINT itself: it saves the experiment state, stops the trials (in memory they
    # all read TERMINATED now) and fit() RETURNS as if the search had ended. That is an interrupt, to be continued
    # with --resume. Where the watch stays out (Ray Client, TUNE_DISABLE_SIGINT_HANDLER=1, where Tune still stops
    # on SIGUSR1), the saved state showing a trial that had not ended says so instead.
    if interrupted() or (search.folder.exists() and any(t.status not in ("TERMINATED", "ERROR")
                                                         for t in tune.ExperimentAnalysis(str(search.folder)).trials)):
        raise KeyboardInterrupt
    return results


def _close(search: OpenSearch, results: Any) -> list:
    """Temporary folders gone, no Optuna trial left open, every MLflow trial run ended: the ranked trials."""
    s = search.exp.search
    # A trial Tune killed 5 s after the end, before its upload: its best.pt from its worker's folder (rescue.py).
    rescue_best_checkpoints(search.uri, tracking.child_runs(search.uri, search.parent_run_id))
    # Every trial of this search, those a killed driver lost included (they have an MLflow run, no Ray result).
    remove_temp_folders([str((r.metrics or {}).get("trial_id")) for r in results if (r.metrics or {}).get("trial_id")]
                        + recorded_trial_ids(search.uri, search.parent_run_id))
    results = [*extend.earlier_results(search), *results]       # an extension ranks every trial of the search
    studies.close_study(search.storage_url, search.study_name, results, s.metric, s.mode)
    trials = summaries(results, s.metric, s.mode, search.exp.run.train.epochs)
    return close_trial_runs(search.uri, search.parent_run_id, trials)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
