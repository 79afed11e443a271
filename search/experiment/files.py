"""Experiment files on disk: read (YAML 1.2 floats, or JSON) and validate, write back (YAML or JSON) so that a
written file loads to an equal :class:`Experiment` (the exported best config round-trips)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from drcapsnet.config import RunConfig
from drcapsnet.errors import ConfigError
from search.experiment.schema import Experiment, ParamSpec, SearchConfig
from search.experiment.validate import experiment_from_dict, run_config_from_dict
from search.experiment.yaml12 import YAMLContentError, YAMLError, load_yaml


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of an experiment (or plain model/data/train) file, or the defaults when ``path`` is None."""
    if path is None:
        return run_config_from_dict({}, source="command line", overrides=overrides)
    path = Path(path).expanduser().resolve()
    return run_config_from_dict(_read(path, str(path)), source=str(path), base_dir=path.parent, overrides=overrides)


def _read(path: Path, shown: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{shown}: cannot read the file ({getattr(e, 'strerror', None) or e})") from None
    try:
        return _parse(text, path.suffix.lower() == ".json", shown)
    except YAMLContentError as e:           # a key given twice, aliases that expand too far
        raise ConfigError(f"{shown}: {e}") from None
    except RecursionError:                  # json and PyYAML parse recursively: thousands of nested [ or {
        raise ConfigError(f"{shown}: nested too deep to read (thousands of levels, where an experiment file needs a "
                          "few); fix the file") from None


def _parse(text: str, is_json: bool, shown: str) -> Any:
    if is_json or text.lstrip().startswith("{"):
        try:                    # JSON proper: YAML 1.1 would read JSON's 1e-05 as a string
            return json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            if is_json:
                raise ConfigError(f"{shown}: JSON syntax error: {e}") from None
    try:
        return load_yaml(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{shown}: YAML syntax error{where}: {what}; fix the file") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (``json`` keeps the last of a repeated key silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise YAMLContentError(f"{key}: given twice in one JSON object; keys must be unique: keep one of them")
        out[key] = value
    return out


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
    search["confirm"] = dataclasses.asdict(exp.search.confirm) if exp.search.confirm is not None else None
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
