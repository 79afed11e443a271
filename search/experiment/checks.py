"""The first layer of validating an experiment mapping: each value against its field's type hint, unknown keys with
a suggestion (``train.lrr: unknown key (did you mean 'lr'?)``), and a dataclass built with its own problems placed
under their dotted fields. Every problem is gathered, none raised here (search/experiment/validate.py raises them all
at once).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from drcapsnet.errors import ConfigError, Problem
from search.experiment.space_spec import is_number


def type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the type hint ``hint``, or None when it does."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [type_problem(value, a) for a in args if a is not type(None)]
        return None if None in problems else problems[0]
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(str, args))}, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, got {value!r}"
    if hint is float:
        if is_number(value):
            return None
        return f"expected a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {value!r}"
        item = args[0] if args else Any
        problems = [p for v in value if (p := type_problem(v, item))]
        return f"in {list(value)!r}: {problems[0]}" if problems else None
    if origin is dict or hint is dict:
        return None if isinstance(value, Mapping) else f"expected a mapping, got {type(value).__name__}"
    return None                                            # nested dataclasses: checked by their own section


def suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def mapping(raw: Any, where: str, issues: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    issues.append(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    return None


def checked(cls: type, where: str, raw: dict[str, Any], issues: list[str]) -> dict[str, Any]:
    """The keys of ``raw`` that are fields of ``cls`` with a value of the right type; the rest become issues."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            issues.append(f"{where}.{key}: unknown key{suggest(str(key), valid)}")
        elif problem := type_problem(value, hints[key]):
            issues.append(f"{where}.{key}: {problem}")
        else:                                              # ints where floats go: 1 -> 1.0, as a float field holds
            accepts = set(typing.get_args(hints[key])) or {hints[key]}
            floaty = float in accepts and int not in accepts
            out[key] = float(value) if floaty and is_number(value) else value
    return out


def placed(where: str, problems: Sequence[Problem]) -> list[str]:
    """Problems whose fields are relative to ``where`` (a search-space entry's ``low``) as issue lines."""
    return [f"{where}.{p.field}: {p.message}" if p.field else f"{where}: {p.message}" for p in problems]


def construct(cls: type, where: str, kwargs: dict[str, Any], issues: list[str],
               drop: Callable[[Problem], bool] = lambda p: False) -> Any:
    """``cls(**kwargs)``, or None with every problem its ``__post_init__`` found added to ``issues`` (those that
    ``drop`` says are reported already left out). Problems come as data (``ConfigError.problems``)."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        found = [str(p) for p in e.problems if not drop(p)] if e.problems else [f"{where}: {e}"]
    except TypeError as e:                                 # not a field: checked reports those first
        found = [f"{where}: {e}"]
    issues.extend(line for line in found if line not in issues)
    return None


