"""The mirror as a process: events sent through ingest, enriched by the processor,
arrive in the legacy stream in the legacy format, each at least once, across a
kill -9 of the mirror and a stop long enough to fall behind."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from services.bridge.decoder import LegacyDecoder, Position, Skip
from services.bridge.metrics import make_mirror_metrics
from services.bridge.mirror import Mirror
from services.common.badrow import FailureType
from services.common.sources import SourceRegistry
from tests.bridge.helpers import bridge_settings, read_stream, start, stop, wait_ready
from tests.helpers import eventually, free_port
from tests.processor.kafka_helpers import make_settings, start_subprocess

KEY = "mirror-shop-write-key"


def sources(stream: str) -> dict[str, Any]:
    return {
        "sources": [
            {"id": "shop", "name": "shop", "write_key": KEY, "legacy": {"direction": "mirror", "stream": stream}}
        ]
    }


async def send(port: int, first: int, count: int) -> None:
    auth = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    batch = [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": f"u{i % 7}",
            "messageId": f"mirror-{i}",
            "properties": {"revenue": i},
        }
        for i in range(first, first + count)
    ]
    async with aiohttp.ClientSession() as http:
        for start_at in range(0, len(batch), 50):
            async with http.post(
                f"http://127.0.0.1:{port}/v1/batch",
                json={"batch": batch[start_at : start_at + 50]},
                headers={"Authorization": auth},
            ) as resp:
                assert resp.status == 200, await resp.text()


def start_ingest(env_values: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **{f"HEADWATER_INGEST_{k}": str(v) for k, v in env_values.items()}}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.ingest"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def legacy_ids(kinesis: Any, stream: str) -> list[dict[str, Any]]:
    return [orjson.loads(r["Data"]) | {"_partition_key": r["PartitionKey"]} for r in await read_stream(kinesis, stream)]


@pytest.mark.slow
async def test_ingest_to_legacy_stream_at_least_once_across_kill_9(
    kafka_bootstrap: str,
    kinesis_endpoint: str,
    kinesis: Any,
    new_stream: Callable[..., Awaitable[str]],
    new_topic: Callable[..., Awaitable[str]],
    new_group: Callable[[str], str],
    tmp_path: Path,
) -> None:
    stream = await new_stream(2)
    sources_file = tmp_path / "sources.json"
    sources_file.write_bytes(orjson.dumps(sources(stream)))
    processor = (await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, partitions=2)).model_copy(
        update={"http_port": free_port()}
    )
    ingest_port = free_port()
    settings = bridge_settings(
        kafka_bootstrap=kafka_bootstrap,
        enriched_topic=processor.enriched_topic,
        dlq_topic=processor.dlq_topic,
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources_file,
        mirror_http_port=free_port(),
        mirror_group_id=new_group("mirror"),
        mirror_batch_max_records=40,
    )
    procs = {
        "ingest": start_ingest(
            {
                "KAFKA_BOOTSTRAP": kafka_bootstrap,
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": ingest_port,
                "RAW_TOPIC": processor.raw_topic,
                "DLQ_TOPIC": processor.dlq_topic,
                "SOURCES_FILE": sources_file,
                "SPOOL_DIR": tmp_path / "spool",
                "RAW_PARTITIONS": 2,
            },
            tmp_path / "ingest.log",
        ),
        "processor": start_subprocess(processor, tmp_path / "processor.log"),
        "mirror1": start(settings, "mirror", tmp_path / "mirror1.log"),
    }
    try:
        await wait_ready(procs["ingest"], ingest_port, tmp_path / "ingest.log")
        await wait_ready(procs["mirror1"], settings.mirror_http_port, tmp_path / "mirror1.log")
        await send(ingest_port, 0, 200)

        async def count_at_least(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return len({d["messageId"] for d in await legacy_ids(kinesis, stream)}) >= n

            return check

        await eventually(await count_at_least(40), 90, "the mirror to write the first records")
        stop(procs["mirror1"], kill=True)
        # Stopped for a while: the events go on into events.enriched, the mirror falls behind.
        await send(ingest_port, 200, 200)
        await asyncio.sleep(2)
        procs["mirror2"] = start(settings, "mirror", tmp_path / "mirror2.log")
        records: list[dict[str, Any]] = []

        async def all_there() -> bool:
            nonlocal records
            records = await legacy_ids(kinesis, stream)
            return len({d["messageId"] for d in records}) >= 400

        await eventually(all_there, 120, "every event in the legacy stream")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            stop(proc)

    assert {d["messageId"] for d in records} == {f"mirror-{i}" for i in range(400)}
    decoder = LegacyDecoder(SourceRegistry(sources_file), service="test", version="test", max_future_skew_ms=0)
    for doc in records:
        # The legacy format: appId = the write key, partition key = messageId, the mirror's marker.
        assert doc["appId"] == KEY and doc["_partition_key"] == doc["messageId"]
        assert doc["type"] == "track" and doc["event"] == "Order Completed"
        assert doc["timestamp"] and doc["receivedAt"] and "_hw" not in doc
        data = orjson.dumps({k: v for k, v in doc.items() if k != "_partition_key"})
        assert decoder.decode(data, Position(stream, "s", "1", int(time.time() * 1000))) is Skip.MIRRORED


async def test_a_record_over_the_kinesis_limit_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    path.write_bytes(orjson.dumps(sources("legacy")))
    registry = SourceRegistry(path)
    registry.load()
    mirror = Mirror(
        bridge_settings(),
        registry,
        kinesis=None,  # type: ignore[arg-type]
        consumer=None,
        producer=None,
        metrics=make_mirror_metrics(CollectorRegistry()),
        version="test",
    )
    huge = {
        "type": "track",
        "event": "Big",
        "messageId": "big-1",
        "properties": {"blob": "x" * (1024 * 1024)},
        "_hw": {"source_id": "shop"},
    }
    small = {**huge, "messageId": "small-1", "properties": {}}
    other = {**small, "_hw": {"source_id": "elsewhere"}}
    batch = mirror.prepare(
        [
            SimpleNamespace(topic="t", partition=0, offset=i, value=orjson.dumps(doc))
            for i, doc in enumerate((huge, small, other))
        ]
        + [SimpleNamespace(topic="t", partition=1, offset=7, value=b"not json")]
    )
    assert [r.message_id for r in batch.by_stream["legacy"]] == ["small-1"]
    assert [(row.failure_type, row.message_id) for row in batch.bad] == [
        (FailureType.SIZE_VIOLATION, "big-1"),
        (FailureType.INVALID_JSON, None),
    ]
    assert KEY.encode() not in batch.bad[0].to_json()
    # Cut, so the row itself fits a Kafka record.
    assert len(batch.bad[0].to_json()) < 200_000 and batch.bad[0].extra["original_truncated_to"] == 64 * 1024
    assert batch.skipped == {"unknown_source": 1}
    assert {(tp.partition, offset) for tp, offset in batch.offsets.items()} == {(0, 3), (1, 8)}
