"""Bridge and mirror throughput against the dev stack's Kinesis server, Kafka and
Cassandra, each beside a plain loop against the same server in the same run.

    .venv/bin/python -m bench.bench_bridge [--events 20000] [--rounds 2] [--limit 1000]

1. bridge: a fresh 2-shard stream filled with N legacy records, then
   - plain: one GetRecords loop per shard (same Limit), records only counted;
   - bridge: ``headwater-bridge`` (one process) into a fresh events.raw, with
     leases, checkpoints and parity rows; timed from the first record in Kafka
     to the last (start-up and lease taking left out).
2. mirror: a fresh events.enriched topic with N enriched events, then
   - plain: PutRecords of the same N legacy records, 500 per call, one call
     at a time (as the mirror sends), refused records sent again;
   - mirror: ``headwater-bridge mirror`` (one process, fresh group), timed from
     its first committed offset to the last.

Prints events/s for each, CPU seconds per 1,000 events of the service
process, and the ratio service/plain per round. Needs the dev stack (started
here if it is not running: ``headwater stack up --kinesis``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.consumer import AIOKafkaConsumer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._proc import cpu_seconds  # noqa: E402
from services.bridge.kinesis import kinesis_client  # noqa: E402
from services.bridge.settings import Settings  # noqa: E402
from services.common.kafka import TopicSpec, ensure_topics  # noqa: E402
from services.devstack import stack  # noqa: E402

KEY = "bench-legacy-write-key"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def legacy_doc(i: int, now_ms: int) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now_ms / 1000)) + ".000Z"
    doc: dict[str, Any] = {
        "appId": KEY,
        "messageId": f"bench-{uuid.uuid4()}",
        "timestamp": stamp,
        "sentAt": stamp,
        "receivedAt": stamp,
        "originalTimestamp": "0001-01-01T00:00:00Z",
        "userId": f"user-{i % 500}",
        "context": {"ip": "81.2.69.142", "library": {"name": "analytics.js"}},
        "properties": {"plan": "pro", "i": i, "path": f"/page/{i % 50}"},
    }
    if i % 3:
        doc.update(type="track", event=f"Event {i % 20}")
    else:
        doc.update(name="Home")  # typeless: inferred as a page
    return doc


def enriched_doc(i: int, now_ms: int) -> dict[str, Any]:
    doc = legacy_doc(i, now_ms)
    doc.pop("appId")
    doc.update(
        type="track",
        event=f"Event {i % 20}",
        _hw={"source_id": "bench", "received_at_ms": now_ms, "processed_at_ms": now_ms, "flags": []},
    )
    doc["context"]["geo"] = {"country": "GB", "city": "London"}
    return doc


async def wait_active(client: Any, stream: str) -> None:
    for _ in range(400):
        summary = await client.describe_stream_summary(StreamName=stream)
        if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"stream {stream} not ACTIVE")


async def put_all(client: Any, stream: str, payloads: list[bytes], keys: list[str]) -> float:
    """PutRecords 500 at a time, refused ones again; returns the seconds it took."""
    started = time.perf_counter()
    for at in range(0, len(payloads), 500):
        pending = [
            {"Data": d, "PartitionKey": k} for d, k in zip(payloads[at : at + 500], keys[at : at + 500], strict=True)
        ]
        while pending:
            answer = await client.put_records(StreamName=stream, Records=pending)
            pending = [e for e, r in zip(pending, answer["Records"], strict=True) if r.get("ErrorCode")]
    return time.perf_counter() - started


async def plain_get(client: Any, stream: str, limit: int, expected: int) -> float:
    shards = (await client.list_shards(StreamName=stream))["Shards"]
    counts = [0]
    started = time.perf_counter()

    async def drain(shard_id: str) -> None:
        it = (await client.get_shard_iterator(StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"))[
            "ShardIterator"
        ]
        while it and counts[0] < expected:
            answer = await client.get_records(ShardIterator=it, Limit=limit)
            counts[0] += len(answer["Records"])
            if not answer["Records"] and answer.get("MillisBehindLatest", 0) == 0:
                return
            it = answer.get("NextShardIterator")

    await asyncio.gather(*(drain(s["ShardId"]) for s in shards))
    assert counts[0] == expected, counts
    return time.perf_counter() - started


def service_env(values: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_BRIDGE_")}
    env.update(AWS)
    env.update({f"HEADWATER_BRIDGE_{k.upper()}": str(v) for k, v in values.items()})
    env["HEADWATER_BRIDGE_LOG_LEVEL"] = "WARNING"
    return env


async def topic_total(consumer: AIOKafkaConsumer, parts: list[TopicPartition]) -> int:
    return sum((await consumer.end_offsets(parts)).values())


async def bridge_round(
    client: Any, settings: stack.StackSettings, sources: Path, n: int, limit: int, log: Path
) -> tuple[float, float, float]:
    stream = f"bench-legacy-{uuid.uuid4().hex[:8]}"
    await client.create_stream(StreamName=stream, ShardCount=2)
    await wait_active(client, stream)
    now = int(time.time() * 1000)
    docs = [legacy_doc(i, now) for i in range(n)]
    await put_all(client, stream, [orjson.dumps(d) for d in docs], [d["messageId"] for d in docs])
    sources.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {
                        "id": "bench",
                        "name": "bench",
                        "write_key": KEY,
                        "legacy": {"direction": "bridge", "stream": stream},
                    }
                ]
            }
        )
    )
    plain_s = await plain_get(client, stream, limit, n)

    raw = f"bench.bridge.raw.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings.kafka_bootstrap, [TopicSpec(raw, 4), TopicSpec(f"{raw}.dlq", 1)])
    env = service_env(
        {
            "kafka_bootstrap": settings.kafka_bootstrap,
            "raw_topic": raw,
            "dlq_topic": f"{raw}.dlq",
            "cassandra_port": settings.cassandra_port,
            "cassandra_keyspace": f"bench_{uuid.uuid4().hex[:8]}",
            "aws_endpoint_url": settings.kinesis_endpoint,
            "sources_file": sources,
            "http_port": 18084,
            "http_host": "127.0.0.1",
            "get_records_limit": limit,
            "discovery_interval_s": 0.5,
        }
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    parts = [TopicPartition(raw, p) for p in range(4)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.bridge"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        while (first := await topic_total(consumer, parts)) == 0:
            assert proc.poll() is None, log.read_text()[-2000:]
            await asyncio.sleep(0.02)
        t0, cpu0 = time.perf_counter(), cpu_seconds(proc.pid)
        while await topic_total(consumer, parts) < n:
            assert proc.poll() is None, log.read_text()[-2000:]
            await asyncio.sleep(0.02)
        # What came before the first record in Kafka is outside the span: scale to n events.
        bridge_s, cpu = (time.perf_counter() - t0) * n / (n - first), (cpu_seconds(proc.pid) - cpu0) * n / (n - first)
    finally:
        proc.terminate()
        proc.wait(30)
        await consumer.stop()
        await client.delete_stream(StreamName=stream)
    return plain_s, bridge_s, cpu


async def committed(admin: AIOKafkaAdminClient, group: str) -> int:
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(max(0, meta.offset) for meta in offsets.values())


async def mirror_round(
    client: Any, settings: stack.StackSettings, sources: Path, n: int, log: Path
) -> tuple[float, float, float]:
    stream = f"bench-mirror-{uuid.uuid4().hex[:8]}"
    await client.create_stream(StreamName=stream, ShardCount=2)
    await wait_active(client, stream)
    now = int(time.time() * 1000)
    docs = [enriched_doc(i, now) for i in range(n)]
    legacy = [orjson.dumps({**{k: v for k, v in d.items() if k != "_hw"}, "appId": KEY}) for d in docs]
    plain_s = await put_all(client, stream, legacy, [d["messageId"] for d in docs])

    enriched = f"bench.mirror.enriched.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings.kafka_bootstrap, [TopicSpec(enriched, 4), TopicSpec(f"{enriched}.dlq", 1)])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(enriched, orjson.dumps(d), key=d["userId"].encode()) for d in docs]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    sources.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {
                        "id": "bench",
                        "name": "bench",
                        "write_key": KEY,
                        "legacy": {"direction": "mirror", "stream": stream},
                    }
                ]
            }
        )
    )
    group = f"bench-mirror-{uuid.uuid4().hex[:8]}"
    env = service_env(
        {
            "kafka_bootstrap": settings.kafka_bootstrap,
            "enriched_topic": enriched,
            "dlq_topic": f"{enriched}.dlq",
            "aws_endpoint_url": settings.kinesis_endpoint,
            "sources_file": sources,
            "mirror_http_port": 18085,
            "http_host": "127.0.0.1",
            "mirror_group_id": group,
        }
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.bridge", "mirror"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        while (first := await committed(admin, group)) == 0:
            assert proc.poll() is None, log.read_text()[-2000:]
            await asyncio.sleep(0.02)
        t0, cpu0 = time.perf_counter(), cpu_seconds(proc.pid)
        while await committed(admin, group) < n:
            assert proc.poll() is None, log.read_text()[-2000:]
            await asyncio.sleep(0.02)
        mirror_s, cpu = (time.perf_counter() - t0) * n / (n - first), (cpu_seconds(proc.pid) - cpu0) * n / (n - first)
    finally:
        proc.terminate()
        proc.wait(30)
        await admin.close()
        await client.delete_stream(StreamName=stream)
    return plain_s, mirror_s, cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=1000, help="GetRecords Limit for both loops")
    args = parser.parse_args()
    settings = stack.StackSettings()
    await asyncio.to_thread(stack.up, settings, kinesis=True)
    for name, value in AWS.items():
        os.environ.setdefault(name, value)
    n = args.events
    print(
        f"{n} events per run, {args.rounds} rounds, {os.cpu_count()} cores, Kinesis: kinesalite at "
        f"{settings.kinesis_endpoint}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        sources, log = Path(tmp) / "sources.json", Path(tmp) / "service.log"
        async with kinesis_client(Settings(aws_endpoint_url=settings.kinesis_endpoint)) as client:
            for label, run in (
                ("bridge", lambda: bridge_round(client, settings, sources, n, args.limit, log)),
                ("mirror", lambda: mirror_round(client, settings, sources, n, log)),
            ):
                ratios = []
                for r in range(args.rounds):
                    plain_s, service_s, cpu = await run()
                    ratio = plain_s / service_s
                    ratios.append(ratio)
                    base = "GetRecords" if label == "bridge" else "PutRecords"
                    print(
                        f"round {r + 1} {label}: plain {base} {n / plain_s:8.0f} ev/s   {label} "
                        f"{n / service_s:8.0f} ev/s   {label} CPU {cpu * 1000 / n:.3f} s/1k ev   "
                        f"ratio {ratio:.2f}"
                    )
                print(f"{label}: median ratio {label}/plain {statistics.median(ratios):.2f}\n")


if __name__ == "__main__":
    asyncio.run(main())
