"""Segment events to one canonical shape: long type names, string ids, and
timestamps as ISO-8601 UTC with milliseconds, with Segment's clock-skew rule."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from services.common.segment import SHORT_TYPES

# Top-level fields events.enriched carries; anything else a client sent
# (writeKey above all) stays in the raw topic only.
KEPT_FIELDS = frozenset(
    (
        "type",
        "messageId",
        "userId",
        "anonymousId",
        "event",
        "name",
        "category",
        "groupId",
        "previousId",
        "properties",
        "traits",
        "context",
        "integrations",
        "channel",
    )
)

FLAG_TIMESTAMP_CLAMPED = "timestamp_clamped"

# Libraries that run on the user's device, whose clock may be hours off: under
# clock_skew "auto" their timestamp is corrected (context.library.name).
CLIENT_LIBRARIES = frozenset(
    (
        "analytics.js",
        "analytics-ios",
        "analytics-android",
        "analytics-react-native",
        "analytics-kotlin",
        "analytics-swift",
        "analytics-flutter",
    )
)
ClockSkew = Literal["auto", "correct", "trust"]


class TimestampError(ValueError):
    """A timestamp field is not ISO-8601."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt")
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


@functools.lru_cache(maxsize=4096)
def _whole_second(epoch_s: int) -> str:
    """2026-11-24T15:00:00 for a second since the epoch."""
    return (_EPOCH + timedelta(seconds=epoch_s)).replace(tzinfo=None).isoformat()


def format_ts(moment: datetime) -> str:
    """2026-11-24T15:00:00.123Z: UTC, milliseconds (truncated), trailing Z."""
    # Three of these per event, and isoformat costs over a microsecond each: the
    # seconds part is cached instead (event times cluster around now, receivedAt
    # even more so) and the milliseconds come from a table.
    if moment.tzinfo is None:
        moment = moment.astimezone(UTC)
    since = moment - _EPOCH
    return _whole_second(since.days * 86400 + since.seconds) + _MILLIS[since.microseconds // 1000]


def format_ms(epoch_ms: int) -> str:
    return format_ts(datetime.fromtimestamp(epoch_ms / 1000, UTC))


def parse_ts(value: str, field: str) -> datetime:
    """ISO-8601 with any offset; no offset means UTC (some SDKs leave it off)."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except (ValueError, AttributeError, TypeError):
        raise TimestampError(f"{field} is not an ISO-8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def corrects_clock(event: dict[str, Any], clock_skew: ClockSkew) -> bool:
    """Whether a client-given ``timestamp`` is a device time to correct (the source's
    ``clock_skew``: ``auto`` corrects client-side libraries only)."""
    if clock_skew == "auto":
        context = event.get("context")
        library = context.get("library") if isinstance(context, dict) else None
        name = library.get("name") if isinstance(library, dict) else None
        return name in CLIENT_LIBRARIES
    return clock_skew == "correct"


def event_time(
    event: dict[str, Any],
    received: datetime,
    max_future_skew: timedelta,
    flags: list[str],
    clock_skew: ClockSkew = "auto",
) -> dict[str, str]:
    """The timestamp fields of the enriched event.

    Segment's rule corrects the device clock: timestamp = receivedAt - (sentAt -
    originalTimestamp). Which device time it starts from depends on ``clock_skew``:

    - a client-given ``timestamp`` from a client-side library (``auto``) or from
      any library (``correct``) is the device time: it becomes originalTimestamp
      and is corrected;
    - otherwise a client-given ``timestamp`` stands, and without one the sent
      originalTimestamp is corrected (``trust``: taken as is);
    - with no sentAt the device time is taken as is, and with neither
      timestamp nor originalTimestamp, receivedAt is the event time.

    A result further ahead of receivedAt than ``max_future_skew`` is clamped to
    receivedAt and flagged.
    """
    out: dict[str, str] = {}
    parsed: dict[str, datetime] = {}
    given: dict[str, str] = {}
    for name in _TIME_FIELDS:
        value = event.get(name)
        if value is not None and value != "":
            text = str(value)
            parsed[name] = parse_ts(text, name)
            given[name] = text
    timestamp = parsed.get("timestamp")
    if timestamp is not None and corrects_clock(event, clock_skew):
        # The library's timestamp is the device time Segment calls originalTimestamp.
        parsed["originalTimestamp"], given["originalTimestamp"] = timestamp, given["timestamp"]
        timestamp = None
    sent = parsed.get("sentAt")
    if timestamp is not None:
        moment = timestamp
    elif "originalTimestamp" in parsed:
        original = parsed["originalTimestamp"]
        moment = received - (sent - original) if sent is not None and clock_skew != "trust" else original
    else:
        moment = received
    if moment - received > max_future_skew:
        moment = received
        flags.append(FLAG_TIMESTAMP_CLAMPED)
    out["timestamp"] = (
        given["timestamp"] if moment is timestamp and _canonical(given["timestamp"]) else format_ts(moment)
    )
    for name in ("originalTimestamp", "sentAt"):
        if name in parsed:
            text = given[name]
            out[name] = text if _canonical(text) else format_ts(parsed[name])
    out["receivedAt"] = format_ts(received)
    return out


def _canonical(text: str) -> bool:
    """Already as format_ts writes it (what JavaScript's toISOString gives): kept as is.
    Called only on text parse_ts read, so the shape check is enough."""
    return len(text) == 24 and text[23] == "Z" and text[19] == "." and text[10] == "T"


def normalise(
    event: dict[str, Any],
    *,
    message_id: str,
    received: datetime,
    max_future_skew: timedelta,
    flags: list[str],
    clock_skew: ClockSkew = "auto",
) -> dict[str, Any]:
    """A new dict in the events.enriched shape (without enrichment and _hw).

    ``event`` must already have passed services.common.segment.validate.
    """
    # segment.present inlined: this runs for every field of every event.
    out: dict[str, Any] = {k: v for k, v in event.items() if k in KEPT_FIELDS and v is not None and v != ""}
    etype = str(out.get("type", ""))
    out["type"] = SHORT_TYPES.get(etype, etype)
    out["messageId"] = message_id
    for key in ("userId", "anonymousId", "groupId", "previousId"):
        if key in out and not isinstance(out[key], str):
            # Segment treats ids as strings; 42 and "42" are the same user.
            value = out[key]
            out[key] = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    context = out.get("context")
    out["context"] = dict(context) if isinstance(context, dict) else {}
    out.update(event_time(event, received, max_future_skew, flags, clock_skew))
    return out
