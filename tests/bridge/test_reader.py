"""The bridge and mirror loops in this process: a checkpoint Kinesis refuses, and a
PutRecords that accepts only part of a batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from botocore.exceptions import ClientError
from cassandra.cluster import NoHostAvailable
from prometheus_client import CollectorRegistry

from services.bridge.bridge import Bridge
from services.bridge.errors import retriable
from services.bridge.legacy import LegacyRecord
from services.bridge.metrics import make_bridge_metrics, make_mirror_metrics
from services.bridge.mirror import Mirror
from services.bridge.settings import Settings
from services.bridge.store import Lease, ParityEntry, Store
from services.common.cassandra import CassandraClient
from services.common.proto.envelope_pb2 import Envelope
from services.common.sources import SourceRegistry
from tests.bridge.helpers import bridge_settings, legacy_record, put_legacy
from tests.helpers import eventually, read_topic

KEY = "reader-web-write-key"


def throttled(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "slow down"}}, "GetRecords")


def test_throughput_and_service_errors_are_retried_others_are_not() -> None:
    for code in ("ProvisionedThroughputExceededException", "LimitExceededException", "InternalFailure"):
        assert retriable(throttled(code))
    for code in ("ResourceNotFoundException", "InvalidArgumentException", "AccessDeniedException"):
        assert not retriable(throttled(code))
    assert not retriable(ValueError("bug"))


@pytest.fixture
async def setup(
    kafka_bootstrap: str,
    cassandra: CassandraClient,
    cassandra_port: int,
    kinesis_endpoint: str,
    new_stream: Callable[..., Awaitable[str]],
    new_topic: Callable[..., Awaitable[str]],
    new_keyspace: Callable[[], str],
    tmp_path: Path,
) -> tuple[Settings, SourceRegistry, Store, str]:
    """One bridged source on a new one-shard stream, its own topic and keyspace: settings,
    the source registry, the migrated store and the stream's name."""
    stream = await new_stream(1)
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
    raw = await new_topic("raw", partitions=1)
    settings = bridge_settings(
        kafka_bootstrap=kafka_bootstrap,
        raw_topic=raw,
        dlq_topic=f"{raw}.dlq",
        cassandra_port=cassandra_port,
        cassandra_keyspace=new_keyspace(),
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources,
        owner_id="reader",
    )
    store = Store(cassandra, settings.cassandra_keyspace, parity_ttl_s=3600)
    await store.migrate(settings.cassandra_replication)
    await store.prepare()
    registry = SourceRegistry(sources)
    registry.load()
    return settings, registry, store, stream


async def run_bridge_until(
    settings: Settings,
    registry: SourceRegistry,
    store: Store,
    kinesis: Any,
    prometheus: CollectorRegistry,
    done: Callable[[], Awaitable[bool]],
    what: str,
) -> None:
    """A Bridge in this process until ``done()``, then stopped."""
    metrics = make_bridge_metrics(prometheus)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    stop = asyncio.Event()
    try:
        bridge = Bridge(settings, registry, store, kinesis, producer, metrics, version="test")
        task = asyncio.create_task(bridge.run(stop))

        async def check() -> bool:
            assert not task.done(), task
            return await done()

        await eventually(check, 60, what)
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        await producer.stop()


async def test_a_refused_checkpoint_reads_the_shard_from_its_oldest_record(
    setup: tuple[Settings, SourceRegistry, Store, str],
    kafka_bootstrap: str,
    cassandra: CassandraClient,
    kinesis: Any,
) -> None:
    settings, registry, store, stream = setup
    await put_legacy(
        kinesis, stream, [legacy_record(KEY, message_id=f"r-{i}", event_ms=int(time.time() * 1000)) for i in range(5)]
    )
    # A checkpoint from before the stream's retention (here: one this shard never had).
    lease = await store.take(stream, "shardId-000000000000", None, "someone-before", 1000)
    assert lease is not None
    assert await store.checkpoint(
        lease, "49590338271490256608559692538361571095921575989136588898", finished=False, duration_ms=0
    )
    prometheus = CollectorRegistry()

    async def forwarded() -> bool:
        return len(await read_topic(kafka_bootstrap, settings.raw_topic, expected=5, timeout_s=2)) >= 5

    await run_bridge_until(
        settings, registry, store, kinesis, prometheus, forwarded, "the shard to be read from its oldest record"
    )
    assert prometheus.get_sample_value("headwater_bridge_checkpoints_refused_total", {"stream": stream}) == 1


async def test_checkpoints_and_parity_rows_a_killed_node_lost_are_read_again_and_rewritten(
    setup: tuple[Settings, SourceRegistry, Store, str],
    kafka_bootstrap: str,
    cassandra: CassandraClient,
    kinesis: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A killed Cassandra node (periodic commitlog) loses what it acknowledged since its last
    sync, and the call after that fails. Here the first two batches' parity rows and the
    first checkpoint are acknowledged and dropped, and the second checkpoint fails once
    (NoHostAvailable, from the driver's side). The shard must be read again from the
    checkpoint Cassandra still holds (none), so the parity report sees every messageId the
    bridge forwarded, and events.raw holds every record."""
    settings, registry, store, stream = setup
    settings = settings.model_copy(update={"get_records_limit": 2})
    minute = int(time.time() * 1000) // 60_000 * 60_000
    ids = {f"p-{i}" for i in range(5)}
    await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=m, event_ms=minute + 1000) for m in sorted(ids)])
    record_parity, checkpoint, execute = Store.record_parity, Store.checkpoint, cassandra.execute
    lost = {"parity": 0, "checkpoints": 0}
    failed: list[str] = []

    async def lose_until_the_failure(self: Store, entries: Iterable[ParityEntry]) -> None:
        if failed:
            return await record_parity(self, entries)
        lost["parity"] += 1
        return None

    async def lose_the_first(self: Store, lease: Lease, sequence: str | None, **kwargs: Any) -> bool:
        if lost["checkpoints"]:
            return await checkpoint(self, lease, sequence, **kwargs)
        lost["checkpoints"] += 1
        lease.checkpoint = sequence  # what an acknowledged checkpoint does
        return True

    async def fail_the_second(statement: Any, params: Any = None) -> Any:
        if not failed and "SET checkpoint" in getattr(statement, "query_string", ""):
            failed.append("checkpoint")
            raise NoHostAvailable("injected: the node was killed", {})
        return await execute(statement, params)

    monkeypatch.setattr(Store, "record_parity", lose_until_the_failure)
    monkeypatch.setattr(Store, "checkpoint", lose_the_first)
    monkeypatch.setattr(cassandra, "execute", fail_the_second)
    prometheus = CollectorRegistry()

    async def read_to_the_end() -> bool:
        rows = await store.parity_ids("web", minute) + await store.parity_ids("web", minute + 60_000)
        return {row.message_id for row in rows} == ids

    await run_bridge_until(settings, registry, store, kinesis, prometheus, read_to_the_end, "every parity row")
    assert lost["parity"] >= 2 and lost["checkpoints"] == 1 and failed == ["checkpoint"], (lost, failed)
    assert prometheus.get_sample_value("headwater_bridge_rewinds_total", {"stream": stream}) == 1
    forwarded = [
        Envelope.FromString(r.value) for r in await read_topic(kafka_bootstrap, settings.raw_topic, expected=7)
    ]
    assert {e.message_id for e in forwarded} >= ids


async def test_a_checkpoint_applied_though_its_call_failed_is_not_read_again(
    setup: tuple[Settings, SourceRegistry, Store, str],
    kafka_bootstrap: str,
    cassandra: CassandraClient,
    kinesis: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint whose call fails after Cassandra applied it (a timeout): the stored
    checkpoint read back is that one, so the shard goes on from it, read once, counted once."""
    settings, registry, store, stream = setup
    settings = settings.model_copy(update={"get_records_limit": 2})
    ids = [f"t-{i}" for i in range(5)]
    await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=m, event_ms=int(time.time() * 1000)) for m in ids])
    execute = cassandra.execute
    failed: list[str] = []

    async def fail_after_applying(statement: Any, params: Any = None) -> Any:
        result = await execute(statement, params)
        if not failed and "SET checkpoint" in getattr(statement, "query_string", ""):
            failed.append("checkpoint")
            raise NoHostAvailable("injected: timed out after it was applied", {})
        return result

    monkeypatch.setattr(cassandra, "execute", fail_after_applying)
    prometheus = CollectorRegistry()

    def sample(name: str) -> float:
        return prometheus.get_sample_value(name, {"stream": stream}) or 0

    async def checkpointed() -> bool:
        return sample("headwater_bridge_checkpoints_total") >= 3

    await run_bridge_until(settings, registry, store, kinesis, prometheus, checkpointed, "three checkpoints")
    assert failed == ["checkpoint"]
    assert sample("headwater_bridge_rewinds_total") == 0
    assert sample("headwater_bridge_checkpoints_total") == 3
    forwarded = [Envelope.FromString(r.value) for r in await read_topic(kafka_bootstrap, settings.raw_topic)]
    assert sorted(e.message_id for e in forwarded) == ids


class PartlyRefusing:
    """A stand-in for the Kinesis client in a unit test: the first PutRecords refuses
    every other record, as Kinesis does under throughput limits."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def put_records(self, *, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append([r["PartitionKey"] for r in Records])
        first = len(self.calls) == 1
        return {
            "Records": [
                {"ErrorCode": "ProvisionedThroughputExceededException"}
                if first and i % 2
                else {"SequenceNumber": "1", "ShardId": "s"}
                for i in range(len(Records))
            ]
        }


@pytest.mark.parametrize("count", [7])
async def test_put_records_sends_only_the_refused_records_again(count: int, tmp_path: Path) -> None:
    client = PartlyRefusing()
    prometheus = CollectorRegistry()
    mirror = Mirror(
        bridge_settings(backoff_initial_s=0.01),
        SourceRegistry(tmp_path / "none.json"),
        client,  # type: ignore[arg-type]
        consumer=None,
        producer=None,
        metrics=make_mirror_metrics(prometheus),
        version="test",
    )
    records = [LegacyRecord("s", f"m{i}", b"{}", "web", f"m{i}") for i in range(count)]
    assert await mirror.put_chunk("s", records)
    assert client.calls == [[f"m{i}" for i in range(count)], ["m1", "m3", "m5"]]
    assert (
        prometheus.get_sample_value(
            "headwater_mirror_put_retries_total", {"stream": "s", "reason": "ProvisionedThroughputExceededException"}
        )
        == 3
    )
    assert (
        prometheus.get_sample_value("headwater_mirror_records_total", {"stream": "s", "outcome": "sent", "reason": ""})
        == count
    )


async def test_a_merge_reads_both_parents_to_their_end_before_the_child(
    kafka_bootstrap: str,
    cassandra: CassandraClient,
    cassandra_port: int,
    kinesis_endpoint: str,
    kinesis: Any,
    new_stream: Callable[..., Awaitable[str]],
    new_topic: Callable[..., Awaitable[str]],
    new_keyspace: Callable[[], str],
    tmp_path: Path,
) -> None:
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
    raw = await new_topic("raw", partitions=1)
    settings = bridge_settings(
        kafka_bootstrap=kafka_bootstrap,
        raw_topic=raw,
        dlq_topic=f"{raw}.dlq",
        cassandra_port=cassandra_port,
        cassandra_keyspace=new_keyspace(),
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources,
        get_records_limit=10,
    )
    now = int(time.time() * 1000)
    await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=f"before-{i}", event_ms=now) for i in range(60)])
    shards = (await kinesis.list_shards(StreamName=stream))["Shards"]
    await kinesis.merge_shards(
        StreamName=stream, ShardToMerge=shards[0]["ShardId"], AdjacentShardToMerge=shards[1]["ShardId"]
    )
    for _ in range(200):
        if (await kinesis.describe_stream_summary(StreamName=stream))["StreamDescriptionSummary"][
            "StreamStatus"
        ] == "ACTIVE":
            break
        await asyncio.sleep(0.05)
    await put_legacy(kinesis, stream, [legacy_record(KEY, message_id=f"after-{i}", event_ms=now) for i in range(40)])
    [child] = [
        s["ShardId"] for s in (await kinesis.list_shards(StreamName=stream))["Shards"] if s.get("AdjacentParentShardId")
    ]

    store = Store(cassandra, settings.cassandra_keyspace, parity_ttl_s=3600)
    await store.migrate(settings.cassandra_replication)
    await store.prepare()
    registry = SourceRegistry(sources)
    registry.load()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    stop = asyncio.Event()
    records: list[Any] = []
    try:
        bridge = Bridge(
            settings, registry, store, kinesis, producer, make_bridge_metrics(CollectorRegistry()), version="test"
        )
        task = asyncio.create_task(bridge.run(stop))

        async def all_there() -> bool:
            nonlocal records
            assert not task.done(), task
            records = await read_topic(kafka_bootstrap, raw, expected=100, timeout_s=2)
            return len(records) >= 100

        await eventually(all_there, 60, "every record of both parents and the child")
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        await producer.stop()
    envelopes = [Envelope.FromString(r.value) for r in records]
    assert {e.message_id for e in envelopes} == {f"before-{i}" for i in range(60)} | {f"after-{i}" for i in range(40)}
    # One partition, so Kafka's order is the bridge's: the child's first record after the parents' last.
    shard_of = [e.request_id.split(":")[1] for e in envelopes]
    assert shard_of.index(child) > max(i for i, s in enumerate(shard_of) if s != child)


async def test_a_stream_no_longer_bridged_is_let_go(
    kafka_bootstrap: str,
    cassandra: CassandraClient,
    cassandra_port: int,
    kinesis_endpoint: str,
    kinesis: Any,
    new_stream: Callable[..., Awaitable[str]],
    new_topic: Callable[..., Awaitable[str]],
    new_keyspace: Callable[[], str],
    tmp_path: Path,
) -> None:
    stream = await new_stream(2)
    sources = tmp_path / "sources.json"
    bridged = {
        "sources": [{"id": "web", "name": "web", "write_key": KEY, "legacy": {"direction": "bridge", "stream": stream}}]
    }
    sources.write_bytes(orjson.dumps(bridged))
    raw = await new_topic("raw", partitions=1)
    settings = bridge_settings(
        kafka_bootstrap=kafka_bootstrap,
        raw_topic=raw,
        dlq_topic=f"{raw}.dlq",
        cassandra_port=cassandra_port,
        cassandra_keyspace=new_keyspace(),
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources,
    )
    store = Store(cassandra, settings.cassandra_keyspace, parity_ttl_s=3600)
    await store.migrate(settings.cassandra_replication)
    await store.prepare()
    registry = SourceRegistry(sources, reload_interval_s=0.1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    stop = asyncio.Event()
    try:
        async with registry.running():
            bridge = Bridge(
                settings, registry, store, kinesis, producer, make_bridge_metrics(CollectorRegistry()), version="test"
            )
            task = asyncio.create_task(bridge.run(stop))

            async def held(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    assert not task.done(), task
                    return len(bridge.readers) == n

                return check

            await eventually(await held(2), 30, "both shards held")
            sources.write_bytes(orjson.dumps({"sources": [{"id": "web", "name": "web", "write_key": KEY}]}))
            await eventually(await held(0), 30, "the shards let go")
            leases = await store.leases(stream)
            assert all(row.expires_at_ms == 0 for row in leases.values()) and len(leases) == 2
            stop.set()
            await asyncio.wait_for(task, 30)
    finally:
        await producer.stop()
