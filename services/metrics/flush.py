"""The flush protocol: what makes Cassandra hold what the partitions applied, in which order.

The order is the whole point (consumer.py explains why each step must come
before the next); ``Flusher.flush`` numbers the steps in its docstring and the
code follows the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import TopicPartition

from services.metrics.gather import bounded_gather
from services.metrics.metrics import MetricsMetrics
from services.metrics.partition import PartitionState, PartitionStatus
from services.metrics.rollup import RESOLUTIONS, RowKey, WindowRow
from services.metrics.series import SeriesIndex
from services.metrics.settings import Settings
from services.metrics.sidesend import SideSender
from services.metrics.store import Checkpoint, Store

T = TypeVar("T")
FlushedRow = tuple[int, RowKey, WindowRow]
# A Cassandra call through the consumer's retry (which marks a resync on failure).
StorageCall = Callable[[Callable[[], Awaitable[Any]], str, float | None], Awaitable[Any]]


@dataclass
class Snapshot:
    """What one flush writes, taken at one moment: rows frozen, checkpoints as they stood then.

    Events applied after the snapshot leave it untouched (they dirty the live rows again), so a
    flush can be written while the loop goes on rolling up the next records."""

    states: list[PartitionState]
    writes: list[tuple[int, RowKey, WindowRow, int]]
    raised: list[tuple[PartitionState, str, int]]
    checkpoints: list[tuple[PartitionState, Checkpoint]]
    started: float = field(default_factory=time.monotonic)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


class Flusher:
    """Writes side rows, series, horizons, rows and checkpoints of a set of partitions.

    ``flush`` numbers the steps. ``snapshot`` takes step 1 at once (and marks the rows clean);
    ``write`` does steps 2-6 and may run while the loop rolls up more records; ``finish`` is
    step 7 and runs on the loop once the write is done, before the next snapshot, so that
    only rows whose values are in Cassandra are ever evicted.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        side: SideSender,
        series: SeriesIndex,
        metrics: MetricsMetrics,
        storage: StorageCall,
        running: Callable[[], bool],
        on_flush: Callable[[list[FlushedRow]], None] | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.side = side
        self.series = series
        self.metrics = metrics
        self.storage = storage
        self.running = running
        self.on_flush = on_flush
        self.group = settings.consumer_group
        self.topic = settings.enriched_topic
        self.lateness_ms = int(settings.allowed_lateness_s * 1000)

    async def flush(
        self, states: list[PartitionState], owned: list[PartitionState], deadline_s: float | None
    ) -> dict[TopicPartition, int]:
        """Make Cassandra hold what ``states`` applied; returns the Kafka offsets to commit then.

        1. Take nothing unless the consumer is running (during a resync memory may be ahead of
           Cassandra; a broken consumer never writes again); else freeze the dirty rows, each
           with its upto (the partition's position), and the checkpoints of moved partitions.
        2. Settle the side rows: Kafka acknowledged every late and bad row the checkpoints pass.
        3. Note new series in the index, which queries list series from.
        4. Raise each partition's horizons past the windows about to be written, before any
           such row is written: after a crash no stored row starts beyond its horizon.
        5. Write the rows, each whole, fenced by its upto.
        6. Write the checkpoints, each attempt only while the consumer is still running: any
           failed Cassandra call since step 1 (this one's first attempt included) means a node
           may have lost what it acknowledged (a killed node loses its last commitlog sync
           period), and a checkpoint retried into the restarted node would pass rows that are
           gone, so their events would never be rolled up. Rows alone are consistent (value
           and upto); the resync that follows resumes from what Cassandra holds.
        7. Evict closed and least recently used rows of all ``owned`` partitions, hand the rows
           to the sink, report.
        """
        snap = self.snapshot(states)
        if snap is None:
            return {}
        await self.write(snap, deadline_s)
        return self.finish(snap, owned)

    def snapshot(self, states: list[PartitionState]) -> Snapshot | None:
        """Step 1: freeze what the flush writes; the live rows are clean from here on."""
        if not self.running():
            return None
        states = [s for s in states if s.status is not PartitionStatus.HALTED]
        writes: list[tuple[int, RowKey, WindowRow, int]] = []
        for state in states:
            through = state.logical(state.next_offset - 1)
            for key, row in state.cache.dirty():
                upto = max(row.upto, through)
                writes.append((state.kpart, key, row.frozen(upto), upto))
                row.upto = upto
                row.dirty = False
        raised = [
            (state, res, window)
            for state in states
            for res, window in state.cache.newest_windows(
                k for kpart, k, _, _ in writes if kpart == state.kpart
            ).items()
        ]
        for state, res, window in raised:
            # Raised in memory now: a horizon ahead of Cassandra only makes reads happen.
            state.cache.horizon[res] = window
        return Snapshot(states, writes, raised, [(s, s.checkpoint()) for s in states if s.moved])

    async def write(self, snap: Snapshot, deadline_s: float | None) -> None:
        """Steps 2 to 6."""
        await self.side.settle()  # 2
        await self.series.write(functools.partial(self._note, deadline_s), self.settings.write_concurrency)  # 3
        await bounded_gather(
            (
                self.storage(
                    functools.partial(
                        self.store.save_horizon,
                        self.group,
                        self.topic,  # 4
                        state.kpart,
                        res,
                        window,
                    ),
                    "save horizon",
                    deadline_s,
                )
                for state, res, window in snap.raised
            ),
            self.settings.write_concurrency,
        )
        if snap.writes:  # 5
            await self.storage(functools.partial(self.store.write_rows, snap.writes), "write rows", deadline_s)
        for state, checkpoint in snap.checkpoints:  # 6
            saved = await self.storage(
                functools.partial(self._save_checkpoint, state.kpart, checkpoint), "save checkpoint", deadline_s
            )
            if not saved:
                return
            state.saved = checkpoint
            snap.offsets[TopicPartition(self.topic, state.kpart)] = checkpoint.next_offset

    def finish(self, snap: Snapshot, owned: list[PartitionState]) -> dict[TopicPartition, int]:
        """Step 7, on the loop, once ``write`` is done; returns the offsets the flush checkpointed."""
        for resolution in RESOLUTIONS:
            n = sum(1 for _, key, _, _ in snap.writes if key.resolution == resolution)
            if n:
                self.metrics.rows_written.labels(resolution).inc(n)
        self._evict(snap.states, owned)
        if snap.writes and self.on_flush is not None:
            self.on_flush([(kpart, key, row) for kpart, key, row, _ in snap.writes])
        marks = [s.watermark_ms for s in snap.states if s.watermark_ms > 0]
        if marks:
            self.metrics.watermark_lag.set(max(0.0, time.time() - min(marks) / 1000))
        self.metrics.flushes.observe(time.monotonic() - snap.started)
        return snap.offsets

    async def _save_checkpoint(self, kpart: int, checkpoint: Checkpoint) -> bool:
        """One attempt of step 6: False, and nothing sent, once the consumer stopped running."""
        if not self.running():
            return False
        await self.store.save_checkpoint(self.group, self.topic, kpart, checkpoint)
        return True

    async def _note(self, deadline_s: float | None, source: str, etype: str, name: str, props: set[str]) -> None:
        await self.storage(
            functools.partial(self.store.note_series, source, etype, name, props), "note series", deadline_s
        )

    def _evict(self, states: list[PartitionState], owned: list[PartitionState]) -> None:
        """Drop closed windows (the lateness setting), then the least recently used."""
        for state in states:
            state.cache.evict_closed(state.watermark_ms - self.lateness_ms)
        total = sum(len(s.cache) for s in owned)
        if total > self.settings.max_cached_rows:
            excess = total - int(self.settings.max_cached_rows * 0.9)
            for state in sorted(owned, key=lambda s: -len(s.cache)):
                excess -= state.cache.evict_oldest(excess)
                if excess <= 0:
                    break
        self.metrics.cached_rows.set(sum(len(s.cache) for s in owned))


class InFlight:
    """The one flush written in the background while the loop rolls up the next records.

    Only one is in flight: the next flush first settles it (back-pressure), and rows are evicted
    only when none is, so a row read back is never older than what memory held."""

    def __init__(self, flusher: Flusher, failed: Callable[[BaseException], None]) -> None:
        self.flusher = flusher
        self.failed = failed
        self._current: tuple[Snapshot, asyncio.Task[None]] | None = None

    def start(self, states: list[PartitionState]) -> None:
        """Freeze what the flush writes (step 1) and write it in a task; nothing must be in flight."""
        assert self._current is None, "settle the flush in flight first"
        snap = self.flusher.snapshot(states)
        if snap is None:
            return
        task = asyncio.create_task(self.flusher.write(snap, None), name="rollup-flush")
        task.add_done_callback(self._done)
        self._current = (snap, task)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failed(task.exception())  # type: ignore[arg-type]

    async def settle(self, owned: list[PartitionState], timeout_s: float | None = None) -> dict[TopicPartition, int]:
        """Wait for the flush in flight (its error is raised here), finish it; the offsets it checkpointed."""
        if self._current is None:
            return {}
        snap, task = self._current
        self._current = None
        await asyncio.wait_for(task, timeout_s)
        return self.flusher.finish(snap, owned)

    async def drop(self) -> None:
        """Cancel the flush in flight: memory is being dropped. A write of it that still lands
        is fenced by its offsets and loses to anything newer."""
        if self._current is None:
            return
        _, task = self._current
        self._current = None
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
