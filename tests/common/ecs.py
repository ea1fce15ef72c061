"""What a log line becomes in a search engine, without one: Filebeat's ndjson decoding and
the ECS field types the index template (compose/filebeat/headwater-logs.template.json) gives.

``ECS_TYPES`` is the written-down subset of the ECS 8.11 schema that Headwater's lines
use (field -> type), plus the few custom fields we search on. The unit tests check real
lines against it; the OpenSearch test checks the engine's mapping against it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_FILE = ROOT / "compose" / "filebeat" / "headwater-logs.template.json"
SAVED_OBJECTS_FILE = ROOT / "compose" / "kibana" / "headwater-logs.ndjson"

# ECS 8.11 (field -> type) for the fields our lines and Filebeat's own carry.
ECS_TYPES: dict[str, str] = {
    "@timestamp": "date",
    "message": "match_only_text",
    "ecs.version": "keyword",
    "log.level": "keyword",
    "log.logger": "keyword",
    "log.file.path": "keyword",
    "log.offset": "long",
    "service.name": "keyword",
    "error.type": "keyword",
    "error.message": "match_only_text",
    "error.stack_trace": "wildcard",
    "host.name": "keyword",
    "agent.type": "keyword",
    "agent.version": "keyword",
    "input.type": "keyword",
    "process.pid": "long",
    "http.response.status_code": "long",
}
# Headwater's own fields (not ECS): what an operator searches by.
CUSTOM_TYPES: dict[str, str] = {
    "request_id": "keyword",
    "labels.source": "keyword",
    "kafka.topic": "keyword",
    "kafka.partition": "long",
    "kafka.offset": "long",
}
FIELD_TYPES = {**ECS_TYPES, **CUSTOM_TYPES}


class ExpandError(ValueError):
    """A key is both a value and an object (``a`` and ``a.b``): Filebeat and the engine refuse the line."""


def expand_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested objects, as Filebeat's ndjson ``expand_keys`` does; a clash raises."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ExpandError(f"{'.'.join(parts[: i + 1])} is a value and {key} needs it as an object")
            node = child
        leaf = parts[-1]
        if isinstance(value, dict):
            value = expand_keys(value)
            existing = node.get(leaf)
            if existing is not None and not isinstance(existing, dict):
                raise ExpandError(f"{key} is a value and an object")
            node.setdefault(leaf, {}).update(value)
        elif isinstance(node.get(leaf), dict):
            raise ExpandError(f"{key} is an object and a value")
        else:
            node[leaf] = value
    return out


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def filebeat_event(line: str, *, path: str, offset: int) -> dict[str, Any]:
    """The document Filebeat's filestream input sends for one stdout line (compose/filebeat/filebeat.yml:
    ndjson with target "", overwrite_keys, expand_keys), with the fields Filebeat adds itself."""
    decoded = json.loads(line)
    event: dict[str, Any] = {
        "@timestamp": datetime.now().astimezone().isoformat(),
        "agent": {"type": "filebeat", "version": "8.15.3", "name": "filebeat"},
        "input": {"type": "filestream"},
        "host": {"name": "headwater-test"},
        "log": {"file": {"path": path}, "offset": offset},
        "ecs": {"version": "8.0.0"},
    }
    for key, value in expand_keys(decoded).items():  # overwrite_keys: the line's own keys win
        if isinstance(value, dict) and isinstance(event.get(key), dict):
            event[key] = {**event[key], **value}
        else:
            event[key] = value
    return event


def _is_type(value: Any, kind: str) -> bool:
    if kind in ("keyword", "match_only_text", "wildcard", "text"):
        return isinstance(value, str)
    if kind == "long":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "date":
        try:
            datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    raise AssertionError(f"no check for type {kind}")


def type_problems(line: dict[str, Any]) -> list[str]:
    """A decoded line's fields that ECS (or our custom table) types differently, or that clash."""
    try:
        nested = expand_keys(line)
    except ExpandError as exc:
        return [str(exc)]
    problems = []
    for field, value in flatten(nested).items():
        kind = FIELD_TYPES.get(field)
        if field.startswith("labels.") and field.count(".") > 1:
            problems.append(f"{field}: labels hold values, not objects")
        elif kind is not None and not _is_type(value, kind):
            problems.append(f"{field}: {value!r} is not a {kind}")
    for field in ("@timestamp", "message", "log.level", "service.name", "ecs.version"):
        if field not in flatten(nested):
            problems.append(f"{field} missing")
    return problems


def template_types(template: dict[str, Any]) -> dict[str, str]:
    """field -> type of the explicit mappings of an index template."""

    def walk(props: dict[str, Any], prefix: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, spec in props.items():
            if spec.get("type", "object") == "object" and "properties" in spec:
                out.update(walk(spec["properties"], f"{prefix}{name}."))
            else:
                out[f"{prefix}{name}"] = spec["type"]
        return out

    return walk(template["template"]["mappings"]["properties"], "")


def load_template() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(TEMPLATE_FILE.read_text())
    return data


def load_saved_objects() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SAVED_OBJECTS_FILE.read_text().splitlines() if line.strip()]
