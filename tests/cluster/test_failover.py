"""A node lost under load on the three-broker, three-node cluster loses nothing.

Each test runs the services as processes (as in production) on the cluster, with
its own topics, groups and keyspace, kills -9 one node in the middle of the
traffic, brings it back, and then counts end to end. Each prints how long the
failure took to heal and the rate during it (also in the session's summary).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from services.common import topics
from services.common.cassandra import CassandraClient
from services.devstack.cluster import Cluster
from services.metrics.settings import Settings as MetricsSettings
from services.processor.settings import Settings as ProcessorSettings
from tests import fleet
from tests.cluster.helpers import (
    Timeline,
    busiest_leader,
    end_total,
    fully_replicated,
    led_without,
    sample_every,
)
from tests.helpers import eventually, free_port, read_topic, unique_name
from tests.metrics.conftest import SUMS
from tests.metrics.helpers import (
    assert_windows_equal,
    checkpoints,
    count_body,
    counts,
    end_offsets,
    expected,
    produce,
    start_service,
    stored_windows,
    write_sources,
)
from tests.metrics.test_rollups import HOUR, workload
from tests.processor.conftest import envelope
from tests.processor.kafka_helpers import committed_total, start_subprocess, wait_committed
from tests.processor.kafka_helpers import produce as produce_raw

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.timeout(420)]

KEY = "cluster-key"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
# Longer than a broker's failover (fenced after the brokers' session timeout, 6 s, then new
# leaders): an acknowledged event waits for the new leader instead of going to the spool.
ACK_DEADLINE_S = 20.0


def sources(tmp_path: Path) -> Path:
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"sources": [{"id": "web", "name": "Web", "write_key": KEY}]}))
    return path


def processor_settings(cluster: Cluster, raw: str, source_file: Path, **overrides: Any) -> ProcessorSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap": cluster.kafka_bootstrap,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "raw_topic": raw,
        "enriched_topic": f"{raw}.enriched",
        "dlq_topic": f"{raw}.dlq",
        "dest_topic_prefix": f"{raw}.dest.",
        "dedupe_topic": f"{raw}.dedupe",
        "group_id": unique_name("cl-proc"),
        "sources_file": source_file,
        "raw_partitions": 4,
        "enriched_partitions": 4,
        "dlq_partitions": 1,
        "dest_partitions": 1,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1000,
        "batch_linger_ms": 20,
        "retry_backoff_s": 0.2,
    }
    values.update(overrides)
    return ProcessorSettings(**values)


async def enriched_ids(bootstrap: str, topic: str) -> Counter[str]:
    """Every messageId in the enriched topic (read_committed), read until it stays quiet."""
    records = await read_topic(bootstrap, topic, expected=None, timeout_s=120)
    return Counter(orjson.loads(r.value)["messageId"] for r in records)


def assert_exactly_once(ids: Counter[str], wanted: set[str]) -> None:
    missing = wanted - set(ids)
    doubled = {k: n for k, n in ids.items() if n > 1}
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
    assert not doubled, f"{len(doubled)} events twice or more, e.g. {list(doubled.items())[:5]}"


async def restart(cluster: Cluster, name: str, node: int, timeline: Timeline) -> None:
    server = cluster.kafka(node) if name == "kafka" else cluster.cassandra(node)
    await asyncio.to_thread(cluster.start_kafka if name == "kafka" else cluster.start_cassandra, node)
    await asyncio.to_thread(cluster.wait_node, server)
    timeline.mark(f"{name} back")


async def test_raw_leader_killed_under_ingest_load(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 the broker leading most events.raw partitions while clients send: every
    acknowledged event is in events.enriched once, and nothing went to the spool."""
    bootstrap = cluster.kafka_bootstrap
    raw = unique_name("test.cl.raw")
    source_file = sources(tmp_path)
    proc_settings = processor_settings(cluster, raw, source_file)
    ingest_port = free_port()
    ingest_env = {
        "KAFKA_BOOTSTRAP": bootstrap,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": ingest_port,
        "RAW_TOPIC": raw,
        "DLQ_TOPIC": f"{raw}.dlq",
        "RAW_PARTITIONS": 4,
        "DLQ_PARTITIONS": 1,
        "SOURCES_FILE": source_file,
        "SPOOL_DIR": tmp_path / "spool",
        "KAFKA_ACK_TIMEOUT_S": ACK_DEADLINE_S,
    }
    procs: list[subprocess.Popen[bytes]] = []
    acked: set[str] = set()
    unanswered = [0]
    timeline = Timeline()
    stop_load, stop_sampling = asyncio.Event(), asyncio.Event()
    try:
        procs.append(fleet.start("ingest", ingest_env, tmp_path / "ingest.log"))
        await fleet.wait_ready("ingest", procs[0], ingest_port, tmp_path / "ingest.log")
        procs.append(start_subprocess(proc_settings, tmp_path / "processor.log"))
        await fleet.wait_ready("processor", procs[1], proc_settings.http_port, tmp_path / "processor.log")

        async def sender(http: aiohttp.ClientSession, worker: int) -> None:
            n = 0
            while not stop_load.is_set():
                batch = [
                    {
                        "type": "track",
                        "event": "Clicked",
                        "userId": f"u{(worker * 7 + i) % 50}",
                        "messageId": f"a-{worker}-{n}-{i}",
                    }
                    for i in range(50)
                ]
                n += 1
                try:
                    async with http.post(
                        f"http://127.0.0.1:{ingest_port}/v1/batch", json={"batch": batch}, headers=AUTH
                    ) as resp:
                        if resp.status == 200:
                            acked.update(e["messageId"] for e in batch)
                            timeline.add(len(acked))
                except (aiohttp.ClientError, TimeoutError):
                    unanswered[0] += 1  # not acknowledged: these events may or may not arrive

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
            senders = [asyncio.create_task(sender(http, w)) for w in range(4)]
            await eventually(lambda: _true(len(acked) >= 5000), 60, "ingest under load")
            victim = await busiest_leader(bootstrap, raw)
            timeline.kill()
            await asyncio.to_thread(cluster.kafka(victim).kill)
            await eventually(lambda: led_without(bootstrap, raw, victim), 60, "new leaders of events.raw")
            timeline.mark("new leaders")
            await eventually(lambda: _true(timeline.progress_resumed() is not None), 60, "acks after the kill")
            await restart(cluster, "kafka", victim, timeline)
            await eventually(lambda: fully_replicated(bootstrap, raw, 3), 120, "events.raw in sync again")
            timeline.mark("in sync")
            await asyncio.sleep(2)
            stop_load.set()
            await asyncio.gather(*senders)
        stop_sampling.set()
        metrics_text = await _get(f"http://127.0.0.1:{ingest_port}/metrics")
        written = await end_total(bootstrap, raw)
        await wait_committed(bootstrap, proc_settings.group_id, raw, written, timeout_s=180)
    finally:
        stop_load.set()
        fleet.stop(procs)
    timeline.report(f"events.raw leader (broker {victim}) killed under ingest load", "acked events", "kafka back")
    print(f"requests without an answer: {unanswered[0]}")
    ids = await enriched_ids(bootstrap, proc_settings.enriched_topic)
    assert_exactly_once(ids, acked)
    # The failover took less than the ack deadline: nothing waited for it in the spool.
    assert timeline.marks["new leaders"] - timeline.killed_at < ACK_DEADLINE_S
    assert _sample(metrics_text, "headwater_ingest_spooled_after_timeout_total") == 0, "spooled"
    assert _sample(metrics_text, "headwater_ingest_spool_events") == 0


async def test_broker_killed_while_the_processor_commits(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 the broker leading most events.enriched partitions while the processor
    commits its transactions: every event is in events.enriched exactly once."""
    bootstrap = cluster.kafka_bootstrap
    raw = unique_name("test.cl.txn")
    await topics.ensure(bootstrap, [topics.RAW.spec(raw, 4)])
    settings = processor_settings(cluster, raw, sources(tmp_path), batch_max_records=200)
    produced = 0
    timeline = Timeline()
    stop_load, stop_sampling = asyncio.Event(), asyncio.Event()

    def chunk(start: int, count: int) -> list[tuple[bytes | None, bytes | None]]:
        return [
            (
                f"web:u{i % 61}".encode(),
                envelope({"type": "track", "event": "Paid", "userId": f"u{i % 61}"}, message_id=f"t-{i}"),
            )
            for i in range(start, start + count)
        ]

    async def load() -> None:
        nonlocal produced
        while not stop_load.is_set():
            await produce_raw(bootstrap, raw, chunk(produced, 500))
            produced += 500
            await asyncio.sleep(0.1)  # pacing the load, not waiting for a result

    proc = start_subprocess(settings, tmp_path / "processor.log")
    sampler: asyncio.Task[None] | None = None
    loader: asyncio.Task[None] | None = None
    try:
        await fleet.wait_ready("processor", proc, settings.http_port, tmp_path / "processor.log")
        loader = asyncio.create_task(load())
        sampler = asyncio.create_task(
            sample_every(timeline, lambda: committed_total(bootstrap, settings.group_id, raw), stop_sampling)
        )
        await eventually(
            lambda: _true(bool(timeline.samples) and timeline.samples[-1][1] >= 5000), 90, "the processor committing"
        )
        victim = await busiest_leader(bootstrap, settings.enriched_topic)
        timeline.kill()
        await asyncio.to_thread(cluster.kafka(victim).kill)
        await eventually(
            lambda: led_without(bootstrap, settings.enriched_topic, victim), 60, "new leaders of events.enriched"
        )
        timeline.mark("new leaders")
        await eventually(lambda: _true(timeline.progress_resumed() is not None), 90, "commits after the kill")
        await restart(cluster, "kafka", victim, timeline)
        await eventually(lambda: fully_replicated(bootstrap, settings.enriched_topic, 3), 120, "in sync again")
        timeline.mark("in sync")
        await asyncio.sleep(2)
        stop_load.set()
        await loader
        await wait_committed(bootstrap, settings.group_id, raw, produced, timeout_s=180)
        assert proc.poll() is None, "the processor must ride out the broker's loss"
    finally:
        stop_load.set()
        stop_sampling.set()
        for task in (loader, sampler):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        fleet.stop([proc])
    timeline.report(
        f"broker {victim} (most events.enriched leaders) killed while the processor commits",
        "committed events",
        "kafka back",
    )
    ids = await enriched_ids(bootstrap, settings.enriched_topic)
    assert_exactly_once(ids, {f"t-{i}" for i in range(produced)})
    assert len(ids) == produced


async def test_cassandra_node_killed_while_metrics_flushes(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 a Cassandra node while metrics flushes at quorum (RF 3): every window equals
    the input, and the query API answers with the node still down."""
    bootstrap = cluster.kafka_bootstrap
    enriched = unique_name("test.cl.enriched")
    await topics.ensure(bootstrap, [topics.ENRICHED.spec(enriched, 3)])
    settings = MetricsSettings(
        kafka_bootstrap=bootstrap,
        enriched_topic=enriched,
        late_topic=f"{enriched}.late",
        dlq_topic=f"{enriched}.dlq",
        late_topic_partitions=1,
        dlq_partitions=1,
        consumer_group=unique_name("cl-metrics"),
        cassandra_hosts=cluster.cassandra_hosts,
        cassandra_port=cluster.settings.cassandra_port,
        cassandra_keyspace=unique_name("cl").lower(),
        cassandra_replication="{'class': 'SimpleStrategy', 'replication_factor': 3}",
        sources_file=write_sources(tmp_path / "sources.json", SUMS),
        flush_interval_s=0.3,
        allowed_lateness_s=600.0,
        max_event_age_s=1800.0,
        max_poll_records=300,
        max_dirty_rows=200,
        http_host="127.0.0.1",
    )
    ks, group = settings.cassandra_keyspace, settings.consumer_group
    # Checks read at QUORUM too: a replica that missed writes while it was down must not answer alone.
    client = CassandraClient(
        cluster.cassandra_hosts,
        settings.cassandra_port,
        request_timeout_s=30,
        consistency_level=settings.read_consistency,
    )
    await client.connect()
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    sent = await produce(bootstrap, enriched, workload(3000, base, 3, seed=41))
    port = free_port()
    proc = await start_service(settings, tmp_path / "metrics.log", port=port)
    timeline = Timeline()
    stop_sampling = asyncio.Event()
    victim = 2
    sampler: asyncio.Task[None] | None = None

    async def rolled_up() -> int:
        return sum((await checkpoints(client, ks, group, enriched)).values())

    try:
        sampler = asyncio.create_task(sample_every(timeline, rolled_up, stop_sampling))
        await eventually(
            lambda: _true(bool(timeline.samples) and timeline.samples[-1][1] >= 500), 120, "metrics flushing"
        )
        timeline.kill()
        await asyncio.to_thread(cluster.cassandra(victim).kill)
        for seed in (42, 43, 44):  # traffic goes on while the node is away
            sent += await produce(bootstrap, enriched, workload(2000, base + (seed - 41) * HOUR // 2, 3, seed=seed))
        want = end_offsets(sent)

        async def caught_up() -> bool:
            got = await checkpoints(client, ks, group, enriched)
            return all(got.get(p, 0) >= o for p, o in want.items())

        await eventually(caught_up, 240, "metrics to roll up everything with one node down")
        timeline.mark("caught up, node down")
        windows, _late = expected(sent, settings.max_event_age_ms, SUMS)
        assert_windows_equal(await stored_windows(client, ks), windows)
        # The query API answers at quorum with the node still down, and agrees with the input.
        start_ms, end_ms = base - 2 * HOUR, base + 4 * HOUR
        answer = orjson.loads(
            await _post(f"http://127.0.0.1:{port}/api/v1/datapoints/query", count_body(start_ms, end_ms))
        )
        want_counts: Counter[str] = Counter()
        for (res, source, _t, _e, _w), w in windows.items():
            if res == "1m":
                want_counts[source] += w["count"]
        assert counts(answer) == dict(want_counts)
        assert proc.returncode is None, "metrics must ride out the node's loss"
        await restart(cluster, "cassandra", victim, timeline)
    finally:
        stop_sampling.set()
        if sampler is not None:
            await asyncio.gather(sampler, return_exceptions=True)
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)
    timeline.report(
        f"cassandra-{victim} killed while metrics flushes (RF 3, LOCAL_QUORUM)", "rolled-up events", "cassandra back"
    )
    assert_windows_equal(await stored_windows(client, ks), windows)
    await client.close()


async def _true(value: bool) -> bool:
    return value


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()


async def _post(url: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


def _sample(text: str, name: str) -> float:
    """A metric's value (summed over its labels); a metric that is not there fails the test."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{"))]
    assert values, f"{name} is not in /metrics"
    return sum(values)
