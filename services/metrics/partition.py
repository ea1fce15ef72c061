"""One owned partition of events.enriched: its position, its status, and the plan of a batch.

Positions are kept as Kafka offsets plus a logical ``base`` (see store.py): the
logical offset of a record is ``base + offset``, and that is what rows' ``upto``
and the fencing timestamps hold. The base is 0 until a partition is rolled up
again from a recreated topic.

``plan()`` is pure: it decodes a batch, decides for each event which windows it
updates (by its age alone, see rollup.AgeRule) and which rows go to the late
and dead-letter topics, and moves the partition's position past the batch.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common.badrow import FailureType
from services.metrics.metrics import MetricsMetrics
from services.metrics.retry import retry
from services.metrics.rollup import (
    ALL_RESOLUTIONS,
    RESOLUTIONS,
    AgeRule,
    BadEvent,
    Event,
    RowKey,
    parse_event,
    row_keys,
)
from services.metrics.rowcache import RowCache
from services.metrics.store import INCARNATION_GAP, Checkpoint

log = structlog.get_logger(__name__)


class PartitionStatus(enum.Enum):
    """Where an owned partition stands. Transitions:

    SOUGHT -> ACTIVE     the first batch starts at (or before) next_offset
    SOUGHT -> RESOUGHT   the first batch starts past next_offset: it was fetched from an older
                         position (the group's offset, ahead of the checkpoint) before our seek
                         landed; it is dropped and the partition sought again
    RESOUGHT -> ACTIVE   the next batch, wherever it starts: a gap after our own seek is real
                         (transaction markers, aborted records)
    new -> HALTED        the checkpoint is ahead of the topic's end and on_checkpoint_ahead is
                         "halt": paused, nothing read or written until an operator acts
    A revoked partition's state is dropped; the next assignment builds a new one.
    """

    SOUGHT = "sought"
    RESOUGHT = "resought"
    ACTIVE = "active"
    HALTED = "halted"


@dataclass
class PartitionState:
    """What one owned partition has consumed, and the window rows it holds."""

    kpart: int
    base: int
    next_offset: int
    watermark_ms: int
    cache: RowCache
    status: PartitionStatus = PartitionStatus.SOUGHT
    saved: Checkpoint | None = None

    def logical(self, offset: int) -> int:
        return self.base + offset

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.base, self.next_offset, self.watermark_ms)

    @property
    def moved(self) -> bool:
        """True when the position passed the last saved checkpoint."""
        return self.saved is None or self.saved != self.checkpoint()


@dataclass
class Late:
    record: Any
    event: Event
    reason: str
    error: str
    extra: dict[str, object]


@dataclass
class BatchPlan:
    """What a batch does: events to apply (logical offset, event, its rows), side rows, reads."""

    events: list[tuple[int, Event, list[RowKey]]] = field(default_factory=list)
    bad: list[tuple[Any, FailureType, str]] = field(default_factory=list)
    late: list[Late] = field(default_factory=list)

    def keys(self) -> list[RowKey]:
        return [key for _, _, keys in self.events for key in keys]


def plan(state: PartitionState, records: list[Any], rule: AgeRule) -> BatchPlan:
    """Decode ``records`` in offset order, decide each one's windows, and move the position past them."""
    out = BatchPlan()
    watermark = state.watermark_ms
    for record in records:
        offset: int = record.offset
        if offset < state.next_offset:
            continue  # already consumed (a seek raced a fetch)
        state.next_offset = offset + 1
        try:
            event = parse_event(record.value or b"")
        except BadEvent as exc:
            out.bad.append((record, FailureType(exc.failure), str(exc)))
            continue
        watermark = max(watermark, event.received_ms)
        resolutions = rule.resolutions(event)
        if resolutions is not ALL_RESOLUTIONS and len(resolutions) < len(RESOLUTIONS):
            out.late.append(_late(record, event, resolutions, rule))
        if resolutions:
            out.events.append((state.logical(offset), event, row_keys(event, resolutions)))
    state.watermark_ms = watermark
    return out


def _late(record: Any, event: Event, kept: tuple[str, ...], rule: AgeRule) -> Late:
    age = event.received_ms - event.time_ms
    if not kept:
        return Late(
            record,
            event,
            "max_event_age",
            f"the event is {age} ms older than its receipt, more than the maximum event age of "
            f"{rule.max_event_age_ms} ms; it is in no window",
            {"age_ms": age},
        )
    skipped = [res for res in RESOLUTIONS if res not in kept]
    return Late(
        record,
        event,
        "retention",
        f"the event is {age} ms older than its receipt, beyond the retention of the "
        f"{', '.join(skipped)} rollups; it is in the {', '.join(kept)} windows only",
        {"age_ms": age, "skipped_resolutions": skipped},
    )


async def resume_position(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    checkpoint: Checkpoint | None,
    cache: RowCache,
    on_ahead: str,
    metrics: MetricsMetrics,
    deadline_s: float | None,
) -> PartitionState:
    """Seek an assigned partition to its checkpoint, after checking it against the topic's offsets.

    A checkpoint ahead of the topic's end (the topic was recreated, the cluster moved) is never
    followed silently: the partition halts, or (``on_ahead == "restart"``) is rolled up again from
    its beginning with a new offset base above every offset its rows hold. A checkpoint behind the
    topic's first offset means retention deleted records before they were rolled up: said, counted.
    """
    first, end = await retry(
        functools.partial(_offset_range, consumer, tp), what="topic offsets", deadline_s=deadline_s
    )
    if checkpoint is None:
        consumer.seek(tp, first)
        return PartitionState(tp.partition, 0, first, 0, cache)
    state = PartitionState(
        tp.partition, checkpoint.base, checkpoint.next_offset, checkpoint.watermark_ms, cache, saved=checkpoint
    )
    where = {"kafka.topic": tp.topic, "kafka.partition": tp.partition, "kafka.offset": checkpoint.next_offset}
    if checkpoint.next_offset > end:
        metrics.partition_problems.labels("checkpoint_ahead").inc()
        if on_ahead == "halt":
            log.error(
                "checkpoint ahead of the topic's end (topic recreated or cluster moved?); the partition "
                "is halted: set HEADWATER_METRICS_ON_CHECKPOINT_AHEAD=restart to roll it up again from "
                "its beginning",
                end_offset=end,
                **where,
            )
            consumer.pause(tp)
            state.status = PartitionStatus.HALTED
            return state
        log.error(
            "checkpoint ahead of the topic's end; rolling the partition up again from its beginning, "
            "its offsets counted on from the old checkpoint",
            end_offset=end,
            **where,
        )
        state.base = checkpoint.logical_next + INCARNATION_GAP
        state.next_offset = first
    elif checkpoint.next_offset < first:
        metrics.partition_problems.labels("records_expired").inc()
        log.error(
            "records between the checkpoint and the topic's first offset were deleted by retention "
            "before they were rolled up",
            first_offset=first,
            **where,
        )
        state.next_offset = first
    consumer.seek(tp, state.next_offset)
    return state


async def _offset_range(consumer: AIOKafkaConsumer, tp: TopicPartition) -> tuple[int, int]:
    first = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]
    return int(first), int(end)
