"""Where accepted events go: Kafka (acks=all), or the local spool when Kafka
is down or slower than the ack deadline. The spool drains in order before
new events go to Kafka directly again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.common import topics
from services.common.badrow import BAD_ROW_SCHEMA
from services.common.errors import HeadwaterError
from services.common.kafkawriter import OutRecord
from services.ingest.batcher import KafkaBatcher
from services.ingest.errors import Overloaded, SpoolDamaged, SpoolFull
from services.ingest.metrics import IngestMetrics
from services.ingest.settings import Settings
from services.ingest.spool import Spool

log = structlog.get_logger(__name__)

_ENVELOPE_HEADERS = [("hw-schema", b"envelope/1")]
_BADROW_HEADERS = [("hw-schema", BAD_ROW_SCHEMA.encode())]


class Publisher:
    """Takes records and returns once they are safe: acked by Kafka or fsync'd."""

    def __init__(self, settings: Settings, spool: Spool, metrics: IngestMetrics) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self._producers: list[AIOKafkaProducer] = []
        self._batcher: KafkaBatcher | None = None
        self._kafka_up = False
        self._inflight = 0
        self._wakeup = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Publisher]:
        self.spool.open()
        await self._connect()
        # After _connect: a healthy start reads spooling 0 (before it, _kafka_up is still False,
        # and an idle drain loop does not refresh the gauges, so 1 stayed until a first spool).
        self._update_gauges()
        self._drainer = asyncio.create_task(self._drain_loop(), name="spool-drain")
        # A dead drainer would strand the spool: make its failure loud.
        self._drainer.add_done_callback(self._drainer_done)
        try:
            yield self
        finally:
            await self.stop()

    def _drainer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("spool drainer died", error=repr(task.exception()))

    async def stop(self) -> None:
        """Flush the producer and keep the spool; safe to call twice."""
        if self._closing:
            return
        self._closing = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._batcher is not None:
            await self._batcher.stop()
        for producer in self._producers:
            try:
                await asyncio.wait_for(producer.stop(), self.settings.shutdown_timeout_s)
            except (TimeoutError, KafkaError) as exc:
                log.warning("producer did not flush in time", error=repr(exc))
        await self.spool.close()

    async def _connect(self) -> bool:
        if self._producers:
            return True
        s = self.settings
        try:
            await topics.ensure(
                s.kafka_bootstrap,
                [
                    topics.RAW.spec(s.raw_topic, s.raw_partitions),
                    topics.DLQ.spec(s.dlq_topic, s.dlq_partitions),
                ],
                timeout_ms=int(s.kafka_ack_timeout_s * 5000),
            )
        except (HeadwaterError, KafkaError, OSError) as exc:
            log.warning("kafka not reachable; spooling until it is", error=repr(exc))
            return False
        producers = [self._new_producer(i) for i in range(s.kafka_producers)]
        try:
            for p in producers:  # one by one: a failed start leaves none still starting
                await p.start()
        except (KafkaError, OSError) as exc:
            log.warning("kafka not reachable; spooling until it is", error=repr(exc))
            for p in producers:
                with contextlib.suppress(Exception):
                    await p.stop()
            return False
        self._producers = producers
        self._batcher = KafkaBatcher(
            producers,
            linger_s=s.kafka_linger_ms / 1000,
            ack_timeout_s=s.kafka_ack_timeout_s,
            max_pending_bytes=s.kafka_max_batch_bytes,
            small_batch_bytes=s.kafka_small_batch_bytes,
            headers_for=lambda t: _BADROW_HEADERS if t == s.dlq_topic else _ENVELOPE_HEADERS,
            observe_ack=self.metrics.kafka_ack_seconds.observe,
        )
        self._batcher.start()
        self._kafka_up = True
        return True

    def _new_producer(self, index: int) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            client_id=f"headwater-ingest-{s.service_name}-{index}",
            acks="all",
            enable_idempotence=True,
            compression_type=None if s.kafka_compression == "none" else s.kafka_compression,
            linger_ms=0,  # the batcher lingers; batches it submits go out at once
            max_batch_size=s.kafka_max_batch_bytes,
            request_timeout_ms=max(int(s.kafka_ack_timeout_s * 1000) * 5, 10_000),
        )

    # -- publishing --------------------------------------------------------------

    @property
    def spooling(self) -> bool:
        return not self.spool.is_empty or not self._kafka_up

    def status(self) -> tuple[bool, str]:
        if self._drainer is not None and self._drainer.done():
            return False, "the spool drainer stopped; spooled events are not being sent"
        if self.spooling:
            # Still ready: events are safe in the spool; /readyz tells ops why.
            return True, (
                f"spooling: kafka {'up' if self._kafka_up else 'down'}, {self.spool.pending_events} events in the spool"
            )
        return True, "kafka"

    async def publish(self, records: list[OutRecord]) -> str:
        """Return "kafka" or "spool" once every record is safe; raise
        SpoolFull or Overloaded when it cannot be taken."""
        n = len(records)
        if self._inflight + n > self.settings.max_inflight_events:
            raise Overloaded(f"{self._inflight} events in flight")
        if self._kafka_up and self._batcher is not None and self.spool.is_empty:
            # The hot path: no gauge, timer or histogram per request (the batcher
            # times each flush's acks), one await on the batcher's future.
            self._inflight += n
            try:
                await self._batcher.submit(records)
            except Exception as exc:  # noqa: BLE001 - whatever Kafka's path failed with, the spool is safe
                self._kafka_up = False
                self.metrics.spooled_after_timeout.inc(n)
                log.warning("kafka did not acknowledge in time; spooling", error=repr(exc), events=n)
            else:
                return "kafka"
            finally:
                self._inflight -= n
        self._inflight += n
        try:
            try:
                await self.spool.append(records)
            except OSError as exc:
                raise SpoolFull(f"the spool cannot be written: {exc}") from exc
            self._wakeup.set()
            return "spool"
        finally:
            self._inflight -= n
            self._update_gauges()

    # -- draining the spool --------------------------------------------------------

    async def _kafka_answers(self) -> bool:
        assert self._producers
        try:
            await asyncio.wait_for(self._producers[0].client.fetch_all_metadata(), self.settings.kafka_ack_timeout_s)
        except (TimeoutError, KafkaError, OSError):
            return False
        return True

    async def _send_batch(self, records: list[OutRecord]) -> None:
        assert self._batcher is not None
        # Draining sends large batches, often to a broker that just came back:
        # a longer deadline than a request's avoids resending (duplicating) them.
        await self._batcher.send(records, timeout_s=max(self.settings.kafka_ack_timeout_s * 5, 10.0))

    async def _reset_producer(self) -> None:
        """Drop a producer that a non-retriable error broke for good; the next _connect makes a
        new one. The case seen: OutOfOrderSequenceNumber after Kafka came back, because batches
        that expired while it was away left a gap in the idempotent producer's sequence numbers,
        and every later send on that producer id fails the same way (aiokafka, unlike Kafka's
        Java client, does not reset the producer id). Records stay in the spool until acked."""
        batcher, producers = self._batcher, self._producers
        self._batcher, self._producers = None, []
        if batcher is not None:
            await batcher.stop()
        for producer in producers:
            with contextlib.suppress(TimeoutError, KafkaError):
                await asyncio.wait_for(producer.stop(), self.settings.kafka_ack_timeout_s * 5)

    async def _drain_loop(self) -> None:
        backoff = 0.2
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), 1.0)
            self._wakeup.clear()
            if self.spool.damaged:
                await asyncio.to_thread(self.spool.refresh_damaged)  # an operator may have replayed one
                self._update_gauges()
            if self.spool.is_empty and self._kafka_up:
                continue
            if not await self._connect() or not await self._kafka_answers():
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                sent = await self.spool.drain(self._send_batch)
            except SpoolDamaged as exc:
                # Already set aside and logged by the spool; back off so a disk that
                # keeps failing cannot turn the drainer into a busy loop.
                self.metrics.spool_damaged_segments.set(len(self.spool.damaged))
                log.warning(
                    "spool drain set a damaged segment aside; backing off",
                    error=str(exc),
                    pending=self.spool.pending_events,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # noqa: BLE001 - the drainer must outlive any one failure
                # Kafka errors, timeouts, disk errors, and anything unexpected: the spool
                # stays on disk and draining is tried again after a backoff.
                self._kafka_up = False
                log.warning("spool drain interrupted; will retry", error=repr(exc), pending=self.spool.pending_events)
                if isinstance(exc, KafkaError) and not exc.retriable:
                    await self._reset_producer()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.2
                self._kafka_up = True
                if sent:
                    log.info("spool drained to kafka", events=sent)
            self._update_gauges()

    def spool_status(self) -> tuple[bool, str]:
        """For /readyz: damaged segments set aside are reported (the process still
        serves: new events are safe), with where they are and what to run."""
        damaged = self.spool.damaged
        if not damaged:
            return True, f"{self.spool.pending_events} events pending"
        return True, (
            f"{len(damaged)} damaged spool segment(s) set aside in {self.spool.damaged_dir}; "
            f"inspect with 'headwater spool inspect {damaged[-1].path}'"
        )

    def _update_gauges(self) -> None:
        self.metrics.spool_damaged_segments.set(len(self.spool.damaged))
        self.metrics.spool_events.set(self.spool.pending_events)
        self.metrics.spool_bytes.set(self.spool.pending_bytes)
        self.metrics.spool_max_bytes.set(self.spool.max_bytes)
        self.metrics.spooling.set(1 if self.spooling else 0)
