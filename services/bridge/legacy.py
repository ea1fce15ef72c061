"""The legacy Kinesis record format: its fields, its times, its types, the mirror's marker,
and Headwater -> legacy (``to_legacy``, for the mirror). Pure code: no Kinesis, Kafka or
Cassandra. Legacy -> Headwater (the bridge's decoding) is decoder.py's.

A legacy record (proto/topics/legacy.kinesis.md) is the old event API's event
JSON: the Segment-like fields plus ``appId``, which is the source's write key,
with PartitionKey = messageId. It was written by a Go service, so a time it
did not have is ``"0001-01-01T00:00:00Z"`` (Go's zero time; the struct tags do
not omit it) and means "absent".

A record the mirror writes carries ``context.headwater.mirrored = true``; the
bridge skips such records, so no event goes round in a loop.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from services.common.segment import SHORT_TYPES, present
from services.common.sources import SourceRegistry

GO_ZERO_TIME = "0001-01-01T00:00:00Z"
# The fields of the old API's Message struct (pkg/types/v1/message.go) other than the key.
LEGACY_FIELDS = (
    "type",
    "messageId",
    "context",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "integrations",
    "traits",
    "properties",
    "anonymousId",
    "userId",
    "groupId",
    "previousId",
    "category",
    "name",
    "action",
    "channel",
    "event",
    "version",
)
KEY_FIELDS = ("appId", "writeKey")
# Where the mirror marks its records: context.headwater.mirrored = true.
MARKER_CONTEXT = "headwater"
MARKER_FIELD = "mirrored"
# Kinesis refuses a record (data plus partition key) over 1 MiB.
MAX_RECORD_BYTES = 1024 * 1024
# A bad row keeps an original up to this size whole, and the first TRUNCATED_ORIGINAL bytes of a larger one.
MAX_BAD_ROW_ORIGINAL = 256 * 1024
TRUNCATED_ORIGINAL = 64 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# Kinesis partition keys are at most 256 characters.
MAX_PARTITION_KEY = 256
TYPES = ("track", "identify", "page", "screen", "group", "alias")


@functools.lru_cache(maxsize=8192)
def _second_ms(prefix: str) -> int:
    """Epoch ms of a UTC "YYYY-MM-DDTHH:MM:SS"; cached, since event times cluster."""
    return (datetime.fromisoformat(prefix).replace(tzinfo=UTC) - _EPOCH) // _MS


def parse_time_ms(value: Any) -> int | None:
    """ISO-8601 text to epoch ms; None when absent or Go's zero time; ValueError when unreadable."""
    if value is None or value == "" or value == GO_ZERO_TIME:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")  # noqa: TRY004 - callers treat every bad time alike
    if len(value) >= 20 and value[-1] == "Z" and value[10] == "T" and value[19] in ".Z" and value[:4] > "0001":
        # The shape both writers use (UTC, "Z", 0 to 9 fraction digits): no datetime per value.
        fraction = value[20:-1]
        if not fraction or fraction.isdigit():
            return _second_ms(value[:19]) + (int((fraction + "00")[:3]) if fraction else 0)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment.year <= 1:
        return None
    return (moment - _EPOCH) // _MS


def infer_type(event: dict[str, Any]) -> str | None:
    """The type of a legacy event that has none, by the old API's rule:
    previousId -> alias, groupId -> group, event -> track, traits -> identify,
    name -> page. None when nothing says."""
    given = event.get("type")
    if isinstance(given, str) and given:
        full = SHORT_TYPES.get(given, given)
        return full if full in TYPES else None
    for field, kind in (
        ("previousId", "alias"),
        ("groupId", "group"),
        ("event", "track"),
        ("traits", "identify"),
        ("name", "page"),
    ):
        if present(event.get(field)):
            return kind
    return None


def event_name(kind: str, event: dict[str, Any]) -> str:
    """The rollups' event name: the track event, the page/screen name, else ""."""
    value = event.get("event") if kind == "track" else event.get("name") if kind in ("page", "screen") else None
    return value[:256] if isinstance(value, str) else ""


def is_mirrored(event: dict[str, Any]) -> bool:
    context = event.get("context")
    marker = context.get(MARKER_CONTEXT) if isinstance(context, dict) else None
    return isinstance(marker, dict) and marker.get(MARKER_FIELD) is True


# -- Headwater -> legacy (the mirror) --------------------------------------------


@dataclass(frozen=True)
class LegacyRecord:
    stream: str
    partition_key: str
    data: bytes
    source_id: str
    message_id: str


class NotMirrored(enum.StrEnum):
    """An events.enriched record the mirror does not send (counted)."""

    NOT_MIRRORED = "not_mirrored"  # its source has no mirror direction
    UNKNOWN_SOURCE = "unknown_source"


def to_legacy(enriched: dict[str, Any], registry: SourceRegistry) -> list[LegacyRecord] | NotMirrored:
    """An enriched event in the legacy format, one record per stream its source is mirrored
    to. ``appId`` is the source's write key: that is what the legacy consumers read."""
    hw = enriched.get("_hw")
    source_id = hw.get("source_id") if isinstance(hw, dict) else None
    source = registry.by_id(source_id) if isinstance(source_id, str) else None
    if source is None:
        return NotMirrored.UNKNOWN_SOURCE
    streams = source.legacy_streams("mirror")
    if not streams:
        return NotMirrored.NOT_MIRRORED
    record: dict[str, Any] = {k: enriched[k] for k in LEGACY_FIELDS if k in enriched}
    context = record.get("context")
    context = dict(context) if isinstance(context, dict) else {}
    context[MARKER_CONTEXT] = {MARKER_FIELD: True}
    record["context"] = context
    record["appId"] = source.write_key
    message_id = str(record.get("messageId") or "")
    partition_key = (
        message_id
        if 0 < len(message_id) <= MAX_PARTITION_KEY
        else (hashlib.sha256(message_id.encode()).hexdigest() if message_id else source.id)
    )
    data = orjson.dumps(record)
    return [
        LegacyRecord(stream=stream, partition_key=partition_key, data=data, source_id=source.id, message_id=message_id)
        for stream in streams
    ]
