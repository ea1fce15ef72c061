"""The one way a service writes records to Kafka: :class:`OutRecord`, and
:class:`BatchWriter`, which turns a list of them into one record batch per
topic-partition through aiokafka's batch API.

``AIOKafkaProducer.send`` costs a future, a partitioner call and an
accumulator lookup per record, tens of microseconds in Python; appending to
a batch builder is several times cheaper, and ingest and the processor write
every event this way. Partitions are picked with Kafka's own murmur2 rule
(the Java client's default), so another producer writing the same keys puts
them on the same partitions. Order within a partition is the order of the
list. A record larger than an empty batch can hold goes out on its own
through ``send``, which sizes a batch for it; beyond the producer's
``max_request_size`` Kafka refuses it and the caller's future fails.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from services.common.kafka import key_hash

# A list, not any sequence: aiokafka's C batch builder takes lists only. Shared, never changed.
Headers = list[tuple[str, bytes]]
NO_HEADERS: Headers = []


@dataclass(slots=True)
class OutRecord:
    """One record to write. ``headers`` empty: the writer's ``headers_for(topic)``.

    Not frozen: a frozen dataclass sets each field through object.__setattr__,
    three times the cost of a plain one, paid for every event ingest takes.
    Nothing changes a record once made."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)


def partition_for(key: bytes | None, partitions: Sequence[int]) -> int:
    """The Java client's choice for a keyed record (murmur2, cached per key: keys are
    per user and repeat); a record without a key goes to any partition."""
    if key is None:
        return random.choice(partitions)
    return partitions[key_hash(key) % len(partitions)]


def aiokafka_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """:func:`partition_for` as an ``AIOKafkaProducer(partitioner=...)``, for the
    records a producer still sends one by one."""
    return partition_for(key, all_partitions) if key is not None else random.choice(available or all_partitions)


class BatchWriter:
    """Writes lists of :class:`OutRecord` through one producer, a batch per topic-partition.

    ``small_batch_bytes``: a partition's records adding up to less than this go in an
    uncompressed batch, whatever the producer's codec. Compressing a few hundred bytes
    costs more than it saves: cramjam's zstd sets up a context of its own on every
    call, about 13 us, and single events under load make batches of one to three
    records. Consumers read both kinds alike. Needs ``batch_bytes`` (the producer's
    max_batch_size); not for a transactional producer (its batches must say so).
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        headers_for: Callable[[str], Headers] | None = None,
        small_batch_bytes: int = 0,
        batch_bytes: int = 0,
    ) -> None:
        if small_batch_bytes and batch_bytes < small_batch_bytes:
            raise ValueError("small_batch_bytes needs batch_bytes, the producer's max_batch_size")
        self._producer = producer
        self._headers_for = headers_for
        self._small_batch_bytes = small_batch_bytes
        self._batch_bytes = batch_bytes

    def _first_batch(self, records: list[OutRecord]) -> BatchBuilder:
        if self._small_batch_bytes:
            size = 0
            for r in records:
                size += len(r.value)
            if size < self._small_batch_bytes:
                # aiokafka's own builder with no codec (keywords: a changed signature fails loudly)
                return BatchBuilder(batch_size=self._batch_bytes, compression_type=0)
        return self._producer.create_batch()

    async def write(self, records: Iterable[OutRecord]) -> list[asyncio.Future[Any]]:
        """Queue every record; the futures complete when Kafka acknowledged their batches
        (or, inside a transaction, when the batches are written to it)."""
        by_tp: dict[tuple[str, int], list[OutRecord]] = {}
        partitions_of: dict[str, list[int]] = {}
        for record in records:
            partitions = partitions_of.get(record.topic)
            if partitions is None:
                partitions = partitions_of[record.topic] = sorted(await self._producer.partitions_for(record.topic))
            tp = (record.topic, partition_for(record.key, partitions))
            group = by_tp.get(tp)
            if group is None:  # not setdefault: that would build a list for every record
                group = by_tp[tp] = []
            group.append(record)
        acks: list[asyncio.Future[Any]] = []
        for (topic, partition), group in by_tp.items():
            await self._write_partition(topic, partition, group, acks)
        return acks

    async def _write_partition(
        self, topic: str, partition: int, records: list[OutRecord], acks: list[asyncio.Future[Any]]
    ) -> None:
        producer = self._producer
        default = self._headers_for(topic) if self._headers_for is not None else NO_HEADERS
        batch = self._first_batch(records)
        for r in records:
            headers = r.headers or default
            if batch.append(key=r.key, value=r.value, timestamp=None, headers=headers) is not None:
                continue
            if batch.record_count():
                acks.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=r.key, value=r.value, timestamp=None, headers=headers) is not None:
                    continue
            # Larger than a whole batch: send() sizes a batch for it.
            acks.append(await producer.send(topic, r.value, key=r.key, partition=partition, headers=headers))
        if batch.record_count():
            acks.append(await producer.send_batch(batch, topic, partition=partition))
