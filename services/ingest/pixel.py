"""Tracking pixels (``GET /v1/pixel/{type}``), as e-mail and pages without JavaScript send
them: the event in the query (or base64 in ``data=``).

A pixel always answers the GIF. Its problems are counted; those of a pixel with a valid write
key are also dead-lettered (keys blanked out). Without a valid write key it is counted only,
so anonymous junk can fill neither the DLQ nor the spool.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

import orjson
import structlog
from aiohttp import web

from services.common import segment
from services.common.badrow import BadRow, FailureType
from services.common.kafkawriter import OutRecord
from services.common.sources import Source
from services.ingest import parsing
from services.ingest.errors import Overloaded, SpoolFull
from services.ingest.parsing import RequestError
from services.ingest.records import prepare
from services.ingest.request import INGEST_KEY, VERSION, Ingest, authorize, observe, rate_limit, scrubbed, unavailable

log = structlog.get_logger(__name__)

# The smallest transparent GIF: what a mail client gets for any pixel.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
# Pixel failures that are counted only: without a valid write key (or for a
# source that takes nothing now) a pixel is anonymous junk that must not fill
# the DLQ or the spool.
PIXEL_COUNT_ONLY = frozenset(
    {"missing_write_key", "unknown_write_key", "source_disabled", "rate_limited", "unavailable", "overloaded"}
)


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
        source = authorize(ing, key)
        request_id = parsing.new_request_id()
        if pixel_type not in segment.TYPES:
            raise RequestError(404, "bad_pixel", f"unknown pixel type {pixel_type!r}")
        if decode_error is not None:
            raise decode_error
        assert event is not None
        rate_limit(ing, source, 1)
        prepared = prepare(
            ing,
            source,
            [event],
            expected_type=pixel_type,
            batch=None,
            request=request,
            request_id=request_id,
            path=path,
        )
        if prepared.rejected:
            raise RequestError(400, "bad_pixel", "; ".join(prepared.rejected[0]["errors"]))
        try:
            await ing.publisher.publish(prepared.records)
        except (SpoolFull, Overloaded) as exc:
            raise unavailable(ing, exc) from None
        ing.metrics.events.accepted(1, source.id)
    except RequestError as exc:
        reason = exc.body["error"]
        ing.metrics.bad_pixels.labels(reason).inc()
        if source is not None and reason not in PIXEL_COUNT_ONLY:
            await _dead_letter_pixel(ing, source, path, query, exc, reason, request_id)
    observe(ing, "/v1/pixel/{type}", 200, started, source)
    return web.Response(
        body=PIXEL_GIF, content_type="image/gif", headers={"Cache-Control": "no-cache, no-store, must-revalidate"}
    )


async def _dead_letter_pixel(
    ing: Ingest, source: Source, path: str, query: dict[str, str], exc: RequestError, reason: str, request_id: str
) -> None:
    keys = ing.sources.write_keys()
    bad = BadRow(
        failure_type=FailureType.PIXEL_DECODE,
        errors=scrubbed([str(exc)], keys),
        original=_pixel_original(path, query, keys),
        service="ingest",
        version=VERSION,
        source_id=source.id,
        request_id=request_id,
        extra={"path": path, "reason": reason},
    )
    try:
        await ing.publisher.publish([OutRecord(ing.settings.dlq_topic, source.id.encode(), bad.to_json())])
    except (SpoolFull, Overloaded):
        log.warning("bad pixel could not be dead-lettered: spool full", request_id=request_id, source_id=source.id)
