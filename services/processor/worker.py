"""The Kafka side of the processor: consume events.raw as a group and write
each batch's outputs, dedupe changelog and consumed offsets in one transaction.

Exactly once
------------
A batch's outputs, its new dedupe keys (to the changelog partition of its
input partition) and its consumed offset are one transaction of that
partition's producer, so a batch is either wholly in the output topics, the
dedupe state and the group's offsets, or in none of them. Whoever owns the
partition next starts a producer with the same transactional id, which
fences this one and settles whatever it left open, before reading back the
dedupe state and the committed offset (transactions.py says why the id is
per partition). A record is only ever read again from the committed offset,
with the dedupe state as committed, so it is written once.

Pipelining
----------
A partition's transactions run one after another, but the loop does not
wait for them: the next batches (up to ``max_pending_batches``) are worked
out while the earlier ones are on the wire, each chained behind the one
before it, with the keys of every uncommitted batch counted by dedupe. A
failed transaction rewinds the partition to its committed offset, and the
batches queued behind it are dropped.

Which work is stale is decided by one number per partition, its epoch
(partitions.py): bumped on every seek, reset, fence and revoke. Fetched
records are tagged with it right after the fetch and a batch carries it; a
batch whose epoch is not its partition's current one, or whose partition is
not ACTIVE, is dropped, and its records come again.

Liveness
--------
While a rebalance callback waits, the consumer is out of its group, so a
revocation waits for its partitions' transactions one session timeout at most
(TransactionManager.cut_off says what happens to those still running). Anything
else that keeps the consumer out of its group, or idle with records waiting,
fails the process after ``rejoin_timeout_s`` (watchdog.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from services.common.errors import DependencyUnavailable
from services.processor import topics, transactions
from services.processor.dedupe import encode_entries, restore
from services.processor.metrics import Metrics, account, observe_lag
from services.processor.partitions import Batch, Partition
from services.processor.pipeline import Pipeline
from services.processor.settings import Settings
from services.processor.transactions import (
    RETRIABLE,
    ProducerFactory,
    Restore,
    TransactionManager,
    is_fenced,
    kafka_fields,
    make_producer,
)
from services.processor.watchdog import Watchdog

log = structlog.get_logger(__name__)


def _raise_failure(task: asyncio.Task[bool]) -> None:
    """A finished batch that failed with something other than a Kafka error (a bug)
    ends the run loop, as it would have when awaited directly."""
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.processor.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.processor.on_assigned(assigned)


class Processor:
    """Owns the consumer and the run loop; the partitions and their producers are the
    TransactionManager's."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        metrics: Metrics,
        *,
        producer_factory: ProducerFactory = make_producer,
        restore_window: Restore = restore,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.consumer: AIOKafkaConsumer | None = None
        self.txns: TransactionManager | None = None
        # How partitions get their producer and dedupe window (unit tests give stand-ins).
        self._producer_factory, self._restore_window = producer_factory, restore_window
        # Held while a batch is dispatched; rebalance callbacks wait for it.
        self._lock = asyncio.Lock()
        self._dest_topics = topics.DestTopics(settings)
        self._lagging: set[int] = set()
        # The first unexpected (non-Kafka) failure of a batch or reset task; run() raises it.
        self._failure: BaseException | None = None
        self._closed = False
        self.watchdog = Watchdog(settings.rejoin_timeout_s, metrics.watchdog_failures, settings.kafka_bootstrap)
        metrics.partitions_stalled.set_function(lambda: len(self.txns.stalled()) if self.txns else 0)
        metrics.stuck_seconds.set_function(lambda: self.watchdog.stalled_s() if self.txns else 0.0)

    @property
    def _parts(self) -> dict[TopicPartition, Partition]:
        return self.txns.parts if self.txns is not None else {}

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Create the topics, join nothing yet (subscribe only); DependencyUnavailable while
        Kafka does not answer, with nothing left running, so the caller may try again."""
        try:
            await self._start()
        except (KafkaError, DependencyUnavailable) as exc:
            if self.consumer is not None:
                consumer, self.consumer, self.txns = self.consumer, None, None
                with contextlib.suppress(KafkaError):
                    await consumer.stop()
            if isinstance(exc, KafkaError):
                raise DependencyUnavailable(f"Kafka at {self.settings.kafka_bootstrap}: {exc!r}") from exc
            raise

    async def _start(self) -> None:
        s = self.settings
        await topics.ensure_outputs(s)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.group_id,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            fetch_max_wait_ms=s.batch_linger_ms,
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=max(1024 * 1024, s.fetch_max_bytes // 4),
            client_id=f"{s.service_name}-consumer",
        )
        self.bind(consumer)
        await consumer.start()
        partitions = await topics.ensure_changelog(s)
        consumer.subscribe([s.raw_topic], listener=_Listener(self))
        self.watchdog.started()
        log.info("processor started", group=s.group_id, **{"kafka.topic": s.raw_topic}, partitions=partitions)

    def bind(self, consumer: Any) -> None:
        """Use ``consumer`` (start() gives it the group consumer; unit tests a stand-in)."""
        self.consumer = consumer
        self.txns = TransactionManager(
            self.settings,
            consumer,
            self._note_failure,
            producer_factory=self._producer_factory,
            restore_window=self._restore_window,
        )

    async def close(self) -> None:
        """Leave the group and close every producer; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # Only left over when the drain timed out: their open transactions are fenced later.
        tasks = [task for part in self._parts.values() for task in part.chain]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.txns is not None:
            await self.txns.close()
        if self.consumer is not None:
            await self.consumer.stop()
        self.metrics.partitions.set(0)
        log.info("processor stopped")

    async def status(self) -> tuple[bool, str]:
        """Readiness: started and in a group (owning no partition is fine: more processes than
        partitions), and no partition stalled (fenced, resetting or not yet open)."""
        if self.consumer is None or self.txns is None or self._closed:
            return False, "not running"
        if (out := self.watchdog.out_of_group(self.settings.session_timeout_ms / 1000)) is not None:
            return False, out
        stalled = self.txns.stalled()
        if stalled:
            now = time.monotonic()
            return False, "stalled: " + ", ".join(
                f"partition {p.tp.partition} {p.status.value} for {now - (p.stalled_since or now):.1f} s"
                for p in sorted(stalled, key=lambda p: p.tp.partition)
            )
        return True, f"{len(self._parts)} partitions"

    # -- rebalance --------------------------------------------------------------

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Drain the revoked partitions' transactions (one session timeout at most: Liveness)."""
        revoked, txns = list(revoked), self.txns
        assert txns is not None
        self.watchdog.joining()
        parts = [p for tp in revoked if (p := self._parts.get(tp)) is not None]
        # A timer, not a timeout around the wait: the lock itself may be held by the run
        # loop waiting on the same stuck transaction (back-pressure in _dispatch).
        timer = asyncio.get_running_loop().call_later(
            self.settings.session_timeout_ms / 1000,
            lambda: self.metrics.transactions.labels("cut_off").inc(txns.cut_off(parts)),
        )
        async with self._lock:
            try:
                # A batch that failed with a bug is noted by _note_failure and ends the
                # run loop; the revocation still completes.
                await self._drain(parts, raise_failure=False)
            finally:
                timer.cancel()
                await txns.revoke(revoked)
                self.metrics.partitions.set(len(self._parts))

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = list(assigned)
        assert self.txns is not None
        async with self._lock:
            await self.txns.assign(assigned)
            self.metrics.partitions.set(len(self._parts))
            self.watchdog.assigned()
            log.info(
                "partitions assigned",
                partitions=sorted(t.partition for t in assigned),
                **{"kafka.topic": self.settings.raw_topic},
            )

    # -- the loop ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until ``stop`` is set; the batches in flight are finished first.
        Raises ConsumerStuck when the watchdog finds the consumer stuck (the service fails)."""
        assert self.consumer is not None, "start() first"
        await self.watchdog.guard(self._loop(stop))

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self._fetch()
            if self._failure is not None:
                raise self._failure
            self._observe()
            async with self._lock:
                for batch in batches:
                    await self._dispatch(batch)
        await self._drain(list(self._parts.values()))

    async def _fetch(self) -> list[Batch]:
        """The next records of every owned partition, each partition's tagged with its epoch."""
        assert self.consumer is not None
        owned = max(1, len(self._parts))
        try:
            fetched = await self.consumer.getmany(timeout_ms=500, max_records=self.settings.batch_max_records * owned)
        except KafkaError as exc:
            # The consumer reconnects by itself; positions are unchanged, so nothing is skipped.
            log.warning("fetch failed; retrying", error=repr(exc), **{"kafka.topic": self.settings.raw_topic})
            await asyncio.sleep(self.settings.retry_backoff_s)
            return []
        # Tagged right after getmany, with no await in between: getmany hands over only
        # records fetched at the current positions (aiokafka drops the rest on seek), so
        # any seek after this has bumped the epoch past the tag. Tagged before getmany,
        # records fetched after a seek would be dropped: a skip.
        parts = self._parts
        return [
            Batch(tp, part.epoch, records)
            for tp, records in fetched.items()
            if records and (part := parts.get(tp)) is not None
        ]

    async def _dispatch(self, batch: Batch) -> None:
        """Queue ``batch`` as its partition's next transaction, behind the ones in flight.

        Transactions of one partition run one after another (order within the
        partition, one producer), but the loop does not wait for them: it works
        out this batch now, while the earlier ones are on the wire, and goes on
        fetching. Up to ``max_pending_batches`` batches per partition are held
        so; beyond that the loop waits for the oldest (back-pressure).
        """
        part = self._parts.get(batch.tp)
        while part is not None and part.takes(batch) and len(part.chain) >= self.settings.max_pending_batches:
            oldest = part.chain[0]
            await asyncio.wait([oldest])
            _raise_failure(oldest)
        if part is None or not part.takes(batch):
            return  # revoked, stalled, or rewound since the fetch: these records come again
        part.compute(self.pipeline, batch)
        previous = part.chain[-1] if part.chain else None
        task = asyncio.create_task(
            self._run_batch(part, batch, previous), name=f"batch-{batch.tp.partition}-{batch.first_offset}"
        )
        # Failures are visible: _run_batch handles Kafka errors; anything else is noted by
        # _note_failure and ends the run loop after its next fetch (or when awaited first).
        part.chain.append(task)
        task.add_done_callback(part.chain.remove)
        task.add_done_callback(self._note_failure)

    def _note_failure(self, task: asyncio.Task[Any]) -> None:
        if self._failure is None and not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()

    async def _run_batch(self, part: Partition, batch: Batch, previous: asyncio.Task[bool] | None) -> bool:
        """One batch's transaction, after the one before it. False when it was not
        committed (the partition was rewound, fenced or revoked first): its records come again."""
        assert self.txns is not None
        try:
            if previous is not None and not await previous:
                return False
            if not part.takes(batch):
                return False
            started = time.perf_counter()
            try:
                await self._commit(part, batch)
            except RETRIABLE as exc:
                fenced = is_fenced(exc)
                log.warning(
                    "producer fenced; the partition waits for a rebalance, then resets"
                    if fenced
                    else "transaction failed; partition will be read again from its committed offset",
                    error=repr(exc),
                    **kafka_fields(batch.tp, batch.first_offset),
                )
                self.metrics.transactions.labels("fenced" if fenced else "failed").inc()
                (self.txns.fence if fenced else self.txns.fail)(part)
                return False
            part.next_offset = batch.next_offset
            self.watchdog.progressed()
            account(
                self.metrics,
                part,
                batch,
                time.perf_counter() - started,
                sum(len(p.window) for p in self._parts.values() if p.window is not None),
            )
            return True
        finally:
            part.forget(batch.staged)

    async def _commit(self, part: Partition, batch: Batch) -> None:
        """Write one batch in one transaction of its partition's producer.

        1. Create the dest.* topics the batch routes to that are new (creating a
           topic cannot be part of a transaction).
        2. Begin the transaction.
        3. Queue the outputs as record batches.
        4. Queue the batch's new dedupe keys as one record on changelog partition p
           (a record per event would cost as much as the outputs).
        5. Wait until the broker has every record.
        6. Add the consumed offset (last + 1) for the group to the transaction.
        7. Commit. A failure in 2-7 aborts the transaction (or leaves it to the next
           producer with this id, which aborts it): none of it is visible.
        8. Only now put the keys in the dedupe window: a failed transaction must
           leave no trace in it.
        """
        s = self.settings
        producer, window = part.producer, part.window
        assert producer is not None and window is not None
        await self._dest_topics.ensure(batch.results)  # 1
        async with transactions.transaction(producer):  # 2, 7
            futures = await transactions.write_outputs(  # 3
                producer, [out for result in batch.results for out in result.outputs]
            )
            if batch.staged:  # 4
                futures.append(
                    await producer.send(s.dedupe_changelog, encode_entries(batch.staged), partition=part.tp.partition)
                )
            await asyncio.gather(*futures)  # 5
            await producer.send_offsets_to_transaction({part.tp: batch.next_offset}, s.group_id)  # 6
        window.add_all(batch.staged.items())  # 8
        if batch.staged:
            window.expire(max(batch.staged.values()))

    async def _drain(self, parts: Iterable[Partition], *, raise_failure: bool = True) -> None:
        """Wait for the transactions in flight on ``parts``."""
        tasks = [task for part in parts for task in part.chain]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=not raise_failure)

    def _observe(self) -> None:
        """Lag per owned partition; an idle processor counts as progress for the watchdog."""
        assert self.consumer is not None
        self._lagging, waiting = observe_lag(self.metrics, self._parts, self.consumer.highwater, self._lagging)
        if not waiting:
            self.watchdog.progressed()
