"""The bridge as processes, on the real Kinesis server, Kafka and Cassandra, with the
real processor behind it: a 2-shard legacy stream with typeless records and bad
ones, a shard split while it runs, a kill -9 and a restart. Every valid record
comes out of events.enriched exactly once; the bad ones are typed bad rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.bridge.settings import Settings
from services.common.badrow import BadRow
from services.common.cassandra import CassandraClient
from services.common.proto.envelope_pb2 import Envelope
from tests.bridge.helpers import bridge_settings, legacy_record, put_legacy, start, stop, wait_ready
from tests.helpers import eventually, free_port, read_topic
from tests.processor.kafka_helpers import make_settings, start_subprocess

WEB_KEY = "legacy-web-write-key"
OFF_KEY = "legacy-off-write-key"
KINDS = ("track", "page", "identify", "group", "alias")


def sources(stream: str) -> dict[str, Any]:
    return {
        "sources": [
            {"id": "web", "name": "web", "write_key": WEB_KEY, "legacy": {"direction": "bridge", "stream": stream}},
            {
                "id": "off",
                "name": "off",
                "write_key": OFF_KEY,
                "enabled": False,
                "legacy": {"direction": "bridge", "stream": stream},
            },
        ]
    }


def valid_records(prefix: str, count: int, event_ms: int) -> list[dict[str, Any]]:
    """Half typed, half typeless (the type inferred from the fields), over five kinds."""
    return [
        legacy_record(
            WEB_KEY,
            message_id=f"{prefix}-{i}",
            typed=i % 2 == 0,
            kind=KINDS[i % len(KINDS)],
            event_ms=event_ms,
            userId=f"user-{i % 13}",
        )
        for i in range(count)
    ]


def bad_records(prefix: str, event_ms: int) -> tuple[list[dict[str, Any] | bytes], Counter[str]]:
    records: list[dict[str, Any] | bytes] = []
    records += [legacy_record("no-such-key", message_id=f"{prefix}-unknown-{i}", event_ms=event_ms) for i in range(3)]
    records += [legacy_record(OFF_KEY, message_id=f"{prefix}-off-{i}", event_ms=event_ms) for i in range(2)]
    records += [
        legacy_record(WEB_KEY, message_id=f"{prefix}-typeless-{i}", typed=False, kind="other", event_ms=event_ms)
        for i in range(2)
    ]
    records.append(b'{"appId": "' + WEB_KEY.encode() + b'", "broken')
    return records, Counter({"unknown_write_key": 3, "disabled_source": 2, "type_not_inferable": 2, "invalid_json": 1})


def mirrored_records(prefix: str, event_ms: int) -> list[dict[str, Any]]:
    docs = [legacy_record(WEB_KEY, message_id=f"{prefix}-mirrored-{i}", event_ms=event_ms) for i in range(2)]
    for doc in docs:
        doc["context"]["headwater"] = {"mirrored": True}
    return docs


async def split_first_shard(kinesis: Any, stream: str) -> tuple[str, list[str]]:
    shard = (await kinesis.list_shards(StreamName=stream))["Shards"][0]
    low, high = int(shard["HashKeyRange"]["StartingHashKey"]), int(shard["HashKeyRange"]["EndingHashKey"])
    await kinesis.split_shard(
        StreamName=stream, ShardToSplit=shard["ShardId"], NewStartingHashKey=str((low + high) // 2)
    )
    for _ in range(200):
        summary = await kinesis.describe_stream_summary(StreamName=stream)
        if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            break
        await asyncio.sleep(0.05)
    children = [
        s["ShardId"]
        for s in (await kinesis.list_shards(StreamName=stream))["Shards"]
        if s.get("ParentShardId") == shard["ShardId"]
    ]
    assert len(children) == 2
    return shard["ShardId"], children


async def enriched_ids(bootstrap: str, topic: str) -> Counter[str]:
    records = await read_topic(bootstrap, topic, expected=None, timeout_s=20)
    return Counter(orjson.loads(r.value)["messageId"] for r in records)


@pytest.mark.slow
async def test_split_and_kill_9_every_valid_record_exactly_once(
    kafka_bootstrap: str,
    cassandra_port: int,
    cassandra: CassandraClient,
    kinesis_endpoint: str,
    kinesis: Any,
    new_stream: Callable[..., Awaitable[str]],
    new_topic: Callable[..., Awaitable[str]],
    new_group: Callable[[str], str],
    new_keyspace: Callable[[], str],
    tmp_path: Path,
) -> None:
    stream = await new_stream(2)
    sources_file = tmp_path / "sources.json"
    sources_file.write_bytes(orjson.dumps(sources(stream)))
    processor = (await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, partitions=4)).model_copy(
        update={"http_port": free_port()}
    )
    settings: Settings = bridge_settings(
        kafka_bootstrap=kafka_bootstrap,
        raw_topic=processor.raw_topic,
        dlq_topic=processor.dlq_topic,
        enriched_topic=processor.enriched_topic,
        cassandra_port=cassandra_port,
        cassandra_keyspace=new_keyspace(),
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources_file,
        http_port=free_port(),
        get_records_limit=40,
    )
    now = int(time.time() * 1000)
    minute = now - now % 60_000 - 120_000
    expected: set[str] = set()
    bad, bad_counts = bad_records("p1", minute)
    phase1 = valid_records("p1", 240, minute)
    expected |= {d["messageId"] for d in phase1}
    await put_legacy(kinesis, stream, [*phase1, *bad, *mirrored_records("p1", minute)])

    procs = {
        "processor": start_subprocess(processor, tmp_path / "processor.log"),
        "bridge1": start(settings, "bridge", tmp_path / "bridge1.log"),
    }
    try:
        await wait_ready(procs["bridge1"], settings.http_port, tmp_path / "bridge1.log")

        async def some_enriched(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return sum((await enriched_ids(kafka_bootstrap, processor.enriched_topic)).values()) >= n

            return check

        # Split a shard while the bridge reads it; the records after it land in the children.
        await eventually(await some_enriched(40), 90, "the bridge to forward the first records")
        parent, children = await split_first_shard(kinesis, stream)
        phase2 = valid_records("p2", 200, minute + 60_000)
        expected |= {d["messageId"] for d in phase2}
        await put_legacy(kinesis, stream, phase2)

        # kill -9 in the middle of the stream, then more records and a new process.
        await eventually(await some_enriched(300), 120, "the bridge to forward past the split")
        stop(procs["bridge1"], kill=True)
        phase3 = valid_records("p3", 120, minute + 60_000)
        expected |= {d["messageId"] for d in phase3}
        await put_legacy(kinesis, stream, phase3)
        procs["bridge2"] = start(
            settings.model_copy(update={"owner_id": f"second-{uuid.uuid4().hex[:6]}"}),
            "bridge",
            tmp_path / "bridge2.log",
        )

        seen: Counter[str] = Counter()

        async def all_there() -> bool:
            nonlocal seen
            seen = await enriched_ids(kafka_bootstrap, processor.enriched_topic)
            return expected <= set(seen)

        try:
            await eventually(all_there, 180, "every valid record in events.enriched")
        except AssertionError:
            missing = sorted(expected - set(seen))
            raise AssertionError(f"{len(missing)} missing, e.g. {missing[:5]}") from None
    finally:
        for proc in procs.values():
            stop(proc)

    # Exactly once: no valid record twice, nothing that should not be there.
    assert set(seen) == expected
    assert [mid for mid, n in seen.items() if n > 1] == []

    # The bad records are typed bad rows (at least once: a re-read batch may send one again).
    dlq = [BadRow.decode(r.value) for r in await read_topic(kafka_bootstrap, processor.dlq_topic, timeout_s=20)]
    bridge_rows = [row for row in dlq if row["producer"]["service"] == "bridge"]
    by_reason: dict[str, set[str]] = {}
    for row in bridge_rows:
        name = row["message_id"] or row["extra"]["kinesis"]["sequence"]
        by_reason.setdefault(row["extra"]["reason"], set()).add(name)
    assert {reason: len(ids) for reason, ids in by_reason.items()} == dict(bad_counts)
    assert [row for row in dlq if row["producer"]["service"] != "bridge"] == []

    # No write key in any Kafka record the bridge or the processor wrote.
    raw = await read_topic(kafka_bootstrap, processor.raw_topic, timeout_s=20)
    enriched = await read_topic(kafka_bootstrap, processor.enriched_topic, timeout_s=20)
    dlq_raw = await read_topic(kafka_bootstrap, processor.dlq_topic, timeout_s=20)
    for record in [*raw, *enriched, *dlq_raw]:
        for key in (WEB_KEY, OFF_KEY, "no-such-key"):
            assert key.encode() not in record.value
            assert key.encode() not in (record.key or b"")

    # Parents before children: every record of the split shard reached Kafka before any of its children's.
    times: dict[str, list[int]] = {}
    for record in raw:
        shard_id = Envelope.FromString(record.value).request_id.split(":")[1]
        times.setdefault(shard_id, []).append(record.timestamp)
    assert parent in times and all(child in times for child in children)
    assert max(times[parent]) <= min(min(times[c]) for c in children)

    # The lease table says the parent was read to its end, and the children were checkpointed.
    rows = await cassandra.execute(
        f"SELECT shard_id, finished, checkpoint FROM {settings.cassandra_keyspace}.shard_leases WHERE stream = %s",
        (stream,),
    )
    leases = {r.shard_id: r for r in rows}
    assert leases[parent].finished is True
    assert all(leases[c].checkpoint for c in children)
