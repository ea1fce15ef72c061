"""Legacy -> Headwater: the bridge's decoding of a legacy Kinesis record (legacy.py has the
format) into an Envelope for events.raw, a typed bad row for events.dlq, or a skip. Pure
code: no Kinesis, Kafka or Cassandra.

Invariants:

* No write key leaves this module towards Kafka: ``appId`` and ``writeKey`` are
  taken out of every event before it becomes an Envelope, and a bad row's
  original bytes have every registered write key (and the record's own appId)
  blanked out; the row names the unknown key only by a short SHA-256 prefix.
* Every record ends in exactly one of: an Envelope for events.raw, a typed
  bad row for events.dlq, or a counted skip (a mirrored record carrying the
  Headwater marker, or a source that is not bridged from this stream).
* The legacy ``timestamp`` was already corrected for clock skew by the old
  API, so it must be the event time downstream too: ``sentAt`` is moved to
  ``context.legacy.sentAt``, and with no sentAt the processor takes the
  timestamp as it is, whatever the source's clock_skew rule says.
* A bridged event's minute for the parity report is computed here the way
  the processor computes event time for such an event (timestamp, else
  originalTimestamp, else receivedAt; further ahead of receivedAt than the
  future-skew limit: receivedAt).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from services.bridge.legacy import (
    GO_ZERO_TIME,
    KEY_FIELDS,
    MAX_BAD_ROW_ORIGINAL,
    TRUNCATED_ORIGINAL,
    event_name,
    infer_type,
    is_mirrored,
    parse_time_ms,
)
from services.common.badrow import BadRow, FailureType
from services.common.segment import user_key
from services.common.sources import Source, SourceRegistry
from services.ingest.envelope import EnvelopeWriter

# The Envelope path of bridged records; the processor infers nothing from it.
BRIDGE_PATH = "/legacy/kinesis"
# The user agent of bridged records when the event's context has none.
BRIDGE_USER_AGENT = "headwater-bridge"
# The times the bridge reads (the event time and receivedAt); sentAt is moved aside unread.
PARSED_TIMES = ("timestamp", "originalTimestamp", "receivedAt")


class Skip(enum.StrEnum):
    """A record the bridge deliberately does not forward (counted, never silent)."""

    MIRRORED = "mirrored"  # written by Headwater's mirror: it came from Headwater
    NOT_BRIDGED = "not_bridged"  # its source is not bridged from this stream


class BadReason(enum.StrEnum):
    """Why a legacy record is a bad row (the ``reason`` in the row's extra and in metrics)."""

    INVALID_JSON = "invalid_json"
    NO_WRITE_KEY = "no_write_key"
    UNKNOWN_WRITE_KEY = "unknown_write_key"
    DISABLED_SOURCE = "disabled_source"
    TYPE_NOT_INFERABLE = "type_not_inferable"
    BAD_TIMESTAMP = "bad_timestamp"
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class Position:
    """Where a legacy record came from."""

    stream: str
    shard_id: str
    sequence: str
    arrival_ms: int


@dataclass(frozen=True)
class Bridged:
    """A record ready for events.raw, and what the parity report counts of it."""

    source_id: str
    message_id: str
    key: bytes
    value: bytes
    minute_ms: int
    type: str
    name: str


@dataclass(frozen=True)
class Rejected:
    reason: BadReason
    row: BadRow


Outcome = Bridged | Rejected | Skip


def fingerprint(key: str) -> str:
    """Names a write key in a bad row or log without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class LegacyDecoder:
    """Turns legacy records of one stream into Envelopes, bad rows or skips."""

    def __init__(self, registry: SourceRegistry, *, service: str, version: str, max_future_skew_ms: int) -> None:
        self.registry = registry
        self.service = service
        self.version = version
        self.max_future_skew_ms = max_future_skew_ms

    def decode(self, data: bytes, at: Position) -> Outcome:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return self._bad(BadReason.INVALID_JSON, FailureType.INVALID_JSON, [f"record is not JSON: {exc}"], data, at)
        if not isinstance(doc, dict):
            return self._bad(
                BadReason.INVALID_JSON,
                FailureType.INVALID_JSON,
                [f"record must be a JSON object, got {type(doc).__name__}"],
                data,
                at,
            )
        if is_mirrored(doc):
            return Skip.MIRRORED
        key = doc.get("appId") or doc.get("writeKey")
        if not isinstance(key, str) or not key:
            return self._bad(
                BadReason.NO_WRITE_KEY, FailureType.SCHEMA_VIOLATION, ["appId is missing"], data, at, doc=doc
            )
        source = self.registry.by_write_key(key)
        if source is None:
            return self._bad(
                BadReason.UNKNOWN_WRITE_KEY,
                FailureType.SCHEMA_VIOLATION,
                ["appId is not a known write key"],
                data,
                at,
                doc=doc,
                extra={"write_key_sha256": fingerprint(key)},
            )
        if not source.enabled:
            return self._bad(
                BadReason.DISABLED_SOURCE,
                FailureType.SCHEMA_VIOLATION,
                [f"source {source.id} is disabled"],
                data,
                at,
                doc=doc,
                source=source,
            )
        if source.legacy_way(at.stream) != "bridge":
            return Skip.NOT_BRIDGED
        return self._bridge(doc, data, at, source)

    def _bridge(
        self, doc: dict[str, Any], data: bytes, at: Position, source: Source
    ) -> Outcome:  # long: every legacy field's rule in the order the Go service applied them
        kind = infer_type(doc)
        if kind is None:
            return self._bad(
                BadReason.TYPE_NOT_INFERABLE,
                FailureType.SCHEMA_VIOLATION,
                ["the record has no type and none of previousId, groupId, event, traits, name"],
                data,
                at,
                doc=doc,
                source=source,
            )
        event = {k: v for k, v in doc.items() if k not in KEY_FIELDS}
        event["type"] = kind
        try:
            times = {name: parse_time_ms(event.get(name)) for name in PARSED_TIMES}
        except ValueError as exc:
            return self._bad(
                BadReason.BAD_TIMESTAMP, FailureType.SCHEMA_VIOLATION, [str(exc)], data, at, doc=doc, source=source
            )
        for name, ms in times.items():
            if ms is None:
                event.pop(name, None)  # Go's zero time: the old API did not have it
        # sentAt is only carried along (the processor never sees it), so it is not parsed.
        sent = event.pop("sentAt", None)
        if sent == GO_ZERO_TIME or sent == "":
            sent = None
        context = event.get("context")
        context = dict(context) if isinstance(context, dict) else {}
        if sent is not None:
            legacy = context.get("legacy")
            context["legacy"] = {**(legacy if isinstance(legacy, dict) else {}), "sentAt": sent}
        event["context"] = context
        received_ms = times["receivedAt"] or at.arrival_ms
        if "receivedAt" not in event:
            event["receivedAt"] = (
                datetime.fromtimestamp(received_ms / 1000, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
        message_id = event.get("messageId")
        if not isinstance(message_id, str) or not message_id:
            # Stable across re-reads, so the processor's dedupe still sees one event.
            message_id = f"legacy-{at.shard_id}-{at.sequence}"
            event["messageId"] = message_id
        moment = times["timestamp"] or times["originalTimestamp"] or received_ms
        if moment - received_ms > self.max_future_skew_ms:
            moment = received_ms
        ip = context.get("ip")
        ua = context.get("userAgent")
        writer = EnvelopeWriter(
            source_id=source.id,
            received_at_ms=received_ms,
            client_ip=ip if isinstance(ip, str) else "",
            user_agent=ua if isinstance(ua, str) else BRIDGE_USER_AGENT,
            request_id=f"kinesis:{at.shard_id}:{at.sequence}",
            path=BRIDGE_PATH,
        )
        return Bridged(
            source_id=source.id,
            message_id=message_id,
            key=f"{source.id}:{user_key(event)}".encode(),
            value=writer.encode(message_id, orjson.dumps(event)),
            minute_ms=moment - moment % 60_000,
            type=kind,
            name=event_name(kind, event),
        )

    def redact(self, data: bytes, doc: dict[str, Any] | None) -> bytes:
        """The original without any write key: the parsed record without its key
        fields, or (unparsable) the bytes with every registered key blanked."""
        if doc is not None:
            return orjson.dumps({k: v for k, v in doc.items() if k not in KEY_FIELDS})
        for key in self.registry.write_keys():
            if key and key.encode() in data:
                data = data.replace(key.encode(), b"<redacted>")
        return data

    def _bad(
        self,
        reason: BadReason,
        failure: FailureType,
        errors: list[str],
        data: bytes,
        at: Position,
        *,
        doc: dict[str, Any] | None = None,
        source: Source | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Rejected:
        mid = doc.get("messageId") if doc is not None else None
        original = self.redact(data, doc)
        if len(original) > MAX_BAD_ROW_ORIGINAL:
            # Base64 in a bad row grows it by a third: a whole 1 MiB record would not fit a Kafka record.
            extra = {**(extra or {}), "original_bytes": len(original), "original_truncated_to": TRUNCATED_ORIGINAL}
            original = original[:TRUNCATED_ORIGINAL]
        row = BadRow(
            failure_type=failure,
            errors=errors,
            original=original,
            service=self.service,
            version=self.version,
            source_id=source.id if source is not None else None,
            message_id=mid if isinstance(mid, str) and mid else None,
            extra={
                "reason": reason.value,
                "original_format": "legacy_kinesis_record",
                "kinesis": {
                    "stream": at.stream,
                    "shard_id": at.shard_id,
                    "sequence": at.sequence,
                    "arrival_ms": at.arrival_ms,
                },
                **(extra or {}),
            },
        )
        return Rejected(reason, row)
