"""The optional KairosDB sink, against a tiny HTTP server that stands in for
KairosDB and records what it receives (Kafka and Cassandra stay real)."""

from __future__ import annotations

import gzip
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.common.cassandra import CassandraClient
from services.metrics.app import build_app
from tests.metrics.conftest import MakeSettings
from tests.metrics.helpers import enriched, poll, produce

HOUR = 3_600_000


async def test_rollups_reach_an_external_kairosdb(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    received: list[dict[str, Any]] = []
    content_types: set[str] = set()
    refused_once: list[bool] = []

    async def datapoints(request: web.Request) -> web.Response:
        if not refused_once:  # the first batch meets a KairosDB that is restarting
            refused_once.append(True)
            return web.Response(status=503)
        content_types.add(request.content_type)
        received.extend(orjson.loads(gzip.decompress(await request.read())))
        return web.Response(status=204)

    kairos = web.Application()
    kairos.router.add_post("/api/v1/datapoints", datapoints)
    async with TestServer(kairos) as server:
        settings = await metrics_settings(partitions=2, kairosdb_url=str(server.make_url("/")), kairosdb_batch_size=7)
        base = (int(time.time() * 1000) // HOUR - 1) * HOUR
        docs = [
            enriched(
                "srv",
                "track",
                "Order Completed",
                f"u{i % 3}",
                base + i * 1000,
                base + 60_000,
                {"revenue": 2, "quantity": 1},
            )
            for i in range(20)
        ]
        await produce(kafka_bootstrap, settings.enriched_topic, [(i % 2, orjson.dumps(d)) for i, d in enumerate(docs)])
        app = await build_app(settings)
        async with TestClient(TestServer(app)):

            def latest(metric: str, resolution: str) -> dict[tuple[str, int], Any]:
                # KairosDB keeps the last value written for a time and tag set.
                out = {}
                for p in received:
                    if p["name"] == metric and p["tags"]["resolution"] == resolution:
                        key = (orjson.dumps(p["tags"], option=orjson.OPT_SORT_KEYS).decode(), p["datapoints"][0][0])
                        out[key] = p["datapoints"][0][1]
                return out

            async def all_counted() -> bool:
                return bool(sum(latest("headwater.events.count", "1h").values()) == 20)

            await poll(all_counted, 60, "the sink to deliver the hour's counts")
    assert content_types == {"application/gzip"}
    counts = [p["datapoints"][0][1] for p in received if p["name"] == "headwater.events.count"]
    sums = [p["datapoints"][0][1] for p in received if p["name"] == "headwater.property.sum"]
    assert counts and all(type(v) is int for v in counts)
    assert sums and all(type(v) is float for v in sums)
    assert {p["tags"]["kpart"] for p in received} == {"0", "1"}
    assert sum(v for (tags, _), v in latest("headwater.property.sum", "1d").items() if "revenue" in tags) == 40.0
