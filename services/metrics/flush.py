"""The flush protocol: what makes Cassandra hold what the partitions applied, in which order.

The order is the whole point (consumer.py explains why each step must come
before the next); ``Flusher.flush`` numbers the steps in its docstring and the
code follows the numbers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import TopicPartition

from services.metrics.metrics import MetricsMetrics
from services.metrics.partition import PartitionState, PartitionStatus
from services.metrics.rollup import RESOLUTIONS, RowKey, WindowRow
from services.metrics.series import SeriesIndex
from services.metrics.settings import Settings
from services.metrics.sidesend import SideSender
from services.metrics.store import Store

T = TypeVar("T")
FlushedRow = tuple[int, RowKey, WindowRow]
# A Cassandra call through the consumer's retry (which marks a resync on failure).
StorageCall = Callable[[Callable[[], Awaitable[Any]], str, float | None], Awaitable[Any]]


class Flusher:
    """Writes side rows, series, horizons, rows and checkpoints of a set of partitions."""

    def __init__(self, settings: Settings, store: Store, side: SideSender, series: SeriesIndex,
                 metrics: MetricsMetrics, storage: StorageCall, running: Callable[[], bool],
                 on_flush: Callable[[list[FlushedRow]], None] | None) -> None:
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

    async def flush(self, states: list[PartitionState], owned: list[PartitionState],
                    deadline_s: float | None) -> dict[TopicPartition, int]:
        """Make Cassandra hold what ``states`` applied; returns the Kafka offsets to commit then.

        1. Write nothing unless the consumer is running: during a resync memory may be ahead
           of Cassandra; a broken consumer never writes again.
        2. Settle the side rows: Kafka acknowledged every late and bad row the checkpoints pass.
        3. Note new series in the index, which queries list series from.
        4. Raise each partition's horizons past the windows about to be written, before any
           such row is written: after a crash no stored row starts beyond its horizon.
        5. Write the dirty rows, each whole with its upto (the partition's position), fenced by it.
        6. Unless the consumer stopped running meanwhile (rows alone are consistent: value and
           upto), write the checkpoint of each partition that moved.
        7. Evict closed and least recently used rows of all ``owned`` partitions, hand the rows
           to the sink, report.
        """
        if not self.running():  # 1
            return {}
        started = time.monotonic()
        states = [s for s in states if s.status is not PartitionStatus.HALTED]
        await self.side.settle()  # 2
        await self.series.write(functools.partial(self._note, deadline_s))  # 3
        writes = [(s.kpart, k, r, max(r.upto, s.logical(s.next_offset - 1)))
                  for s in states for k, r in s.cache.dirty()]
        for state in states:  # 4
            keys = (k for kpart, k, _, _ in writes if kpart == state.kpart)
            for res, window in state.cache.newest_windows(keys).items():
                await self.storage(functools.partial(self.store.save_horizon, self.group, self.topic,
                                                     state.kpart, res, window), "save horizon", deadline_s)
                state.cache.horizon[res] = window
        flushed = await self._write_rows(writes, deadline_s)  # 5
        offsets: dict[TopicPartition, int] = {}
        if not self.running():  # 6
            return offsets
        for state in states:
            if state.moved:
                checkpoint = state.checkpoint()
                await self.storage(functools.partial(self.store.save_checkpoint, self.group, self.topic,
                                                     state.kpart, checkpoint), "save checkpoint", deadline_s)
                state.saved = checkpoint
                offsets[TopicPartition(self.topic, state.kpart)] = state.next_offset
        self._evict(states, owned)  # 7
        if flushed and self.on_flush is not None:
            self.on_flush(flushed)
        marks = [s.watermark_ms for s in states if s.watermark_ms > 0]
        if marks:
            self.metrics.watermark_lag.set(max(0.0, time.time() - min(marks) / 1000))
        self.metrics.flushes.observe(time.monotonic() - started)
        return offsets

    async def _note(self, deadline_s: float | None, source: str, etype: str, name: str, props: set[str]) -> None:
        await self.storage(functools.partial(self.store.note_series, source, etype, name, props),
                           "note series", deadline_s)

    async def _write_rows(self, writes: list[tuple[int, RowKey, WindowRow, int]],
                          deadline_s: float | None) -> list[FlushedRow]:
        if not writes:
            return []
        await self.storage(functools.partial(self.store.write_rows, writes), "write rows", deadline_s)
        flushed: list[FlushedRow] = []
        for kpart, key, row, upto in writes:
            row.upto = upto
            row.dirty = False
            flushed.append((kpart, key, row))
        for resolution in RESOLUTIONS:
            n = sum(1 for _, key, _ in flushed if key.resolution == resolution)
            if n:
                self.metrics.rows_written.labels(resolution).inc(n)
        return flushed

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
