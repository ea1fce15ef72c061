"""Late and bad rows the rollup consumer sends beside its Cassandra writes.

Every row is acknowledged by Kafka before the checkpoint passes its offset
(``settle()`` runs first in a flush), so a crash can resend a row but never
lose one. A Kafka failure here is Kafka's: it is retried on its own and never
makes the consumer doubt what Cassandra holds (no resync of the partitions).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.common.badrow import BadRow, FailureType
from services.metrics.metrics import MetricsMetrics
from services.metrics.retry import retry
from services.metrics.rollup import Event

log = structlog.get_logger(__name__)

SERVICE = "headwater-metrics"
VERSION = "0.1.0"
BAD_ROW_HEADERS = [("hw-schema", b"headwater/bad_row/1")]


class SideSender:
    """Sends typed rows to the late and dead-letter topics and waits for their acks."""

    def __init__(self, producer: AIOKafkaProducer, metrics: MetricsMetrics, *, late_topic: str, dlq_topic: str) -> None:
        self.producer = producer
        self.metrics = metrics
        self.late_topic = late_topic
        self.dlq_topic = dlq_topic
        self._pending: list[tuple[str, bytes, bytes | None, asyncio.Future[asyncio.Future[Any]]]] = []

    def bad(self, record: Any, failure: FailureType, error: str) -> None:
        """A record that is not a usable enriched event: a bad row on the DLQ topic."""
        self.metrics.bad.labels(failure.value).inc()
        row = BadRow(
            failure_type=failure,
            errors=[error],
            original=record.value or b"",
            service=SERVICE,
            version=VERSION,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        log.warning(
            "bad input",
            failure_type=failure.value,
            error=error,
            **{"kafka.topic": record.topic, "kafka.partition": record.partition, "kafka.offset": record.offset},
        )
        self._send(self.dlq_topic, row.to_json(), record.key)

    def late(self, record: Any, event: Event, reason: str, error: str, extra: dict[str, object]) -> None:
        """An event some or all resolutions can no longer hold: a row on the late topic."""
        self.metrics.late.labels(event.source, reason).inc()
        row = BadRow(
            failure_type=FailureType.LATE_EVENT,
            errors=[error],
            original=record.value or b"",
            service=SERVICE,
            version=VERSION,
            source_id=event.source,
            message_id=event.message_id,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            extra={
                "reason": reason,
                "event_time_ms": event.time_ms,
                "received_at_ms": event.received_ms,
                "type": event.type,
                "event": event.name,
                **extra,
            },
        )
        self._send(self.late_topic, row.to_json(), record.key)

    def _send(self, topic: str, value: bytes, key: bytes | None) -> None:
        future = asyncio.ensure_future(self.producer.send(topic, value, key=key, headers=BAD_ROW_HEADERS))
        self._pending.append((topic, value, key, future))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def settle(self) -> None:
        """Wait until Kafka acknowledged every row sent so far; resend those it refused."""
        sends, self._pending = self._pending, []
        for topic, value, key, future in sends:
            try:
                await (await future)
            except KafkaError as exc:
                log.warning(
                    "side record not acknowledged; sending again",
                    error=f"{type(exc).__name__}: {exc}",
                    **{"kafka.topic": topic},
                )
                await retry(
                    functools.partial(self.producer.send_and_wait, topic, value, key=key, headers=BAD_ROW_HEADERS),
                    what=f"send to {topic}",
                )
