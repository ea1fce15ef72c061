"""/metrics carries readiness: headwater_ready and headwater_ready_check{check}, fresh at each scrape."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.common.health import Health, add_health_routes


async def test_metrics_carry_readiness_as_of_the_scrape() -> None:
    health = Health(CollectorRegistry())
    state = {"kafka": True}

    async def kafka() -> tuple[bool, str]:
        return state["kafka"], "kafka"

    async def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    health.add_check("kafka", kafka)
    app = web.Application()
    add_health_routes(app, health)
    async with TestClient(TestServer(app)) as client:
        text = await (await client.get("/metrics")).text()
        assert "headwater_ready 1.0" in text and 'headwater_ready_check{check="kafka"} 1.0' in text
        state["kafka"] = False
        text = await (await client.get("/metrics")).text()
        assert "headwater_ready 0.0" in text and 'headwater_ready_check{check="kafka"} 0.0' in text
        # A check that raises is a failing check: /metrics and /readyz still answer.
        state["kafka"] = True
        health.add_check("broken", broken)
        resp = await client.get("/metrics")
        assert resp.status == 200
        text = await resp.text()
        assert "headwater_ready 0.0" in text and 'headwater_ready_check{check="broken"} 0.0' in text
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["checks"]["broken"]["detail"].startswith("check failed: RuntimeError")
