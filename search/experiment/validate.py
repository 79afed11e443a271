"""Validation of a raw experiment mapping (as read from YAML or JSON, overrides applied) into the frozen configs,
with EVERY problem reported at once as ``path.key: what is wrong (did you mean ...?)``.

Two layers: here, each value is checked against its field's type hint and unknown keys get a suggestion; then each
dataclass checks its own values (``problems()``, as data: field + message) and the problems are gathered by their
fields. Nothing here depends on the wording of a message.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from drcapsnet.config import MODEL_PRESETS, ModelConfig, RunConfig
from drcapsnet.errors import ConfigError  # an experiment is wrong: one problem per line, "path.key: what"
from search.experiment.checks import checked, construct, mapping, placed, suggest, type_problem
from search.experiment.objectives import first_objective_defaults
from search.experiment.overrides import apply_override
from search.experiment.schema import (
    SECTIONS,
    TOP_LEVEL,
    ConfirmConfig,
    Experiment,
    ResourcesConfig,
    SchedulerConfig,
    SearchConfig,
    TrackingConfig,
    grace_period_problem,
    name_problem,
)
from search.experiment.space_spec import PARAM_TYPES, ParamSpec

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
    return construct(ModelConfig, "model", {**base, **checked(ModelConfig, "model", raw, issues)}, issues)


def _run_section(name: str, raw: Any, base_dir: Path, issues: list[str]) -> Any:
    values = mapping(raw, name, issues)
    if values is None:
        return None
    if name == "model":
        return _model(values, issues)
    kwargs = checked(SECTIONS[name], name, values, issues)
    if name == "data" and isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = os.path.normpath(base_dir / Path(kwargs["data_dir"]).expanduser())
    return construct(SECTIONS[name], name, kwargs, issues)


def _field_hint(dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return typing.get_type_hints(SECTIONS[section])[key]


def _space(raw: Any, sections: dict[str, Any], issues: list[str]) -> dict[str, ParamSpec]:
    values = mapping(raw, "search.space", issues)
    fields = RunConfig().flat()
    out: dict[str, ParamSpec] = {}
    for name, spec_raw in (values or {}).items():
        where = f"search.space.{name}"
        if name not in fields:
            issues.append(f"{where}: not a config field{suggest(str(name), list(fields))}")
            continue
        spec = mapping(spec_raw, where, issues)
        if spec is None:
            continue
        if "type" not in spec:
            issues.append(f"{where}.type: required, one of {', '.join(PARAM_TYPES)}")
            continue
        kwargs = checked(ParamSpec, where, spec, issues)
        if len(kwargs) != len(spec):                       # a key of the wrong type: reported above
            continue
        try:
            out[name] = ParamSpec(**kwargs)
        except ConfigError as e:                           # the entry's problems, fields relative to it
            issues += placed(where, e.problems)
            continue
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
        if problem := type_problem(value, hint):
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
        values = mapping(point, where, issues)
        for name, value in (values or {}).items():
            spec = space.get(name)
            if spec is None:
                issues.append(f"{where}.{name}: not in search.space{suggest(str(name), list(space))}")
            elif spec.type == "categorical":
                if value not in spec.choices:
                    issues.append(f"{where}.{name}: {value!r} is not one of the choices {list(spec.choices)!r}")
            elif problem := type_problem(value, int if spec.type == "int" else float):
                issues.append(f"{where}.{name}: {problem}")
            elif not spec.low <= value <= spec.high:       # type: ignore[operator]
                issues.append(f"{where}.{name}: {value!r} is outside [{spec.low!r}, {spec.high!r}]")
        points.append(values or {})
    return tuple(points)


WARM_START_KEYS = ("experiment", "allow_changed")


def _warm_start(raw: Any, issues: list[str]) -> dict[str, Any] | None:
    """``search.warm_start: {experiment: NAME, allow_changed: [dotted fields]}`` (search/warm_start.py)."""
    values = mapping(raw, "search.warm_start", issues)
    if values is None:
        return None
    for key in values:
        if key not in WARM_START_KEYS:
            issues.append(f"search.warm_start.{key}: unknown key{suggest(str(key), WARM_START_KEYS)}")
    name, allowed = values.get("experiment"), values.get("allow_changed") or []
    if not (isinstance(name, str) and name):
        issues.append("search.warm_start.experiment: required, the MLflow experiment whose latest search seeds "
                      f"this one, got {name!r}")
    known = [*RunConfig().flat(), "search.metric", "search.mode"]
    if not isinstance(allowed, list):
        issues.append(f"search.warm_start.allow_changed: expected a list of dotted fields, got {allowed!r}")
        allowed = []
    for field in allowed:
        if field not in known:
            issues.append(f"search.warm_start.allow_changed: {field!r} is not a setting{suggest(str(field), known)}")
    return {"experiment": name, "allow_changed": [str(f) for f in allowed]} if isinstance(name, str) and name else None


def _search(raw: Any, sections: dict[str, Any], issues: list[str]) -> SearchConfig | None:
    values = mapping(raw, "search", issues)
    if values is None:
        return None
    nested = ("scheduler", "resources", "space", "enqueue", "confirm", "warm_start")
    kwargs = checked(SearchConfig, "search", {k: v for k, v in values.items() if k not in nested}, issues)
    first_objective_defaults(values, kwargs)
    for key, cls in (("scheduler", SchedulerConfig), ("resources", ResourcesConfig)):
        sub = mapping(values.get(key), f"search.{key}", issues)
        if sub is not None:
            obj = construct(cls, f"search.{key}", checked(cls, f"search.{key}", sub, issues), issues)
            if obj is not None:
                kwargs[key] = obj
    if values.get("confirm") is not None:
        sub = mapping(values.get("confirm"), "search.confirm", issues)
        if sub is not None:
            obj = construct(ConfirmConfig, "search.confirm", checked(ConfirmConfig, "search.confirm", sub, issues),
                             issues)
            if obj is not None:
                kwargs["confirm"] = obj
    if values.get("warm_start") is not None:
        kwargs["warm_start"] = _warm_start(values["warm_start"], issues)
    kwargs["space"] = _space(values.get("space"), sections, issues)
    kwargs["enqueue"] = _enqueue(values.get("enqueue"), kwargs["space"], issues)
    if isinstance(kwargs.get("storage"), str):
        kwargs["storage"] = _absolute_uri(kwargs["storage"])
    # A space whose entries all failed is empty here: its entries' problems are reported already.
    return construct(SearchConfig, "search", kwargs, issues,
                      drop=lambda p: bool(values.get("space")) and p.field == "search.space")


def _tracking(raw: Any, issues: list[str]) -> TrackingConfig | None:
    values = mapping(raw, "tracking", issues)
    if values is None:
        return None
    kwargs = checked(TrackingConfig, "tracking", values, issues)
    if isinstance(kwargs.get("uri"), str):
        kwargs["uri"] = _absolute_uri(kwargs["uri"])
    return construct(TrackingConfig, "tracking", kwargs, issues)


# ---------------------------------------------------------------------------------------------------- overrides


# ---------------------------------------------------------------------------------------------------- whole files


def _prepare(raw: Any, source: str, overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``raw`` with the overrides applied, and the problems found so far (overrides, top-level keys)."""
    if not isinstance(raw, Mapping):
        got = "an empty file" if raw is None else type(raw).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level ({', '.join(TOP_LEVEL)}), got {got}")
    raw = _deep_copy(raw)                                  # overrides must not change the caller's mapping
    issues: list[str] = []
    for text in overrides:
        apply_override(raw, text, issues)
    for key in raw:
        if key not in TOP_LEVEL:
            issues.append(f"{key}: unknown key{suggest(str(key), TOP_LEVEL)}")
    return raw, issues


def experiment_from_dict(raw: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None,
                         overrides: Sequence[str] = ()) -> Experiment:
    """Validate a raw mapping (as read from YAML) into an :class:`Experiment`; raise one :class:`ConfigError`."""
    raw, issues = _prepare(raw, source, overrides)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    name = raw.get("name")
    if (problem := name_problem(name)) is not None:
        issues.append(str(problem))
    sections = {s: _run_section(s, raw.get(s), base_dir, issues) for s in SECTIONS}
    search = _search(raw.get("search"), sections, issues)
    tracking = _tracking(raw.get("tracking"), issues)
    if search is not None and sections["train"] is not None and (
            late := grace_period_problem(search.scheduler, sections["train"].epochs)):
        issues.append(str(late))
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


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(v) for v in value]
    return value
