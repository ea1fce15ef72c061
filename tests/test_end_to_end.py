"""The whole fleet, as separate processes on the real Kafka and Cassandra:
a Segment SDK -> ingest -> processor -> metrics -> the KairosDB query API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from segment.analytics.client import Client

from tests.conftest import eventually, free_port, read_topic, unique_name

KEY = "e2e-key"


@pytest.fixture
async def fleet(kafka_bootstrap: str, cassandra_port: int, new_keyspace: Callable[[], str],
                tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": [
        {"id": "shop", "name": "Shop", "write_key": KEY, "sum_properties": ["revenue"],
         "destinations": [{"name": unique_name("billing"), "types": ["track"], "events": ["Order Completed"]}]},
    ]}))
    topics = {name: unique_name(f"test.e2e.{name}") for name in ("raw", "enriched", "dlq", "late")}
    ports = {name: free_port() for name in ("ingest", "processor", "metrics")}
    common = {"KAFKA_BOOTSTRAP": kafka_bootstrap, "HTTP_HOST": "127.0.0.1"}
    envs = {
        "ingest": {**common, "HTTP_PORT": ports["ingest"], "RAW_TOPIC": topics["raw"], "DLQ_TOPIC": topics["dlq"],
                   "SOURCES_FILE": sources, "SPOOL_DIR": tmp_path / "spool", "RAW_PARTITIONS": 2},
        "processor": {**common, "HTTP_PORT": ports["processor"], "RAW_TOPIC": topics["raw"],
                      "ENRICHED_TOPIC": topics["enriched"], "DLQ_TOPIC": topics["dlq"], "SOURCES_FILE": sources,
                      "GROUP_ID": unique_name("e2e-processor"), "DEDUPE_TOPIC": unique_name("test.e2e.dedupe"),
                      "DEST_TOPIC_PREFIX": unique_name("test.e2e.dest") + ".",
                      "RAW_PARTITIONS": 2, "ENRICHED_PARTITIONS": 2},
        "metrics": {**common, "HTTP_PORT": ports["metrics"], "ENRICHED_TOPIC": topics["enriched"],
                    "DLQ_TOPIC": topics["dlq"], "LATE_TOPIC": topics["late"],
                    "CONSUMER_GROUP": unique_name("e2e-metrics"), "CASSANDRA_PORT": cassandra_port,
                    "CASSANDRA_KEYSPACE": new_keyspace(), "SOURCES_FILE": sources},
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, values in envs.items():
            env = {**os.environ, **{f"HEADWATER_{name.upper()}_{k}": str(v) for k, v in values.items()}}
            with (tmp_path / f"{name}.log").open("ab") as log:
                procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
        async with aiohttp.ClientSession() as http:
            for name, port in ports.items():
                async def ready(name: str = name, port: int = port) -> bool:
                    assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            return resp.status == 200
                    except aiohttp.ClientError:
                        return False
                await eventually(ready, 90, f"{name} to be ready")
        yield {"ports": ports, "topics": topics, "procs": procs, "logs": tmp_path}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _send(host: str, now: datetime) -> list[Any]:
    errors: list[Any] = []
    client = Client(KEY, host=host, gzip=True, max_retries=2, upload_size=25,
                    on_error=lambda exc, batch: errors.append(exc))
    for i in range(30):
        client.track(f"user-{i % 5}", "Order Completed", {"revenue": 10.0 + i}, timestamp=now,
                     message_id=f"e2e-order-{i}")
    for i in range(20):
        client.page(anonymous_id=f"anon-{i % 4}", name="Home", timestamp=now, message_id=f"e2e-page-{i}")
    # A duplicate delivery (an SDK retry) must be counted once.
    client.track("user-0", "Order Completed", {"revenue": 10.0}, timestamp=now, message_id="e2e-order-0")
    client.flush()
    client.join()
    return errors


async def test_sdk_to_kairosdb_query(fleet: dict[str, Any], kafka_bootstrap: str) -> None:
    ports = fleet["ports"]
    now = datetime.now(UTC).replace(microsecond=0)
    errors = await asyncio.to_thread(_send, f"http://127.0.0.1:{ports['ingest']}", now)
    assert errors == []

    query = {
        "start_absolute": int(now.timestamp() * 1000) - 3_600_000,
        "end_absolute": int(now.timestamp() * 1000) + 3_600_000,
        "metrics": [
            {"name": "headwater.events.count", "tags": {"source": ["shop"], "resolution": ["1m"]},
             "group_by": [{"name": "tag", "tags": ["type"]}], "aggregators": [{"name": "sum"}]},
            {"name": "headwater.property.sum", "tags": {"source": ["shop"], "property": ["revenue"],
                                                        "resolution": ["1m"]},
             "aggregators": [{"name": "sum"}]},
        ],
    }
    totals: dict[str, float] = {}
    revenue = 0.0
    async with aiohttp.ClientSession() as http:
        async def counted() -> bool:
            nonlocal revenue
            async with http.post(f"http://127.0.0.1:{ports['metrics']}/api/v1/datapoints/query",
                                 json=query) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            totals.clear()
            for result in body["queries"][0]["results"]:
                kind = (result.get("tags", {}).get("type") or ["?"])[0]
                totals[kind] = sum(v for _, v in result["values"])
            revenue = sum(v for r in body["queries"][1]["results"] for _, v in r["values"])
            return totals == {"track": 30, "page": 20}
        try:
            await eventually(counted, 90, "the rollups to count every event once")
        except AssertionError:
            raise AssertionError(f"rollups {totals}, revenue {revenue}") from None
    assert revenue == pytest.approx(sum(10.0 + i for i in range(30)))

    enriched = await read_topic(kafka_bootstrap, fleet["topics"]["enriched"], expected=50)
    events = [json.loads(r.value) for r in enriched]
    assert sorted(e["messageId"] for e in events) == sorted(
        [f"e2e-order-{i}" for i in range(30)] + [f"e2e-page-{i}" for i in range(20)])
    assert all(e["_hw"]["source_id"] == "shop" for e in events)
    assert all(e["timestamp"].endswith("Z") for e in events)
