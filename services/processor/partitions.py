"""One owned events.raw partition: its status, its epoch, and its batches on the way.

Status
------
Every partition this process owns is in one ``PartitionStatus``; ``become``
refuses a transition not listed here::

    OPENING   -> ACTIVE     producer started (the previous owner fenced), dedupe state read back
    OPENING   -> RESETTING  opening failed at assignment: retried until it works
    ACTIVE    -> RESETTING  a transaction failed, its outcome unknown: a new producer settles it
    ACTIVE    -> FENCED     our producer was fenced: another owner took the transactional id, or
                            the broker aborted a transaction that ran past transaction_timeout_ms
    FENCED    -> RESETTING  no rebalance took the partition within the grace: it is still ours
    RESETTING -> ACTIVE     new producer, dedupe state and position as committed
    ACTIVE    -> REVOKED    a rebalance took it; the producer is kept, the same rebalance may give
                            it back
    REVOKED   -> ACTIVE     given back (rewound to our own next offset)
    any       -> CLOSED     revoked while stalled, not given back, or the processor closes

Only ACTIVE partitions take batches. FENCED, RESETTING and OPENING are
*stalled*: paused in the consumer, reported by /readyz and the stalled gauge.

Epoch
-----
One number per partition, bumped on every seek, reset, fence and revoke, and
drawn from one process-wide counter, so a number is never reused, not even by
a new Partition for the same topic-partition. Fetched records are tagged with
their partition's epoch right after the fetch, and a Batch carries the epoch
it was fetched under: whatever does not carry the current epoch is stale, and
its records come again from wherever the partition was moved to.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from services.processor.dedupe import DedupeWindow
from services.processor.pipeline import Pipeline, Result

_epochs = itertools.count(1)


class PartitionStatus(enum.Enum):
    OPENING = "opening"
    ACTIVE = "active"
    FENCED = "fenced"
    RESETTING = "resetting"
    REVOKED = "revoked"
    CLOSED = "closed"


_S = PartitionStatus
TRANSITIONS: dict[PartitionStatus, frozenset[PartitionStatus]] = {
    _S.OPENING: frozenset({_S.ACTIVE, _S.RESETTING, _S.CLOSED}),
    _S.ACTIVE: frozenset({_S.RESETTING, _S.FENCED, _S.REVOKED, _S.CLOSED}),
    _S.FENCED: frozenset({_S.RESETTING, _S.CLOSED}),
    _S.RESETTING: frozenset({_S.ACTIVE, _S.CLOSED}),
    _S.REVOKED: frozenset({_S.ACTIVE, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}
STALLED = frozenset({_S.OPENING, _S.FENCED, _S.RESETTING})


@dataclass(eq=False, slots=True)
class Batch:
    """Records of one partition from one fetch, and what the pipeline made of them."""

    tp: TopicPartition
    epoch: int
    records: list[Any]
    results: list[Result] = field(default_factory=list)
    # New dedupe keys of the batch (key -> receivedAt ms): in the window once committed.
    staged: dict[str, int] = field(default_factory=dict)

    @property
    def first_offset(self) -> int:
        return int(self.records[0].offset)

    @property
    def next_offset(self) -> int:
        """The offset to commit: after the batch's last record."""
        return int(self.records[-1].offset) + 1


@dataclass(eq=False)
class Partition:
    tp: TopicPartition
    status: PartitionStatus = PartitionStatus.OPENING
    epoch: int = field(default_factory=lambda: next(_epochs))
    producer: AIOKafkaProducer | None = None
    window: DedupeWindow | None = None
    # The offset after our last commit (or the reset point); None until known.
    next_offset: int | None = None
    # New dedupe keys of each batch dispatched but not yet committed (not yet in the
    # window), oldest first.
    pending: list[dict[str, int]] = field(default_factory=list)
    # Its transactions dispatched and not finished, oldest first; each awaits the one before.
    chain: deque[asyncio.Task[bool]] = field(default_factory=deque)
    # The background reset of a stalled partition (None when none runs).
    recovery: asyncio.Task[None] | None = None
    # time.monotonic() when it last left ACTIVE; None while ACTIVE.
    stalled_since: float | None = field(default_factory=time.monotonic)

    def bump(self) -> int:
        """A new epoch: everything fetched or dispatched before is stale from now on."""
        self.epoch = next(_epochs)
        return self.epoch

    def become(self, status: PartitionStatus) -> None:
        if status is not self.status and status not in TRANSITIONS[self.status]:
            raise RuntimeError(f"partition {self.tp.partition}: no transition {self.status.name} -> {status.name}")
        if status is PartitionStatus.ACTIVE:
            self.stalled_since = None
        elif self.stalled_since is None:
            self.stalled_since = time.monotonic()
        self.status = status

    def takes(self, batch: Batch) -> bool:
        """Whether ``batch`` may still be dispatched or committed: fetched under the current
        epoch of a partition that is ACTIVE."""
        return self.status is PartitionStatus.ACTIVE and batch.epoch == self.epoch

    @property
    def stalled(self) -> bool:
        return self.status in STALLED

    def compute(self, pipeline: Pipeline, batch: Batch) -> None:
        """Run the pipeline over the batch (no Kafka), counting the keys of every uncommitted
        batch before it as seen; its own new keys go to ``pending`` until it commits."""
        window = self.window
        assert window is not None, "an ACTIVE partition has its dedupe window"
        staged = batch.staged
        batches = (staged, *self.pending)
        window_ms = window.window_ms
        window_duplicate = window.is_duplicate

        def is_duplicate(key: str, received_at_ms: int) -> bool:
            for keys in batches:
                first = keys.get(key)
                if first is not None and abs(received_at_ms - first) < window_ms:
                    return True
            return window_duplicate(key, received_at_ms)

        process: Callable[..., Result] = pipeline.process
        results = batch.results
        for record in batch.records:
            result = process(record, is_duplicate)
            if result.seen is not None:
                staged[result.seen[0]] = result.seen[1]
            results.append(result)
        self.pending.append(staged)

    def forget(self, staged: dict[str, int]) -> None:
        """A batch is done (committed: its keys are in the window; failed: its records come
        again and must not look like duplicates of themselves)."""
        for index, keys in enumerate(self.pending):
            if keys is staged:
                del self.pending[index]
                return
