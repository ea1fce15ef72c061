"""The rollup consumer: events.enriched -> window rows in Cassandra, exactly once in effect.
The loop, rebalances and resyncs live here; apply.py rolls a batch into rows, flush.py writes them.

How a window stays equal to its input whatever moment the process dies at:

* Window rows are kept per Kafka partition (``kpart`` is part of the row key),
  so one partition has one writer and queries add the partitions up.
* A row stores its whole aggregate and ``upto``, the last (logical) offset of
  its partition it includes. A stored row is always the rollup of exactly the
  partition's events at offsets <= upto that map to it.
* A flush writes the dirty rows first, then the partition's checkpoint (next
  offset and watermark) in Cassandra, then commits the Kafka offsets (for lag
  monitoring only). See ``flush`` for its steps.
* On assignment the partition resumes from its Cassandra checkpoint. Rows are
  read back before they are updated (rowcache.py says when a read is skipped),
  and an event at offset <= upto of the stored row is skipped: the row already
  holds it. A crash between the row writes and the checkpoint therefore
  re-reads events that some rows hold and others do not, and each row takes
  exactly the ones it lacks.
* Late events update their own windows the same way: the row is read back
  (batched) and rewritten whole. Which windows an event updates depends on its
  age alone (receivedAt - timestamp, rollup.AgeRule), so a replay decides as
  the first run did; only events past the maximum age (or a resolution's
  retention) go to the late topic.
* Writes are fenced by the offsets they include (store.py): a member cut off
  from the group that writes again after the new owner moved on loses to it.
* Kafka offsets are committed only after the checkpoint, so the group's
  committed offset is never ahead of it: should a fetch from the committed
  position race the seek to the checkpoint, it only re-reads records that
  are skipped (offset < next offset), never skips unread ones.
* A Cassandra node with a periodic commitlog can lose what it acknowledged
  in its last sync period when it is killed. So after any failed Cassandra
  call or a node going down or up, no checkpoint is written until every
  partition has been resumed from what Cassandra holds (memory is dropped, and
  every series is noted again).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from services.common.cassandra import HostChanges
from services.common.sources import SourceRegistry
from services.metrics.apply import Applier
from services.metrics.errors import ConsumerBroken
from services.metrics.flush import FlushedRow, Flusher, InFlight
from services.metrics.metrics import MetricsMetrics
from services.metrics.partition import PartitionState, PartitionStatus, resume_position
from services.metrics.retry import retry
from services.metrics.rollup import RESOLUTIONS, AgeRule
from services.metrics.rowcache import ALWAYS_READ, RowCache
from services.metrics.schema import retentions
from services.metrics.series import SeriesIndex
from services.metrics.settings import Settings
from services.metrics.sidesend import SideSender
from services.metrics.store import Store

log = structlog.get_logger(__name__)

SERVICE = "headwater-metrics"
T = TypeVar("T")


class ConsumerStatus(enum.Enum):
    """The consumer's own state. Transitions:

    RUNNING -> RESYNC   a Cassandra call failed, or a node went down or up: what Cassandra holds
                        may be behind memory, so no checkpoint is written until every partition
                        resumed from Cassandra
    RESYNC -> RUNNING   every partition resumed
    any -> BROKEN       processing or a flush failed half-way: memory may be ahead of what it
                        applied, so this process never writes another row or checkpoint; run()
                        raises ConsumerBroken and the service stops for a restart (final)
    """

    RUNNING = "running"
    RESYNC = "resync"
    BROKEN = "broken"


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: RollupConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.owner.resume(assigned)


class RollupConsumer:
    """Consumes events.enriched and keeps the rollup tables equal to it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        sources: SourceRegistry,
        producer: AIOKafkaProducer,
        metrics: MetricsMetrics,
        on_flush: Callable[[list[FlushedRow]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sources = sources
        self.metrics = metrics
        self.on_flush = on_flush
        self.topic = settings.enriched_topic
        self.group = settings.consumer_group
        self.lateness_ms = int(settings.allowed_lateness_s * 1000)
        self.rule = AgeRule(settings.max_event_age_ms, {r: s * 1000 for r, s in retentions(settings).items()})
        self.side = SideSender(producer, metrics, late_topic=settings.late_topic, dlq_topic=settings.dlq_topic)
        self.states: dict[int, PartitionState] = {}
        self.status = ConsumerStatus.RUNNING
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.series = SeriesIndex()
        self.flusher = Flusher(
            settings,
            store,
            self.side,
            self.series,
            metrics,
            self._storage,
            lambda: self.status is ConsumerStatus.RUNNING,
            on_flush,
        )
        self.inflight = InFlight(self.flusher, self._flush_failed)
        self._stop = asyncio.Event()
        self._last_flush = time.monotonic()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=settings.max_poll_records,
            client_id=f"{SERVICE}-consumer",
        )
        self.applier = Applier(
            self.consumer, store, sources, self.side, self.series, metrics, self.rule, self._storage, self._cached_rows
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def request_resync(self) -> None:
        """Thread-safe: resume every partition from its checkpoint before the next checkpoint."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._mark_resync)

    def _mark_resync(self) -> None:
        if self.status is ConsumerStatus.RUNNING:
            self.status = ConsumerStatus.RESYNC

    def stop(self) -> None:
        """Ask the loop to finish its batch, flush and leave; safe to call twice."""
        self._stop.set()

    def problems(self) -> list[str]:
        """What /readyz reports: halted partitions, a broken consumer."""
        out = [
            f"partition {s.kpart}: checkpoint ahead of the topic's end (halted)"
            for s in self.states.values()
            if s.status is PartitionStatus.HALTED
        ]
        if self.status is ConsumerStatus.BROKEN:
            out.append("the consumer failed half-way and stops for a restart")
        return out

    async def run(self) -> None:
        """Consume until stop(); the last flush and commit happen before it returns."""
        self._loop = asyncio.get_running_loop()
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        watch = HostChanges(self.request_resync)
        cluster = self.store.client.session.cluster
        cluster.register_listener(watch)
        await self.consumer.start()
        try:
            while not self._stop.is_set():
                await self._round()
            self._raise_if_broken()
            async with self._lock, self._breaks_on_error():
                offsets = await self._settle_flush()
                offsets.update(await self.flush(list(self.states.values())))
            await self._commit(offsets)
        finally:
            await self.inflight.drop()
            cluster.unregister_listener(watch)
            await self.consumer.stop()
            # The rows' sketches are C++ objects: free them now, not at interpreter exit, where the
            # bindings report every one still alive as "leaked" into the service log.
            self.states.clear()

    async def _round(self) -> None:
        """One turn of the loop: resync if asked, fetch, roll up, flush when due, commit."""
        self._raise_if_broken()
        if self.status is ConsumerStatus.RESYNC:
            await self._resync_states()
        batch = await self.consumer.getmany(
            timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.max_poll_records
        )
        # aiokafka logs and swallows errors of the rebalance callbacks run in getmany.
        self._raise_if_broken()
        async with self._lock, self._breaks_on_error():
            for tp, records in batch.items():
                state = self.states.get(tp.partition)
                if state is not None and records:
                    await self.applier.process(tp, state, records)
            offsets = None
            if self._flush_due():
                offsets = await self._settle_flush()
                self._start_flush()
        if offsets:
            await self._commit(offsets)

    def _start_flush(self) -> None:
        self._last_flush = time.monotonic()
        self.inflight.start(list(self.states.values()))

    async def _settle_flush(self, timeout_s: float | None = None) -> dict[TopicPartition, int]:
        return await self.inflight.settle(list(self.states.values()), timeout_s)

    def _flush_due(self) -> bool:
        return (
            time.monotonic() - self._last_flush >= self.settings.flush_interval_s
            or self._dirty_rows() >= self.settings.max_dirty_rows
            or self._cached_rows() > self.settings.max_cached_rows
        )

    def _flush_failed(self, exc: BaseException) -> None:
        log.error("rollup flush failed; the consumer stops", error=repr(exc))
        self.status = ConsumerStatus.BROKEN

    @contextlib.asynccontextmanager
    async def _breaks_on_error(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            self.status = ConsumerStatus.BROKEN
            raise

    def _raise_if_broken(self) -> None:
        # An error, not a return: the task's done-callback then stops the service for a restart.
        if self.status is ConsumerStatus.BROKEN:
            raise ConsumerBroken(
                "the rollup consumer failed half-way (see the errors logged before); "
                "restart to resume from the Cassandra checkpoints"
            )

    async def _resync_states(self) -> None:
        async with self._lock:
            assigned = [tp for tp in self.consumer.assignment() if tp.topic == self.topic]
            log.warning(
                "Cassandra failed or restarted; resuming every partition from its checkpoint", partitions=len(assigned)
            )
            await self.inflight.drop()
            self.states.clear()
            self.series.forget()
            self.status = ConsumerStatus.RUNNING
            await self._resume_locked(assigned, deadline_s=None)

    async def _storage(self, call: Callable[[], Awaitable[T]], what: str, deadline_s: float | None) -> T:
        """A Cassandra call, retried; any failure means memory may no longer match the store."""

        def failed(_: BaseException) -> None:
            self.metrics.flush_errors.inc()
            self._mark_resync()

        return await retry(call, what=what, deadline_s=deadline_s, on_failure=failed)

    # --- rebalance ---------------------------------------------------------------------------

    async def resume(self, assigned: list[TopicPartition]) -> None:
        """Start each assigned partition at its Cassandra checkpoint (or its beginning)."""
        try:
            async with self._lock:
                await self._resume_locked(assigned, deadline_s=self.settings.rebalance_retry_s)
        except BaseException:
            # A partition without state would be skipped for good: stop, so a restart resumes it.
            self.status = ConsumerStatus.BROKEN
            self._stop.set()
            raise

    async def _resume_locked(self, assigned: list[TopicPartition], deadline_s: float | None) -> None:
        for tp in assigned:
            if tp.topic != self.topic:
                continue
            checkpoint = await self._storage(
                functools.partial(self.store.load_checkpoint, self.group, tp.topic, tp.partition),
                "load checkpoint",
                deadline_s,
            )
            horizons = await self._storage(
                functools.partial(self.store.load_horizons, self.group, tp.topic, tp.partition),
                "load horizons",
                deadline_s,
            )
            # No checkpoint and no horizon: nothing was ever written. A checkpoint without
            # a horizon for a resolution: be safe and read every row of it.
            unknown = -1 if checkpoint is None else ALWAYS_READ
            cache = RowCache({res: horizons.get(res, unknown) for res in RESOLUTIONS}, self.settings.hll_lg_k)
            state = await resume_position(
                self.consumer, tp, checkpoint, cache, self.settings.on_checkpoint_ahead, self.metrics, deadline_s
            )
            self.states[tp.partition] = state
            log.info(
                "partition resumed",
                **{"kafka.topic": tp.topic, "kafka.partition": tp.partition, "kafka.offset": state.next_offset},
                base=state.base,
                watermark_ms=state.watermark_ms,
                status=state.status.value,
            )
        self.metrics.halted_partitions.set(sum(1 for s in self.states.values() if s.status is PartitionStatus.HALTED))

    async def release(self, revoked: list[TopicPartition]) -> None:
        """Flush the partitions another member takes over, then forget them."""
        async with self._lock:
            states = [
                self.states[tp.partition] for tp in revoked if tp.topic == self.topic and tp.partition in self.states
            ]
            if not states:
                return
            async with self._breaks_on_error():
                offsets = await self._settle_flush(self.settings.rebalance_retry_s)
                offsets.update(await self.flush(states, deadline_s=self.settings.rebalance_retry_s))
            for state in states:
                del self.states[state.kpart]
        await self._commit(offsets)
        self.metrics.cached_rows.set(self._cached_rows())

    # --- flushing ----------------------------------------------------------------------------

    def _cached_rows(self) -> int:
        return sum(len(s.cache) for s in self.states.values())

    def _dirty_rows(self) -> int:
        return sum(s.cache.dirty_count() for s in self.states.values())

    async def flush(self, states: list[PartitionState], deadline_s: float | None = None) -> dict[TopicPartition, int]:
        """Make Cassandra hold what ``states`` applied (flush.py); returns the offsets to commit."""
        return await self.flusher.flush(states, list(self.states.values()), deadline_s)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Kafka offsets are for lag dashboards only; the Cassandra checkpoint is the truth."""
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            log.warning(
                "kafka offset commit failed; the checkpoint in Cassandra stands", error=f"{type(exc).__name__}: {exc}"
            )
