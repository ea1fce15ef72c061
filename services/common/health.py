"""/metrics, /healthz and /readyz for every service.

/metrics runs the readiness checks before it answers, so a scrape also
carries ``headwater_ready`` (1 when /readyz would answer 200) and
``headwater_ready_check{check}`` (each check's own answer): Prometheus sees a
service that is up but not ready, which ``up`` alone does not show.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# A readiness check answers (ok, detail); detail explains a "not ready".
ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class Health:
    """The registry and readiness checks one service exposes."""

    registry: CollectorRegistry
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    check_timeout_s: float = 2.0
    # The checks' last answers (None before the first), exported by _ReadinessCollector.
    last_checks: dict[str, bool] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.registry.register(_ReadinessCollector(self))

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self.checks[name] = check

    async def readiness(self) -> tuple[bool, dict[str, dict[str, object]]]:
        async def run(check: ReadinessCheck) -> tuple[bool, str]:
            try:
                return await asyncio.wait_for(check(), self.check_timeout_s)
            except TimeoutError:
                return False, "timed out"
            except Exception as exc:  # noqa: BLE001 - a check that raises is a failing check, and /metrics runs them too
                return False, f"check failed: {exc!r}"

        names = list(self.checks)
        results = await asyncio.gather(*(run(self.checks[n]) for n in names))
        report = {n: {"ok": ok, "detail": detail} for n, (ok, detail) in zip(names, results, strict=True)}
        self.last_checks = {n: ok for n, (ok, _) in zip(names, results, strict=True)}
        return all(ok for ok, _ in results), report


class _ReadinessCollector:
    """The last readiness answer as gauges; nothing before the first check ran."""

    def __init__(self, health: Health) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        last = self._health.last_checks
        if last is None:
            return
        yield GaugeMetricFamily(
            "headwater_ready",
            "1 when every readiness check passes (/readyz answers 200)",
            value=1 if all(last.values()) else 0,
        )
        checks = GaugeMetricFamily("headwater_ready_check", "Each readiness check: 1 passes, 0 fails", labels=["check"])
        for name, ok in sorted(last.items()):
            checks.add_metric([name], 1 if ok else 0)
        yield checks


HEALTH_KEY = web.AppKey("health", Health)


async def _metrics(request: web.Request) -> web.Response:
    health = request.app[HEALTH_KEY]
    await health.readiness()  # the scrape carries a fresh headwater_ready
    body = generate_latest(health.registry)
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
