"""Benchmark of the metrics service's consumer: events/s rolled up and Cassandra
writes/s, beside a plain consumer loop (read + JSON decode) on the same topic in
the same run. Needs the local stack (``headwater stack up``).

    .venv/bin/python bench/bench_metrics.py [--events 60000] [--partitions 3]

Figures depend on the machine and on what else runs on it; compare the two
lines of one run rather than runs on different days.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.cassandra import CassandraClient
from services.common.kafka import TopicSpec, ensure_topics
from services.common.sources import SourceRegistry
from services.metrics.consumer import RollupConsumer
from services.metrics.metrics import make_metrics
from services.metrics.schema import migrate_schema
from services.metrics.settings import Settings
from services.metrics.store import Store


def events(n: int, partitions: int, users: int, names: int) -> list[tuple[int, bytes]]:
    rnd = random.Random(1)
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        received = now - 1_800_000 + i * 1_800_000 // n
        t = received - rnd.randint(0, 120_000)
        etype = rnd.choice(["track", "track", "track", "page", "identify"])
        doc = {
            "type": etype,
            "messageId": f"m{i}",
            "userId": f"u{rnd.randrange(users)}",
            "event": f"Event {rnd.randrange(names)}",
            "name": "Home",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t / 1000)) + f".{t % 1000:03d}Z",
            "properties": {"revenue": rnd.randint(1, 500) / 10, "sku": "X-1"},
            "context": {"ip": "10.0.0.1", "userAgent": "Mozilla/5.0", "bot": False},
            "_hw": {
                "source_id": rnd.choice(["web", "srv"]),
                "received_at_ms": received,
                "processed_at_ms": received + 3,
                "raw": {"topic": "events.raw", "partition": 0, "offset": i},
                "flags": [],
            },
        }
        out.append((rnd.randrange(partitions), orjson.dumps(doc)))
    return out


async def fill(bootstrap: str, topic: str, records: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024, compression_type="zstd"
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, v, partition=p) for p, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def plain_loop(bootstrap: str, topic: str, n: int) -> tuple[float, float]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-plain-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_poll_records=2000,
    )
    await consumer.start()
    try:
        seen = 0
        start, cpu0 = time.perf_counter(), cpu_s()
        while seen < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            for records in batch.values():
                for r in records:
                    orjson.loads(r.value)
                seen += sum(len(rs) for rs in batch.values())
            if batch:
                await consumer.commit()
        return time.perf_counter() - start, cpu_s() - cpu0
    finally:
        await consumer.stop()


def time_flushes(consumer: RollupConsumer, took: list[float]) -> None:
    """Record how long each flush's writes take (they run beside the loop, one at a time)."""
    write = consumer.flusher.write

    async def timed(snap, deadline_s):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            await write(snap, deadline_s)
        finally:
            took.append(time.perf_counter() - started)

    consumer.flusher.write = timed  # type: ignore[method-assign]


async def rollup_loop(settings: Settings, n: int) -> dict[str, float]:
    client = CassandraClient(settings.cassandra_hosts, settings.cassandra_port)
    await client.connect()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    try:
        await migrate_schema(client, settings)
        store = Store(client, settings)
        await store.prepare()
        async with SourceRegistry(settings.sources_file).running() as sources:
            consumer = RollupConsumer(settings, store, sources, producer, metrics)
            flush_s: list[float] = []
            time_flushes(consumer, flush_s)
            start, cpu0 = time.perf_counter(), cpu_s()
            task = asyncio.create_task(consumer.run())
            while True:
                done = sum(s.next_offset for s in consumer.states.values())
                if done >= n or task.done():
                    break
                await asyncio.sleep(0.01)
            # Counted until the last rows and checkpoints are in Cassandra.
            consumer.stop()
            await task
            elapsed, cpu = time.perf_counter() - start, cpu_s() - cpu0
        rows = sum(
            s.value
            for m in registry.collect()
            if m.name == "headwater_metrics_rows_written"
            for s in m.samples
            if s.name.endswith("_total")
        )
        flushes = sorted(flush_s)
        return {
            "elapsed": elapsed,
            "cpu": cpu,
            "rows": rows,
            "flushes": len(flushes),
            "flush_p50": statistics.median(flushes) if flushes else 0.0,
            "flush_p99": flushes[min(len(flushes) - 1, int(len(flushes) * 0.99))] if flushes else 0.0,
        }
    finally:
        await client.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra_keyspace}")
        await producer.stop()
        await client.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--names", type=int, default=4, help="distinct track event names (more: more rows)")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--cassandra-port", type=int, default=9042)
    args = parser.parse_args()

    run_id = uuid.uuid4().hex[:10]
    topic = f"bench.enriched.{run_id}"
    with tempfile.TemporaryDirectory() as tmp:
        sources = Path(tmp) / "sources.json"
        sources.write_text(
            orjson.dumps(
                {
                    "sources": [
                        {"id": "web", "name": "web", "write_key": "w", "sum_properties": ["revenue"]},
                        {"id": "srv", "name": "srv", "write_key": "s", "sum_properties": ["revenue"]},
                    ]
                }
            ).decode()
        )
        settings = Settings(
            kafka_bootstrap=args.bootstrap,
            enriched_topic=topic,
            late_topic=f"bench.late.{run_id}",
            dlq_topic=f"bench.dlq.{run_id}",
            consumer_group=f"bench-metrics-{run_id}",
            cassandra_port=args.cassandra_port,
            cassandra_keyspace=f"bench_{run_id}",
            sources_file=sources,
        )
        await ensure_topics(
            args.bootstrap,
            [TopicSpec(topic, args.partitions), TopicSpec(settings.late_topic, 1), TopicSpec(settings.dlq_topic, 1)],
        )
        records = events(args.events, args.partitions, args.users, args.names)
        t0 = time.perf_counter()
        await fill(args.bootstrap, topic, records)
        print(
            f"filled {topic}: {args.events} events, {args.partitions} partitions, "
            f"{args.names} event names, {sum(len(v) for _, v in records) / len(records):.0f} B/event, "
            f"{time.perf_counter() - t0:.1f}s"
        )
        try:
            plain_s, plain_cpu = await plain_loop(args.bootstrap, topic, args.events)
            roll = await rollup_loop(settings, args.events)
        finally:
            admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([topic, settings.late_topic, settings.dlq_topic])
            finally:
                await admin.close()
    n = args.events
    print(f"{'loop':<34}{'events/s':>10}{'CPU s/1000 ev':>15}")
    print(f"{'plain consumer (read + JSON)':<34}{n / plain_s:>10.0f}{plain_cpu / n * 1000:>15.3f}")
    print(f"{'metrics rollup consumer':<34}{n / roll['elapsed']:>10.0f}{roll['cpu'] / n * 1000:>15.3f}")
    print(f"rollup/plain throughput: {plain_s / roll['elapsed']:.2f}")
    print(
        f"cassandra rows upserted: {roll['rows']:.0f} ({roll['rows'] / roll['elapsed']:.0f} writes/s), "
        f"{roll['flushes']:.0f} flushes, flush p50 {roll['flush_p50'] * 1000:.1f} ms, "
        f"p99 {roll['flush_p99'] * 1000:.1f} ms"
    )
    print(f"peak RSS of the bench process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
