"""One entry of a search space (``train.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}``) as a frozen
dataclass that checks itself, and the number rule every config check shares (an int or a float, not a bool).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from drcapsnet.errors import Problem, raise_problems

PARAM_TYPES: tuple[str, ...] = ("float", "int", "categorical")


def is_number(value: object) -> bool:
    """An int or a float, not a bool (YAML's true is not 1 here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def param_problems(type_: str, low: Any, high: Any, log: bool, step: Any, choices: Sequence[Any]) -> list[Problem]:
    """Problems of one search-space entry; fields are relative to the entry (``low``; ``""``: the entry as a
    whole), because an entry does not know its own name."""
    out: list[Problem] = []
    if type_ == "categorical":
        out += [Problem(key, "only for type float or int") for key, v in (("low", low), ("high", high), ("step", step))
                if v is not None]
        if log:
            out.append(Problem("log", "only for type float or int"))
        if not choices:
            out.append(Problem("choices", "required for type categorical, a non-empty list"))
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            out.append(Problem("choices", f"must be null, booleans, numbers or strings (optuna), got {bad!r}"))
        return out
    if choices:
        out.append(Problem("choices", "only for type categorical"))
    kind = "an integer" if type_ == "int" else "a number"
    for key, v in (("low", low), ("high", high)):
        if v is None:
            out.append(Problem(key, f"required for type {type_}"))
        elif not is_number(v) or (type_ == "int" and not isinstance(v, int)):
            out.append(Problem(key, f"expected {kind}, got {v!r}"))
    if not out and low >= high:
        out.append(Problem("", f"low must be < high, got low={low!r}, high={high!r}"))
    if log and is_number(low) and low <= 0:
        out.append(Problem("log", f"needs low > 0, got low={low!r}"))
    if step is not None:
        if not is_number(step) or step <= 0 or (type_ == "int" and not isinstance(step, int)):
            out.append(Problem("step", f"must be {kind} > 0, got {step!r}"))
        elif log and (type_ == "float" or step != 1):
            out.append(Problem("", "log and step cannot be combined (optuna)"))
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
        raise_problems(self.problems())
        if self.type == "float":                           # 0 and 1 read from YAML are ints; keep floats floats
            for name in ("low", "high", "step"):
                if getattr(self, name) is not None:
                    object.__setattr__(self, name, float(getattr(self, name)))

    def problems(self) -> list[Problem]:
        if self.type not in PARAM_TYPES:
            return [Problem("type", f"must be one of {', '.join(PARAM_TYPES)}, got {self.type!r}")]
        return param_problems(self.type, self.low, self.high, self.log, self.step, self.choices)
