"""A search decided once, before any work: :func:`make_plan` turns (experiment file, ``--set`` overrides, flags) into
a frozen :class:`SearchPlan`: the experiment as it will run (``--smoke-test`` applied here, once), the resolved
tracking URI, Optuna storage and storage folder, the output files, and every up-front check done exactly once.

``search.tune.run_search`` runs a plan; ``search.publish`` takes the plan and what the run recorded. Nothing here
starts Ray or writes a record: a bad input is one DrcapsError line (exit code 2) and the working folder unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from drcapsnet.errors import UsageError
from search import cluster_auth, earlier, preflight, state, tracking
from search.experiment import Experiment, load_experiment
from search.storage import optuna_storage_url

NODE_TRACKING_ENV = "MLFLOW_TRACKING_URI"   # MLflow's own variable; docker-compose.yml sets it on every Ray node
NODE_STORAGE_ENV = "DRCAPS_STORAGE_PATH"     # Ray's storage_path as the cluster's nodes see it (a shared volume)
SMOKE_TRAIN_IMAGES = 256                     # --smoke-test: 2 trials x 1 epoch on at most this many training images


@dataclass(frozen=True)
class SearchPlan:
    """One search, decided: what runs, where it is recorded, where its outputs go, and how to resume it."""

    experiment: Experiment            # as it will run (smoke applied)
    tracking_uri: str                 # resolved MLflow tracking URI
    storage_url: str                  # the Optuna storage (RDB URL)
    storage_root: Path                # Ray's results: <storage_root>/<experiment>/<study>/
    out: Path                         # the exported best config; the CSV and the report sit beside it
    address: str | None = None        # a Ray cluster to join (None: Ray starts here)
    resume: bool = False
    smoke_test: bool = False
    default_uri: bool = True          # neither the command line nor the machine named a tracking URI
    source: Path | None = None        # the experiment file as the user named it (for the resume hint)
    flags: tuple[tuple[str, str], ...] = ()   # the flags the user gave that a resume must repeat
    extend: int | None = None         # --extend N: N more trials of the finished search ``extends``
    extends: earlier.EarlierSearch | None = None
    warm_start: earlier.EarlierSearch | None = None   # search.warm_start: the search whose trials seed this one

    @property
    def folder(self) -> Path:
        """``<storage root>/<experiment>``: the state file, the lock, one Tune folder per study."""
        return self.storage_root / self.experiment.name

    @property
    def csv(self) -> Path:
        return self.out.with_suffix(".trials.csv")

    @property
    def report(self) -> Path:
        return self.out.with_name(f"{self.experiment.name}.report.html")

    def resume_command(self) -> str:
        """The command that continues this search after an interrupt."""
        return (f"drcaps search {self.source or self.experiment.path} --resume"
                + "".join(f" {flag} {value}" for flag, value in self.flags)
                + (" --smoke-test" if self.smoke_test else ""))


def node_defaults(tracking_uri: str | None, storage_path: Path | None, exp: Experiment) -> tuple[str | None,
                                                                                                  Path | None]:
    """``(tracking_uri, storage_path)``, each filled in, where the command line and the experiment say nothing, by
    the machine the search driver runs on: ``MLFLOW_TRACKING_URI`` and ``DRCAPS_STORAGE_PATH`` (the Optuna storage:
    ``DRCAPS_OPTUNA_STORAGE``, search/storage.py). On a node of docker-compose.yml they name the stack's MLflow
    server, its shared ``runs`` volume and its PostgreSQL; elsewhere they are usually unset."""
    if tracking_uri is None and os.environ.get(NODE_TRACKING_ENV) and exp.tracking.uri is None:
        tracking_uri = os.environ[NODE_TRACKING_ENV]
    if storage_path is None and os.environ.get(NODE_STORAGE_ENV):
        storage_path = Path(os.environ[NODE_STORAGE_ENV])
    return tracking_uri, storage_path


def smoke_experiment(exp: Experiment) -> Experiment:
    """2 trials x 1 epoch on at most 256 training images, no confirmation: checks the wiring in a minute."""
    run = exp.run
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, epochs=1), data=dataclasses.replace(
        run.data, limit_train=min(run.data.limit_train or SMOKE_TRAIN_IMAGES, SMOKE_TRAIN_IMAGES)))
    # One epoch leaves a scheduler nothing to stop (and its grace period would outlast the run): none.
    search = dataclasses.replace(exp.search, num_samples=2, time_budget_s=None,
                                 scheduler=dataclasses.replace(exp.search.scheduler, name="none"))
    if search.confirm is not None:
        search = dataclasses.replace(search, confirm=None)
    search = dataclasses.replace(search, warm_start=None)   # one epoch: another metric than the source's
    # Apart from the real searches: its own name (Ray folder, lock, export file), MLflow experiment and registered
    # model, and its parent run tagged drcaps.smoke_test, so no "latest"/"best" lookup of the real experiment sees it.
    smoke_tracking = dataclasses.replace(exp.tracking, experiment=f"{exp.mlflow_experiment}-smoke",
                                         registered_model=f"{exp.registered_model}-smoke")
    return dataclasses.replace(exp, name=f"{exp.name}-smoke", run=run, search=search, tracking=smoke_tracking)


def make_plan(experiment: Path | Experiment, overrides: list[str] | tuple[str, ...] = (), *,
              address: str | None = None, tracking_uri: str | None = None, storage_path: Path | None = None,
              out: Path | None = None, resume: bool = False, smoke_test: bool = False,
              check_data: bool = True, extend: int | None = None) -> SearchPlan:
    """The search of ``experiment`` (a file, with the dotted ``overrides``; or an Experiment already loaded),
    decided and checked: raises a DrcapsError on any bad input, writes nothing. ``check_data``: load the data once
    up front (the command does; a library caller that has just loaded it may skip it)."""
    for flag, value in (("--tracking-uri", tracking_uri), ("--address", address)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag}: empty; leave it out for the default, or give a value")
    if extend is not None and extend < 1:
        raise UsageError(f"--extend: {extend} trials; give the number of trials to add, 1 or more")
    if extend is not None and resume:
        raise UsageError("--extend: cannot be combined with --resume; finish the interrupted search with --resume "
                         "first, then extend it")
    loaded = experiment if isinstance(experiment, Experiment) else load_experiment(experiment, list(overrides))
    exp = smoke_experiment(loaded) if smoke_test else loaded
    given_uri, given_storage = tracking_uri, storage_path
    tracking_uri, storage_path = node_defaults(tracking_uri, storage_path, exp)
    uri = tracking.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    plan = SearchPlan(
        experiment=exp, tracking_uri=uri, storage_url=optuna_storage_url(exp, uri),
        storage_root=Path(storage_path or Path.cwd() / "drcaps-runs").resolve(),
        out=(out or Path.cwd() / f"{exp.name}.best.yaml").resolve(), address=address, resume=resume,
        smoke_test=smoke_test, default_uri=tracking_uri is None and exp.tracking.uri is None,
        source=experiment if isinstance(experiment, Path) else None,
        flags=tuple((f, str(v)) for f, v in (("--storage-path", given_storage), ("--tracking-uri", given_uri),
                                             ("--address", address)) if v), extend=extend)
    check_plan(plan, check_data=False)
    if extend is not None:                   # the earlier search (MLflow, state file): before the data's seconds
        plan = dataclasses.replace(plan, extends=earlier.finished_search(
            exp, plan.folder, uri, plan.storage_url, plan.resume_command()))
    elif not resume:
        plan = dataclasses.replace(plan, warm_start=earlier.warm_start_source(exp, uri, plan.storage_url))
    if check_data:
        preflight.check_data(exp.run, dict(exp.search.space))
    return plan


def check_plan(plan: SearchPlan, *, check_data: bool = True) -> None:
    """Every up-front check of a search, once: outputs, tracking store and names, storage folder and resume state,
    Optuna storage, the metric in every epoch's report, the lock, the address, the space's corners, the data."""
    exp, s = plan.experiment, plan.experiment.search
    for path in (plan.out, plan.csv, plan.report):
        preflight.check_output("--out", path)
    tracking.check_tracking_uri(plan.tracking_uri)
    cluster_auth.check_mlflow_login(plan.tracking_uri)     # a server with a login: ours works
    tracking.check_names(exp.mlflow_experiment, exp.registered_model)
    preflight.check_storage(plan.storage_root, exp.name, plan.resume)
    preflight.check_optuna_storage(plan.storage_url)
    preflight.check_metric_every_epoch(s.metric, exp.run.train.epochs, exp.run.train.eval_interval, s.space,
                                       s.scheduler.name)
    if not plan.extend:                                    # --extend says more (earlier.finished_search)
        state.SearchLock(plan.folder / state.LOCK_FILE).check_free(exp.name)
    preflight.check_address(plan.address)
    preflight.check_space_corners(exp)
    if check_data:
        preflight.check_data(exp.run, dict(s.space))
