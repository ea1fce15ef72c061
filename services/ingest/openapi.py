"""The OpenAPI document served at /openapi.json.

It says exactly what the service accepts and answers, so a schema-driven
fuzzer (schemathesis, run by tests/ingest/test_openapi.py) finds a request
the document allows refused, or one it forbids taken, as a failure. The
event schemas mirror services/common/segment.py ``validate`` rule for rule
(fields it does not check are left open); the handlers (api.py, records.py) add
the limits named in the 413 answer, which a schema cannot express (the event's
size and nesting depth are checked on the decoded event).
"""

from __future__ import annotations

from typing import Any

from services.common import segment
from services.ingest.settings import Settings

_REF = "#/components/schemas/"
# Python's bool is an int, so segment.validate takes true/false as an id too.
_ID = {
    "type": ["string", "number", "boolean", "null"],
    "description": 'a string or a number; null and "" count as absent',
}
_PRESENT_ID = {"anyOf": [{"type": "string", "minLength": 1}, {"type": ["number", "boolean"]}]}
_PRESENT = {"not": {"enum": [None, ""]}, "description": 'any value but null or ""'}
_OBJECT = {"type": ["object", "null"]}
_TIME = {
    "type": ["string", "null"],
    "description": "ISO-8601; kept as sent (the processor dead-letters one it cannot read)",
}
_ONE_USER = [
    {"required": ["userId"], "properties": {"userId": _PRESENT_ID}},
    {"required": ["anonymousId"], "properties": {"anonymousId": _PRESENT_ID}},
]


def _event_schema(etype: str, *, type_required: bool) -> dict[str, Any]:
    """One event type as segment.validate takes it."""
    properties: dict[str, Any] = {
        "type": {"const": etype},
        "userId": _ID,
        "anonymousId": _ID,
        "messageId": {
            "type": ["string", "null"],
            "maxLength": segment.MESSAGE_ID_MAX,
            "description": "ingest stamps one when absent",
        },
        **{k: _OBJECT for k in ("properties", "traits", "context", "integrations")},
        **{k: _TIME for k in ("timestamp", "originalTimestamp", "sentAt")},
    }
    required = ["type"] if type_required else []
    if etype == "track":
        properties["event"] = {"type": "string", "minLength": 1}
        required.append("event")
    elif etype == "group":
        properties["groupId"] = _PRESENT
        required.append("groupId")
    elif etype == "alias":
        properties["previousId"] = _PRESENT
        required.append("previousId")
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "anyOf": _ONE_USER,
        "description": f'A Segment {etype} event: userId or anonymousId is required (null and "" count '
        "as absent); other fields are taken as sent; writeKey is removed.",
    }


def _error(description: str, *headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"{_REF}Error"}}},
    }
    if headers:
        answer["headers"] = {h: {"schema": {"type": "string" if h != "Retry-After" else "integer"}} for h in headers}
    return answer


def _body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": "JSON, under any of the content types listed (analytics.js sends text/plain); "
        "Content-Encoding gzip or deflate accepted. Limits apply to the decoded body.",
        "content": {
            ct: {"schema": {"$ref": f"{_REF}{schema}"}}
            for ct in ("application/json", "text/plain", "application/octet-stream")
        },
    }


def _answers(settings: Settings) -> dict[str, Any]:
    return {
        "200": {
            "description": "Accepted: in Kafka (acks=all) or in the local fsync'd spool",
            "content": {"application/json": {"schema": {"$ref": f"{_REF}Success"}}},
        },
        "400": _error(
            "Invalid JSON (or nested deeper than the service reads), or an event that breaks the "
            "Segment spec, or one nested deeper than 254 levels"
        ),
        "401": _error("No write key, one that belongs to no source, or a Basic header that is not base64"),
        "403": _error("The source is disabled, or the Origin is not allowed for it"),
        "408": _error(
            f"The body did not arrive within client_body_timeout_s ({settings.client_body_timeout_s:g} s)"
            "; the connection is closed"
        ),
        "413": _error(
            f"Over a limit: max_event_bytes={settings.max_event_bytes}, "
            f"max_request_bytes={settings.max_request_bytes}, "
            f"max_batch_events={settings.max_batch_events}"
        ),
        "415": _error("Unsupported Content-Type or Content-Encoding"),
        "429": _error("Over the source's rate limit", "Retry-After", "X-RateLimit-Reset"),
        "503": _error(
            "Kafka is down and the spool is full, the process is overloaded, or it has max_connections open",
            "Retry-After",
        ),
    }


def build(settings: Settings, version: str) -> dict[str, Any]:  # long: the OpenAPI document as one literal
    """Describe every route, limit and answer of the tracking API."""
    answers = _answers(settings)
    security: list[dict[str, list[str]]] = [{"basic": []}, {"writeKeyQuery": []}]
    paths: dict[str, Any] = {}
    for name, etype in [*((t, t) for t in segment.TYPES), *segment.SHORT_TYPES.items()]:
        paths[f"/v1/{name}"] = {
            "post": {
                "summary": f"Send one {etype} event" + (" (analytics.js short path)" if len(name) == 1 else ""),
                "operationId": f"post_{name}",
                "requestBody": _body(f"Single_{etype}"),
                "responses": answers,
                "security": security,
            }
        }
    for name in ("batch", "b", "import"):
        paths[f"/v1/{name}"] = {
            "post": {
                "summary": "Send a batch of events; each is checked on its own: valid ones are kept, the others "
                "listed in the answer and dead-lettered",
                "operationId": f"post_{name}",
                "requestBody": _body("Batch"),
                "security": security,
                "responses": {
                    **answers,
                    "200": {
                        "description": "The batch was well-formed: every event is taken or listed in rejected "
                        "(success is false when none was taken)",
                        "content": {"application/json": {"schema": {"$ref": f"{_REF}BatchResult"}}},
                    },
                },
            }
        }
    paths["/v1/pixel/{type}"] = {
        "get": {
            "summary": "Tracking pixel: always the 1x1 GIF, whatever the query holds",
            "description": "A pixel with a valid writeKey that cannot be read (bad base64, bad JSON, an event that "
            "breaks the spec, a type that is not an event type) is dead-lettered; one without a valid "
            "writeKey is only counted (headwater_ingest_bad_pixels_total). Event fields may also come "
            "as plain query parameters (properties.<name>=...).",
            "operationId": "get_pixel",
            "security": [],
            "parameters": [
                {
                    "name": "type",
                    "in": "path",
                    "required": True,
                    "schema": {
                        "type": "string",
                        "description": f"one of {', '.join(segment.TYPES)}; any other "
                        "value is counted and dead-lettered",
                    },
                },
                {
                    "name": "data",
                    "in": "query",
                    "schema": {"type": "string"},
                    "description": "base64 (standard or URL-safe, padding optional) of the event JSON",
                },
                {"name": "writeKey", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {
                    "description": "GIF",
                    "content": {"image/gif": {"schema": {"type": "string", "format": "binary"}}},
                }
            },
        }
    }
    paths["/v1/projects/{writeKey}/settings"] = {
        "get": {
            "summary": "The analytics.js settings document for a source (analytics-next's cdnURL pointed here)",
            "description": "The Segment.io integration aimed at this ingest, with apiKey = the write key asked for; "
            "Cache-Control public with max-age, an ETag (If-None-Match answers 304), CORS per source.",
            "operationId": "get_settings",
            "security": [],
            "parameters": [{"name": "writeKey", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {
                    "description": "the settings document",
                    "headers": {
                        "ETag": {"schema": {"type": "string"}},
                        "Cache-Control": {"schema": {"type": "string"}},
                    },
                    "content": {"application/json": {"schema": {"type": "object", "required": ["integrations"]}}},
                },
                "304": {"description": "unchanged since the ETag sent in If-None-Match"},
                "404": _error("No enabled source has this write key"),
            },
        }
    }
    paths["/healthz"] = {
        "get": {
            "summary": "Alive",
            "operationId": "healthz",
            "security": [],
            "responses": {
                "200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    }
    ready = {"content": {"application/json": {"schema": {"$ref": f"{_REF}Readiness"}}}}
    paths["/readyz"] = {
        "get": {
            "summary": "Kafka answers, sources loaded; says when spooling or when damaged "
            "spool segments were set aside",
            "operationId": "readyz",
            "security": [],
            "responses": {"200": {"description": "ready", **ready}, "503": {"description": "not ready", **ready}},
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    single = {f"Single_{t}": _event_schema(t, type_required=False) for t in segment.TYPES}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Headwater ingest: Segment tracking API", "version": version},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic", "description": "write key as user name, empty password"},
                "writeKeyQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "writeKey",
                    "description": "also taken from a writeKey string field of the body",
                },
            },
            "schemas": {
                **single,
                "Batch": {
                    "type": "object",
                    "required": ["batch"],
                    "properties": {
                        "batch": {
                            "type": "array",
                            "minItems": 1,
                            "description": f"at most max_batch_events ({settings.max_batch_events}) events, else 413",
                            "items": {
                                "description": "an event; each is checked on its own (as the single "
                                "event schemas say, with a required type)"
                            },
                        },
                        "context": {"description": "merged under each event's own context when an object"},
                        "integrations": {"description": "merged under each event's own when an object"},
                        "sentAt": _TIME,
                    },
                },
                "Success": {"type": "object", "required": ["success"], "properties": {"success": {"const": True}}},
                "BatchResult": {
                    "type": "object",
                    "required": ["success"],
                    "properties": {
                        "success": {"type": "boolean"},
                        "accepted": {"type": "integer", "minimum": 0},
                        "rejected": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["index", "errors"],
                                "properties": {
                                    "index": {"type": "integer"},
                                    "messageId": {"type": ["string", "null"]},
                                    "errors": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                        },
                        "error": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["success", "error", "message"],
                    "properties": {
                        "success": {"const": False},
                        "error": {"type": "string"},
                        "message": {"type": "string"},
                        "request_id": {"type": "string"},
                    },
                },
                "Readiness": {
                    "type": "object",
                    "required": ["ready", "checks"],
                    "properties": {
                        "ready": {"type": "boolean"},
                        "checks": {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    }
