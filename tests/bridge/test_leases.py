"""Two bridge processes split a 4-shard stream through the lease table: the second
one takes its share (over from the first, which holds every shard when it is
alone), and no record is lost on the way into events.raw."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.common.cassandra import CassandraClient
from services.common.proto.envelope_pb2 import Envelope
from tests.bridge.helpers import bridge_settings, legacy_record, put_legacy, start, stop, wait_ready
from tests.helpers import eventually, free_port, read_topic

KEY = "lease-web-write-key"


@pytest.mark.slow
async def test_two_bridges_share_the_shards_and_lose_nothing(
    kafka_bootstrap: str,
    cassandra_port: int,
    cassandra: CassandraClient,
    kinesis_endpoint: str,
    kinesis: Any,
    new_stream: Callable[..., Awaitable[str]],
    new_topic: Callable[..., Awaitable[str]],
    new_keyspace: Callable[[], str],
    tmp_path: Path,
) -> None:
    stream = await new_stream(4)
    sources_file = tmp_path / "sources.json"
    sources_file.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {"id": "web", "name": "web", "write_key": KEY, "legacy": {"direction": "bridge", "stream": stream}}
                ]
            }
        )
    )
    raw = await new_topic("raw", partitions=2)
    base = bridge_settings(
        kafka_bootstrap=kafka_bootstrap,
        raw_topic=raw,
        dlq_topic=f"{raw}.dlq",
        cassandra_port=cassandra_port,
        cassandra_keyspace=new_keyspace(),
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources_file,
        get_records_limit=25,
    )
    first = base.model_copy(update={"owner_id": "bridge-a", "http_port": free_port()})
    second = base.model_copy(update={"owner_id": "bridge-b", "http_port": free_port()})
    now = int(time.time() * 1000)
    ids = [f"lease-{i}" for i in range(400)]
    await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=m, event_ms=now) for m in ids[:200]])

    async def owners() -> Counter[str]:
        rows = await cassandra.execute(
            f"SELECT owner, expires_at_ms FROM {base.cassandra_keyspace}.shard_leases WHERE stream = %s", (stream,)
        )
        return Counter(r.owner for r in rows if r.expires_at_ms > time.time() * 1000)

    procs = {"a": start(first, "bridge", tmp_path / "bridge-a.log")}
    try:
        await wait_ready(procs["a"], first.http_port, tmp_path / "bridge-a.log")

        async def a_holds_all() -> bool:
            return await owners() == Counter({"bridge-a": 4})

        await eventually(a_holds_all, 60, "the first bridge to hold every shard")

        procs["b"] = start(second, "bridge", tmp_path / "bridge-b.log")
        await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=m, event_ms=now) for m in ids[200:]])

        async def shared() -> bool:
            return await owners() == Counter({"bridge-a": 2, "bridge-b": 2})

        await eventually(shared, 90, "the two bridges to hold two shards each")

        seen: set[str] = set()

        async def all_there() -> bool:
            nonlocal seen
            records = await read_topic(kafka_bootstrap, raw, timeout_s=10)
            seen = {Envelope.FromString(r.value).message_id for r in records}
            return seen >= set(ids)

        await eventually(all_there, 90, "every record in events.raw")
    finally:
        for proc in procs.values():
            stop(proc)
    assert seen == set(ids)
    # A clean stop releases the leases: another process may take them at once.
    assert await owners() == Counter()
