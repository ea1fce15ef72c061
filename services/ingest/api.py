"""The Segment tracking API over aiohttp: the routes, the POST endpoints (single events and
batches) and CORS preflights. What the endpoints share is in request.py, events become
records in records.py, pixels are pixel.py's.

Invariants:

- 200 only once every record of the request is acknowledged by Kafka or
  fsync'd in the spool (Publisher.publish); bad input is a 4xx JSON answer
  naming the problem, never a 5xx (503 only for "cannot store now", with
  Retry-After).
- No write key leaves in anything built here: events lose their writeKey
  field (parsing.stamp); bad rows drop it from their original and blank every
  registered key in it and in their errors; error answers are scrubbed the
  same way. Metric labels are route templates, fixed reasons and source ids.
- A single event is answered (400/413) and not dead-lettered; a well-formed
  batch is answered 200 with its rejected events listed and dead-lettered.
- Pixels always answer the GIF; without a valid write key they are counted
  only, so anonymous junk can fill neither the DLQ nor the spool.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from services.common import segment
from services.common.sources import Source
from services.ingest import parsing
from services.ingest.errors import Overloaded, SpoolFull
from services.ingest.parsing import RequestError
from services.ingest.pixel import handle_pixel
from services.ingest.records import prepare
from services.ingest.request import (
    INGEST_KEY,
    authorize,
    clean_header,
    cors_headers,
    json_response,
    observe,
    rate_limit,
    read_body,
    unavailable,
)

log = structlog.get_logger(__name__)

SUCCESS = orjson.dumps({"success": True})
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Content-Encoding, X-Request-Id"

SINGLE_PATHS = {**{t: t for t in segment.TYPES}, **segment.SHORT_TYPES}
BATCH_PATHS = ("batch", "b", "import")


def make_post_handler(path: str) -> Callable[[web.Request], Awaitable[web.Response]]:  # noqa: C901 - one request's steps and error answers in order
    name = path.rsplit("/", 1)[1]
    is_batch = name in BATCH_PATHS
    expected_type = None if is_batch else SINGLE_PATHS[name]

    async def handle(
        request: web.Request,
    ) -> web.Response:  # long: one request's steps and error answers in order (the hot path: one frame)
        started = time.perf_counter()
        ing = request.app[INGEST_KEY]
        origin = request.headers.get("Origin")
        request_id = clean_header(request.headers.get("X-Request-Id", ""), 100) or parsing.new_request_id()
        source: Source | None = None
        counted = False  # events rejected in prepare() are counted there, once
        try:
            body = await read_body(request, ing.settings.max_request_bytes, ing.settings.client_body_timeout_s)
            data = parsing.parse_json_body(body)
            key = parsing.find_write_key(
                request.headers.get("Authorization"),
                # The query is parsed only when there is one.
                request.query.get("writeKey") if request.query_string else None,
                data,
            )
            source = authorize(ing, key)
            if origin and "*" not in source.allowed_origins and origin not in source.allowed_origins:
                raise RequestError(403, "origin_not_allowed", f"origin {origin!r} may not send to source {source.id!r}")
            if is_batch:
                events = data.get("batch")
                if not isinstance(events, list):
                    raise RequestError(400, "invalid_batch", "a batch needs a 'batch' array of events")
                if len(events) > ing.settings.max_batch_events:
                    raise RequestError(
                        413,
                        "payload_too_large",
                        f"the batch has {len(events)} events; max_batch_events is {ing.settings.max_batch_events}",
                        limit="max_batch_events",
                        limit_events=ing.settings.max_batch_events,
                    )
                if not events:
                    raise RequestError(400, "invalid_batch", "the batch is empty")
                if data.get("sentAt") is not None and not isinstance(data["sentAt"], str):
                    raise RequestError(400, "invalid_batch", "the batch's sentAt must be an ISO-8601 string")
            else:
                events = [data]
            rate_limit(ing, source, len(events))
            prepared = prepare(
                ing,
                source,
                events,
                expected_type=expected_type,
                batch=data if is_batch else None,
                request=request,
                request_id=request_id,
                path=path,
            )
            if not is_batch and prepared.rejected:
                counted = True
                errors = prepared.rejected[0]["errors"]
                too_big = any("max_event_bytes" in e for e in errors)
                raise RequestError(
                    413 if too_big else 400,
                    "payload_too_large" if too_big else "invalid_event",
                    "; ".join(errors),
                    errors=errors,
                    **({"limit": "max_event_bytes"} if too_big else {}),
                )
            # A rejected single event was answered above (the client knows);
            # a batch's rejected events travel as bad rows with the good ones.
            try:
                await ing.publisher.publish(prepared.records)
            except (SpoolFull, Overloaded) as exc:
                raise unavailable(ing, exc) from None
            if prepared.accepted:
                ing.metrics.events.accepted(prepared.accepted, source.id)
            if is_batch and prepared.rejected:
                # 200 for any well-formed batch, as Segment answers: every event has its
                # outcome here (taken, or listed and dead-lettered), and SDKs must not
                # resend the good ones. success says whether any was taken.
                status = 200
                body_out: dict[str, Any] | bytes = {
                    "success": prepared.accepted > 0,
                    "accepted": prepared.accepted,
                    "rejected": prepared.rejected,
                    **(
                        {}
                        if prepared.accepted
                        else {
                            "error": "invalid_batch",
                            "message": "no event in the batch is valid; each is listed in rejected and dead-lettered",
                        }
                    ),
                }
            else:
                status, body_out = 200, SUCCESS
            response = json_response(status, body_out, cors_headers(origin, source) if origin else None)
        except RequestError as exc:
            reason = exc.body["error"]
            if not counted and reason not in ("rate_limited", "unavailable", "overloaded"):
                ing.metrics.events.rejected(reason, source=source.id if source else "")
            # The page may read why it failed, unless its origin is what failed.
            headers = cors_headers(origin if reason != "origin_not_allowed" else None, source)
            headers.update(exc.headers)
            # An error answer may quote client input (an origin, a type); no write key
            # goes back in one, whoever sent it.
            answer = parsing.scrub_keys(orjson.dumps({**exc.body, "request_id": request_id}), ing.sources.write_keys())
            response = json_response(exc.status, answer, headers)
            if exc.close_connection:
                response.force_close()
            if exc.status >= 500:
                log.warning("request refused", status=exc.status, error=reason, request_id=request_id)
        observe(ing, path, response.status, started, source)
        return response

    return handle


async def handle_preflight(request: web.Request) -> web.Response:
    ing = request.app[INGEST_KEY]
    origin = request.headers.get("Origin")
    if not origin or not ing.sources.origin_allowed_anywhere(origin):
        return json_response(
            403,
            {
                "success": False,
                "error": "origin_not_allowed",
                "message": f"origin {origin!r} is not allowed by any source",
            },
        )
    requested = request.headers.get("Access-Control-Request-Headers")
    headers = cors_headers(origin, None)
    headers["Access-Control-Allow-Methods"] = "POST, GET, OPTIONS"
    headers["Access-Control-Allow-Headers"] = requested or CORS_ALLOW_HEADERS
    headers["Access-Control-Max-Age"] = "86400"
    headers["Vary"] = "Origin, Access-Control-Request-Headers"
    return web.Response(status=204, headers=headers)


def add_routes(app: web.Application) -> None:
    for name in (*SINGLE_PATHS, *BATCH_PATHS):
        path = f"/v1/{name}"
        app.router.add_post(path, make_post_handler(path))
    app.router.add_get("/v1/pixel/{type}", handle_pixel)
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", handle_preflight)
