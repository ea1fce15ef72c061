"""The Segment tracking API over aiohttp.

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

import asyncio
import base64
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from services.common import segment
from services.common.badrow import BadRow, FailureType
from services.common.sources import Source, SourceRegistry
from services.ingest import parsing
from services.ingest.envelope import EnvelopeWriter
from services.ingest.errors import Overloaded, SpoolFull
from services.ingest.metrics import IngestMetrics
from services.ingest.parsing import RequestError
from services.ingest.publisher import Publisher
from services.ingest.ratelimit import RateLimiter, retry_after_seconds
from services.ingest.settings import Settings
from services.ingest.spoolfile import Record

log = structlog.get_logger(__name__)

VERSION = "0.1.0"
# The smallest transparent GIF: what a mail client gets for any pixel.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
SUCCESS = orjson.dumps({"success": True})
# JSON under every label real clients put on it: analytics.js sends text/plain
# to skip the preflight, curl -d sends form-urlencoded, some send octet-stream.
ALLOWED_CONTENT_TYPES = ("", "application/json", "text/plain", "application/octet-stream",
                         "application/x-www-form-urlencoded")
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Content-Encoding, X-Request-Id"

SINGLE_PATHS = {**{t: t for t in segment.TYPES}, **segment.SHORT_TYPES}
BATCH_PATHS = ("batch", "b", "import")


@dataclass
class Ingest:
    """What the handlers share inside one worker process."""

    settings: Settings
    sources: SourceRegistry
    publisher: Publisher
    metrics: IngestMetrics
    limiter: RateLimiter
    proxies: parsing.TrustedProxies


INGEST_KEY = web.AppKey("ingest", Ingest)


JSON_MAX_DEPTH = parsing.JSON_MAX_DEPTH
# A bad row's original keeps the event whole up to this depth; deeper containers
# are replaced by a marker (orjson cannot write them, and repr() would recurse).
ORIGINAL_MAX_DEPTH = 200
CUT_MARKER = f"[nested deeper than {ORIGINAL_MAX_DEPTH} levels: cut]"


def clean_header(value: str, limit: int = 1024) -> str:
    """aiohttp keeps non-UTF-8 header bytes as surrogates, which protobuf refuses."""
    if value.isascii():
        return value[:limit]
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:limit]


def original_bytes(event: Any, write_keys: Sequence[str] = ()) -> bytes:
    """The event for a bad row, as JSON: without its ``writeKey`` field and with any
    registered write key blanked out; containers nested past ORIGINAL_MAX_DEPTH cut."""
    if isinstance(event, dict) and "writeKey" in event:
        event = {k: v for k, v in event.items() if k != "writeKey"}
    try:
        raw = orjson.dumps(event)
    except orjson.JSONEncodeError:
        try:
            raw = orjson.dumps(parsing.cut_deep(event, ORIGINAL_MAX_DEPTH, CUT_MARKER))
        except orjson.JSONEncodeError:
            raw = orjson.dumps(CUT_MARKER)
    return parsing.scrub_keys(raw, write_keys)


def _scrubbed(errors: list[str], write_keys: Sequence[str]) -> list[str]:
    """Error texts quote client values (a type, say), which may be a write key."""
    return [parsing.scrub_keys(e.encode(), write_keys).decode() for e in errors]


def _json(status: int, body: dict[str, Any] | bytes, headers: CIMultiDict[str] | None = None) -> web.Response:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(status=status, body=payload, content_type="application/json", headers=headers)


def _cors_headers(origin: str | None, source: Source | None) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    if origin and (source is None or "*" in source.allowed_origins or origin in source.allowed_origins):
        headers["Access-Control-Allow-Origin"] = origin
        headers["Vary"] = "Origin"
    return headers


def _media_type(header: str) -> str:
    return header.split(";")[0].strip().lower()


@functools.lru_cache(maxsize=256)
def _accepted_content_type(header: str) -> bool:
    """Cached: clients send a handful of Content-Type headers."""
    content_type = _media_type(header)
    return content_type in ALLOWED_CONTENT_TYPES or content_type.endswith("+json")


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The decoded body, refused with 413 as soon as it passes ``limit``, and with
    408 (the connection then closed) when it has not all arrived after ``timeout_s``."""
    header = request.headers.get("Content-Type", "")
    if not _accepted_content_type(header):
        content_type = _media_type(header)
        raise RequestError(415, "unsupported_media_type",
                           f"Content-Type {content_type!r} is not accepted; send application/json or text/plain")
    if request.content_length is not None and request.content_length > limit:
        raise parsing.too_large("max_request_bytes", limit, "the request body")
    encoding = request.headers.get("Content-Encoding", "")
    if request.content_length is not None and encoding in ("", "identity"):
        # Plain body of a known, allowed size (the hot path). Mostly it came in the
        # same packets as the headers and is all buffered already: take it as is.
        if request.content.is_eof():
            return request.content.read_nowait()
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_rest(request, limit, encoding)
    except TimeoutError:
        err = RequestError(408, "request_timeout",
                           f"the request body did not arrive within client_body_timeout_s ({timeout_s:g} s)")
        err.close_connection = True
        raise err from None


async def _read_rest(request: web.Request, limit: int, encoding: str) -> bytes:
    if request.content_length is not None and encoding in ("", "identity"):
        return await request.read()
    decoder = parsing.BoundedDecoder(encoding, limit)
    received = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        received += len(chunk)
        if received > limit:
            raise parsing.too_large("max_request_bytes", limit, "the request body")
        decoder.feed(chunk)
    return decoder.finish()


def _authorize(ing: Ingest, key: str) -> Source:
    source = ing.sources.by_write_key(key)
    if source is None:
        raise RequestError(401, "unknown_write_key", "the write key does not belong to any source")
    if not source.enabled:
        raise RequestError(403, "source_disabled", f"source {source.id!r} is disabled")
    return source


def _rate_limit(ing: Ingest, source: Source, n: int) -> None:
    wait = ing.limiter.check(source.id, source.rate_limit_per_s, source.rate_limit_burst, n)
    if wait > 0:
        retry = retry_after_seconds(wait, ing.settings.rate_limit_retry_after_s)
        err = RequestError(429, "rate_limited",
                           f"source {source.id!r} is over its rate limit of {source.rate_limit_per_s} events/s",
                           retry_after_s=retry)
        err.headers = {"Retry-After": str(retry), "X-RateLimit-Reset": str(int(time.time()) + retry)}
        raise err


@dataclass
class Prepared:
    records: list[Record]
    rejected: list[dict[str, Any]]
    accepted: int


def prepare(ing: Ingest, source: Source, events: list[Any], *, expected_type: str | None,
            batch: dict[str, Any] | None, request: web.Request, request_id: str,
            path: str) -> Prepared:
    """Validate and stamp events; build Kafka records for the good ones and
    bad rows for the rest."""
    s = ing.settings
    now_ms = time.time_ns() // 1_000_000
    received_at = parsing.iso_ms(now_ms)      # the same instant as the Envelope's received_at_ms
    client_ip = ing.proxies.client_ip(request.remote, request.headers.get("X-Forwarded-For"))
    user_agent = clean_header(request.headers.get("User-Agent", ""))
    batch_context = batch.get("context") if batch else None
    batch_context = batch_context if isinstance(batch_context, dict) else None
    batch_integrations = batch.get("integrations") if batch else None
    batch_integrations = batch_integrations if isinstance(batch_integrations, dict) else None
    batch_sent_at = batch.get("sentAt") if batch else None
    source_prefix = f"{source.id}:"
    envelopes = EnvelopeWriter(source_id=source.id, received_at_ms=now_ms, client_ip=client_ip,
                               user_agent=user_agent, request_id=request_id, path=path)
    records: list[Record] = []
    rejected: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        errors = segment.validate(event, expected_type)
        failure = FailureType.SCHEMA_VIOLATION
        value = b""
        if not errors:
            event.setdefault("type", expected_type)
            parsing.stamp(event, received_at=received_at, client_ip=client_ip, batch_context=batch_context,
                          batch_integrations=batch_integrations, batch_sent_at=batch_sent_at)
            try:
                value = orjson.dumps(event)
            except orjson.JSONEncodeError:
                errors = [f"event is nested deeper than {JSON_MAX_DEPTH} levels"]
            else:
                if len(value) > s.max_event_bytes:
                    errors = [f"event is larger than max_event_bytes ({s.max_event_bytes} bytes)"]
                    failure = FailureType.SIZE_VIOLATION
        if errors:
            # Errors and ids quote client values, which may be a write key: blanked
            # here for the answer and the bad row alike.
            keys = ing.sources.write_keys()
            errors = _scrubbed(errors, keys)
            message_id = event.get("messageId") if isinstance(event, dict) else None
            message_id = _scrubbed([message_id], keys)[0] if isinstance(message_id, str) else None
            rejected.append({"index": index, "messageId": message_id, "errors": errors})
            ing.metrics.events.rejected(failure.value)
            records.append(Record(s.dlq_topic, source.id.encode(), BadRow(
                failure_type=failure, errors=errors,
                original=original_bytes(event, keys),
                service="ingest", version=VERSION, source_id=source.id,
                message_id=message_id, request_id=request_id,
                extra={"path": path, "index": index},
            ).to_json()))
            continue
        key = f"{source_prefix}{segment.user_key(event)}".encode()
        records.append(Record(s.raw_topic, key, envelopes.encode(event["messageId"], value)))
    return Prepared(records, rejected, len(events) - len(rejected))


def _unavailable(ing: Ingest, exc: SpoolFull | Overloaded) -> RequestError:
    """The 503 for events that cannot be taken right now; SDKs retry after Retry-After."""
    if isinstance(exc, SpoolFull):
        retry = ing.settings.spool_retry_after_s
        err = RequestError(503, "unavailable", f"events cannot be stored right now: {exc}", retry_after_s=retry)
    else:
        retry = 1
        err = RequestError(503, "overloaded", f"too many events in flight: {exc}", retry_after_s=retry)
    err.headers = {"Retry-After": str(retry)}
    return err


def _observe(ing: Ingest, path: str, status: int, started: float, source: Source | None) -> None:
    ing.metrics.requests.observe(path, status, time.perf_counter() - started, source.id if source else "")


def make_post_handler(path: str) -> Callable[[web.Request], Awaitable[web.Response]]:  # noqa: C901 - one request's steps and error answers in order
    name = path.rsplit("/", 1)[1]
    is_batch = name in BATCH_PATHS
    expected_type = None if is_batch else SINGLE_PATHS[name]

    async def handle(request: web.Request) -> web.Response:
        started = time.perf_counter()
        ing = request.app[INGEST_KEY]
        origin = request.headers.get("Origin")
        request_id = clean_header(request.headers.get("X-Request-Id", ""), 100) or parsing.new_request_id()
        source: Source | None = None
        try:
            body = await read_body(request, ing.settings.max_request_bytes, ing.settings.client_body_timeout_s)
            data = parsing.parse_json_body(body)
            key = parsing.find_write_key(request.headers.get("Authorization"),
                                         # The query is parsed only when there is one.
                                         request.query.get("writeKey") if request.query_string else None, data)
            source = _authorize(ing, key)
            if origin and "*" not in source.allowed_origins and origin not in source.allowed_origins:
                raise RequestError(403, "origin_not_allowed",
                                   f"origin {origin!r} may not send to source {source.id!r}")
            if is_batch:
                events = data.get("batch")
                if not isinstance(events, list):
                    raise RequestError(400, "invalid_batch", "a batch needs a 'batch' array of events")
                if len(events) > ing.settings.max_batch_events:
                    raise RequestError(413, "payload_too_large",
                                       f"the batch has {len(events)} events; max_batch_events is "
                                       f"{ing.settings.max_batch_events}",
                                       limit="max_batch_events", limit_events=ing.settings.max_batch_events)
                if not events:
                    raise RequestError(400, "invalid_batch", "the batch is empty")
                if data.get("sentAt") is not None and not isinstance(data["sentAt"], str):
                    raise RequestError(400, "invalid_batch", "the batch's sentAt must be an ISO-8601 string")
            else:
                events = [data]
            _rate_limit(ing, source, len(events))
            prepared = prepare(ing, source, events, expected_type=expected_type,
                               batch=data if is_batch else None, request=request,
                               request_id=request_id, path=path)
            if not is_batch and prepared.rejected:
                errors = prepared.rejected[0]["errors"]
                too_big = any("max_event_bytes" in e for e in errors)
                raise RequestError(413 if too_big else 400,
                                   "payload_too_large" if too_big else "invalid_event",
                                   "; ".join(errors), errors=errors,
                                   **({"limit": "max_event_bytes"} if too_big else {}))
            # A rejected single event was answered above (the client knows);
            # a batch's rejected events travel as bad rows with the good ones.
            try:
                await ing.publisher.publish(prepared.records)
            except (SpoolFull, Overloaded) as exc:
                raise _unavailable(ing, exc) from None
            if prepared.accepted:
                ing.metrics.events.accepted(prepared.accepted)
            if is_batch and prepared.rejected:
                # 200 for any well-formed batch, as Segment answers: every event has its
                # outcome here (taken, or listed and dead-lettered), and SDKs must not
                # resend the good ones. success says whether any was taken.
                status = 200
                body_out: dict[str, Any] | bytes = {
                    "success": prepared.accepted > 0, "accepted": prepared.accepted,
                    "rejected": prepared.rejected,
                    **({} if prepared.accepted else {"error": "invalid_batch",
                                                     "message": "no event in the batch is valid; each is listed "
                                                                "in rejected and dead-lettered"}),
                }
            else:
                status, body_out = 200, SUCCESS
            response = _json(status, body_out, _cors_headers(origin, source) if origin else None)
        except RequestError as exc:
            reason = exc.body["error"]
            if reason not in ("rate_limited", "unavailable", "overloaded"):
                ing.metrics.events.rejected(reason)
            # The page may read why it failed, unless its origin is what failed.
            headers = _cors_headers(origin if reason != "origin_not_allowed" else None, source)
            headers.update(exc.headers)
            # An error answer may quote client input (an origin, a type); no write key
            # goes back in one, whoever sent it.
            answer = parsing.scrub_keys(orjson.dumps({**exc.body, "request_id": request_id}),
                                        ing.sources.write_keys())
            response = _json(exc.status, answer, headers)
            if exc.close_connection:
                response.force_close()
            if exc.status >= 500:
                log.warning("request refused", status=exc.status, error=reason, request_id=request_id)
        _observe(ing, path, response.status, started, source)
        return response

    return handle


# Pixel failures that are counted only: without a valid write key (or for a
# source that takes nothing now) a pixel is anonymous junk that must not fill
# the DLQ or the spool.
PIXEL_COUNT_ONLY = frozenset({"missing_write_key", "unknown_write_key", "source_disabled", "rate_limited",
                              "unavailable", "overloaded"})


def _pixel_original(path: str, query: dict[str, str], write_keys: Sequence[str]) -> bytes:
    """A bad pixel's input for its bad row: the query without ``writeKey``, its
    ``data=`` decoded when it is base64 (a key inside shows, so it can be blanked),
    every registered write key blanked."""
    kept: dict[str, Any] = {k: v for k, v in query.items() if k != "writeKey"}
    data = kept.get("data")
    if data is not None:
        decoded = parsing.decode_pixel_data(data)
        if decoded is not None:
            kept["data"] = decoded.decode("utf-8", "replace")
            kept["data_decoded"] = True
    return parsing.scrub_keys(orjson.dumps({"path": path, "query": kept}), write_keys)


async def handle_pixel(request: web.Request) -> web.Response:
    """Tracking pixels always answer the GIF. Problems go to metrics; those of a
    pixel with a valid write key also to the DLQ (keys blanked out)."""
    started = time.perf_counter()
    ing = request.app[INGEST_KEY]
    pixel_type = request.match_info["type"]
    path = f"/v1/pixel/{pixel_type}"
    query = dict(request.query)
    source: Source | None = None
    request_id = ""
    try:
        event: dict[str, Any] | None = None
        decode_error: RequestError | None = None
        try:
            event = parsing.decode_pixel(query, pixel_type)
        except RequestError as exc:
            decode_error = exc
        key = query.get("writeKey") or (event.pop("writeKey", None) if event is not None else None)
        if not isinstance(key, str) or not key:
            raise RequestError(401, "missing_write_key", "the pixel has no writeKey")
        source = _authorize(ing, key)
        request_id = parsing.new_request_id()
        if pixel_type not in segment.TYPES:
            raise RequestError(404, "bad_pixel", f"unknown pixel type {pixel_type!r}")
        if decode_error is not None:
            raise decode_error
        assert event is not None
        _rate_limit(ing, source, 1)
        prepared = prepare(ing, source, [event], expected_type=pixel_type, batch=None,
                           request=request, request_id=request_id, path=path)
        if prepared.rejected:
            raise RequestError(400, "bad_pixel", "; ".join(prepared.rejected[0]["errors"]))
        try:
            await ing.publisher.publish(prepared.records)
        except (SpoolFull, Overloaded) as exc:
            raise _unavailable(ing, exc) from None
        ing.metrics.events.accepted()
    except RequestError as exc:
        reason = exc.body["error"]
        ing.metrics.bad_pixels.labels(reason).inc()
        if source is not None and reason not in PIXEL_COUNT_ONLY:
            await _dead_letter_pixel(ing, source, path, query, exc, reason, request_id)
    _observe(ing, "/v1/pixel/{type}", 200, started, source)
    return web.Response(body=PIXEL_GIF, content_type="image/gif",
                        headers={"Cache-Control": "no-cache, no-store, must-revalidate"})


async def _dead_letter_pixel(ing: Ingest, source: Source, path: str, query: dict[str, str],
                             exc: RequestError, reason: str, request_id: str) -> None:
    keys = ing.sources.write_keys()
    bad = BadRow(failure_type=FailureType.PIXEL_DECODE, errors=_scrubbed([str(exc)], keys),
                 original=_pixel_original(path, query, keys), service="ingest", version=VERSION,
                 source_id=source.id, request_id=request_id, extra={"path": path, "reason": reason})
    try:
        await ing.publisher.publish([Record(ing.settings.dlq_topic, source.id.encode(), bad.to_json())])
    except (SpoolFull, Overloaded):
        log.warning("bad pixel could not be dead-lettered: spool full", request_id=request_id,
                    source_id=source.id)


async def handle_preflight(request: web.Request) -> web.Response:
    ing = request.app[INGEST_KEY]
    origin = request.headers.get("Origin")
    if not origin or not ing.sources.origin_allowed_anywhere(origin):
        return _json(403, {"success": False, "error": "origin_not_allowed",
                           "message": f"origin {origin!r} is not allowed by any source"})
    requested = request.headers.get("Access-Control-Request-Headers")
    headers = _cors_headers(origin, None)
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
