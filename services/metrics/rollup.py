"""Rollup arithmetic: which windows an enriched event updates, and the
whole-aggregate value of one window row (count, HLL sketch of users, sums).

Pure code, no I/O: the consumer and the tests both build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import datasketches
import orjson

# Resolution name -> window length in ms. The names are also the "resolution" tag.
RESOLUTIONS: dict[str, int] = {"1m": 60_000, "1h": 3_600_000, "1d": 86_400_000}
# Cassandra partition span per resolution, so a partition holds a bounded number of windows
# and TWCS can drop whole SSTables as they expire.
BUCKET_MS: dict[str, int] = {"1m": 86_400_000, "1h": 30 * 86_400_000, "1d": 360 * 86_400_000}

# Longest event name kept; longer names are cut so a clustering key stays small.
MAX_NAME_CHARS = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class BadEvent(ValueError):
    """The record is not an enriched event the rollups can use."""

    def __init__(self, failure: str, message: str) -> None:
        super().__init__(message)
        self.failure = failure  # "invalid_json" or "schema_violation"


def parse_time_ms(value: Any) -> int | None:
    """ISO-8601 text (with Z or an offset; naive means UTC) to epoch ms, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS


def numeric(value: Any) -> float | None:
    """A property value that can be summed: a finite int or float, or text holding one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and 0 < len(value) <= 64:
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Event:
    """The parts of an enriched event the rollups read."""

    source: str
    type: str
    name: str
    user: str | None
    message_id: str | None
    time_ms: int
    received_ms: int
    properties: dict[str, Any]


def parse_event(raw: bytes) -> Event:
    """Read an events.enriched value; raises BadEvent when it cannot be rolled up."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadEvent("invalid_json", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadEvent("invalid_json", "the value is not a JSON object")
    hw = doc.get("_hw")
    source = hw.get("source_id") if isinstance(hw, dict) else None
    if not isinstance(source, str) or not source:
        raise BadEvent("schema_violation", "_hw.source_id is missing")
    etype = doc.get("type")
    if not isinstance(etype, str) or not etype:
        raise BadEvent("schema_violation", "type is missing")
    time_ms = parse_time_ms(doc.get("timestamp"))
    if time_ms is None:
        raise BadEvent("schema_violation", "timestamp is missing or not ISO-8601")
    received = hw.get("received_at_ms") if isinstance(hw, dict) else None
    if not isinstance(received, int) or isinstance(received, bool):
        received = parse_time_ms(doc.get("receivedAt"))
        if received is None:
            raise BadEvent("schema_violation", "_hw.received_at_ms is missing")
    if etype == "track":
        name = doc.get("event")
    elif etype in ("page", "screen"):
        name = doc.get("name")
    else:
        name = None
    name = name[:MAX_NAME_CHARS] if isinstance(name, str) else ""
    user: str | None = None
    for key in ("userId", "anonymousId"):
        value = doc.get(key)
        if isinstance(value, str) and value:
            user = value
            break
        if isinstance(value, int | float) and not isinstance(value, bool):
            user = str(value)
            break
    props = doc.get("properties")
    mid = doc.get("messageId")
    return Event(
        source=source,
        type=etype,
        name=name,
        user=user,
        time_ms=time_ms,
        message_id=mid if isinstance(mid, str) else None,
        received_ms=received,
        properties=props if isinstance(props, dict) else {},
    )


class RowKey(NamedTuple):
    """One window row of one Kafka partition (the partition is implied by its owner)."""

    resolution: str
    source: str
    type: str
    event: str
    window_start: int

    @property
    def bucket(self) -> int:
        return self.window_start // BUCKET_MS[self.resolution]


ALL_RESOLUTIONS = tuple(RESOLUTIONS)


def row_keys(event: Event, resolutions: tuple[str, ...] = ALL_RESOLUTIONS) -> list[RowKey]:
    """The windows (one per resolution asked for) an event updates."""
    t, source, etype, name = event.time_ms, event.source, event.type, event.name
    return [RowKey(res, source, etype, name, t - t % RESOLUTIONS[res]) for res in resolutions]


@dataclass(frozen=True)
class AgeRule:
    """Which resolutions an event may still update, decided by its age alone.

    The age is ``receivedAt - timestamp``: both travel with the record, so a
    replay decides exactly as the first run did, whatever the wall clock says
    and in whatever order the partition delivers the events (a mobile SDK's
    offline queue, a spool drained late, /v1/import of history).
    """

    max_event_age_ms: int
    # Resolution -> its retention in ms: a window older than that is gone from its table.
    retention_ms: dict[str, int]
    # Worked out once, not per event: an event younger than this is in every resolution.
    shortest_retention_ms: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shortest_retention_ms", min(self.retention_ms.values()))

    def resolutions(self, event: Event) -> tuple[str, ...]:
        """The resolutions the event is rolled into; empty when it is older than the maximum age."""
        age = event.received_ms - event.time_ms
        if age > self.max_event_age_ms:
            return ()
        if age <= self.shortest_retention_ms:
            return ALL_RESOLUTIONS  # the common case, without a tuple per event
        return tuple(res for res in RESOLUTIONS if age <= self.retention_ms[res])


def new_sketch(lg_k: int) -> datasketches.hll_sketch:
    return datasketches.hll_sketch(lg_k, datasketches.tgt_hll_type.HLL_8)


def union_estimate(blobs: list[bytes], lg_k: int) -> float:
    """Distinct users across serialized sketches (windows or series rolled up by union)."""
    union = datasketches.hll_union(lg_k)
    for blob in blobs:
        if blob:
            union.update(datasketches.hll_sketch.deserialize(blob))
    return float(union.get_result().get_estimate())


@dataclass
class WindowRow:
    """A whole aggregate. ``upto`` is the last partition offset it includes: a
    stored row equals the rollup of exactly the partition's events at offsets
    <= upto that map to it, which is what makes replay idempotent."""

    lg_k: int
    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    upto: int = -1
    sketch_blob: bytes | None = None
    dirty: bool = False
    _sketch: datasketches.hll_sketch | None = None

    def add(self, event: Event, sum_properties: tuple[str, ...]) -> None:
        self.count += 1
        if event.user is not None:
            self.sketch().update(event.user)
        for prop in sum_properties:
            value = numeric(event.properties.get(prop))
            if value is not None:
                self.sums[prop] = self.sums.get(prop, 0.0) + value
        self.dirty = True

    def sketch(self) -> datasketches.hll_sketch:
        if self._sketch is None:
            if self.sketch_blob:
                self._sketch = datasketches.hll_sketch.deserialize(self.sketch_blob)
            else:
                self._sketch = new_sketch(self.lg_k)
            self.sketch_blob = None
        return self._sketch

    def frozen(self, upto: int) -> WindowRow:
        """A copy of the aggregate as it stands, to be written while this row takes more events."""
        return WindowRow(self.lg_k, count=self.count, sums=dict(self.sums), upto=upto, sketch_blob=self.users_blob())

    def users_blob(self) -> bytes:
        if self._sketch is not None:
            return bytes(self._sketch.serialize_compact())
        return self.sketch_blob or b""
