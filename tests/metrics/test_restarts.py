"""Cassandra or Kafka killed (kill -9) and started again while the metrics service
consumes: nothing is lost or counted twice. Uses a private node (private_stack)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from services.common.badrow import BadRow
from services.common.cassandra import CassandraClient
from services.common.kafka import TopicSpec, ensure_topics
from services.devstack import stack
from tests.helpers import read_topic
from tests.metrics.conftest import SUMS, MakeSettings
from tests.metrics.helpers import (
    assert_windows_equal,
    checkpoints,
    end_offsets,
    expected,
    poll,
    produce,
    start_service,
    stored_windows,
)
from tests.metrics.test_rollups import HOUR, workload


@pytest.mark.timeout(900)
async def test_cassandra_killed_and_restarted_while_consuming(
    metrics_settings: MakeSettings, private_stack: stack.StackSettings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(stack.up, private_stack, kafka=False)
    settings = await metrics_settings(
        partitions=3, cassandra_port=private_stack.cassandra_port, max_poll_records=200, max_dirty_rows=100
    )
    ks, group, topic = settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    first = await produce(kafka_bootstrap, topic, workload(6000, base, 3, seed=21))
    log_path = tmp_path / "metrics.log"
    proc = await start_service(settings, log_path)
    try:
        client = CassandraClient(["127.0.0.1"], private_stack.cassandra_port)
        await client.connect()
        try:

            async def started() -> bool:
                return sum((await checkpoints(client, ks, group, topic)).values()) >= 500

            await poll(started, 120, "the service to make progress")
        finally:
            await client.close()

        await asyncio.to_thread(stack.cassandra_server(private_stack).kill)
        second = await produce(kafka_bootstrap, topic, workload(2000, base + HOUR, 3, seed=22))
        await asyncio.to_thread(stack.up, private_stack, kafka=False)

        client = CassandraClient(["127.0.0.1"], private_stack.cassandra_port)
        await client.connect()
        try:
            want = end_offsets(first + second)

            async def caught_up() -> bool:
                got = await checkpoints(client, ks, group, topic)
                return all(got.get(p, 0) >= o for p, o in want.items())

            await poll(caught_up, 300, "the service to catch up after the restart")
            assert proc.returncode is None, "the service must ride out the outage, not exit"
            windows, _ = expected(first + second, settings.max_event_age_ms, SUMS)
            try:
                assert_windows_equal(await stored_windows(client, ks), windows)
            except AssertionError as exc:
                # The service's log (its flushes, resync and resumed offsets) goes with the
                # failure: the temporary folder holding it does not outlive a few runs.
                raise AssertionError(f"{exc}\n--- metrics log ---\n{log_path.read_text()[-30_000:]}") from None
        finally:
            await client.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
    log_text = log_path.read_text()
    assert "storage call failed; retrying" in log_text
    assert "resuming every partition from its checkpoint" in log_text


@pytest.mark.timeout(900)
async def test_kafka_killed_and_restarted_while_consuming(
    metrics_settings: MakeSettings, private_stack: stack.StackSettings, cassandra: CassandraClient, tmp_path: Path
) -> None:
    await asyncio.to_thread(stack.up, private_stack, cassandra=False)
    bootstrap = private_stack.kafka_bootstrap
    names = {"enriched_topic": "metrics.enriched", "late_topic": "metrics.late", "dlq_topic": "metrics.dlq"}
    await ensure_topics(
        bootstrap,
        [TopicSpec(names["enriched_topic"], 3), TopicSpec(names["late_topic"], 1), TopicSpec(names["dlq_topic"], 1)],
    )
    settings = await metrics_settings(
        partitions=1, kafka_bootstrap=bootstrap, max_poll_records=200, max_dirty_rows=100, **names
    )
    ks, group, topic = settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    first = await produce(bootstrap, topic, workload(6000, base, 3, seed=31))
    log_path = tmp_path / "metrics.log"
    proc = await start_service(settings, log_path)
    try:

        async def started() -> bool:
            return sum((await checkpoints(cassandra, ks, group, topic)).values()) >= 500

        await poll(started, 120, "the service to make progress")

        await asyncio.to_thread(stack.kafka_server(private_stack).kill)
        await asyncio.to_thread(stack.up, private_stack, cassandra=False)
        second = await produce(bootstrap, topic, workload(2000, base + HOUR, 3, seed=32))
        want = end_offsets(first + second)

        async def caught_up() -> bool:
            got = await checkpoints(cassandra, ks, group, topic)
            return all(got.get(p, 0) >= o for p, o in want.items())

        await poll(caught_up, 300, "the service to catch up after the Kafka restart")
        assert proc.returncode is None, "the service must ride out the outage, not exit"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
    windows, late = expected(first + second, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, ks), windows)
    rows = await read_topic(bootstrap, settings.late_topic, expected=len(late), timeout_s=30)
    assert {
        (BadRow.decode(r.value)["input"]["partition"], BadRow.decode(r.value)["input"]["offset"]) for r in rows
    } == late
