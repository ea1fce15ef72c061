"""The rollup consumer: events.enriched -> window rows in Cassandra, exactly once in effect.

How a window stays equal to its input whatever moment the process dies at:

* Window rows are kept per Kafka partition (``kpart`` is part of the row key),
  so one partition has one writer and queries add the partitions up.
* A row stores its whole aggregate and ``upto``, the last offset of its
  partition it includes. A stored row is always the rollup of exactly the
  partition's events at offsets <= upto that map to it.
* A flush writes the dirty rows first, then the partition's checkpoint
  (next offset and watermark) in Cassandra, then commits the Kafka offsets
  (for lag monitoring only).
* On assignment the partition resumes from its Cassandra checkpoint. Rows are
  read back before they are updated, and an event at offset <= upto of the
  stored row is skipped: the row already holds it. A crash between the row
  writes and the checkpoint therefore re-reads events that some rows hold and
  others do not, and each row takes exactly the ones it lacks.
* A read before the first update of a row is skipped when the row's window
  starts after the partition's horizon: the newest window start it has ever
  written per resolution, saved before the rows that pass it are written, so
  no stored row lies beyond it.
* Kafka offsets are committed only after the checkpoint, so the group's
  committed offset is never ahead of it: should a fetch from the committed
  position race the seek to the checkpoint, it only re-reads records that
  are skipped (offset < next offset), never skips unread ones.
* A Cassandra node with a periodic commitlog can lose what it acknowledged
  in its last sync period when it is killed. So after any failed Cassandra
  call or a node going down or up, no checkpoint is written until every
  partition has been resumed from what Cassandra holds (memory is dropped),
  and the first batch after a resume must start at the checkpoint (else the
  partition is sought again), even if the group's Kafka offset is ahead.
* Lateness is decided against the partition's watermark (the newest
  receivedAt seen on it), which the checkpoint stores, so a replay decides
  exactly as the first run did.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionBusy, ConnectionException
from cassandra.policies import HostStateListener

from services.common.badrow import BadRow, FailureType
from services.common.errors import DependencyUnavailable
from services.common.sources import SourceRegistry
from services.metrics.errors import ConsumerBroken
from services.metrics.metrics import MetricsMetrics
from services.metrics.rollup import RESOLUTIONS, BadEvent, Event, RowKey, WindowRow, parse_event, row_keys
from services.metrics.settings import Settings
from services.metrics.store import Store, bounded_gather

log = structlog.get_logger(__name__)

SERVICE = "headwater-metrics"
VERSION = "0.1.0"
BAD_ROW_HEADERS = [("hw-schema", b"headwater/bad_row/1")]
# Series already noted in the index by this process; bounded, cleared when full.
_MAX_KNOWN_SERIES = 50_000

FlushedRow = tuple[int, RowKey, WindowRow]
T = TypeVar("T")
_ALWAYS_READ = 2**62
# Failures a retry can outlast: Cassandra or Kafka restarting, a timeout.
RETRIABLE = (DriverException, NoHostAvailable, ConnectionException, ConnectionBusy, DependencyUnavailable,
             KafkaError, OSError, TimeoutError)


@dataclass
class PartitionState:
    """What one owned partition has consumed and the window rows it holds."""

    kpart: int
    next_offset: int
    watermark_ms: int
    saved_offset: int
    # Per resolution, no stored row of this partition starts after this window.
    horizon: dict[str, int] = field(default_factory=dict)
    rows: OrderedDict[RowKey, WindowRow] = field(default_factory=OrderedDict)
    # The first batch after a resume must start at next_offset; see _process.
    verified: bool = False
    reseeked: bool = False


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: RollupConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.owner.resume(assigned)


class _HostWatch(HostStateListener):  # type: ignore[misc]
    """Cassandra node down or up: what it acknowledged lately may be gone (periodic commitlog)."""

    def __init__(self, owner: RollupConsumer) -> None:
        self.owner = owner

    def on_down(self, host: object) -> None:
        self.owner.request_resync()

    def on_up(self, host: object) -> None:
        self.owner.request_resync()

    def on_add(self, host: object) -> None:
        return None

    def on_remove(self, host: object) -> None:
        return None


class RollupConsumer:
    """Consumes events.enriched and keeps the rollup tables equal to it."""

    def __init__(self, settings: Settings, store: Store, sources: SourceRegistry,
                 producer: AIOKafkaProducer, metrics: MetricsMetrics,
                 on_flush: Callable[[list[FlushedRow]], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.sources = sources
        self.producer = producer
        self.metrics = metrics
        self.on_flush = on_flush
        self.topic = settings.enriched_topic
        self.lateness_ms = int(settings.allowed_lateness_s * 1000)
        self.states: dict[int, PartitionState] = {}
        self._lock = asyncio.Lock()
        self._pending_sends: list[tuple[str, bytes, bytes | None, asyncio.Future[asyncio.Future[object]]]] = []
        self._new_series: dict[tuple[str, str, str], set[str]] = {}
        self._known_series: set[tuple[str, str, str, frozenset[str]]] = set()
        self._stop = asyncio.Event()
        # Set when processing or a flush failed half-way: the in-memory state may then be
        # ahead of what it applied, so this process must never write another row or checkpoint.
        self._broken = False
        # Set from driver threads when Cassandra failed or restarted: a node may lose the writes it
        # acknowledged in its last commitlog sync period, so memory is no longer known to match
        # the store. No checkpoint is written until every partition resumed from Cassandra again.
        self._resync = False
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
            enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
            max_poll_records=settings.max_poll_records, client_id=f"{SERVICE}-consumer",
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def request_resync(self) -> None:
        """Thread-safe: resume every partition from its checkpoint before the next checkpoint."""
        self._resync = True

    def stop(self) -> None:
        """Ask the loop to finish its batch, flush and leave; safe to call twice."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until stop(); the last flush and commit happen before it returns."""
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        watch = _HostWatch(self)
        cluster = self.store.client.session.cluster
        cluster.register_listener(watch)
        await self.consumer.start()
        try:
            last_flush = time.monotonic()
            while not self._stop.is_set():
                self._raise_if_broken()
                if self._resync:
                    await self._resync_states()
                batch = await self.consumer.getmany(timeout_ms=self.settings.poll_timeout_ms,
                                                    max_records=self.settings.max_poll_records)
                # aiokafka logs and swallows errors of the rebalance callbacks run in getmany.
                self._raise_if_broken()
                async with self._lock:
                    try:
                        for tp, records in batch.items():
                            state = self.states.get(tp.partition)
                            if state is not None and records:
                                await self._process(tp, state, records)
                        due = (time.monotonic() - last_flush >= self.settings.flush_interval_s
                               or self._dirty_rows() >= self.settings.max_dirty_rows
                               or self._cached_rows() > self.settings.max_cached_rows)
                        offsets = await self._flush(list(self.states.values())) if due else {}
                    except BaseException:
                        self._broken = True
                        raise
                if due:
                    last_flush = time.monotonic()
                    await self._commit(offsets)
            self._raise_if_broken()
            async with self._lock:
                offsets = await self._flush(list(self.states.values()))
            await self._commit(offsets)
        finally:
            cluster.unregister_listener(watch)
            await self.consumer.stop()

    def _raise_if_broken(self) -> None:
        # An error, not a return: the task's done-callback then stops the service for a restart.
        if self._broken:
            raise ConsumerBroken("the rollup consumer failed half-way (see the errors logged before); "
                                 "restart to resume from the Cassandra checkpoints")

    async def _resync_states(self) -> None:
        async with self._lock:
            self._resync = False
            assigned = [tp for tp in self.consumer.assignment() if tp.topic == self.topic]
            log.warning("Cassandra failed or restarted; resuming every partition from its checkpoint",
                        partitions=len(assigned))
            self.states.clear()
            await self._resume_locked(assigned)

    # --- rebalance ---------------------------------------------------------------------------

    async def resume(self, assigned: list[TopicPartition]) -> None:
        """Start each assigned partition at its Cassandra checkpoint (or its beginning)."""
        try:
            await self._resume(assigned)
        except BaseException:
            # A partition without state would be skipped for good: stop, so a restart resumes it.
            self._broken = True
            self._stop.set()
            raise

    async def _resume(self, assigned: list[TopicPartition]) -> None:
        async with self._lock:
            await self._resume_locked(assigned)

    async def _resume_locked(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            if tp.topic != self.topic:
                continue
            checkpoint = await self._retry(functools.partial(
                self.store.load_checkpoint, self.settings.consumer_group, tp.topic, tp.partition))
            horizons = await self._retry(functools.partial(
                self.store.load_horizons, self.settings.consumer_group, tp.topic, tp.partition))
            # No checkpoint and no horizon: nothing was ever written. A checkpoint without
            # a horizon for a resolution: be safe and read every row of it.
            unknown = -1 if checkpoint is None else _ALWAYS_READ
            horizon = {res: horizons.get(res, unknown) for res in RESOLUTIONS}
            if checkpoint is None:
                await self.consumer.seek_to_beginning(tp)
                state = PartitionState(tp.partition, 0, 0, -1, horizon)
            else:
                next_offset, watermark = checkpoint
                self.consumer.seek(tp, next_offset)
                state = PartitionState(tp.partition, next_offset, watermark, next_offset, horizon)
            self.states[tp.partition] = state
            log.info("partition resumed", **{"kafka.topic": tp.topic, "kafka.partition": tp.partition,
                                             "kafka.offset": state.next_offset},
                     watermark_ms=state.watermark_ms)

    async def release(self, revoked: list[TopicPartition]) -> None:
        """Flush the partitions another member takes over, then forget them."""
        async with self._lock:
            states = [self.states[tp.partition] for tp in revoked
                      if tp.topic == self.topic and tp.partition in self.states]
            if not states:
                return
            try:
                offsets = await self._flush(states)
            except BaseException:
                self._broken = True
                raise
            for state in states:
                del self.states[state.kpart]
        await self._commit(offsets)
        self.metrics.cached_rows.set(self._cached_rows())

    # --- processing --------------------------------------------------------------------------

    def _sum_properties(self, source_id: str) -> tuple[str, ...]:
        source = self.sources.by_id(source_id)
        return source.sum_properties if source is not None else ()

    async def _process(self, tp: TopicPartition, state: PartitionState, records: list[object]) -> None:
        if not state.verified:
            first: int = records[0].offset  # type: ignore[attr-defined]
            if first > state.next_offset and not state.reseeked:
                # Fetched from an older position (e.g. a group offset ahead of the checkpoint)
                # before our seek: seek again and drop it. A gap seen after our own seek is real
                # (transaction markers, aborted records).
                self.consumer.seek(tp, state.next_offset)
                state.reseeked = True
                return
            state.verified = True
        # Pass 1: decode and decide lateness in offset order, so the rows to read are known.
        plan: list[tuple[int, Event]] = []
        watermark = state.watermark_ms
        for record in records:
            offset: int = record.offset  # type: ignore[attr-defined]
            if offset < state.next_offset:
                continue  # already consumed (a seek raced a fetch)
            value: bytes = record.value or b""  # type: ignore[attr-defined]
            try:
                event = parse_event(value)
            except BadEvent as exc:
                self._send_bad(self.settings.dlq_topic, record, FailureType(exc.failure), [str(exc)])
                self.metrics.bad.labels(exc.failure).inc()
                state.next_offset = offset + 1
                continue
            watermark = max(watermark, event.received_ms)
            if event.time_ms < watermark - self.lateness_ms:
                self._send_late(record, event, watermark)
            else:
                plan.append((offset, event))
            state.next_offset = offset + 1
        state.watermark_ms = watermark

        # Read back the rows this batch touches that are not in memory.
        missing: list[RowKey] = []
        seen: set[RowKey] = set()
        for _, event in plan:
            for key in row_keys(event):
                if key not in state.rows and key not in seen:
                    seen.add(key)
                    if key.window_start > state.horizon[key.resolution]:
                        state.rows[key] = WindowRow(self.settings.hll_lg_k)  # never written: no read
                    else:
                        missing.append(key)
        if missing:
            loaded = await self._retry(lambda: self.store.load_rows(state.kpart, missing))
            for key, row in zip(missing, loaded, strict=True):
                state.rows[key] = row

        # Pass 2: apply, skipping what a stored row already holds.
        skipped = 0
        per_type: dict[str, int] = {}
        for offset, event in plan:
            props = self._sum_properties(event.source)
            for key in row_keys(event):
                row = state.rows[key]
                state.rows.move_to_end(key)
                if offset <= row.upto:
                    skipped += 1
                    continue
                row.add(event, props)
            per_type[event.type] = per_type.get(event.type, 0) + 1
            present = frozenset(p for p in props if p in event.properties) if props else frozenset()
            series = (event.source, event.type, event.name, present)
            if series not in self._known_series:
                self._new_series.setdefault(series[:3], set()).update(present)
        for etype, n in per_type.items():
            self.metrics.events.labels(etype).inc(n)
        if skipped:
            self.metrics.replay_skipped.inc(skipped)
        self.metrics.cached_rows.set(self._cached_rows())

    def _send_bad(self, topic: str, record: object, failure: FailureType, errors: list[str],
                  event: Event | None = None, extra: dict[str, object] | None = None) -> None:
        row = BadRow(
            failure_type=failure, errors=errors, original=record.value or b"",  # type: ignore[attr-defined]
            service=SERVICE, version=VERSION,
            source_id=event.source if event else None, message_id=event.message_id if event else None,
            topic=record.topic, partition=record.partition, offset=record.offset,  # type: ignore[attr-defined]
            extra=extra or {},
        )
        key: bytes | None = record.key  # type: ignore[attr-defined]
        log.warning("bad input", failure_type=failure.value, error=errors[0],
                    **{"kafka.topic": row.topic, "kafka.partition": row.partition, "kafka.offset": row.offset})
        self._side_send(topic, row.to_json(), key)

    def _send_late(self, record: object, event: Event, watermark: int) -> None:
        self.metrics.late.labels(event.source).inc()
        row = BadRow(
            failure_type=FailureType.LATE_EVENT,
            errors=[f"event time {event.time_ms} is older than the partition watermark {watermark} "
                    f"minus the allowed lateness of {self.lateness_ms} ms"],
            original=record.value or b"", service=SERVICE, version=VERSION,  # type: ignore[attr-defined]
            source_id=event.source, message_id=event.message_id,
            topic=record.topic, partition=record.partition, offset=record.offset,  # type: ignore[attr-defined]
            extra={"event_time_ms": event.time_ms, "watermark_ms": watermark,
                   "allowed_lateness_ms": self.lateness_ms, "type": event.type, "event": event.name},
        )
        key: bytes | None = record.key  # type: ignore[attr-defined]
        self._side_send(self.settings.late_topic, row.to_json(), key)

    def _side_send(self, topic: str, value: bytes, key: bytes | None) -> None:
        future = asyncio.ensure_future(self.producer.send(topic, value, key=key, headers=BAD_ROW_HEADERS))
        self._pending_sends.append((topic, value, key, future))

    async def _settle_sends(self) -> None:
        """Wait for every late/bad row to be acknowledged; resend the ones Kafka refused."""
        sends, self._pending_sends = self._pending_sends, []
        for topic, value, key, future in sends:
            try:
                await (await future)
            except KafkaError as exc:
                log.warning("side record not acknowledged; sending again", error=f"{type(exc).__name__}: {exc}",
                            **{"kafka.topic": topic})
                await self._retry(functools.partial(self.producer.send_and_wait, topic, value, key=key,
                                                    headers=BAD_ROW_HEADERS))

    # --- flushing ----------------------------------------------------------------------------

    def _cached_rows(self) -> int:
        return sum(len(s.rows) for s in self.states.values())

    def _dirty_rows(self) -> int:
        return sum(1 for s in self.states.values() for r in s.rows.values() if r.dirty)

    async def _flush(self, states: list[PartitionState]) -> dict[TopicPartition, int]:
        """Side records, then rows, then checkpoints; returns the Kafka offsets to commit."""
        if self._broken:
            log.error("not flushing: this process failed half-way through a batch; "
                      "the next one resumes from the last checkpoint")
            return {}
        if self._resync:
            return {}
        started = time.monotonic()
        # Late and bad rows must be acknowledged before the checkpoint passes their offsets.
        await self._settle_sends()
        if self._new_series:
            new, self._new_series = self._new_series, {}
            for (source, etype, name), props in new.items():
                await self._retry(functools.partial(self.store.note_series, source, etype, name, props))
                if len(self._known_series) > _MAX_KNOWN_SERIES:
                    self._known_series.clear()
                self._known_series.add((source, etype, name, frozenset(props)))
        flushed: list[FlushedRow] = []
        writes = []
        for state in states:
            through = state.next_offset - 1
            for key, row in state.rows.items():
                if row.dirty:
                    upto = max(row.upto, through)
                    writes.append((state.kpart, key, row, upto))
        if writes:
            # Horizons first: after a crash no stored row may start beyond its partition's horizon.
            for state in states:
                newest: dict[str, int] = {}
                for kpart, key, _, _ in writes:
                    if kpart == state.kpart and key.window_start > newest.get(key.resolution, -1):
                        newest[key.resolution] = key.window_start
                for res, window in newest.items():
                    if window > state.horizon[res]:
                        await self._retry(functools.partial(
                            self.store.save_horizon, self.settings.consumer_group, self.topic, state.kpart,
                            res, window))
                        state.horizon[res] = window
            await self._retry(lambda: self._write_rows(writes))
            for kpart, key, row, upto in writes:
                row.upto = upto
                row.dirty = False
                self.metrics.rows_written.labels(key.resolution).inc()
                flushed.append((kpart, key, row))
        offsets: dict[TopicPartition, int] = {}
        if self._resync:
            # Rows just written are consistent on their own (value and upto); a checkpoint now
            # could cover writes the node lost. Resume from Cassandra first.
            return offsets
        for state in states:
            if state.next_offset != state.saved_offset:
                await self._retry(functools.partial(
                    self.store.save_checkpoint, self.settings.consumer_group, self.topic, state.kpart,
                    state.next_offset, state.watermark_ms))
                state.saved_offset = state.next_offset
                offsets[TopicPartition(self.topic, state.kpart)] = state.next_offset
        self._evict(states)
        if flushed and self.on_flush is not None:
            self.on_flush(flushed)
        if states:
            oldest = min(s.watermark_ms for s in states)
            if oldest > 0:
                self.metrics.watermark_lag.set(max(0.0, time.time() - oldest / 1000))
        self.metrics.flushes.observe(time.monotonic() - started)
        return offsets

    async def _write_rows(self, writes: list[tuple[int, RowKey, WindowRow, int]]) -> None:
        # Every write of a failed attempt must be finished or cancelled before _retry starts the
        # next one: Cassandra keeps the last write, so a stale one landing later would undo it.
        await bounded_gather((self.store.write_row(*w) for w in writes), self.settings.write_concurrency)

    def _evict(self, states: list[PartitionState]) -> None:
        """Drop closed windows (no on-time event can reach them), then the least recently used."""
        for state in states:
            horizon = state.watermark_ms - self.lateness_ms
            closed = [k for k, r in state.rows.items()
                      if not r.dirty and k.window_start + RESOLUTIONS[k.resolution] <= horizon]
            for key in closed:
                del state.rows[key]
        limit = self.settings.max_cached_rows
        total = self._cached_rows()
        if total > limit:
            target = int(limit * 0.9)
            for state in sorted(self.states.values(), key=lambda s: -len(s.rows)):
                while total > target and state.rows:
                    key, row = next(iter(state.rows.items()))
                    if row.dirty:
                        break
                    del state.rows[key]
                    total -= 1
        self.metrics.cached_rows.set(self._cached_rows())

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Kafka offsets are for lag dashboards only; the Cassandra checkpoint is the truth."""
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("kafka offset commit failed; the checkpoint in Cassandra stands",
                        error=f"{type(exc).__name__}: {exc}")

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a Cassandra or Kafka call that failed for a reason that may pass (a restart)."""
        delay = 0.1
        while True:
            try:
                return await call()
            except RETRIABLE as exc:
                self._resync = True
                self.metrics.flush_errors.inc()
                log.warning("storage call failed; retrying", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
