"""YAML reading for configs: safe (no Python tags), and a key given twice is an error; and
the node a validation error's location points at (:func:`node_at`), for its line.

PyYAML's ``safe_load`` keeps the last of two equal keys silently (``name:`` twice in a
pipeline file ran under the second name); here it fails with the line of the second one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

__all__ = ["UniqueKeyLoader", "node_at", "safe_load_unique"]


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader whose mappings refuse duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` for a key given twice in a mapping."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def node_at(node: yaml.Node | None, loc: Sequence[int | str]) -> yaml.Node | None:
    """The YAML node at pydantic error location ``loc`` (as deep as it exists): a mapping's
    last key names its key node, so an error points at the line of the field."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            child = None
            for k, v in node.value:
                if k.value == key:
                    child = k if key == loc[-1] else v
                    break
            if child is None:
                return node
            node = child
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            if key >= len(node.value):
                return node
            node = node.value[key]
        else:
            return node
    return node
