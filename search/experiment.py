"""Experiment files: one YAML (or JSON) -> validated, frozen configs; every problem reported at once.

Layout (top-level keys ``name``, ``model``, ``data``, ``train``, ``search``, ``tracking``, ``result``)::

    name: quickstart
    model: {preset: small, units: 8}        # preset values first, then the other keys
    data:  {dataset: digits, batch_size: 64}
    train: {epochs: 6, lr: 5e-2}             # 5e-2 is a float (YAML 1.2 floats, unlike PyYAML's YAML 1.1)
    search:
      metric: val_acc
      space:
        train.lr: {type: float, low: 1.0e-3, high: 2.0e-1, log: true}
    tracking: {experiment: quickstart}

Overrides (``--set train.lr=3.0e-4``, ``--set search.scheduler.name=none``,
``--set search.space.train.lr.high=0.1``) are applied to the raw mapping before validation, so a bad override is
reported exactly like a bad key in the file.

Paths are made absolute on load, because Ray runs trials in another working directory:
``data.data_dir`` relative to the file's folder (``base_dir`` or the cwd for dicts; the cwd for a ``--set``
override), ``tracking.uri`` and ``search.storage`` relative to the cwd when they are a ``sqlite:///relative.db`` URL
or a plain path (``mlruns``). Every other URI is kept as written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from drcapsnet.config import MODEL_PRESETS, DataConfig, ModelConfig, RunConfig, TrainConfig
from drcapsnet.errors import ConfigError  # an experiment is wrong: one problem per line, "path.key: what is wrong"

METRICS: tuple[str, ...] = ("val_acc", "val_loss", "train_loss", "test_acc", "test_loss", "images_per_s", "epoch_s")
SAMPLERS: tuple[str, ...] = ("tpe", "random", "cmaes", "gp", "qmc")
SCHEDULERS: tuple[str, ...] = ("asha", "median", "none")
PARAM_TYPES: tuple[str, ...] = ("float", "int", "categorical")
SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
TOP_LEVEL: tuple[str, ...] = ("name", "model", "data", "train", "search", "tracking", "result")

_NAME = re.compile(r"[A-Za-z0-9._-]+")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` and ``2E5`` are numbers (YAML 1.1 wants a dot)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """YAML text -> Python, safely, with YAML 1.2 floats (``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


_KEY_PREFIX = re.compile(r"^([\w.]+?)\.(\w+):")                                # "model.units: ..." -> field "units"


def _fail(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole_or_fraction(value: float) -> bool:
    return value <= 1 or float(value).is_integer()        # Ray: quantities above 1 must be whole


def _param_problems(type_: str, low: Any, high: Any, log: bool, step: Any, choices: Sequence[Any]) -> list[str]:
    """Problems of one search-space entry, each ``key: what`` or ``: what`` (for the entry as a whole)."""
    out: list[str] = []
    if type_ == "categorical":
        out += [f"{key}: only for type float or int" for key, v in (("low", low), ("high", high), ("step", step))
                if v is not None]
        if log:
            out.append("log: only for type float or int")
        if not choices:
            out.append("choices: required for type categorical, a non-empty list")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            out.append(f"choices: must be null, booleans, numbers or strings (optuna), got {bad!r}")
        return out
    if choices:
        out.append("choices: only for type categorical")
    kind = "an integer" if type_ == "int" else "a number"
    for key, v in (("low", low), ("high", high)):
        if v is None:
            out.append(f"{key}: required for type {type_}")
        elif not _is_number(v) or (type_ == "int" and not isinstance(v, int)):
            out.append(f"{key}: expected {kind}, got {v!r}")
    if not out and low >= high:
        out.append(f": low must be < high, got low={low!r}, high={high!r}")
    if log and _is_number(low) and low <= 0:
        out.append(f"log: needs low > 0, got low={low!r}")
    if step is not None:
        if not _is_number(step) or step <= 0 or (type_ == "int" and not isinstance(step, int)):
            out.append(f"step: must be {kind} > 0, got {step!r}")
        elif log and (type_ == "float" or step != 1):
            out.append(": log and step cannot be combined (optuna)")
    return out


@dataclass(frozen=True)
class ParamSpec:
    """One search-space entry: ``{type: float, low: 1.0e-4, high: 1.0e-1, log: true}``."""

    type: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        _fail(self.type in PARAM_TYPES, f"type: must be one of {', '.join(PARAM_TYPES)}, got {self.type!r}")
        problems = _param_problems(self.type, self.low, self.high, self.log, self.step, self.choices)
        _fail(not problems, problems[0] if problems else "")
        if self.type == "float":                           # 0 and 1 read from YAML are ints; keep floats floats
            for name in ("low", "high", "step"):
                if getattr(self, name) is not None:
                    object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping by the Tune scheduler; ``none`` runs every trial to ``train.epochs``."""

    name: Literal["asha", "median", "none"] = "asha"
    grace_period: int = 1                  # epochs before a trial can be stopped
    reduction_factor: float = 2.0          # ASHA: keep 1/reduction_factor of the trials at each rung

    def __post_init__(self) -> None:
        _fail(self.name in SCHEDULERS,
              f"search.scheduler.name: must be one of {', '.join(SCHEDULERS)}, got {self.name!r}")
        _fail(isinstance(self.grace_period, int) and self.grace_period >= 1,
              f"search.scheduler.grace_period: must be an integer >= 1, got {self.grace_period!r}")
        _fail(_is_number(self.reduction_factor) and self.reduction_factor > 1,
              f"search.scheduler.reduction_factor: must be a number > 1, got {self.reduction_factor!r}")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per trial. ``gpu`` may be fractional: 0.25 packs 4 trials on one GPU."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cpu", "gpu"):
            value = getattr(self, name)
            _fail(_is_number(value) and value >= 0 and _whole_or_fraction(value),
                  f"search.resources.{name}: must be a number >= 0, a fraction or a whole number, got {value!r}")


@dataclass(frozen=True)
class SearchConfig:
    """What to search, with which sampler and scheduler, on which resources."""

    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    seed: int = 0
    sampler: Literal["tpe", "random", "cmaes", "gp", "qmc"] = "tpe"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    time_budget_s: float | None = None
    max_failures: int = 1                  # Ray retries of a crashed trial; -1 = retry forever
    keep_checkpoints: int = 2
    storage: str | None = None             # Optuna RDB URL; None = SQLite next to the MLflow store (search/tune.py)
    enqueue: tuple[dict[str, Any], ...] = ()   # known-good points tried first; dotted names -> values
    space: dict[str, ParamSpec] = field(default_factory=dict)   # dotted config names -> spec; required

    def __post_init__(self) -> None:
        object.__setattr__(self, "enqueue", tuple(dict(point) for point in self.enqueue))
        _fail(self.metric in METRICS, f"search.metric: must be one of {', '.join(METRICS)}, got {self.metric!r}")
        _fail(self.mode in ("max", "min"), f"search.mode: must be one of max, min, got {self.mode!r}")
        for name in ("num_samples", "max_concurrent", "keep_checkpoints"):
            value = getattr(self, name)
            _fail(isinstance(value, int) and value >= 1, f"search.{name}: must be an integer >= 1, got {value!r}")
        _fail(isinstance(self.seed, int), f"search.seed: must be an integer, got {self.seed!r}")
        _fail(self.sampler in SAMPLERS, f"search.sampler: must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _fail(self.time_budget_s is None or (_is_number(self.time_budget_s) and self.time_budget_s > 0),
              f"search.time_budget_s: must be null or a number > 0, got {self.time_budget_s!r}")
        _fail(isinstance(self.max_failures, int) and self.max_failures >= -1,
              f"search.max_failures: must be an integer >= -1 (-1 = retry forever), got {self.max_failures!r}")
        _fail(self.storage is None or bool(self.storage), "search.storage: must be null or a non-empty URL")
        _fail(bool(self.space), "search.space: required, at least one parameter, "
              "e.g. train.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. None everywhere = a local SQLite store in the cwd, experiment and model named after the file."""

    uri: str | None = None                 # None = sqlite:///<abs cwd>/mlflow.db (search/tracking.py)
    experiment: str | None = None          # None = the experiment's name
    registered_model: str | None = None    # None = f"{experiment}-capsnet"

    def __post_init__(self) -> None:
        for name in ("uri", "experiment", "registered_model"):
            value = getattr(self, name)
            _fail(value is None or bool(value), f"tracking.{name}: must be null or a non-empty string")


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
        _fail(isinstance(self.name, str) and bool(_NAME.fullmatch(self.name)),
              f"name: must be letters, digits, '.', '_' or '-', got {self.name!r}")

    @property
    def mlflow_experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or f"{self.mlflow_experiment}-capsnet"


# ---------------------------------------------------------------------------------------------------- type checks

def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the type hint ``hint``, or None when it does."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if None in problems else problems[0]
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(str, args))}, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, got {value!r}"
    if hint is float:
        if _is_number(value):
            return None
        return f"expected a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {value!r}"
        item = args[0] if args else Any
        problems = [p for v in value if (p := _type_problem(v, item))]
        return f"in {list(value)!r}: {problems[0]}" if problems else None
    if origin is dict or hint is dict:
        return None if isinstance(value, Mapping) else f"expected a mapping, got {type(value).__name__}"
    return None                                            # nested dataclasses: checked by their own section


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _mapping(raw: Any, where: str, issues: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    issues.append(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    return None


def _checked(cls: type, where: str, raw: dict[str, Any], issues: list[str]) -> dict[str, Any]:
    """The keys of ``raw`` that are fields of ``cls`` with a value of the right type; the rest become issues."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            issues.append(f"{where}.{key}: unknown key{_suggest(str(key), valid)}")
        elif problem := _type_problem(value, hints[key]):
            issues.append(f"{where}.{key}: {problem}")
        else:                                              # ints where floats go: 1 -> 1.0, as a float field holds
            accepts = set(typing.get_args(hints[key])) or {hints[key]}
            floaty = float in accepts and int not in accepts
            out[key] = float(value) if floaty and _is_number(value) else value
    return out


def _construct(cls: type, where: str, kwargs: dict[str, Any], issues: list[str]) -> Any:
    """``cls(**kwargs)``, gathering every ``__post_init__`` error: drop the field each one names and retry."""
    kwargs = dict(kwargs)
    failed = False
    while True:
        try:
            obj = cls(**kwargs)
            return None if failed else obj
        except (TypeError, ValueError) as e:
            message = str(e)
            match = _KEY_PREFIX.match(message)
            if not match:
                message = f"{where}: {message}"
            if message not in issues:
                issues.append(message)
            failed = True
            if not match or match.group(2) not in kwargs:
                return None
            del kwargs[match.group(2)]


# ---------------------------------------------------------------------------------------------------- sections

def _absolute_uri(uri: str) -> str:
    """``sqlite:///rel.db`` and plain relative paths -> absolute (cwd); every other URI unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///"):]
        return uri if not rest or rest.startswith(":memory:") else "sqlite:///" + os.path.abspath(rest)
    if ":" not in uri and uri not in ("databricks", "databricks-uc"):
        return os.path.abspath(os.path.expanduser(uri))
    return uri


def _model(raw: dict[str, Any], issues: list[str]) -> ModelConfig | None:
    raw = dict(raw)
    preset = raw.pop("preset", None)
    base: dict[str, Any] = {}
    if preset is not None:
        if preset in MODEL_PRESETS:
            base = dict(MODEL_PRESETS[preset])
        else:
            issues.append(f"model.preset: must be one of {', '.join(MODEL_PRESETS)}, got {preset!r}")
    return _construct(ModelConfig, "model", {**base, **_checked(ModelConfig, "model", raw, issues)}, issues)


def _run_section(name: str, raw: Any, base_dir: Path, issues: list[str]) -> Any:
    values = _mapping(raw, name, issues)
    if values is None:
        return None
    if name == "model":
        return _model(values, issues)
    kwargs = _checked(SECTIONS[name], name, values, issues)
    if name == "data" and isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = os.path.normpath(base_dir / Path(kwargs["data_dir"]).expanduser())
    return _construct(SECTIONS[name], name, kwargs, issues)


def _field_hint(dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return typing.get_type_hints(SECTIONS[section])[key]


def _space(raw: Any, sections: dict[str, Any], issues: list[str]) -> dict[str, ParamSpec]:
    values = _mapping(raw, "search.space", issues)
    fields = RunConfig().flat()
    out: dict[str, ParamSpec] = {}
    for name, spec_raw in (values or {}).items():
        where = f"search.space.{name}"
        if name not in fields:
            issues.append(f"{where}: not a config field{_suggest(str(name), list(fields))}")
            continue
        spec = _mapping(spec_raw, where, issues)
        if spec is None:
            continue
        if "type" not in spec:
            issues.append(f"{where}.type: required, one of {', '.join(PARAM_TYPES)}")
            continue
        kwargs = _checked(ParamSpec, where, spec, issues)
        if len(kwargs) != len(spec):                       # a key of the wrong type: reported above
            continue
        problems = _param_problems(kwargs["type"], kwargs.get("low"), kwargs.get("high"), kwargs.get("log", False),
                                   kwargs.get("step"), kwargs.get("choices", ()))
        issues += [f"{where}.{p}" if not p.startswith(":") else f"{where}{p}" for p in problems]
        if problems:
            continue
        out[name] = ParamSpec(**kwargs)
        _check_bounds(name, out[name], sections, issues)
    return out


def _check_bounds(name: str, spec: ParamSpec, sections: dict[str, Any], issues: list[str]) -> None:
    """Every value the sampler may propose must be one the config accepts: try the ends and each choice."""
    section, _, key = name.partition(".")
    hint, base = _field_hint(name), sections.get(section)
    if spec.type == "categorical":
        candidates = [(f"choice {c!r}", c) for c in spec.choices]
    else:                                                  # ParamSpec made float bounds floats, int bounds are ints
        candidates = [(f"low={spec.low!r}", spec.low), (f"high={spec.high!r}", spec.high)]
    for label, value in candidates:
        if problem := _type_problem(value, hint):
            kind = "an integer field (use type: int)" if hint is int else f"this field ({problem})"
            issues.append(f"search.space.{name}: {label} does not fit {kind}")
            return
        if base is not None:
            try:
                dataclasses.replace(base, **{key: value})
            except ValueError as e:
                issues.append(f"search.space.{name}: {label} is rejected: {e}")


def _enqueue(raw: Any, space: dict[str, ParamSpec], issues: list[str]) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        issues.append(f"search.enqueue: expected a list of mappings (dotted name: value), got {raw!r}")
        return ()
    points = []
    for i, point in enumerate(raw):
        where = f"search.enqueue[{i}]"
        values = _mapping(point, where, issues)
        for name, value in (values or {}).items():
            spec = space.get(name)
            if spec is None:
                issues.append(f"{where}.{name}: not in search.space{_suggest(str(name), list(space))}")
            elif spec.type == "categorical":
                if value not in spec.choices:
                    issues.append(f"{where}.{name}: {value!r} is not one of the choices {list(spec.choices)!r}")
            elif problem := _type_problem(value, int if spec.type == "int" else float):
                issues.append(f"{where}.{name}: {problem}")
            elif not spec.low <= value <= spec.high:       # type: ignore[operator]
                issues.append(f"{where}.{name}: {value!r} is outside [{spec.low!r}, {spec.high!r}]")
        points.append(values or {})
    return tuple(points)


def _search(raw: Any, sections: dict[str, Any], issues: list[str]) -> SearchConfig | None:
    values = _mapping(raw, "search", issues)
    if values is None:
        return None
    nested = ("scheduler", "resources", "space", "enqueue")
    kwargs = _checked(SearchConfig, "search", {k: v for k, v in values.items() if k not in nested}, issues)
    for key, cls in (("scheduler", SchedulerConfig), ("resources", ResourcesConfig)):
        sub = _mapping(values.get(key), f"search.{key}", issues)
        if sub is not None:
            obj = _construct(cls, f"search.{key}", _checked(cls, f"search.{key}", sub, issues), issues)
            if obj is not None:
                kwargs[key] = obj
    kwargs["space"] = _space(values.get("space"), sections, issues)
    kwargs["enqueue"] = _enqueue(values.get("enqueue"), kwargs["space"], issues)
    if isinstance(kwargs.get("storage"), str):
        kwargs["storage"] = _absolute_uri(kwargs["storage"])
    before = len(issues)
    search = _construct(SearchConfig, "search", kwargs, issues)
    if values.get("space"):                                # entries that all failed: they are reported already
        issues[before:] = [i for i in issues[before:] if not i.startswith("search.space: required")]
    return search


def _tracking(raw: Any, issues: list[str]) -> TrackingConfig | None:
    values = _mapping(raw, "tracking", issues)
    if values is None:
        return None
    kwargs = _checked(TrackingConfig, "tracking", values, issues)
    if isinstance(kwargs.get("uri"), str):
        kwargs["uri"] = _absolute_uri(kwargs["uri"])
    return _construct(TrackingConfig, "tracking", kwargs, issues)


# ---------------------------------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``. The value is YAML (1.2 floats: ``1e-3`` is a number); text
    that is not valid YAML is kept as a string."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3.0e-4")
    value_text = value_text.strip()
    try:
        return key, load_yaml(value_text)
    except yaml.YAMLError:
        return key, value_text


def _apply_override(raw: dict[str, Any], text: str, issues: list[str]) -> None:
    try:
        key, value = parse_override(text)
    except ConfigError as e:
        issues.append(str(e))
        return
    parts = key.split(".")
    if parts[:2] == ["search", "space"] and len(parts) >= 4:   # space names hold a dot: search.space.train.lr.high
        parts = [*parts[:2], f"{parts[2]}.{parts[3]}", *parts[4:]]
    if key == "data.data_dir" and isinstance(value, str):       # a path typed on the command line: relative to cwd
        value = os.path.abspath(os.path.expanduser(value))
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            issues.append(f"{'.'.join(parts[:i + 1])}: cannot apply --set {text}: not a mapping")
            return
        node = node[part]
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------------- load / dump

def _prepare(raw: Any, source: str, overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``raw`` with the overrides applied, and the problems found so far (overrides, top-level keys)."""
    if not isinstance(raw, Mapping):
        got = "an empty file" if raw is None else type(raw).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level ({', '.join(TOP_LEVEL)}), got {got}")
    raw = _deep_copy(raw)                                  # overrides must not change the caller's mapping
    issues: list[str] = []
    for text in overrides:
        _apply_override(raw, text, issues)
    for key in raw:
        if key not in TOP_LEVEL:
            issues.append(f"{key}: unknown key{_suggest(str(key), TOP_LEVEL)}")
    return raw, issues


def experiment_from_dict(raw: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None,
                         overrides: Sequence[str] = ()) -> Experiment:
    """Validate a raw mapping (as read from YAML) into an :class:`Experiment`; raise one :class:`ConfigError`."""
    raw, issues = _prepare(raw, source, overrides)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    name = raw.get("name")
    if name is None:
        issues.append("name: required (letters, digits, '.', '_' or '-')")
    elif not (isinstance(name, str) and _NAME.fullmatch(name)):
        issues.append(f"name: must be letters, digits, '.', '_' or '-', got {name!r}")
    sections = {s: _run_section(s, raw.get(s), base_dir, issues) for s in SECTIONS}
    search = _search(raw.get("search"), sections, issues)
    tracking = _tracking(raw.get("tracking"), issues)
    result = raw.get("result")
    if result is not None and not isinstance(result, dict):
        issues.append(f"result: expected a mapping, got {type(result).__name__}")
    if issues:
        raise ConfigError(f"{source}:\n  " + "\n  ".join(issues))
    assert isinstance(name, str) and search is not None and tracking is not None   # else an issue was raised
    return Experiment(name=name, run=RunConfig(**sections), search=search, tracking=tracking, result=result)


def run_config_from_dict(raw: dict[str, Any] | None, *, source: str = "<dict>", base_dir: Path | None = None,
                         overrides: Sequence[str] = ()) -> RunConfig:
    """Only the model/data/train sections, validated as in :func:`experiment_from_dict` (one :class:`ConfigError`
    listing every problem). ``drcaps train`` uses it: a file without a ``search`` section is fine here, and the
    ``name``/``search``/``tracking``/``result`` sections of a full experiment file are ignored."""
    raw, issues = _prepare({} if raw is None else raw, source, overrides)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    sections = {s: _run_section(s, raw.get(s), base, issues) for s in SECTIONS}
    if issues:
        raise ConfigError(f"{source}:\n  " + "\n  ".join(issues))
    return RunConfig(**sections)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of an experiment (or plain model/data/train) file, or the defaults when ``path`` is None."""
    if path is None:
        return run_config_from_dict({}, source="command line", overrides=overrides)
    path = Path(path).expanduser().resolve()
    return run_config_from_dict(_read(path, str(path)), source=str(path), base_dir=path.parent, overrides=overrides)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(v) for v in value]
    return value


def _read(path: Path, shown: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{shown}: cannot read the file ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:                    # JSON proper: YAML 1.1 would read JSON's 1e-05 as a string
            return json.loads(text)
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json":
                raise ConfigError(f"{shown}: JSON syntax error: {e}") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{shown}: YAML syntax error{where}: {what}; fix the file") from None


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """Read, override, validate. ``.json`` files work too (what ``export_best(fmt="json")`` writes)."""
    absolute = Path(path).expanduser().absolute()
    raw = _read(absolute, str(path))
    exp = experiment_from_dict(raw, source=str(path), base_dir=absolute.parent, overrides=overrides)
    return dataclasses.replace(exp, path=absolute)


def to_plain(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, paths -> str: what safe_dump and json.dump accept."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _spec_to_dict(spec: ParamSpec) -> dict[str, Any]:
    if spec.type == "categorical":
        return {"type": spec.type, "choices": list(spec.choices)}
    out: dict[str, Any] = {"type": spec.type, "low": spec.low, "high": spec.high}
    if spec.log:
        out["log"] = True
    if spec.step is not None:
        out["step"] = spec.step
    return out


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """A plain mapping (YAML/JSON-able) with every field explicit: ``experiment_from_dict`` of it equals ``exp``."""
    search = {f.name: getattr(exp.search, f.name) for f in dataclasses.fields(SearchConfig)}
    search["scheduler"] = dataclasses.asdict(exp.search.scheduler)
    search["resources"] = dataclasses.asdict(exp.search.resources)
    search["enqueue"] = [dict(point) for point in exp.search.enqueue]
    search["space"] = {name: _spec_to_dict(spec) for name, spec in exp.search.space.items()}
    out: dict[str, Any] = {"name": exp.name, **exp.run.to_dict(), "search": search,
                           "tracking": dataclasses.asdict(exp.tracking)}
    if exp.result is not None:
        out["result"] = exp.result
    return to_plain(out)


def dump_experiment(exp: Experiment, path: Path, *, fmt: Literal["yaml", "json"] | None = None,
                    comment: str = "") -> Path:
    """Write ``exp`` as YAML or JSON (``fmt``; default: JSON when ``path`` ends in ``.json``). ``comment`` lines head
    a YAML file. The loader reads JSON as JSON whatever the suffix, because the text starts with ``{``."""
    path = Path(path)
    fmt = fmt or ("json" if path.suffix.lower() == ".json" else "yaml")
    if fmt not in ("yaml", "json"):
        raise ValueError(f"format: must be one of yaml, json, got {fmt!r}")
    data = experiment_to_dict(exp)
    if fmt == "json":
        text = json.dumps(data, indent=2) + "\n"
    else:                       # safe_dump writes 1e-05 as 1.0e-05, which YAML reads back as a float
        header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
        text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
