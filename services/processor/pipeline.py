"""One events.raw record in, the records it becomes out.

Pure apart from the parsers' caches: no Kafka here, so the whole path from
Envelope bytes to enriched JSON is unit-tested without servers. Bad input
becomes a typed bad row; an unexpected exception is retried a bounded number
of times and then becomes a poison bad row, so no record can block its
partition.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

import orjson
import structlog
from google.protobuf.message import DecodeError

from services.common.badrow import BAD_ROW_SCHEMA, BadRow, FailureType
from services.common.kafkawriter import OutRecord
from services.common.proto.envelope_pb2 import Envelope
from services.common.segment import SHORT_TYPES, TYPES, present, user_key, validate
from services.common.sources import Enrichment, SourceRegistry
from services.processor.dedupe import dedupe_key
from services.processor.enrich import Enricher
from services.processor.errors import BadInput
from services.processor.normalise import TimestampError, normalise, parse_ts
from services.processor.routing import destinations
from services.processor.settings import Settings

log = structlog.get_logger(__name__)

SCHEMA_HEADER = "hw-schema"
ENVELOPE_SCHEMA = b"envelope/1"
ENRICHED_HEADERS = [(SCHEMA_HEADER, b"enriched/1")]
BAD_ROW_HEADERS = [(SCHEMA_HEADER, BAD_ROW_SCHEMA.encode())]
FLAG_UNKNOWN_SOURCE = "unknown_source"
DEFAULT_ENRICHMENT = Enrichment()
# DLQ key of a record whose source could not be read.
UNKNOWN_SOURCE_KEY = "unknown"

try:
    VERSION = metadata.version("headwater")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"


class Kind(enum.StrEnum):
    ENRICHED = "enriched"
    DLQ = "dlq"
    DUPLICATE = "duplicate"


@dataclass(slots=True)
class Result:
    kind: Kind
    outputs: list[OutRecord] = field(default_factory=list)
    # (dedupe key, receivedAt ms) to remember once the transaction commits.
    seen: tuple[str, int] | None = None
    reason: FailureType | None = None
    source_id: str | None = None
    received_at_ms: int | None = None
    destinations: Sequence[str] = ()


class _Bad(BadInput):
    """Bad input: unwinds to a bad row (a control-flow signal inside this module)."""

    def __init__(
        self, failure: FailureType, errors: list[str], envelope: Envelope | None = None, message_id: str | None = None
    ) -> None:
        super().__init__(failure.value)
        self.failure = failure
        self.errors = errors
        self.envelope = envelope
        self.message_id = message_id


def _expected_type(path: str) -> str | None:
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last in TYPES:
        return last
    return SHORT_TYPES.get(last)


class Pipeline:
    def __init__(self, settings: Settings, registry: SourceRegistry, enricher: Enricher) -> None:
        self.settings = settings
        self.registry = registry
        self.enricher = enricher
        self._skew = timedelta(seconds=settings.max_future_skew_s)

    def process(self, record: Any, is_duplicate: Callable[[str, int], bool]) -> Result:
        """Turn one record into its outputs; never raises."""
        last_error: BaseException | None = None
        for attempt in range(1, self.settings.poison_max_tries + 1):
            try:
                return self._process(record, is_duplicate)
            except _Bad as bad:
                return self._bad_row(record, bad.failure, bad.errors, bad.envelope, bad.message_id)
            except Exception as exc:  # noqa: BLE001 - any bug on one record must not stop the partition
                last_error = exc
                log.warning(
                    "processing a record failed",
                    attempt=attempt,
                    error=repr(exc),
                    **{"kafka.topic": record.topic, "kafka.partition": record.partition, "kafka.offset": record.offset},
                )
        errors = [
            f"processing failed {self.settings.poison_max_tries} times: {type(last_error).__name__}: {last_error}"
        ]
        # The whole record is kept (it can go back to events.raw as is once the bug is fixed);
        # the ids come from the Envelope when it can be read at all.
        ids: Envelope | None = None
        with contextlib.suppress(DecodeError, TypeError):
            ids = Envelope.FromString(record.value or b"")
        return self._bad_row(record, FailureType.POISON, errors, None, None, ids=ids)

    def _decode(self, record: Any) -> tuple[Envelope, dict[str, Any]]:
        value = record.value
        if not value:
            raise _Bad(FailureType.ENVELOPE_DECODE, ["record has no value"])
        for name, header in record.headers or ():
            if name == SCHEMA_HEADER and header != ENVELOPE_SCHEMA:
                raise _Bad(FailureType.ENVELOPE_DECODE, [f"unknown {SCHEMA_HEADER} header {header!r}"])
        try:
            envelope = Envelope.FromString(value)
        except DecodeError as exc:
            raise _Bad(FailureType.ENVELOPE_DECODE, [f"not an Envelope: {exc}"]) from None
        if not envelope.source_id:
            raise _Bad(FailureType.ENVELOPE_DECODE, ["Envelope has no source_id"], envelope)
        body = envelope.event  # each read of a bytes field copies it
        if len(body) > self.settings.max_event_bytes:
            raise _Bad(
                FailureType.SIZE_VIOLATION,
                [f"event is {len(body)} bytes; the limit is {self.settings.max_event_bytes}"],
                envelope,
            )
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _Bad(FailureType.INVALID_JSON, [f"event is not JSON: {exc}"], envelope) from None
        if not isinstance(event, dict):
            raise _Bad(FailureType.INVALID_JSON, [f"event must be a JSON object, got {type(event).__name__}"], envelope)
        return envelope, event

    def _process(
        self, record: Any, is_duplicate: Callable[[str, int], bool]
    ) -> Result:  # long: the per-record hot path in one frame
        envelope, event = self._decode(record)
        if "type" not in event and (expected := _expected_type(envelope.path)):
            event["type"] = expected
        mid = event.get("messageId")
        errors = validate(event)
        if errors:
            raise _Bad(FailureType.SCHEMA_VIOLATION, errors, envelope, mid if isinstance(mid, str) else None)
        # ingest stamps a messageId; a record from another producer gets a stable one.
        message_id = (mid if present(mid) else envelope.message_id) or (
            f"hw-{record.topic}-{record.partition}-{record.offset}"
        )

        source_id = envelope.source_id
        source = self.registry.by_id(source_id)
        received_ms = envelope.received_at_ms
        try:
            if received_ms <= 0:
                # Not from ingest: the event's own stamp, else the Kafka record's time.
                stamped = event.get("receivedAt")
                received_ms = (
                    int(parse_ts(stamped, "receivedAt").timestamp() * 1000)
                    if isinstance(stamped, str)
                    else record.timestamp
                )
            received = datetime.fromtimestamp(received_ms / 1000, UTC)
            flags: list[str] = []
            out = normalise(
                event,
                message_id=message_id,
                received=received,
                max_future_skew=self._skew,
                flags=flags,
                clock_skew=source.clock_skew if source is not None else "auto",
            )
        except TimestampError as exc:
            raise _Bad(FailureType.SCHEMA_VIOLATION, [str(exc)], envelope, message_id) from None

        key = dedupe_key(source_id, message_id)
        if is_duplicate(key, received_ms):
            return Result(Kind.DUPLICATE, source_id=source_id, received_at_ms=received_ms)

        if source is None:
            flags.append(FLAG_UNKNOWN_SOURCE)
        switches = source.enrichment if source is not None else DEFAULT_ENRICHMENT
        self.enricher.enrich(
            out, switches=switches, header_ua=envelope.user_agent, client_ip=envelope.client_ip, flags=flags
        )
        out["_hw"] = {
            "source_id": source_id,
            "received_at_ms": received_ms,
            "processed_at_ms": int(time.time() * 1000),
            "raw": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
            "flags": flags,
        }
        value = orjson.dumps(out)
        if len(value) > self.settings.max_output_bytes:
            raise _Bad(
                FailureType.SIZE_VIOLATION,
                [f"enriched event is {len(value)} bytes; the limit is {self.settings.max_output_bytes}"],
                envelope,
                message_id,
            )
        out_key = record.key or f"{source_id}:{user_key(out)}".encode()
        outputs = [OutRecord(self.settings.enriched_topic, out_key, value, ENRICHED_HEADERS)]
        names = destinations(source.destinations, out) if source is not None else []
        outputs.extend(
            OutRecord(self.settings.dest_topic_prefix + name, out_key, value, ENRICHED_HEADERS) for name in names
        )
        return Result(
            Kind.ENRICHED,
            outputs,
            seen=(key, received_ms),
            source_id=source_id,
            received_at_ms=received_ms,
            destinations=names,
        )

    def _bad_row(
        self,
        record: Any,
        failure: FailureType,
        errors: list[str],
        envelope: Envelope | None,
        message_id: str | None,
        ids: Envelope | None = None,
    ) -> Result:
        """A bad row; ``envelope`` when it was read (its event JSON is kept), else the raw
        record is kept and ``ids`` (if any) only names the source and message."""
        named = envelope if envelope is not None else ids
        row = BadRow(
            failure_type=failure,
            errors=errors,
            # The event JSON when the Envelope was readable (what a replay needs), else the record.
            original=(envelope.event if envelope is not None else (record.value or b"")),
            service="processor",
            version=VERSION,
            source_id=(named.source_id or None) if named is not None else None,
            message_id=message_id or ((named.message_id or None) if named is not None else None),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            request_id=(named.request_id or None) if named is not None else None,
            extra=(
                {
                    "original_format": "event_json",
                    "received_at_ms": envelope.received_at_ms,
                    "client_ip": envelope.client_ip,
                    "user_agent": envelope.user_agent,
                    "path": envelope.path,
                }
                if envelope is not None
                else {"original_format": "raw_record"}
            ),
        )
        # Keyed by source like ingest's bad rows, so one source's rows stay together.
        key = (row.source_id or UNKNOWN_SOURCE_KEY).encode()
        return Result(
            Kind.DLQ,
            [OutRecord(self.settings.dlq_topic, key, row.to_json(), BAD_ROW_HEADERS)],
            reason=failure,
            source_id=row.source_id,
        )
