"""Rolling one partition's fetched batch into its cached rows: the position check, the plan
(partition.py), reading back the rows the cache lacks (rowcache.py), and adding each event
to the rows that do not hold it yet. Rows change in memory only; flush.py makes Cassandra
hold them.

An event at an offset <= a row's ``upto`` is skipped by that row: the row holds it already.
That is what makes a replay from the checkpoint exact (consumer.py says why).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common.sources import SourceRegistry
from services.metrics.flush import StorageCall
from services.metrics.metrics import MetricsMetrics
from services.metrics.partition import BatchPlan, PartitionState, PartitionStatus, plan
from services.metrics.rollup import AgeRule
from services.metrics.series import SeriesIndex
from services.metrics.sidesend import SideSender
from services.metrics.store import Store


class Applier:
    """Applies the batches the consumer fetches; one per RollupConsumer, called under its lock."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        store: Store,
        sources: SourceRegistry,
        side: SideSender,
        series: SeriesIndex,
        metrics: MetricsMetrics,
        rule: AgeRule,
        storage: StorageCall,
        cached_rows: Callable[[], int],
    ) -> None:
        self.consumer = consumer
        self.store = store
        self.sources = sources
        self.side = side
        self.series = series
        self.metrics = metrics
        self.rule = rule
        self.storage = storage
        self.cached_rows = cached_rows

    async def process(self, tp: TopicPartition, state: PartitionState, records: list[Any]) -> None:
        """Roll one partition's batch up: check the position, plan, read back, apply."""
        if not self._at_position(tp, state, records[0].offset):
            return
        batch = plan(state, records, self.rule)
        for record, failure, error in batch.bad:
            self.side.bad(record, failure, error)
        for late in batch.late:
            self.side.late(late.record, late.event, late.reason, late.error, late.extra)
        missing = state.cache.missing(batch.keys())
        if missing:
            rows = await self.storage(
                functools.partial(self.store.load_rows, state.kpart, missing), "read rows back", None
            )
            state.cache.fill(missing, rows)
        self._apply(state, batch)

    def _at_position(self, tp: TopicPartition, state: PartitionState, first: int) -> bool:
        """False (and the partition sought again) for a batch fetched before our seek landed."""
        if state.status is PartitionStatus.HALTED:
            return False
        if state.status is PartitionStatus.SOUGHT and first > state.next_offset:
            self.consumer.seek(tp, state.next_offset)
            state.status = PartitionStatus.RESOUGHT
            return False
        state.status = PartitionStatus.ACTIVE
        return True

    def _sum_properties(self, source_id: str) -> tuple[str, ...]:
        source = self.sources.by_id(source_id)
        return source.sum_properties if source is not None else ()

    def _apply(self, state: PartitionState, batch: BatchPlan) -> None:
        """Add each event to the rows that do not hold it yet; note new series."""
        skipped = 0
        per_type: dict[str, int] = {}
        self.series.tick()
        for offset, event, keys in batch.events:
            props = self._sum_properties(event.source)
            for key in keys:
                row = state.cache.touch(key)
                if offset <= row.upto:
                    skipped += 1
                    continue
                row.add(event, props)
            per_type[event.type] = per_type.get(event.type, 0) + 1
            self.series.see(event, props)
        for etype, n in per_type.items():
            self.metrics.events.labels(etype).inc(n)
        if skipped:
            self.metrics.replay_skipped.inc(skipped)
        self.metrics.cached_rows.set(self.cached_rows())
