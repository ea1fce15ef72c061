"""Events into Kafka records: each event of a request validated against the Segment spec,
stamped (receivedAt, context.ip, the batch's context) and wrapped in its Envelope for
``events.raw``; an event that fails becomes a typed bad row for the DLQ instead.

No write key leaves in a record: events lose their writeKey field (parsing.stamp), and a bad
row drops it from its original and blanks every registered key in it and in its errors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from services.common import segment
from services.common.badrow import BadRow, FailureType
from services.common.kafkawriter import OutRecord
from services.common.sources import Source
from services.ingest import parsing
from services.ingest.envelope import EnvelopeWriter
from services.ingest.request import VERSION, Ingest, clean_header, scrubbed

JSON_MAX_DEPTH = parsing.JSON_MAX_DEPTH
# A bad row's original keeps the event whole up to this depth; deeper containers
# are replaced by a marker (orjson cannot write them, and repr() would recurse).
ORIGINAL_MAX_DEPTH = 200
CUT_MARKER = f"[nested deeper than {ORIGINAL_MAX_DEPTH} levels: cut]"


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


@dataclass
class Prepared:
    """A request's records (good events and bad rows), what the answer lists as rejected,
    and how many events were taken."""

    records: list[OutRecord]
    rejected: list[dict[str, Any]]
    accepted: int


def prepare(
    ing: Ingest,
    source: Source,
    events: list[Any],
    *,
    expected_type: str | None,
    batch: dict[str, Any] | None,
    request: web.Request,
    request_id: str,
    path: str,
) -> Prepared:  # long: one pass over a request's events, the hot path in one frame
    """Validate and stamp events; build Kafka records for the good ones and
    bad rows for the rest."""
    s = ing.settings
    now_ms = time.time_ns() // 1_000_000
    received_at = parsing.iso_ms(now_ms)  # the same instant as the Envelope's received_at_ms
    client_ip = ing.proxies.client_ip(request.remote, request.headers.get("X-Forwarded-For"))
    user_agent = clean_header(request.headers.get("User-Agent", ""))
    batch_context = batch.get("context") if batch else None
    batch_context = batch_context if isinstance(batch_context, dict) else None
    batch_integrations = batch.get("integrations") if batch else None
    batch_integrations = batch_integrations if isinstance(batch_integrations, dict) else None
    batch_sent_at = batch.get("sentAt") if batch else None
    source_prefix = f"{source.id}:"
    envelopes = EnvelopeWriter(
        source_id=source.id,
        received_at_ms=now_ms,
        client_ip=client_ip,
        user_agent=user_agent,
        request_id=request_id,
        path=path,
    )
    records: list[OutRecord] = []
    rejected: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        errors = segment.validate(event, expected_type)
        failure = FailureType.SCHEMA_VIOLATION
        value = b""
        if not errors:
            event.setdefault("type", expected_type)
            parsing.stamp(
                event,
                received_at=received_at,
                client_ip=client_ip,
                batch_context=batch_context,
                batch_integrations=batch_integrations,
                batch_sent_at=batch_sent_at,
            )
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
            errors = scrubbed(errors, keys)
            message_id = event.get("messageId") if isinstance(event, dict) else None
            message_id = scrubbed([message_id], keys)[0] if isinstance(message_id, str) else None
            rejected.append({"index": index, "messageId": message_id, "errors": errors})
            ing.metrics.events.rejected(failure.value, source=source.id)
            records.append(
                OutRecord(
                    s.dlq_topic,
                    source.id.encode(),
                    BadRow(
                        failure_type=failure,
                        errors=errors,
                        original=original_bytes(event, keys),
                        service="ingest",
                        version=VERSION,
                        source_id=source.id,
                        message_id=message_id,
                        request_id=request_id,
                        extra={"path": path, "index": index},
                    ).to_json(),
                )
            )
            continue
        key = f"{source_prefix}{segment.user_key(event)}".encode()
        records.append(OutRecord(s.raw_topic, key, envelopes.encode(event["messageId"], value)))
    return Prepared(records, rejected, len(events) - len(rejected))
