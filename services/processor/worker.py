"""The Kafka side of the processor: consume events.raw as a group and write
each batch's outputs, dedupe changelog and consumed offsets in one transaction.

Transactional ids and zombie fencing
------------------------------------
aiokafka's ``send_offsets_to_transaction`` sends only the group id, not the
consumer's generation (KIP-447), so the broker cannot fence a stale consumer
by generation. Fencing therefore rides on the transactional id, which is
fixed per *input partition*: ``<prefix>.<raw topic>.<partition>``. Whichever
process is given partition p starts a producer with p's id; the broker bumps
the epoch, aborts whatever transaction the previous owner left open (a
process killed with -9 mid-batch) and rejects any later commit from it. A
per-process id could not do that: a zombie's id would differ from the new
owner's, and its open transaction would hold back read_committed readers
until the transaction timeout. The cost is one producer per owned partition,
which is also what lets partitions commit concurrently.

The dedupe changelog has as many partitions as events.raw and partition p's
entries go to changelog partition p, written by the same producer, so its
state moves with the partition.

Pipelining
----------
A partition's transactions run one after another, but the loop does not
wait for them: the next batches (up to ``max_pending_batches``) are worked
out while the earlier ones are on the wire, each chained behind the one
before it, with the keys of every uncommitted batch counted by dedupe. A
failed transaction rewinds the partition to its committed offset, and the
batches queued behind it are dropped. Which fetched records are stale is
decided by a sequence number given to every seek: records fetched before
their partition's latest seek are dropped (they come again), records
fetched after it are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)

from services.common.errors import ConfigError, DependencyUnavailable
from services.common.kafka import TopicSpec, ensure_topic_configs, ensure_topics, key_hash
from services.processor.dedupe import DedupeWindow, decode_entries, encode_entries
from services.processor.metrics import Metrics
from services.processor.pipeline import Kind, Output, Pipeline, Result
from services.processor.settings import Settings

log = structlog.get_logger(__name__)

_FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)


def _partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default (Java-compatible murmur2) choice, with the hash cached per key:
    keys are per user, so they repeat, and hashing in Python is a visible cost."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[key_hash(key) % len(all_partitions)]


async def _send_batched(producer: AIOKafkaProducer, outputs: list[Output]) -> list[asyncio.Future[Any]]:
    """Queue ``outputs`` as record batches, one builder per topic-partition.

    producer.send() costs tens of microseconds per record in Python; appending
    to a batch builder is several times cheaper, and the processor writes two
    or three records per event. Order within a partition is kept.
    """
    by_tp: dict[tuple[str, int], list[Output]] = {}
    counts: dict[str, list[int]] = {}
    for out in outputs:
        partitions = counts.get(out.topic)
        if partitions is None:
            partitions = counts[out.topic] = sorted(await producer.partitions_for(out.topic))
        partition = _partitioner(out.key, partitions, partitions)
        group = by_tp.get((out.topic, partition))
        if group is None:  # not setdefault: that would build a list for every record
            group = by_tp[out.topic, partition] = []
        group.append(out)
    futures: list[asyncio.Future[Any]] = []
    for (topic, partition), outs in by_tp.items():
        builder = producer.create_batch()
        for out in outs:
            if builder.append(timestamp=None, key=out.key, value=out.value, headers=out.headers) is None:
                futures.append(await producer.send_batch(builder, topic, partition=partition))
                builder = producer.create_batch()
                if builder.append(timestamp=None, key=out.key, value=out.value, headers=out.headers) is None:
                    # Larger than a whole batch: send() sizes a batch for it.
                    futures.append(await producer.send(topic, out.value, key=out.key, partition=partition,
                                                       headers=out.headers))
        if builder.record_count():
            futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


def _raise_failure(task: asyncio.Task[bool]) -> None:
    """A finished batch that failed with something other than a Kafka error (a bug)
    ends the run loop, as it would have when awaited directly."""
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


def _kafka_fields(tp: TopicPartition, offset: int | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"kafka.topic": tp.topic, "kafka.partition": tp.partition}
    if offset is not None:
        fields["kafka.offset"] = offset
    return fields


async def _partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        [described] = await admin.describe_topics([topic])
    except KafkaError as exc:
        raise DependencyUnavailable(f"Kafka at {bootstrap} did not describe {topic}: {exc}") from exc
    finally:
        await admin.close()
    if described["error_code"] or not described["partitions"]:
        raise DependencyUnavailable(f"topic {topic} is not available (error {described['error_code']})")
    return len(described["partitions"])


@dataclass
class PartitionState:
    tp: TopicPartition
    producer: AIOKafkaProducer
    window: DedupeWindow
    # Set when our producer was fenced: another process owns the partition now.
    lost: bool = False
    # The offset after our last commit (or the reset point); None until known.
    next_offset: int | None = None
    # New dedupe keys of each batch dispatched but not yet committed (not yet in the
    # window), oldest first.
    pending: list[dict[str, int]] = field(default_factory=list)
    # Its transactions dispatched and not finished, oldest first; each awaits the one before.
    chain: deque[asyncio.Task[bool]] = field(default_factory=deque)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.processor.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.processor.on_assigned(assigned)


class Processor:
    """Owns the consumer, one transactional producer per owned partition, and the dedupe windows."""

    def __init__(self, settings: Settings, pipeline: Pipeline, metrics: Metrics) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.consumer: AIOKafkaConsumer | None = None
        self._parts: dict[TopicPartition, PartitionState] = {}
        # Revoked at the start of a rebalance; kept if the same rebalance gives them back.
        self._revoked: dict[TopicPartition, PartitionState] = {}
        # Held while a batch is processed; rebalance callbacks wait for it.
        self._lock = asyncio.Lock()
        self._generation = 0
        self._known_dest: set[str] = set()
        # The last transaction dispatched per partition (it awaits the ones before it).
        self._inflight: dict[TopicPartition, asyncio.Task[bool]] = {}
        # Every seek we make gets a number; records fetched before a seek of their
        # partition are stale (the position moved back under them) and are dropped.
        self._seeks = 0
        self._last_seek: dict[TopicPartition, int] = {}
        # The first unexpected (non-Kafka) failure of a batch task; run() raises it.
        self._failure: BaseException | None = None
        self._stopping = False
        self._closed = False

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Create the topics, join nothing yet (subscribe only); DependencyUnavailable while
        Kafka does not answer, with nothing left running, so the caller may try again."""
        try:
            await self._start()
        except KafkaError as exc:
            await self._stop_consumer()
            raise DependencyUnavailable(f"Kafka at {self.settings.kafka_bootstrap}: {exc!r}") from exc
        except DependencyUnavailable:
            await self._stop_consumer()
            raise

    async def _stop_consumer(self) -> None:
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            with contextlib.suppress(KafkaError):
                await consumer.stop()

    async def _start(self) -> None:
        s = self.settings
        await ensure_topics(s.kafka_bootstrap, [
            TopicSpec(s.raw_topic, s.raw_partitions),
            TopicSpec(s.enriched_topic, s.enriched_partitions,
                      configs={"retention.ms": str(s.enriched_retention_ms)}),
            TopicSpec(s.dlq_topic, s.dlq_partitions,
                      configs={"retention.ms": str(s.dlq_retention_ms),
                               "max.message.bytes": str(s.max_request_bytes)}),
        ])
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=s.group_id,
            isolation_level="read_committed", enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
            fetch_max_wait_ms=s.batch_linger_ms, fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=max(1024 * 1024, s.fetch_max_bytes // 4),
            client_id=f"{s.service_name}-consumer",
        )
        await self.consumer.start()
        partitions = await _partition_count(s.kafka_bootstrap, s.raw_topic)
        # Entries older than the window are useless, so retention is the window (plus a margin).
        changelog_configs = {"cleanup.policy": "delete", "retention.ms": str(s.dedupe_window_ms + 3600 * 1000)}
        await ensure_topics(s.kafka_bootstrap, [TopicSpec(s.dedupe_changelog, partitions, configs=changelog_configs)])
        # A changelog made by an older release was compacted, which refuses the keyless
        # records written now (every transaction would fail): bring it up to date.
        await ensure_topic_configs(s.kafka_bootstrap, s.dedupe_changelog, changelog_configs)
        changelog_partitions = await _partition_count(s.kafka_bootstrap, s.dedupe_changelog)
        if changelog_partitions < partitions:
            raise ConfigError(
                f"{s.dedupe_changelog} has {changelog_partitions} partitions but {s.raw_topic} has "
                f"{partitions}; add partitions to the changelog to match")
        self.consumer.subscribe([s.raw_topic], listener=_Listener(self))
        log.info("processor started", group=s.group_id, **{"kafka.topic": s.raw_topic},
                 partitions=partitions)

    async def close(self) -> None:
        """Leave the group and close every producer; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        # Only left over when the drain timed out: their open transactions are fenced later.
        for task in self._inflight.values():
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._inflight.clear()
        states = list(self._parts.values()) + list(self._revoked.values())
        self._parts.clear()
        self._revoked.clear()
        for state in states:
            await self._stop_producer(state)
        if self.consumer is not None:
            await self.consumer.stop()
        self.metrics.partitions.set(0)
        log.info("processor stopped")

    async def status(self) -> tuple[bool, str]:
        """Readiness: started and in a group (owning no partition is fine: more processes than partitions)."""
        if self.consumer is None or self._closed:
            return False, "not running"
        return True, f"{len(self._parts)} partitions"

    # -- rebalance --------------------------------------------------------------

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        async with self._lock:
            self._generation += 1
            try:
                # A batch that failed with a bug is noted by _note_failure and ends the
                # run loop; the revocation still completes.
                await self._drain(revoked, raise_failure=False)
            finally:
                for tp in revoked:
                    state = self._parts.pop(tp, None)
                    if state is not None:
                        self._revoked[tp] = state
                self.metrics.partitions.set(len(self._parts))

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        async with self._lock:
            self._generation += 1
            assigned = set(assigned)
            for tp, state in list(self._revoked.items()):
                if tp not in assigned or state.lost:
                    await self._stop_producer(state)
                    del self._revoked[tp]
                    with contextlib.suppress(KeyError):
                        self.metrics.lag.remove(str(tp.partition))
            fresh: list[TopicPartition] = []
            for tp in sorted(assigned, key=lambda t: t.partition):
                kept = self._revoked.pop(tp, None)
                if kept is not None:
                    self._parts[tp] = kept
                elif tp not in self._parts:
                    fresh.append(tp)
            opened = await asyncio.gather(*(self._open_partition(tp) for tp in fresh), return_exceptions=True)
            for tp, outcome in zip(fresh, opened, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, KafkaError | TimeoutError | DependencyUnavailable):
                        raise outcome
                    # Not fatal: the partition is opened when its first records arrive.
                    log.warning("could not open partition on assignment; will retry",
                                error=repr(outcome), **_kafka_fields(tp))
            self.metrics.partitions.set(len(self._parts))
            log.info("partitions assigned", partitions=sorted(t.partition for t in assigned),
                     **{"kafka.topic": self.settings.raw_topic})

    async def _open_partition(self, tp: TopicPartition) -> PartitionState:
        """Fence the previous owner, read back the dedupe state, and own ``tp``."""
        s = self.settings
        producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            transactional_id=f"{s.transactional_prefix}.{s.raw_topic}.{tp.partition}",
            transaction_timeout_ms=s.transaction_timeout_ms, acks="all",
            compression_type=None if s.kafka_compression == "none" else s.kafka_compression,
            linger_ms=0, max_batch_size=256 * 1024, max_request_size=s.max_request_bytes,
            partitioner=_partitioner,
            client_id=f"{s.service_name}-{tp.partition}",
        )
        try:
            await producer.start()
            window = await self._restore(tp.partition)
        except BaseException:
            await producer.stop()
            raise
        state = PartitionState(tp, producer, window)
        self._parts[tp] = state
        log.info("partition opened", dedupe_entries=len(window), **_kafka_fields(tp))
        return state

    async def _restore(self, partition: int) -> DedupeWindow:
        """Read the changelog back, newest first in growing chunks, until the window is full
        or the start is reached: a busy partition's day of history is not read in full."""
        s = self.settings
        window = DedupeWindow(s.dedupe_window_ms, s.dedupe_max_entries_per_partition)
        tp = TopicPartition(s.dedupe_changelog, partition)
        reader = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None,
                                  isolation_level="read_committed", enable_auto_commit=False,
                                  auto_offset_reset="earliest",
                                  client_id=f"{s.service_name}-restore")
        await reader.start()
        try:
            reader.assign([tp])
            end = (await asyncio.wait_for(reader.end_offsets([tp]), s.restore_timeout_s))[tp]
            begin = (await asyncio.wait_for(reader.beginning_offsets([tp]), s.restore_timeout_s))[tp]
            deadline = asyncio.get_running_loop().time() + s.restore_timeout_s
            chunks: list[list[tuple[str, int]]] = []
            held, stop_at = 0, end
            # A changelog record holds one batch (at most batch_max_records keys).
            span = max(1, s.dedupe_max_entries_per_partition // max(1, s.batch_max_records))
            while stop_at > begin and held < window.max_entries:
                start = max(begin, stop_at - span)
                chunk = await self._read_range(reader, tp, start, stop_at, deadline)
                if chunk is None:
                    log.error("dedupe state only partly read back; duplicates may pass",
                              end=end, read_from=stop_at, **_kafka_fields(tp))
                    break
                chunks.append(chunk)
                held += len(chunk)
                stop_at, span = start, span * 2
            newest = 0
            for chunk in reversed(chunks):  # oldest first: the window evicts from the front
                for key, ts in chunk:
                    window.add(key, ts)
                    newest = max(newest, ts)
            window.expire(newest)
            log.info("dedupe state read back", changelog_end=end, read_from=stop_at, entries=len(window),
                     **_kafka_fields(tp))
        finally:
            await reader.stop()
        return window

    @staticmethod
    async def _read_range(reader: AIOKafkaConsumer, tp: TopicPartition, start: int, stop: int,
                          deadline: float) -> list[tuple[str, int]] | None:
        """Entries of changelog records in [start, stop); None when the deadline passed."""
        loop = asyncio.get_running_loop()
        reader.seek(tp, start)
        entries: list[tuple[str, int]] = []
        while await reader.position(tp) < stop:
            if loop.time() > deadline:
                return None
            batch = await reader.getmany(tp, timeout_ms=500)
            for record in batch.get(tp, ()):
                if record.offset >= stop:
                    return entries
                entries.extend(decode_entries(record.value))
        return entries

    async def _stop_producer(self, state: PartitionState) -> None:
        try:
            await state.producer.stop()
        except KafkaError as exc:
            log.warning("producer did not stop cleanly", error=repr(exc), **_kafka_fields(state.tp))

    # -- the loop ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until ``stop`` is set; the batch in flight is finished first."""
        assert self.consumer is not None, "start() first"
        consumer = self.consumer
        while not stop.is_set():
            generation = self._generation
            owned = max(1, len(self._parts))
            try:
                batch = await consumer.getmany(timeout_ms=500,
                                               max_records=self.settings.batch_max_records * owned)
                # Read right after getmany, with no await in between: getmany hands over
                # only records fetched at the current positions (aiokafka drops the rest
                # on seek), so any seek numbered above this came after these records.
                # Read before getmany, it would drop fresh records: a skip.
                fetched_at = self._seeks
            except KafkaError as exc:
                # The consumer reconnects by itself; positions are unchanged, so nothing is skipped.
                log.warning("fetch failed; retrying", error=repr(exc), **{"kafka.topic": self.settings.raw_topic})
                await asyncio.sleep(self.settings.retry_backoff_s)
                continue
            if self._failure is not None:
                raise self._failure
            if not batch:
                continue
            async with self._lock:
                if generation != self._generation:
                    # A rebalance ran while these were fetched: drop them and read again from
                    # where our own commits (or resets) left each partition we still own.
                    await self._drain(list(self._inflight))
                    assignment = consumer.assignment()
                    for tp, records in batch.items():
                        if tp in assignment:
                            state = self._parts.get(tp)
                            known = state.next_offset if state is not None else None
                            self._seek(tp, records[0].offset if known is None else known)
                    continue
                for tp, records in batch.items():
                    await self._dispatch(tp, records, fetched_at)
        await self._drain(list(self._inflight))

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        assert self.consumer is not None
        self._seeks += 1
        self._last_seek[tp] = self._seeks
        self.consumer.seek(tp, offset)

    async def _dispatch(self, tp: TopicPartition, records: list[Any], fetched_at: int) -> None:
        """Queue ``records`` as tp's next transaction, behind the ones in flight.

        Transactions of one partition run one after another (order within the
        partition, one producer), but the loop does not wait for them: it works
        out this batch now, while the earlier ones are on the wire, and goes on
        fetching. Up to ``max_pending_batches`` batches per partition are held
        so; beyond that the loop waits for the oldest (back-pressure).
        """
        if self._last_seek.get(tp, 0) > fetched_at:
            return  # fetched before tp was rewound: these records come again
        state = self._parts.get(tp)
        tail = self._inflight.get(tp)
        if tail is not None and tail.done():
            _raise_failure(tail)
        if state is None or state.lost or (tail is not None and tail not in state.chain and not tail.done()):
            # No producer yet, fenced, or the tail belongs to a state a reset replaced:
            # wait for that tail, then chain if the partition is open by then, else one
            # batch that _run_partition opens (or drops).
            if tail is not None:
                await asyncio.wait([tail])
                _raise_failure(tail)
                if self._last_seek.get(tp, 0) > fetched_at:
                    return
            state = self._parts.get(tp)
            if state is None or state.lost:
                self._enqueue(tp, None, records, None)
                return
        while len(state.chain) >= self.settings.max_pending_batches:
            oldest = state.chain[0]
            await asyncio.wait([oldest])
            _raise_failure(oldest)
            if self._last_seek.get(tp, 0) > fetched_at or self._parts.get(tp) is not state or state.lost:
                return  # a transaction before this batch failed and rewound the partition
        computed = self._compute(state, records)
        state.pending.append(computed[1])
        self._enqueue(tp, state, records, computed)

    def _enqueue(self, tp: TopicPartition, state: PartitionState | None, records: list[Any],
                 computed: tuple[list[Result], dict[str, int]] | None) -> None:
        previous = state.chain[-1] if state is not None and state.chain else None
        task = asyncio.create_task(self._run_after(previous, tp, state, records, computed),
                                   name=f"batch-{tp.partition}-{records[0].offset}")
        # Failures are visible: _run_partition handles Kafka errors; anything else is noted by
        # _note_failure and ends the run loop after its next fetch (or when awaited first).
        if state is not None:
            state.chain.append(task)
            task.add_done_callback(state.chain.remove)
        task.add_done_callback(self._note_failure)
        self._inflight[tp] = task

    def _note_failure(self, task: asyncio.Task[bool]) -> None:
        if self._failure is None and not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()

    async def _run_after(self, previous: asyncio.Task[bool] | None, tp: TopicPartition,
                         state: PartitionState | None, records: list[Any],
                         computed: tuple[list[Result], dict[str, int]] | None) -> bool:
        if previous is not None and not await previous:
            return False  # the partition was rewound (or lost) before this batch: it comes again
        if state is not None and self._parts.get(tp) is not state:
            return False
        return await self._run_partition(tp, records, computed)

    def _compute(self, state: PartitionState, records: list[Any]) -> tuple[list[Result], dict[str, int]]:
        """Run the pipeline over a batch; no Kafka. Returns the results and the new dedupe keys."""
        staged: dict[str, int] = {}
        window = state.window
        batches = (staged, *state.pending)

        def is_duplicate(key: str, received_at_ms: int) -> bool:
            for batch in batches:
                first = batch.get(key)
                if first is not None and abs(received_at_ms - first) < window.window_ms:
                    return True
            return window.is_duplicate(key, received_at_ms)

        results: list[Result] = []
        for record in records:
            result = self.pipeline.process(record, is_duplicate)
            if result.seen is not None:
                staged[result.seen[0]] = result.seen[1]
            results.append(result)
        return results, staged

    async def _drain(self, tps: Iterable[TopicPartition], *, raise_failure: bool = True) -> None:
        """Wait for the transactions in flight on ``tps`` (each tail awaits its chain)."""
        tasks = [t for tp in tps if (t := self._inflight.pop(tp, None)) is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=not raise_failure)

    async def _run_partition(self, tp: TopicPartition, records: list[Any],
                             computed: tuple[list[Result], dict[str, int]] | None = None) -> bool:
        """One batch in one transaction. False when the partition was rewound instead."""
        assert self.consumer is not None
        state = self._parts.get(tp)
        if state is None:
            try:
                state = await self._open_partition(tp)
            except (KafkaError, TimeoutError) as exc:
                log.warning("could not open partition; will retry", error=repr(exc), **_kafka_fields(tp))
                self._seek(tp, records[0].offset)
                await asyncio.sleep(self.settings.retry_backoff_s)
                return False
        if state.lost:
            self._seek(tp, records[0].offset)
            return False
        started = time.perf_counter()
        if computed is None:
            computed = self._compute(state, records)
            state.pending.append(computed[1])
        results, staged = computed
        try:
            await self._transact(state, records, results, staged)
        except _FENCED as exc:
            # Another process owns the partition now; the coming rebalance takes it from us.
            log.warning("producer fenced; leaving the partition to its new owner", error=repr(exc),
                        **_kafka_fields(tp, records[0].offset))
            state.lost = True
            self._seek(tp, records[0].offset)
            self.consumer.pause(tp)
            self.metrics.transactions.labels("fenced").inc()
            return False
        except (KafkaError, TimeoutError, DependencyUnavailable) as exc:
            log.warning("transaction failed; partition will be read again from its committed offset",
                        error=repr(exc), **_kafka_fields(tp, records[0].offset))
            self.metrics.transactions.labels("failed").inc()
            await self._reset_partition(state)
            return False
        state.next_offset = records[-1].offset + 1
        self._account(state, records, results, time.perf_counter() - started)
        return True

    async def _transact(self, state: PartitionState, records: list[Any], results: list[Result],
                        staged: dict[str, int]) -> None:
        try:
            await self._commit(state, records, results, staged)
        finally:
            # Committed keys are in the window now; a failed batch's keys must not make
            # its own records look like duplicates when they are read again.
            for index, batch in enumerate(state.pending):
                if batch is staged:
                    del state.pending[index]
                    break

    async def _commit(self, state: PartitionState, records: list[Any], results: list[Result],
                      staged: dict[str, int]) -> None:
        s = self.settings
        window = state.window
        await self._ensure_dest_topics(results)

        producer = state.producer
        await producer.begin_transaction()
        try:
            futures = await _send_batched(producer, [out for result in results for out in result.outputs])
            if staged:
                # One record per batch: a record per event would cost as much as the outputs.
                futures.append(await producer.send(s.dedupe_changelog, encode_entries(staged),
                                                   partition=state.tp.partition))
            await asyncio.gather(*futures)
            await producer.send_offsets_to_transaction({state.tp: records[-1].offset + 1}, s.group_id)
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(KafkaError, TimeoutError):
                if producer._txn_manager is not None and producer._txn_manager.is_in_transaction():
                    await producer.abort_transaction()
            raise
        # Only now: a failed transaction must leave no trace in the window.
        window.add_all(staged.items())
        if staged:
            window.expire(max(staged.values()))

    async def _ensure_dest_topics(self, results: list[Result]) -> None:
        s = self.settings
        names: set[str] = set()
        for r in results:
            if r.destinations:
                names.update(r.destinations)
        wanted = {s.dest_topic_prefix + name for name in names} - self._known_dest
        if wanted:
            await ensure_topics(s.kafka_bootstrap, [
                TopicSpec(name, s.dest_partitions, configs={"retention.ms": str(s.dest_retention_ms)})
                for name in sorted(wanted)])
            self._known_dest |= wanted

    async def _reset_partition(self, state: PartitionState) -> None:
        """After a failed or unknown-outcome commit: a fresh producer (which settles the old
        transaction), the dedupe state as committed, and the position as committed."""
        assert self.consumer is not None
        tp = state.tp
        await self._stop_producer(state)
        self._parts.pop(tp, None)
        while not self._stopping:
            await asyncio.sleep(self.settings.retry_backoff_s)
            try:
                fresh = await self._open_partition(tp)
            except (KafkaError, TimeoutError) as exc:
                log.warning("partition reset failed; retrying", error=repr(exc), **_kafka_fields(tp))
                continue
            try:
                committed = await self.consumer.committed(tp)
                if committed is None:
                    committed = (await self.consumer.beginning_offsets([tp]))[tp]
            except (KafkaError, TimeoutError) as exc:
                log.warning("partition reset failed; retrying", error=repr(exc), **_kafka_fields(tp))
                self._parts.pop(tp, None)
                await self._stop_producer(fresh)
                continue
            self._seek(tp, committed)
            fresh.next_offset = committed
            log.info("partition reset", committed=committed, dedupe_entries=len(fresh.window),
                     **_kafka_fields(tp))
            return

    def _account(self, state: PartitionState, records: list[Any], results: list[Result],
                 seconds: float) -> None:
        m = self.metrics
        m.transactions.labels("committed").inc()
        m.batch_seconds.observe(seconds)
        m.events_in.inc(len(records))
        now_ms = time.time() * 1000
        enriched = dest = duplicates = 0
        dlq: dict[str, int] = {}
        latency = m.latency_seconds
        for result in results:
            if result.kind is Kind.ENRICHED:
                enriched += 1
                dest += len(result.destinations)
                if result.received_at_ms:
                    latency.observe(max(0.0, (now_ms - result.received_at_ms) / 1000))
            elif result.kind is Kind.DLQ:
                reason = result.reason.value if result.reason else "unknown"
                dlq[reason] = dlq.get(reason, 0) + 1
            else:
                duplicates += 1
        if enriched:
            m.events_out.labels("enriched").inc(enriched)
        if dest:
            m.events_out.labels("dest").inc(dest)
        if duplicates:
            m.duplicates.inc(duplicates)
        for reason, count in dlq.items():
            m.events_dlq.labels(reason).inc(count)
        assert self.consumer is not None
        high = self.consumer.highwater(state.tp)
        if high is not None:
            m.lag.labels(str(state.tp.partition)).set(max(0, high - records[-1].offset - 1))
        evicted = state.window.evicted
        if evicted:
            m.dedupe_evicted.inc(evicted)
            state.window.evicted = 0
        m.dedupe_entries.set(sum(len(p.window) for p in self._parts.values()))
