"""Per-partition transactional producers: who opens, fences, resets and closes them.

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
state moves with the partition. A producer is started (fencing the previous
owner) *before* the dedupe state is read back, so the state read is final.

Failures and fences
-------------------
A transaction that fails with its outcome unknown (a broker went away, a
timeout) resets the partition: a new producer with the same id settles the
old transaction (the broker finishes or aborts it first), then the dedupe
state and the position are taken as committed. A fenced producer means one
of two things: another process owns the partition now (a rebalance is on its
way and takes it from us), or the broker aborted a transaction that ran past
``transaction_timeout_ms`` and no rebalance will ever come. The partition
waits one session timeout for that rebalance (a member the group dropped
learns it within that time) and then resets as above, so it cannot stall
for good. Resetting is safe even if the other owner is real: the reset
fences whoever holds the id and reads the committed state back, so the worst
case is two owners taking turns until the group settles, never a record
written twice. Either way the partition is paused while it stalls, and
/readyz and the stalled gauge show it.

Cut off on revocation
---------------------
A revocation waits for the partition's transactions, but not for ever: a
transaction still running after one session timeout is stuck on a broker call
(aiokafka retries transactional requests without a deadline, e.g. against a
coordinator that was killed and restarted) and keeps the consumer out of its
group. ``cut_off`` cancels it without an abort (which would wait on the same
broker) and the partition is then closed, not kept: whoever opens it next,
this process or another, starts a producer with its transactional id, which
aborts what was left open, or waits for a commit already sent to settle, and
only then reads the committed offset and dedupe state. So the cut-off batch is
either wholly committed or read again, never written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced, TransactionalIdAuthorizationFailed

from services.common.errors import DependencyUnavailable
from services.common.kafkawriter import BatchWriter, OutRecord, aiokafka_partitioner
from services.processor.dedupe import DedupeWindow, restore
from services.processor.partitions import Partition, PartitionStatus
from services.processor.settings import Settings

log = structlog.get_logger(__name__)

FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)
# Errors after which a retry can help: the partition is reset, not the process stopped.
RETRIABLE = (KafkaError, TimeoutError, DependencyUnavailable)


def is_fenced(exc: BaseException) -> bool:
    """A fence, also when it surfaced as the cause of a failed abort."""
    return isinstance(exc, FENCED) or isinstance(exc.__context__, FENCED)


def quiet_fenced_futures(loop: asyncio.AbstractEventLoop) -> None:
    """Keep a fenced producer's dropped futures out of the error log.

    When a producer is fenced, aiokafka fails its batches, their drain waiters and its
    transaction waiter with the fence, and nothing awaits them afterwards: the partition's
    next owner carries on, as exactly-once intends. asyncio logs each such future at error
    level, with a traceback, when it is collected, which reads like a fault in every
    rebalance. Those go to debug; the fence itself is logged where it is handled. Anything
    else goes to the handler that was there."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is not None and is_fenced(exc) and context.get("message", "").endswith("exception was never retrieved"):
            log.debug("a fenced producer's future was dropped", error=repr(exc))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


class Consumer(Protocol):
    """What the manager needs of the group consumer (AIOKafkaConsumer has it)."""

    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...
    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...


def kafka_fields(tp: TopicPartition, offset: int | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"kafka.topic": tp.topic, "kafka.partition": tp.partition}
    if offset is not None:
        fields["kafka.offset"] = offset
    return fields


async def write_outputs(producer: AIOKafkaProducer, outputs: list[OutRecord]) -> list[asyncio.Future[Any]]:
    """Queue ``outputs`` in the open transaction, a record batch per topic-partition
    (the one Kafka writer, services/common/kafkawriter.py)."""
    return await BatchWriter(producer).write(outputs)


@contextlib.asynccontextmanager
async def transaction(producer: AIOKafkaProducer) -> AsyncIterator[None]:
    """Begin; commit when the body finishes, abort when it raises. A failed abort is not
    raised over the body's error: the next producer with this id aborts what is left."""
    await producer.begin_transaction()
    try:
        yield
    except BaseException as exc:
        # A fenced producer cannot abort (the broker did, or the new owner does); a cancelled
        # one (cut off, or closing) leaves it to the next producer with the id.
        if not is_fenced(exc) and not isinstance(exc, asyncio.CancelledError):
            # aiokafka asserts on the state change when an error was fatal, and tells which
            # errors are only through private state: AssertionError is that refusal here.
            with contextlib.suppress(KafkaError, TimeoutError, AssertionError):
                await producer.abort_transaction()
        raise
    await producer.commit_transaction()


ProducerFactory = Callable[[Settings, int], AIOKafkaProducer]
Restore = Callable[[Settings, int], Awaitable[DedupeWindow]]


def make_producer(settings: Settings, partition: int) -> AIOKafkaProducer:
    s = settings
    return AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        transactional_id=f"{s.transactional_prefix}.{s.raw_topic}.{partition}",
        transaction_timeout_ms=s.transaction_timeout_ms,
        acks="all",
        compression_type=None if s.kafka_compression == "none" else s.kafka_compression,
        linger_ms=0,
        max_batch_size=256 * 1024,
        max_request_size=s.max_request_bytes,
        partitioner=aiokafka_partitioner,
        client_id=f"{s.service_name}-{partition}",
    )


class TransactionManager:
    """The Partition objects this process owns, their producers, and what happens to them
    on assignment, revocation, failure, fence and close."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        on_failure: Callable[[asyncio.Task[Any]], None],
        *,
        producer_factory: ProducerFactory = make_producer,
        restore_window: Restore = restore,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.parts: dict[TopicPartition, Partition] = {}
        # Revoked at the start of a rebalance; kept if the same rebalance gives them back.
        self._revoked: dict[TopicPartition, Partition] = {}
        # Partitions whose transactions were cut off: closed when revoked, never kept.
        self._cut: set[TopicPartition] = set()
        self._on_failure = on_failure
        self._producer_factory = producer_factory
        self._restore = restore_window

    def seek(self, part: Partition, offset: int) -> None:
        part.bump()
        self.consumer.seek(part.tp, offset)

    def stalled(self) -> list[Partition]:
        return [p for p in self.parts.values() if p.stalled]

    # -- rebalance ----------------------------------------------------------------

    def cut_off(self, parts: Iterable[Partition]) -> int:
        """The revocation of ``parts`` waited long enough: cancel their transactions still
        running (see Cut off on revocation above); how many were cancelled."""
        cancelled = 0
        for part in parts:
            if not part.chain:
                continue
            log.warning(
                "transactions still running when the revocation stopped waiting; cancelling them",
                in_flight=len(part.chain),
                **kafka_fields(part.tp),
            )
            part.bump()  # the run loop dispatches nothing more to it
            self._cut.add(part.tp)
            for task in part.chain:
                task.cancel()
                cancelled += 1
        return cancelled

    async def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """After the processor drained their transactions: ACTIVE partitions are kept aside
        (the same rebalance may give them back), stalled and cut-off ones closed."""
        for tp in tps:
            part = self.parts.pop(tp, None)
            if part is None:
                continue
            part.bump()
            if part.status is PartitionStatus.ACTIVE and tp not in self._cut:
                part.become(PartitionStatus.REVOKED)
                self._revoked[tp] = part
            else:
                await self._close(part)
            self._cut.discard(tp)

    async def assign(self, assigned: Iterable[TopicPartition]) -> None:
        """Close what was revoked and not given back, take back what was, open the rest."""
        wanted = set(assigned)
        for tp, part in list(self._revoked.items()):
            if tp not in wanted:
                del self._revoked[tp]
                await self._close(part)
        fresh: list[Partition] = []
        for tp in sorted(wanted, key=lambda t: t.partition):
            kept = self._revoked.pop(tp, None)
            if kept is not None:
                self.parts[tp] = kept
                kept.become(PartitionStatus.ACTIVE)
                if kept.next_offset is not None:
                    # Not the group's committed offset: its last transaction's markers may
                    # not be written yet, and our own is exact.
                    self.seek(kept, kept.next_offset)
            elif tp not in self.parts:
                fresh.append(Partition(tp))
        opened = await asyncio.gather(*(self._open(p) for p in fresh), return_exceptions=True)
        for part, outcome in zip(fresh, opened, strict=True):
            # Owned from here: records the consumer fetched for it while it opened were
            # dropped (not owned yet), and the rewind below reads them again.
            self.parts[part.tp] = part
            if isinstance(outcome, int):
                self._activate(part, outcome)
            elif isinstance(outcome, RETRIABLE):
                log.warning(
                    "could not open partition on assignment; will retry", error=repr(outcome), **kafka_fields(part.tp)
                )
                self._stall(part, PartitionStatus.RESETTING, delay_s=self.settings.retry_backoff_s)
            else:
                raise outcome

    # -- failures -----------------------------------------------------------------

    def fail(self, part: Partition) -> None:
        """A transaction failed with its outcome unknown: reset now."""
        self._stall(part, PartitionStatus.RESETTING, delay_s=self.settings.retry_backoff_s)

    def fence(self, part: Partition) -> None:
        """Our producer was fenced: give a rebalance one session timeout to take the
        partition, then reset (the broker may have aborted a transaction that ran past
        transaction_timeout_ms, and then no rebalance comes)."""
        self._stall(part, PartitionStatus.FENCED, delay_s=self.settings.session_timeout_ms / 1000)

    def _stall(self, part: Partition, status: PartitionStatus, delay_s: float) -> None:
        part.bump()
        part.become(status)
        self.consumer.pause(part.tp)
        if part.recovery is None:
            task = asyncio.create_task(self._recover(part, delay_s), name=f"reset-{part.tp.partition}")
            # A bug in the reset ends the run loop, as a bug in a batch does.
            task.add_done_callback(self._on_failure)
            part.recovery = task

    async def _recover(self, part: Partition, delay_s: float) -> None:
        """Until it works (or the partition is taken away, which cancels this): a new
        producer (which fences or settles whatever the old one left open), the dedupe
        state and the position as committed, then resume."""
        tp = part.tp
        await asyncio.sleep(delay_s)
        if part.status is PartitionStatus.FENCED:
            log.warning("no rebalance took the fenced partition; resetting it", **kafka_fields(tp))
            part.become(PartitionStatus.RESETTING)
        if part.chain:  # the failed batch and the ones queued behind it give up at once
            await asyncio.wait(list(part.chain))
        while True:
            await self._stop_producer(part)
            try:
                committed = await self._open(part)
            except RETRIABLE as exc:
                log.warning("partition reset failed; retrying", error=repr(exc), **kafka_fields(tp))
                await asyncio.sleep(self.settings.retry_backoff_s)
                continue
            stalled_s = time.monotonic() - (part.stalled_since or time.monotonic())
            part.recovery = None
            self._activate(part, committed)
            self.consumer.resume(tp)
            log.info("partition reset", committed=committed, stalled_s=round(stalled_s, 3), **kafka_fields(tp))
            return

    def _activate(self, part: Partition, committed: int) -> None:
        """Rewind to ``committed`` and take batches again (no await: one step)."""
        self.seek(part, committed)
        part.next_offset = committed
        part.become(PartitionStatus.ACTIVE)

    # -- producers ----------------------------------------------------------------

    async def _open(self, part: Partition) -> int:
        """Fence the previous owner (which also settles the transaction it left open), read
        back the dedupe state, and return the committed offset, final now."""
        tp = part.tp
        producer = self._producer_factory(self.settings, tp.partition)
        # aiokafka retries these without a deadline (InitProducerId, OffsetFetch): bounded
        # here, a TimeoutError stalls the partition and it is tried again, with a warning.
        timeout_s = self.settings.restore_timeout_s
        try:
            await asyncio.wait_for(producer.start(), timeout_s)
            window = await self._restore(self.settings, tp.partition)
            committed = await asyncio.wait_for(self.consumer.committed(tp), timeout_s)
            if committed is None:  # nothing committed yet: auto_offset_reset=earliest
                committed = (await asyncio.wait_for(self.consumer.beginning_offsets([tp]), timeout_s))[tp]
        except BaseException:
            with contextlib.suppress(KafkaError):
                await producer.stop()
            raise
        part.producer, part.window, part.pending = producer, window, []
        log.info("partition opened", dedupe_entries=len(window), committed=committed, **kafka_fields(tp))
        return committed

    async def _stop_producer(self, part: Partition) -> None:
        producer, part.producer = part.producer, None
        if producer is None:
            return
        # stop() first flushes what is queued, with no deadline: a batch the broker never
        # takes would hold a revocation or a reset for good. Past one session timeout the
        # producer is left behind; the next producer with its id fences it.
        try:
            await asyncio.wait_for(producer.stop(), self.settings.session_timeout_ms / 1000)
        except (KafkaError, TimeoutError) as exc:
            log.warning("producer did not stop cleanly", error=repr(exc), **kafka_fields(part.tp))

    async def _close(self, part: Partition) -> None:
        task, part.recovery = part.recovery, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        part.become(PartitionStatus.CLOSED)
        await self._stop_producer(part)

    async def close(self) -> None:
        """Stop every producer (their open transactions are aborted by the next owner)."""
        parts = [*self.parts.values(), *self._revoked.values()]
        self.parts.clear()
        self._revoked.clear()
        for part in parts:
            await self._close(part)
