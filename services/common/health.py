"""/metrics, /healthz and /readyz for every service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# A readiness check answers (ok, detail); detail explains a "not ready".
ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class Health:
    """The registry and readiness checks one service exposes."""

    registry: CollectorRegistry
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    check_timeout_s: float = 2.0

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self.checks[name] = check

    async def readiness(self) -> tuple[bool, dict[str, dict[str, object]]]:
        async def run(check: ReadinessCheck) -> tuple[bool, str]:
            try:
                return await asyncio.wait_for(check(), self.check_timeout_s)
            except TimeoutError:
                return False, "timed out"

        names = list(self.checks)
        results = await asyncio.gather(*(run(self.checks[n]) for n in names))
        report = {n: {"ok": ok, "detail": detail} for n, (ok, detail) in zip(names, results, strict=True)}
        return all(ok for ok, _ in results), report


HEALTH_KEY = web.AppKey("health", Health)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[HEALTH_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ok, report = await request.app[HEALTH_KEY].readiness()
    return web.json_response({"ready": ok, "checks": report}, status=200 if ok else 503)


def add_health_routes(app: web.Application, health: Health) -> None:
    app[HEALTH_KEY] = health
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
