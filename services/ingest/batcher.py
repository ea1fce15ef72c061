"""Cross-request batching: every request hands over its records and one task
writes whatever has arrived through the one Kafka writer (a record batch per
partition, Kafka's murmur2 rule: services/common/kafkawriter.py). A request
returns when every batch of its flush is acknowledged (acks=all), so the
contract "200 only after Kafka acked" holds.

Batching adapts to the load the way Nagle's algorithm does: each flush
awaits its acks on a producer of its own, at most one flush per producer,
and whatever arrives meanwhile goes out together in the next one. A lone
request is sent at once (no linger to wait out); under load the batches
grow by themselves, by the time one round trip to the broker takes.

Several producers (the ``kafka_producers`` setting, 2 by default): aiokafka
keeps one produce request in flight per broker connection, so with one
producer a process whose requests are all waiting for acks idles for the
round trip; two overlap their round trips, at the price of smaller flushes
(each costs aiokafka about half a millisecond of CPU). Measured pinned to one
core (bench_ingest --pin): one producer kept the core 88% busy on single
events, two 100%, for 4% more requests a second and 6% more CPU a request;
batches came out the same. Three did no better, nor did lingering for larger
flushes. Order is kept where it
means something: a client's next request comes after the answer to its
previous one, so after its records were acknowledged; requests in flight
together have no order to keep. The spool drains one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from services.common.kafkawriter import BatchWriter, Headers, OutRecord

log = structlog.get_logger(__name__)


class KafkaBatcher:
    """Groups records from concurrent callers into per-partition batches."""

    def __init__(
        self,
        producers: Sequence[AIOKafkaProducer],
        *,
        linger_s: float,
        ack_timeout_s: float,
        max_pending_bytes: int,
        headers_for: Callable[[str], Headers],
        small_batch_bytes: int = 0,
        observe_ack: Callable[[float], None] | None = None,
    ) -> None:
        self._linger_s = linger_s
        # Writers with no flush in flight; a flush takes one and gives it back when acked.
        self._idle = [
            BatchWriter(p, headers_for=headers_for, small_batch_bytes=small_batch_bytes, batch_bytes=max_pending_bytes)
            for p in producers
        ]
        self._inflight: set[asyncio.Future[Any]] = set()
        self._observe_ack = observe_ack
        self._ack_timeout_s = ack_timeout_s
        self._max_pending_bytes = max_pending_bytes
        self._pending: list[OutRecord] = []
        self._pending_bytes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._wakeup = asyncio.Event()
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kafka-batcher")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("kafka batcher died", error=repr(exc))
            self._fail(self._waiters, exc)
            self._waiters = []

    async def stop(self) -> None:
        """Stop taking records; callers still waiting get an error (and spool). Safe twice."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail(self._waiters, ConnectionError("ingest is stopping"))
        self._waiters = []

    async def send(self, records: list[OutRecord], timeout_s: float | None = None) -> None:
        """Return once Kafka acknowledged every record; raise otherwise
        (TimeoutError when the acks take longer than ``timeout_s``, by default
        the batcher's ``ack_timeout_s``)."""
        await self.submit(records, timeout_s)

    def submit(self, records: list[OutRecord], timeout_s: float | None = None) -> asyncio.Future[None]:
        """Hand ``records`` over; the future completes when Kafka acknowledged
        them all, or fails (TimeoutError after ``timeout_s``, by default the
        batcher's ``ack_timeout_s``). Not a coroutine: the hot path awaits the
        future directly, one frame less per request."""
        if self._task is None or self._task.done():
            raise ConnectionError("kafka batcher is not running")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if not self._waiters or timeout_s is not None:
            # One deadline per flush group, set when the group opens (a request's
            # own timeout, or a longer one a drain asks for), not one timer per
            # request. Callers still waiting then get a TimeoutError and spool;
            # Kafka may still take the records (a duplicate, never a loss).
            when = loop.time() + (timeout_s or self._ack_timeout_s)
            if self._deadline is None or not self._waiters or when > self._deadline.when():
                if self._deadline is not None and self._waiters:
                    self._deadline.cancel()
                self._deadline = loop.call_at(
                    when, self._fail, self._waiters, TimeoutError("kafka did not acknowledge in time")
                )
        self._pending.extend(records)
        for r in records:
            self._pending_bytes += len(r.value)
        self._waiters.append(waiter)
        self._wakeup.set()
        return waiter

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if self._linger_s and self._pending_bytes < self._max_pending_bytes:
                await asyncio.sleep(self._linger_s)  # let concurrent requests join this flush
            while not self._idle:
                # Records keep arriving while the broker answers: they make the next flush.
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            self._wakeup.clear()
            records, waiters, deadline = self._pending, self._waiters, self._deadline
            self._pending, self._waiters, self._pending_bytes, self._deadline = [], [], 0, None
            if not records:
                continue
            writer = self._idle.pop()
            try:
                acks = await writer.write(records)
            except Exception as exc:  # noqa: BLE001 - every caller learns of it and spools
                self._idle.append(writer)
                self._fail(waiters, exc)
                continue
            flushed = asyncio.gather(*acks)
            self._inflight.add(flushed)
            flushed.add_done_callback(functools.partial(self._flushed, writer, waiters, deadline, loop.time()))

    def _flushed(
        self,
        writer: BatchWriter,
        waiters: list[asyncio.Future[None]],
        deadline: asyncio.TimerHandle | None,
        started: float,
        done: asyncio.Future[Any],
    ) -> None:
        self._inflight.discard(done)
        self._idle.append(writer)
        if deadline is not None:
            deadline.cancel()
        if self._observe_ack is not None and not done.cancelled() and done.exception() is None:
            self._observe_ack(asyncio.get_running_loop().time() - started)
        self._settle(waiters, done)

    @staticmethod
    def _settle(waiters: list[asyncio.Future[None]], done: asyncio.Future[Any]) -> None:
        exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
        for w in waiters:
            if w.done():
                continue  # the caller gave up (timed out) and spooled
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)

    @staticmethod
    def _fail(waiters: list[asyncio.Future[None]], exc: BaseException) -> None:
        for w in waiters:
            if not w.done():
                w.set_exception(exc)
