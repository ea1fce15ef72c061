"""What every ingest endpoint shares: the handlers' state (Ingest, under INGEST_KEY), reading
a request body within its size and time limits, the source a write key belongs to, the rate
limit, the 503 for events that cannot be stored now, JSON answers with their CORS headers,
and the request metric.

Bad input is a RequestError (parsing.py) with its 4xx status; the handlers turn it into the
answer. A body is refused as soon as it passes its limit (413), as it arrives or as it is
decompressed, and with 408 when it stops arriving.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from services.common.sources import Source, SourceRegistry
from services.ingest import parsing
from services.ingest.errors import Overloaded, SpoolFull
from services.ingest.metrics import IngestMetrics
from services.ingest.parsing import RequestError
from services.ingest.publisher import Publisher
from services.ingest.ratelimit import RateLimiter, retry_after_seconds
from services.ingest.settings import Settings

VERSION = "0.1.0"

# JSON under every label real clients put on it: analytics.js sends text/plain
# to skip the preflight, curl -d sends form-urlencoded, some send octet-stream.
ALLOWED_CONTENT_TYPES = (
    "",
    "application/json",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
)


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


def clean_header(value: str, limit: int = 1024) -> str:
    """aiohttp keeps non-UTF-8 header bytes as surrogates, which protobuf refuses."""
    if value.isascii():
        return value[:limit]
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:limit]


def scrubbed(errors: list[str], write_keys: Sequence[str]) -> list[str]:
    """Error texts quote client values (a type, say), which may be a write key."""
    return [parsing.scrub_keys(e.encode(), write_keys).decode() for e in errors]


def json_response(status: int, body: dict[str, Any] | bytes, headers: CIMultiDict[str] | None = None) -> web.Response:
    """A JSON answer (``body`` already serialized when it is bytes)."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(status=status, body=payload, content_type="application/json", headers=headers)


def cors_headers(origin: str | None, source: Source | None) -> CIMultiDict[str]:
    """Lets the page at ``origin`` read the answer, when the source (any, for None) allows it."""
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
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type!r} is not accepted; send application/json or text/plain",
        )
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
        err = RequestError(
            408, "request_timeout", f"the request body did not arrive within client_body_timeout_s ({timeout_s:g} s)"
        )
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


def authorize(ing: Ingest, key: str) -> Source:
    """The enabled source of a write key; 401 for an unknown key, 403 for a disabled source."""
    source = ing.sources.by_write_key(key)
    if source is None:
        raise RequestError(401, "unknown_write_key", "the write key does not belong to any source")
    if not source.enabled:
        raise RequestError(403, "source_disabled", f"source {source.id!r} is disabled")
    return source


def rate_limit(ing: Ingest, source: Source, n: int) -> None:
    """429 with Retry-After when ``n`` more events would put the source over its rate limit."""
    wait = ing.limiter.check(source.id, source.rate_limit_per_s, source.rate_limit_burst, n)
    if wait > 0:
        retry = retry_after_seconds(wait, ing.settings.rate_limit_retry_after_s)
        err = RequestError(
            429,
            "rate_limited",
            f"source {source.id!r} is over its rate limit of {source.rate_limit_per_s} events/s",
            retry_after_s=retry,
        )
        err.headers = {"Retry-After": str(retry), "X-RateLimit-Reset": str(int(time.time()) + retry)}
        raise err


def unavailable(ing: Ingest, exc: SpoolFull | Overloaded) -> RequestError:
    """The 503 for events that cannot be taken right now; SDKs retry after Retry-After."""
    if isinstance(exc, SpoolFull):
        retry = ing.settings.spool_retry_after_s
        err = RequestError(503, "unavailable", f"events cannot be stored right now: {exc}", retry_after_s=retry)
    else:
        retry = 1
        err = RequestError(503, "overloaded", f"too many events in flight: {exc}", retry_after_s=retry)
    err.headers = {"Retry-After": str(retry)}
    return err


def observe(ing: Ingest, path: str, status: int, started: float, source: Source | None) -> None:
    """Count the request under its route template (never the write key) and its source."""
    ing.metrics.requests.observe(path, status, time.perf_counter() - started, source.id if source else "")
