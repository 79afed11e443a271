"""YAML as experiment files are read: PyYAML's safe loader with YAML 1.2's floats, so ``1e-3`` is a number
(PyYAML follows YAML 1.1, which wants a dot: ``1.0e-3``, and reads ``1e-3`` as text), and two things PyYAML lets
through refused: a mapping key given twice (YAML says keys are unique; PyYAML keeps the last value silently) and
aliases that expand too far (the "billion laughs" shape: a few hundred bytes that expand to billions of values).

Both are checked on the composed node graph, before any Python object is built: each node is visited once (aliases
share nodes), so a hostile file is refused in milliseconds."""

from __future__ import annotations

import re
from typing import Any

import yaml

from drcapsnet.errors import ConfigError

YAMLError = yaml.YAMLError
MAX_EXPANDED_NODES = 100_000   # values a file may expand to through its aliases; an experiment file has hundreds
MAX_DEPTH = 100                # nesting levels; an experiment file has at most 5


class YAMLContentError(ConfigError):
    """Valid YAML syntax that an experiment file must not hold (a key given twice, aliases that expand too far);
    the message names the dotted key or the problem, without the file (the caller prefixes it)."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` and ``2E5`` are numbers (YAML 1.1 wants a dot)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

_MERGE = "tag:yaml.org,2002:merge"


def _key_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else f"<{node.id} key>"


def _where(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _check_unique_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    """Every mapping in the graph holds each (scalar) key once; ``path`` is the dotted name of ``node``."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Node] = {}
        for key, value in node.value:
            if key.tag == _MERGE:           # `<<: *base`: keys given after it override the merged ones, as YAML says
                _check_unique_keys(value, path, seen)
                continue
            text = _key_text(key)
            dotted = f"{path}.{text}" if path else text
            if text in first:
                raise YAMLContentError(f"{dotted}: given twice (at {_where(first[text])} and {_where(key)}); YAML "
                                       "keys must be unique: keep one of them")
            first[text] = key
            _check_unique_keys(value, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]", seen)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` becomes once every alias is expanded (counted once per node, so linear in the
    file); raises as soon as the count passes MAX_EXPANDED_NODES or a node contains itself."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise YAMLContentError(f"line {node.start_mark.line + 1}: an alias refers to the node that contains it "
                               "(a recursive structure); write the values out")
    open_.add(id(node))
    total = 1
    if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        for child in children:
            total += _expanded_size(child, sizes, open_)
            if total > MAX_EXPANDED_NODES:
                raise YAMLContentError(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values (the "
                                       "'billion laughs' shape); write the values out, or use fewer aliases")
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def _check_depth(text: str) -> None:
    """PyYAML composes recursively (thousands of nested ``[`` take seconds, then exhaust the stack); its parser does
    not: walk the events first and refuse more than MAX_DEPTH levels."""
    depth = 0
    for event in yaml.parse(text, Loader=_Yaml12Loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise YAMLContentError(f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep "
                                       "(an experiment file needs a few); fix the file")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def load_yaml(text: str) -> Any:
    """YAML text -> Python, safely, with YAML 1.2 floats (``1e-3`` is a float). Raises ``YAMLError`` for bad syntax
    and :class:`YAMLContentError` for a key given twice or aliases that expand past MAX_EXPANDED_NODES values."""
    _check_depth(text)
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        _check_unique_keys(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()
