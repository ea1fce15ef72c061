"""The whole fleet, as separate processes on the real Kafka and Cassandra:
a Segment SDK -> ingest -> processor -> metrics -> the KairosDB query API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from segment.analytics.client import Client

from tests import fleet as fleet_helpers
from tests.helpers import eventually, read_topic, unique_name

KEY = "e2e-key"


@pytest.fixture
async def fleet(
    kafka_bootstrap: str, cassandra_port: int, new_keyspace: Callable[[], str], tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    sources = tmp_path / "sources.json"
    sources.write_text(
        json.dumps(
            {
                "sources": [
                    {
                        "id": "shop",
                        "name": "Shop",
                        "write_key": KEY,
                        "sum_properties": ["revenue"],
                        "destinations": [
                            {"name": unique_name("billing"), "types": ["track"], "events": ["Order Completed"]}
                        ],
                    },
                ]
            }
        )
    )
    async with fleet_helpers.running(kafka_bootstrap, cassandra_port, new_keyspace(), sources, tmp_path) as fleet:
        yield fleet


def _send(host: str, now: datetime) -> list[Any]:
    errors: list[Any] = []
    client = Client(
        KEY, host=host, gzip=True, max_retries=2, upload_size=25, on_error=lambda exc, batch: errors.append(exc)
    )
    for i in range(30):
        client.track(
            f"user-{i % 5}", "Order Completed", {"revenue": 10.0 + i}, timestamp=now, message_id=f"e2e-order-{i}"
        )
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
            {
                "name": "headwater.events.count",
                "tags": {"source": ["shop"], "resolution": ["1m"]},
                "group_by": [{"name": "tag", "tags": ["type"]}],
                "aggregators": [{"name": "sum"}],
            },
            {
                "name": "headwater.property.sum",
                "tags": {"source": ["shop"], "property": ["revenue"], "resolution": ["1m"]},
                "aggregators": [{"name": "sum"}],
            },
        ],
    }
    totals: dict[str, float] = {}
    revenue = 0.0
    async with aiohttp.ClientSession() as http:

        async def counted() -> bool:
            nonlocal revenue
            async with http.post(f"http://127.0.0.1:{ports['metrics']}/api/v1/datapoints/query", json=query) as resp:
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
        [f"e2e-order-{i}" for i in range(30)] + [f"e2e-page-{i}" for i in range(20)]
    )
    assert all(e["_hw"]["source_id"] == "shop" for e in events)
    assert all(e["timestamp"].endswith("Z") for e in events)
