"""YAML as experiment files are read: PyYAML's safe loader with YAML 1.2's floats, so ``1e-3`` is a number
(PyYAML follows YAML 1.1, which wants a dot: ``1.0e-3``, and reads ``1e-3`` as text)."""

from __future__ import annotations

import re
from typing import Any

import yaml

YAMLError = yaml.YAMLError


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` and ``2E5`` are numbers (YAML 1.1 wants a dot)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """YAML text -> Python, safely, with YAML 1.2 floats (``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)
