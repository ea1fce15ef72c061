"""The one Kafka writer (services/common/kafkawriter.py) against a stand-in
producer whose batches hold a fixed number of bytes, and against real Kafka."""

from __future__ import annotations

import asyncio
import re
import subprocess
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.common.kafka import TopicSpec, ensure_topics, key_hash
from services.common.kafkawriter import BatchWriter, OutRecord, partition_for
from services.devstack import stack
from tests.helpers import unique_name


class Batch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []

    def append(
        self, *, key: bytes | None, value: bytes, timestamp: int | None, headers: list[tuple[str, bytes]]
    ) -> object | None:
        assert isinstance(headers, list), "aiokafka's C builder takes lists only"
        if sum(len(v) for _, v, _ in self.records) + len(value) > self.capacity:
            return None
        self.records.append((key, value, headers))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class Producer:
    """What the writer uses of AIOKafkaProducer; ``sent`` is what reached 'Kafka', in order."""

    def __init__(self, partitions: int, capacity: int = 100) -> None:
        self.partitions, self.capacity = partitions, capacity
        self.sent: list[tuple[str, int, bytes, list[tuple[str, bytes]], str]] = []

    async def partitions_for(self, _topic: str) -> set[int]:
        return set(range(self.partitions))

    def create_batch(self) -> Batch:
        return Batch(self.capacity)

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        self.sent.extend((topic, partition, value, headers, "batch") for _, value, headers in batch.records)
        return _done()

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, partition: int, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]:
        self.sent.append((topic, partition, value, headers, "alone"))
        return _done()


def _done() -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def test_keys_go_where_the_java_client_puts_them() -> None:
    # Written down from Kafka 4.1.1's Java client: Utils.toPositive(Utils.murmur2(key bytes)).
    java = {b"a": 584102524, b"web:user-1": 479575292, b"user-big": 713394232}
    for key, hashed in java.items():
        assert key_hash(key) == hashed
        assert partition_for(key, [0, 1, 2, 3, 4, 5]) == hashed % 6
    assert partition_for(None, [3]) == 3


async def test_records_keep_their_order_within_each_partition_and_full_batches_are_split() -> None:
    producer = Producer(partitions=3, capacity=25)
    keys = [f"user-{i}".encode() for i in range(6)]
    records = [OutRecord("t", keys[i % 6], f"value-{i:03d}".encode()) for i in range(30)]
    acks = await BatchWriter(producer).write(records)
    await asyncio.gather(*acks)
    assert len(producer.sent) == 30
    for partition in range(3):
        wanted = [r.value for r in records if partition_for(r.key, [0, 1, 2]) == partition]
        assert [v for _, p, v, _, _ in producer.sent if p == partition] == wanted
    assert len(acks) > 3, "25-byte batches hold 2 records: several batches per partition"


async def test_a_record_larger_than_a_batch_goes_out_alone_in_its_place() -> None:
    producer = Producer(partitions=1, capacity=20)
    values = [b"small-1", b"x" * 50, b"small-2"]
    await BatchWriter(producer).write([OutRecord("t", b"k", v) for v in values])
    assert [(v, how) for _, _, v, _, how in producer.sent] == [
        (b"small-1", "batch"),
        (b"x" * 50, "alone"),
        (b"small-2", "batch"),
    ]


async def test_headers_of_the_record_win_over_the_topics_default() -> None:
    producer = Producer(partitions=1)
    own = [("hw-schema", b"bad_row/1")]
    writer = BatchWriter(producer, headers_for=lambda topic: [("hw-schema", topic.encode())])
    await writer.write([OutRecord("raw", b"k", b"1"), OutRecord("dlq", b"k", b"2", own)])
    assert [(t, h) for t, _, _, h, _ in producer.sent] == [("raw", [("hw-schema", b"raw")]), ("dlq", own)]


@pytest.mark.integration
async def test_real_kafka_gets_every_record_on_the_partition_the_java_rule_picks(kafka_bootstrap: str) -> None:
    topic = unique_name("writer")
    await ensure_topics(kafka_bootstrap, [TopicSpec(topic, 4)])
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        max_batch_size=16 * 1024,
        max_request_size=2 * 1024 * 1024,
    )
    await producer.start()
    try:
        records = [OutRecord(topic, f"user-{i % 10}".encode(), f"{i}".encode() * (1 + i % 3)) for i in range(500)]
        records.append(OutRecord(topic, b"user-big", b"B" * 100_000))
        await asyncio.gather(*await BatchWriter(producer).write(records))
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", group_id=unique_name("writer-group")
    )
    await consumer.start()
    got: dict[int, list[bytes]] = {}
    try:
        while sum(map(len, got.values())) < len(records):
            for tp, batch in (await consumer.getmany(timeout_ms=2000)).items():
                got.setdefault(tp.partition, []).extend(m.value for m in batch if m.value is not None)
    finally:
        await consumer.stop()
    for partition, values in got.items():
        assert values == [r.value for r in records if partition_for(r.key, [0, 1, 2, 3]) == partition]


def _codecs(settings: stack.StackSettings, topic: str) -> list[str]:
    """Each batch's codec in partition 0 of ``topic``, as Kafka's own DumpLogSegments reads the log."""
    log_file = settings.data / "kafka" / "logs" / f"{topic}-0" / "00000000000000000000.log"
    lib = stack.kafka_server(settings).lib_dir
    out = subprocess.run(
        [settings.java, "-cp", f"{lib}/*", "kafka.tools.DumpLogSegments", "--files", str(log_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return re.findall(r"compresscodec: (\w+)", out)


@pytest.mark.integration
async def test_small_batches_go_uncompressed_and_large_ones_with_the_producers_codec(
    stack_settings: stack.StackSettings,
) -> None:
    small, large = unique_name("writer-small"), unique_name("writer-large")
    bootstrap = stack_settings.kafka_bootstrap
    await ensure_topics(bootstrap, [TopicSpec(small, 1), TopicSpec(large, 1)])
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, compression_type="zstd"
    )
    await producer.start()
    try:
        writer = BatchWriter(producer, small_batch_bytes=4096, batch_bytes=16384)
        few = [OutRecord(small, b"k", b"s" * 300) for _ in range(3)]  # 900 bytes
        many = [OutRecord(large, b"k", f"{i:05d}".encode() * 60) for i in range(20)]  # 6,000 bytes
        await asyncio.gather(*await writer.write(few + many))
        await asyncio.gather(*await BatchWriter(producer).write(few))  # no threshold: the codec
    finally:
        await producer.stop()
    assert await asyncio.to_thread(_codecs, stack_settings, small) == ["none", "zstd"]
    assert await asyncio.to_thread(_codecs, stack_settings, large) == ["zstd"]
    consumer = AIOKafkaConsumer(small, large, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        got: list[bytes] = []
        while len(got) < 26:
            for batch in (await consumer.getmany(timeout_ms=2000)).values():
                got.extend(r.value for r in batch if r.value is not None)
    finally:
        await consumer.stop()
    assert sorted(got) == sorted(r.value for r in few + few + many)
