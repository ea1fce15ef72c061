"""The dev stack runs the real servers, and they keep their data across down/up."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from services.devstack import stack
from tests.helpers import read_topic


def test_status_reports_running_servers(stack_settings: stack.StackSettings) -> None:
    lines = stack.status(stack_settings)
    assert any(line.startswith("kafka") and "running pid" in line for line in lines)
    assert any(line.startswith("cassandra") and "running pid" in line for line in lines)


def test_kafka_properties_are_single_node_safe(stack_settings: stack.StackSettings) -> None:
    props = stack._kafka_properties(stack_settings, stack_settings.data / "kafka")
    for line in (
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "offsets.topic.replication.factor=1",
        "group.initial.rebalance.delay.ms=0",
        "share.coordinator.state.topic.replication.factor=1",
    ):
        assert line in props


def test_up_twice_is_harmless(stack_settings: stack.StackSettings) -> None:
    before = stack.kafka_server(stack_settings).pid()
    timings = stack.up(stack_settings)
    assert stack.kafka_server(stack_settings).pid() == before
    assert set(timings) == {"kafka", "cassandra"}


async def test_private_kafka_keeps_data_across_down_and_up(private_stack: stack.StackSettings) -> None:
    await asyncio.to_thread(stack.up, private_stack, cassandra=False)
    bootstrap = private_stack.kafka_bootstrap
    from services.common.kafka import TopicSpec, ensure_topics

    await ensure_topics(bootstrap, [TopicSpec("durable", 1)])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait("durable", b"kept")
    finally:
        await producer.stop()

    assert await asyncio.to_thread(stack.down, private_stack) == ["kafka"]
    assert stack.kafka_server(private_stack).pid() is None
    await asyncio.to_thread(stack.up, private_stack, cassandra=False)

    records = await read_topic(bootstrap, "durable", expected=1)
    assert [r.value for r in records] == [b"kept"]


async def test_private_cassandra_keeps_data_across_down_and_up(private_stack: stack.StackSettings) -> None:
    from services.common.cassandra import CassandraClient

    await asyncio.to_thread(stack.up, private_stack, kafka=False)
    client = CassandraClient(["127.0.0.1"], private_stack.cassandra_port)
    await client.connect()
    try:
        await client.execute(
            "CREATE KEYSPACE durable WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        await client.execute("CREATE TABLE durable.kv (k text PRIMARY KEY, v text)")
        await client.execute("INSERT INTO durable.kv (k, v) VALUES ('a', 'kept')")
    finally:
        await client.close()

    assert await asyncio.to_thread(stack.down, private_stack) == ["cassandra"]
    await asyncio.to_thread(stack.up, private_stack, kafka=False)

    client = CassandraClient(["127.0.0.1"], private_stack.cassandra_port)
    await client.connect()
    try:
        rows = list(await client.execute("SELECT v FROM durable.kv WHERE k = 'a'"))
    finally:
        await client.close()
    assert [r.v for r in rows] == ["kept"]


def test_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # The storage tool's argument parser reads "-..." as an option; one id in 64 would.
    import uuid

    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 "-A..."
    draws = iter([dashed, uuid.UUID(int=7)])
    monkeypatch.setattr("services.devstack.stack.uuid.uuid4", lambda: next(draws))
    assert stack.kafka_cluster_id() == "AAAAAAAAAAAAAAAAAAAABw"
    monkeypatch.undo()
    assert not any(stack.kafka_cluster_id().startswith("-") for _ in range(2000))
