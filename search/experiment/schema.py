"""The search side of an experiment as frozen dataclasses: the space, the scheduler, the resources, the search, the
tracking, and the :class:`Experiment` that holds them with the run config (``drcapsnet.config``).

Each dataclass checks its own values: ``problems()`` lists them as data (:class:`~drcapsnet.errors.Problem`, the
dotted field and what is wrong) and ``__post_init__`` raises them in one :class:`ConfigError`. Reading a file and
reporting every problem of it at once is ``search/experiment/validate.py``'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from drcapsnet.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from drcapsnet.errors import Problem, need, raise_problems
from search.experiment.objectives import measured_costs, objective_pairs, objective_problems
from search.experiment.space_spec import ParamSpec, is_number

METRICS: tuple[str, ...] = ("val_acc", "val_loss", "train_loss", "test_acc", "test_loss", "images_per_s", "epoch_s")
SAMPLERS: tuple[str, ...] = ("tpe", "random", "cmaes", "gp", "qmc", "nsga2")
SCHEDULERS: tuple[str, ...] = ("asha", "median", "none")
SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
TOP_LEVEL: tuple[str, ...] = ("name", "model", "data", "train", "search", "tracking", "result")

_NAME = re.compile(r"[A-Za-z0-9._-]+")
# A name becomes file and folder names (``<name>-smoke.best.trials.csv``, ``<name>-smoke-<date>-<time>-<hex>``: +29)
# that must fit the filesystem's 255 bytes, and MLflow names (``<name>-capsnet-smoke``, run names) that must fit its
# 250-character columns: 128 leaves room for every suffix.
MAX_NAME_BYTES = 128


def _whole_or_fraction(value: float) -> bool:
    return value <= 1 or float(value).is_integer()        # Ray: quantities above 1 must be whole


def name_problem(name: Any) -> Problem | None:
    """Why ``name`` cannot name an experiment (it names Ray folders, MLflow experiments and files), or None."""
    if name is None:
        return Problem("name", "required (letters, digits, '.', '_' or '-')")
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        return Problem("name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
    return long_name_problem("name", name)


def long_name_problem(field: str, name: str) -> Problem | None:
    """A name longer than MAX_NAME_BYTES (UTF-8) cannot name files and MLflow records once suffixed."""
    size = len(name.encode("utf-8"))
    if size <= MAX_NAME_BYTES:
        return None
    return Problem(field, f"{name[:20]!r}... is {size} bytes long, at most {MAX_NAME_BYTES} (it names files, folders "
                          "and MLflow records, with suffixes such as -smoke.best.trials.csv); shorten it")


def grace_period_problem(scheduler: SchedulerConfig, epochs: int) -> Problem | None:
    """ASHA and the median rule never stop a trial before ``grace_period`` epochs: at or above ``train.epochs`` the
    scheduler stops nothing, quietly. Checked on the experiment as written (``--smoke-test`` runs 1 epoch of it)."""
    if scheduler.name == "none" or scheduler.grace_period <= 1 or scheduler.grace_period < epochs:
        return None
    return Problem("search.scheduler.grace_period",
                   f"{scheduler.grace_period} is not below train.epochs ({epochs}), so {scheduler.name} would never "
                   f"stop a trial; {f'set it below {epochs}, ' if epochs > 1 else ''}raise train.epochs, or set "
                   "search.scheduler.name: none")


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping by the Tune scheduler; ``none`` runs every trial to ``train.epochs``."""

    name: Literal["asha", "median", "none"] = "asha"
    grace_period: int = 1                  # epochs before a trial can be stopped
    reduction_factor: float = 2.0          # ASHA: keep 1/reduction_factor of the trials at each rung

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        need(out, self.name in SCHEDULERS,
             "search.scheduler.name", f"must be one of {', '.join(SCHEDULERS)}, got {self.name!r}")
        need(out, isinstance(self.grace_period, int) and self.grace_period >= 1,
             "search.scheduler.grace_period", f"must be an integer >= 1, got {self.grace_period!r}")
        need(out, is_number(self.reduction_factor) and self.reduction_factor > 1,
             "search.scheduler.reduction_factor", f"must be a number > 1, got {self.reduction_factor!r}")
        return out


@dataclass(frozen=True)
class ResourcesConfig:
    """Per trial. ``gpu`` may be fractional: 0.25 packs 4 trials on one GPU."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        for name in ("cpu", "gpu"):
            value = getattr(self, name)
            need(out, is_number(value) and value >= 0 and _whole_or_fraction(value), f"search.resources.{name}",
                 f"must be a number >= 0, a fraction or a whole number, got {value!r}")
        return out


@dataclass(frozen=True)
class ConfirmConfig:
    """Confirm the winner before crowning it (search/tune/confirm.py): the ``top_k`` configs by the one ranking
    (with several objectives: the first ``top_k`` Pareto front members by ``search.pick``) are trained again
    ``seeds`` times with new seeds (model init and data order; ``resplit``: also a fresh validation split drawn from
    the training data); the pick is the best mean over those runs (several objectives: the pick rule on the
    confirmed means, search/publish/front.py)."""

    top_k: int = 3
    seeds: int = 3
    resplit: bool = False

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        for name in ("top_k", "seeds"):
            value = getattr(self, name)
            need(out, isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"search.confirm.{name}", f"must be an integer >= 1, got {value!r} (leave search.confirm out to "
                 "crown the raw best)")
        need(out, isinstance(self.resplit, bool), "search.confirm.resplit",
             f"must be true or false, got {self.resplit!r}")
        return out


@dataclass(frozen=True)
class SearchConfig:
    """What to search, with which sampler and scheduler, on which resources."""

    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    # Several objectives (search/experiment/objectives.py): [{metric, mode}, ...]; metric/mode are then the first's.
    objectives: tuple[dict[str, Any], ...] = ()
    constraints: dict[str, dict[str, float]] = field(default_factory=dict)   # {metric: {max: V} and/or {min: V}}
    pick: str | dict[str, Any] = "knee"    # the pick from the front: knee | {maximize|minimize: M, subject_to: ...}
    num_samples: int = 8
    max_concurrent: int = 2
    seed: int = 0
    sampler: Literal["tpe", "random", "cmaes", "gp", "qmc", "nsga2"] = "tpe"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    time_budget_s: float | None = None
    max_failures: int = 1                  # Ray retries of a crashed trial; -1 = retry forever
    keep_checkpoints: int = 2
    storage: str | None = None             # Optuna RDB URL; None = SQLite next to the MLflow store (search/tune/)
    enqueue: tuple[dict[str, Any], ...] = ()   # known-good points tried first; dotted names -> values
    space: dict[str, ParamSpec] = field(default_factory=dict)   # dotted config names -> spec; required
    confirm: ConfirmConfig | None = None   # None: the raw best is crowned (search/tune/confirm.py)
    # {experiment: NAME, allow_changed: [fields]}: seed the study with NAME's latest search (search/warm_start.py)
    warm_start: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enqueue", tuple(dict(point) for point in self.enqueue))
        object.__setattr__(self, "objectives", tuple(dict(o) if isinstance(o, dict) else o for o in self.objectives))
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        need(out, bool(self.objectives) or self.metric in METRICS,      # with objectives: objective_problems
             "search.metric", f"must be one of {', '.join(METRICS)}, got {self.metric!r}")
        need(out, self.mode in ("max", "min"), "search.mode", f"must be one of max, min, got {self.mode!r}")
        for name in ("num_samples", "max_concurrent", "keep_checkpoints"):
            value = getattr(self, name)
            need(out, isinstance(value, int) and value >= 1,
                 f"search.{name}", f"must be an integer >= 1, got {value!r}")
        need(out, isinstance(self.seed, int), "search.seed", f"must be an integer, got {self.seed!r}")
        need(out, self.sampler in SAMPLERS,
             "search.sampler", f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        out += objective_problems(self.objectives, self.constraints, self.pick, metric=self.metric, mode=self.mode,
                                  sampler=self.sampler, scheduler=self.scheduler.name)
        need(out, self.time_budget_s is None or (is_number(self.time_budget_s) and self.time_budget_s > 0),
             "search.time_budget_s", f"must be null or a number > 0, got {self.time_budget_s!r}")
        need(out, isinstance(self.max_failures, int) and self.max_failures >= -1,
             "search.max_failures", f"must be an integer >= -1 (-1 = retry forever), got {self.max_failures!r}")
        need(out, self.storage is None or bool(self.storage), "search.storage", "must be null or a non-empty URL")
        need(out, self.confirm is None or not isinstance(self.confirm.top_k, int) or
             not isinstance(self.num_samples, int) or self.num_samples < 1 or
             self.confirm.top_k <= self.num_samples, "search.confirm.top_k",
             f"{getattr(self.confirm, 'top_k', None)!r} is above search.num_samples ({self.num_samples!r}); set it "
             "to at most num_samples")
        need(out, self.warm_start is None or (isinstance(self.warm_start.get("experiment"), str) and bool(
            self.warm_start["experiment"])), "search.warm_start.experiment", "required: the MLflow experiment whose "
             "latest search seeds this one")
        need(out, bool(self.space), "search.space", "required, at least one parameter, "
             "e.g. train.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}")
        return out

    @property
    def objective_pairs(self) -> tuple[tuple[str, str], ...]:
        """``(metric, mode)`` of each objective: ``objectives``, or the one ``metric``/``mode``."""
        return objective_pairs(self.objectives, self.metric, self.mode)

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_pairs) > 1

    @property
    def measured_costs(self) -> tuple[str, ...]:
        """The cost metrics (params, flops, latency_ms, train_s_per_epoch) a trial must measure for this search."""
        return measured_costs(self.objectives, self.constraints, self.pick)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. None everywhere = a local SQLite store in the cwd, experiment and model named after the file."""

    uri: str | None = None                 # None = sqlite:///<abs cwd>/mlflow.db (search/tracking/)
    experiment: str | None = None          # None = the experiment's name
    registered_model: str | None = None    # None = f"{experiment}-capsnet"

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        for name in ("uri", "experiment", "registered_model"):
            value = getattr(self, name)
            need(out, value is None or bool(value), f"tracking.{name}", "must be null or a non-empty string")
            if name != "uri" and isinstance(value, str) and (long := long_name_problem(f"tracking.{name}", value)):
                out.append(long)
        return out


@dataclass(frozen=True)
class Experiment:
    """One experiment file, validated. Equality ignores ``path`` (where it was loaded from)."""

    name: str
    run: RunConfig
    search: SearchConfig
    tracking: TrackingConfig
    path: Path | None = field(default=None, compare=False)   # the file it was loaded from (absolute)
    result: dict[str, Any] | None = None   # written by search/export.py: metrics, params, run id, model URI

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        raise_problems([problem] if problem else [])

    @property
    def mlflow_experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or f"{self.mlflow_experiment}-capsnet"
