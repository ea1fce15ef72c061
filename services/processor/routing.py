"""Destination rules: which dest.<name> topics get a copy of an event."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.common.sources import Destination

_MISSING = object()


def lookup(event: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (``properties.plan``), or a sentinel when absent."""
    node: Any = event
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def matches(rule: Destination, event: dict[str, Any]) -> bool:
    if rule.types is not None and event.get("type") not in rule.types:
        return False
    if rule.events is not None:
        # The old router matched track's "event" and page/screen's "name".
        name = event.get("event") if event.get("type") == "track" else event.get("name")
        if name not in rule.events:
            return False
    if not rule.where:
        return True
    return all(lookup(event, path) == expected for path, expected in rule.where.items())


def destinations(rules: Iterable[Destination], event: dict[str, Any]) -> list[str]:
    """Names of the destinations whose rules the event matches, each once, in rule order."""
    names: list[str] = []
    for rule in rules:
        if rule.name not in names and matches(rule, event):
            names.append(rule.name)
    return names
