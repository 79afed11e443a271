"""Overrides: ``--set train.lr=3e-4`` (or a flag that stands for one, search/cli.py ``RUN_FLAGS``) applied to the raw
mapping BEFORE validation, so a bad override is reported exactly like a bad key in the file. One dotted name
everywhere: ``train.lr``, ``search.scheduler.name``, ``search.space.train.lr.high`` (space names hold a dot)."""

from __future__ import annotations

import os
from typing import Any

from drcapsnet.errors import ConfigError
from search.experiment.yaml12 import YAMLError, load_yaml


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
    except YAMLError:
        return key, value_text


def apply_override(raw: dict[str, Any], text: str, issues: list[str]) -> None:
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
