"""A private Kafka killed and restarted under a running bridge: the bridge waits, sends
the batches again, and nothing read from the legacy stream is missing from events.raw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.common.kafka import TopicSpec, ensure_topics
from services.common.proto.envelope_pb2 import Envelope
from services.devstack import stack
from tests.bridge.helpers import bridge_settings, legacy_record, put_legacy, start, stop, wait_ready
from tests.helpers import eventually, free_port, read_topic, unique_name

KEY = "outage-web-write-key"


@pytest.mark.slow
async def test_kafka_killed_and_restarted_under_the_bridge(
    private_stack: stack.StackSettings,
    cassandra_port: int,
    kinesis_endpoint: str,
    kinesis: Any,
    new_stream: Callable[..., Awaitable[str]],
    new_keyspace: Callable[[], str],
    tmp_path: Path,
) -> None:
    await asyncio.to_thread(stack.up, private_stack, cassandra=False)
    bootstrap = private_stack.kafka_bootstrap
    raw = unique_name("test.raw")
    await ensure_topics(bootstrap, [TopicSpec(raw, 2), TopicSpec(f"{raw}.dlq", 1)])
    stream = await new_stream(2)
    sources = tmp_path / "sources.json"
    sources.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {"id": "web", "name": "web", "write_key": KEY, "legacy": {"direction": "bridge", "stream": stream}}
                ]
            }
        )
    )
    settings = bridge_settings(
        kafka_bootstrap=bootstrap,
        raw_topic=raw,
        dlq_topic=f"{raw}.dlq",
        cassandra_port=cassandra_port,
        cassandra_keyspace=new_keyspace(),
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources,
        http_port=free_port(),
        get_records_limit=50,
        parity_interval_s=0,
    )
    now = int(time.time() * 1000)
    ids = [f"outage-{i}" for i in range(4000)]
    await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=m, event_ms=now) for m in ids[:3000]])
    proc = start(settings, "bridge", tmp_path / "bridge.log")
    try:
        await wait_ready(proc, settings.http_port, tmp_path / "bridge.log")

        async def some() -> bool:
            return len(await read_topic(bootstrap, raw, expected=300, timeout_s=2)) >= 300

        await eventually(some, 60, "the bridge to forward the first records")
        # kill -9 the broker in the middle of the backlog, keep it away a while, bring it back.
        await asyncio.to_thread(stack.kafka_server(private_stack).kill)
        await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=m, event_ms=now) for m in ids[3000:]])
        await asyncio.sleep(3)
        assert proc.poll() is None, "the bridge exited while Kafka was away"
        await asyncio.to_thread(stack.up, private_stack, cassandra=False)

        seen: set[str] = set()

        async def all_there() -> bool:
            nonlocal seen
            assert proc.poll() is None, (tmp_path / "bridge.log").read_text()[-3000:]
            records = await read_topic(bootstrap, raw, expected=len(ids), timeout_s=5)
            seen = {Envelope.FromString(r.value).message_id for r in records}
            return seen >= set(ids)

        try:
            await eventually(all_there, 180, "every record in events.raw after the broker came back")
        except AssertionError:
            raise AssertionError(f"{len(set(ids) - seen)} missing") from None
    finally:
        stop(proc)
    assert seen == set(ids)
