"""The OpenAPI document served at /openapi.json."""

from __future__ import annotations

from typing import Any

from services.common import segment
from services.ingest.settings import Settings


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def build(settings: Settings, version: str) -> dict[str, Any]:
    """Describe every route, limit and answer of the tracking API."""
    body = {
        "required": True,
        "description": "JSON (application/json or text/plain, as analytics.js sends it); "
                       "Content-Encoding gzip or deflate accepted. Limits apply to the decoded body.",
        "content": {ct: {"schema": {"$ref": "#/components/schemas/Event"}}
                    for ct in ("application/json", "text/plain")},
    }
    batch_body = {**body, "content": {ct: {"schema": {"$ref": "#/components/schemas/Batch"}}
                                      for ct in ("application/json", "text/plain")}}
    answers = {
        "200": {"description": "Accepted: in Kafka (acks=all) or in the local fsync'd spool",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Success"}}}},
        "400": _error("Invalid JSON or an event that breaks the Segment spec"),
        "401": _error("No write key, or one that belongs to no source"),
        "403": _error("The source is disabled, or the Origin is not allowed for it"),
        "413": _error(f"Over a limit: max_event_bytes={settings.max_event_bytes}, "
                      f"max_request_bytes={settings.max_request_bytes}, "
                      f"max_batch_events={settings.max_batch_events}"),
        "415": _error("Unsupported Content-Type or Content-Encoding"),
        "429": _error("Over the source's rate limit; see Retry-After and X-RateLimit-Reset"),
        "503": _error("Kafka is down and the spool is full, or the process is overloaded; see Retry-After"),
    }
    security: list[dict[str, list[str]]] = [{"basic": []}, {"writeKeyQuery": []}]
    paths: dict[str, Any] = {}
    for name, etype in [*((t, t) for t in segment.TYPES), *segment.SHORT_TYPES.items()]:
        paths[f"/v1/{name}"] = {"post": {
            "summary": f"Send one {etype} event" + (" (analytics.js short path)" if len(name) == 1 else ""),
            "operationId": f"post_{name}", "requestBody": body, "responses": answers, "security": security,
        }}
    for name in ("batch", "b", "import"):
        paths[f"/v1/{name}"] = {"post": {
            "summary": "Send a batch of events; invalid ones are listed and dead-lettered, valid ones kept",
            "operationId": f"post_{name}", "requestBody": batch_body, "security": security,
            "responses": {**answers, "200": {
                "description": "At least one event accepted",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchResult"}}}}},
        }}
    paths["/v1/pixel/{type}"] = {"get": {
        "summary": "Tracking pixel: always a 1x1 GIF; bad pixels are counted and dead-lettered",
        "operationId": "get_pixel",
        "parameters": [
            {"name": "type", "in": "path", "required": True, "schema": {"enum": list(segment.TYPES)}},
            {"name": "data", "in": "query", "schema": {"type": "string"},
             "description": "base64 (standard or URL-safe) of the event JSON"},
            {"name": "writeKey", "in": "query", "schema": {"type": "string"}},
        ],
        "responses": {"200": {"description": "GIF", "content": {"image/gif": {}}}},
    }}
    paths["/healthz"] = {"get": {"summary": "Alive", "responses": {"200": {"description": "ok"}}}}
    paths["/readyz"] = {"get": {"summary": "Kafka answers, sources loaded; says when spooling",
                                "responses": {"200": {"description": "ready"},
                                              "503": {"description": "not ready"}}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}}
    event_schema = {
        "type": "object", "required": ["type"],
        "properties": {
            "type": {"enum": list(segment.TYPES)},
            "userId": {"type": ["string", "number", "null"]},
            "anonymousId": {"type": ["string", "number", "null"]},
            "messageId": {"type": "string", "maxLength": segment.MESSAGE_ID_MAX},
            "event": {"type": "string", "description": "required for track"},
            "name": {"type": "string"}, "groupId": {"type": ["string", "number"]},
            "previousId": {"type": ["string", "number"]},
            "properties": {"type": "object"}, "traits": {"type": "object"},
            "context": {"type": "object"}, "integrations": {"type": "object"},
            "timestamp": {"type": "string", "format": "date-time"},
            "originalTimestamp": {"type": "string", "format": "date-time"},
            "sentAt": {"type": "string", "format": "date-time"},
            "writeKey": {"type": "string"},
        },
        "description": "A Segment event: userId or anonymousId is required (null counts as absent).",
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Headwater ingest: Segment tracking API", "version": version},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic",
                          "description": "write key as user name, empty password"},
                "writeKeyQuery": {"type": "apiKey", "in": "query", "name": "writeKey"},
            },
            "schemas": {
                "Event": event_schema,
                "Batch": {"type": "object", "required": ["batch"], "properties": {
                    "batch": {"type": "array", "items": {"$ref": "#/components/schemas/Event"},
                              "maxItems": settings.max_batch_events},
                    "context": {"type": "object"}, "integrations": {"type": "object"},
                    "sentAt": {"type": "string"}, "writeKey": {"type": "string"}}},
                "Success": {"type": "object", "properties": {"success": {"const": True}}},
                "BatchResult": {"type": "object", "properties": {
                    "success": {"type": "boolean"}, "accepted": {"type": "integer"},
                    "rejected": {"type": "array", "items": {"type": "object", "properties": {
                        "index": {"type": "integer"}, "messageId": {"type": ["string", "null"]},
                        "errors": {"type": "array", "items": {"type": "string"}}}}}}},
                "Error": {"type": "object", "required": ["success", "error", "message"], "properties": {
                    "success": {"const": False}, "error": {"type": "string"},
                    "message": {"type": "string"}, "request_id": {"type": "string"}}},
            },
        },
    }
