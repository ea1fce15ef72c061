"""``headwater parity`` against the whole shadow run as processes: legacy stream ->
bridge -> processor -> metrics. Equal sides report nothing and exit 0; a seeded
gap is reported as exactly that minute, that event and those messageIds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.bridge.parity import compare, iso, minutes
from services.bridge.settings import Settings
from services.bridge.store import ParityEntry, Store
from services.common.cassandra import CassandraClient
from tests.bridge.helpers import REPO, bridge_settings, legacy_record, put_legacy, settings_env, start, stop, wait_ready
from tests.helpers import eventually, free_port
from tests.processor.kafka_helpers import make_settings, start_subprocess

KEY = "parity-web-write-key"


def parity(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "parity", *args],
        cwd=REPO,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def start_metrics(values: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **{f"HEADWATER_METRICS_{k}": str(v) for k, v in values.items()}}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.metrics"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def rollup_total(port: int, start_ms: int, end_ms: int) -> float:
    query = {
        "start_absolute": start_ms,
        "end_absolute": end_ms,
        "metrics": [
            {
                "name": "headwater.events.count",
                "tags": {"source": ["web"], "resolution": ["1m"]},
                "aggregators": [{"name": "sum"}],
            }
        ],
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/api/v1/datapoints/query", json=query) as resp,
    ):
        body = await resp.json()
    return float(sum(v for r in body["queries"][0]["results"] for _, v in r["values"]))


@pytest.mark.slow
async def test_parity_reports_exactly_the_seeded_gap(
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
    sources_file.write_bytes(
        orjson.dumps(
            {
                "sources": [
                    {"id": "web", "name": "web", "write_key": KEY, "legacy": {"direction": "bridge", "stream": stream}}
                ]
            }
        )
    )
    processor = (await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, partitions=2)).model_copy(
        update={"http_port": free_port()}
    )
    metrics_port = free_port()
    settings = bridge_settings(
        kafka_bootstrap=kafka_bootstrap,
        raw_topic=processor.raw_topic,
        dlq_topic=processor.dlq_topic,
        enriched_topic=processor.enriched_topic,
        cassandra_port=cassandra_port,
        cassandra_keyspace=new_keyspace(),
        aws_endpoint_url=kinesis_endpoint,
        sources_file=sources_file,
        http_port=free_port(),
        metrics_url=f"http://127.0.0.1:{metrics_port}",
        parity_interval_s=1,
        parity_lag_s=0,
        parity_window_s=600,
    )
    now = int(time.time() * 1000)
    m0 = now - now % 60_000 - 4 * 60_000
    m1, m2 = m0 + 60_000, m0 + 120_000
    docs = (
        [legacy_record(KEY, message_id=f"c-{i}", event_ms=m0 + i, event="Clicked") for i in range(10)]
        + [legacy_record(KEY, message_id=f"h-{i}", kind="page", typed=False, event_ms=m1 + i) for i in range(8)]
        + [legacy_record(KEY, message_id=f"p-{i}", event_ms=m1 + 30_000, event="Paid") for i in range(4)]
        + [legacy_record(KEY, message_id=f"i-{i}", kind="identify", typed=False, event_ms=m2) for i in range(6)]
    )
    await put_legacy(kinesis, stream, docs)
    procs = {
        "processor": start_subprocess(processor, tmp_path / "processor.log"),
        "bridge": start(settings, "bridge", tmp_path / "bridge.log"),
        "metrics": start_metrics(
            {
                "KAFKA_BOOTSTRAP": kafka_bootstrap,
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": metrics_port,
                "ENRICHED_TOPIC": processor.enriched_topic,
                "DLQ_TOPIC": processor.dlq_topic,
                "LATE_TOPIC": f"{processor.raw_topic}.late",
                "CONSUMER_GROUP": new_group("metrics"),
                "CASSANDRA_PORT": cassandra_port,
                "CASSANDRA_KEYSPACE": new_keyspace(),
                "SOURCES_FILE": sources_file,
            },
            tmp_path / "metrics.log",
        ),
    }
    span = ("--source", "web", "--from", iso(m0), "--to", iso(m2 + 60_000))
    try:
        await wait_ready(procs["metrics"], metrics_port, tmp_path / "metrics.log", timeout_s=90)

        async def counted() -> bool:
            return await rollup_total(metrics_port, m0, m2 + 60_000) == len(docs)

        await eventually(counted, 120, "the rollups to count every bridged record")

        # Equal sides: nothing to report, exit 0.
        same = parity(settings, *span, "--json")
        assert same.returncode == 0, same.stderr + same.stdout
        report = orjson.loads(same.stdout)
        assert report["differences"] == [] and report["only_legacy"] == {} and report["only_headwater"] == {}

        # Seed a gap: three events the legacy stream carried in m1 that never reached Headwater,
        # and one that only Headwater has in m2.
        store = Store(cassandra, settings.cassandra_keyspace, parity_ttl_s=3600)
        await store.prepare()
        await store.record_parity(ParityEntry("web", m1, "track", "Paid", f"lost-{i}") for i in range(3))
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            extra = {
                "type": "identify",
                "messageId": "hw-only-1",
                "userId": "u",
                "timestamp": iso(m2 + 5),
                "traits": {},
                "_hw": {"source_id": "web", "received_at_ms": m2 + 10},
            }
            await producer.send_and_wait(processor.enriched_topic, orjson.dumps(extra), key=b"web:u")
        finally:
            await producer.stop()

        async def counted_extra() -> bool:
            return await rollup_total(metrics_port, m0, m2 + 60_000) == len(docs) + 1

        await eventually(counted_extra, 60, "the rollups to count the Headwater-only event")

        # The bridge's own comparison shows the same on its /metrics.
        async def bridge_gauges() -> bool:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{settings.http_port}/metrics") as resp,
            ):
                text = await resp.text()
            return (
                'headwater_parity_difference{source="web"} 3.0' in text
                and 'headwater_parity_minutes_differing{source="web"} 2.0' in text
            )

        await eventually(bridge_gauges, 30, "the bridge's parity gauges to show the gap")

        gauge_file = tmp_path / "parity.prom"
        gap = parity(settings, *span, "--json", "--metrics-file", str(gauge_file))
        text = parity(settings, *span)
        lenient = parity(settings, *span, "--threshold", "3")
    finally:
        for proc in procs.values():
            stop(proc)

    assert gap.returncode == 1 and gap.stdout, gap.stderr[-3000:] + gap.stdout
    report = orjson.loads(gap.stdout)
    assert report["differences"] == [
        {"minute": iso(m1), "type": "track", "event": "Paid", "legacy": 7, "headwater": 4, "difference": 3},
        {"minute": iso(m2), "type": "identify", "event": "", "legacy": 6, "headwater": 7, "difference": -1},
    ]
    assert report["only_legacy"] == {iso(m1): ["lost-0", "lost-1", "lost-2"]}
    assert report["only_headwater"] == {iso(m2): ["hw-only-1"]}
    assert report["ids_complete"] is True
    assert text.returncode == 1 and "lost-1" in text.stdout and iso(m1) in text.stdout
    assert lenient.returncode == 0, lenient.stdout
    gauges = gauge_file.read_text()
    assert 'headwater_parity_difference{source="web"} 3.0' in gauges
    assert 'headwater_parity_minutes_differing{source="web"} 2.0' in gauges
    assert KEY not in gap.stdout + text.stdout + gauges


def test_compare_is_exact_per_minute_and_event() -> None:
    legacy = {(0, "track", "A"): {"a", "b"}, (60_000, "page", "Home"): {"c"}}
    headwater = {(0, "track", "A"): 2, (60_000, "page", "Home"): 2, (120_000, "track", "B"): 1}
    report = compare("web", 0, 180_000, legacy, headwater, {60_000: {"c", "d"}, 120_000: {"e"}}, threshold=0)
    assert [(c["minute"], c["difference"]) for c in report.cells] == [(iso(60_000), -1), (iso(120_000), -1)]
    assert report.only_headwater == {iso(60_000): ["d"], iso(120_000): ["e"]} and report.only_legacy == {}
    assert report.exceeded and not compare("web", 0, 1, legacy, headwater, None, threshold=1).exceeded
    assert minutes(30_000, 150_000) == [60_000, 120_000]


def test_parity_that_cannot_reach_the_metrics_api_exits_2(cassandra_port: int, new_keyspace: Callable[[], str]) -> None:
    settings = bridge_settings(
        cassandra_port=cassandra_port, cassandra_keyspace=new_keyspace(), metrics_url=f"http://127.0.0.1:{free_port()}"
    )
    done = parity(settings, "--source", "web", "--from", "2026-01-01T00:00", "--to", "2026-01-01T00:05")
    assert done.returncode == 2, done.stderr
    assert "parity could not run" in done.stderr and "Traceback" not in done.stderr
