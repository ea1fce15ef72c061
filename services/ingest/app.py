"""Builds the ingest service's aiohttp application for one worker process."""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.common.components import Site
from services.common.health import Health, add_health_routes
from services.common.logging import configure_logging
from services.common.runner import Service, run
from services.common.sources import SourceRegistry
from services.ingest import openapi, parsing
from services.ingest.api import add_routes
from services.ingest.cdnsettings import add_settings_route
from services.ingest.connections import ConnectionGuard, usable_connections
from services.ingest.metrics import ConnectionStats, make_metrics
from services.ingest.publisher import Publisher
from services.ingest.ratelimit import RateLimiter
from services.ingest.request import INGEST_KEY, VERSION, Ingest
from services.ingest.settings import Settings
from services.ingest.spool import Spool


def orphan_spools(settings: Settings, worker: int) -> list[Path]:
    """Spool folders of worker indexes at or above the current worker count (left
    by a run with more workers); worker i takes those with index % workers == i."""
    found = []
    for folder in sorted(settings.spool_dir.glob("worker-*")):
        index = folder.name.removeprefix("worker-")
        if index.isdecimal() and int(index) >= settings.workers and int(index) % settings.workers == worker:
            found.append(folder)
    return found


def build_service(settings: Settings, worker: int = 0, guard: ConnectionGuard | None = None) -> Service:
    """The API on one worker's spool and producer; the source registry starts first
    and the publisher second, so the publisher flushes before the registry stops."""
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    if guard is not None:
        registry.register(ConnectionStats(guard))
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    spool = Spool(
        settings.spool_dir / f"worker-{worker}",
        settings.spool_max_bytes,
        settings.spool_segment_bytes,
        adopt=orphan_spools(settings, worker),
    )
    publisher = Publisher(settings, spool, metrics)
    ingest = Ingest(
        settings=settings,
        sources=sources,
        publisher=publisher,
        metrics=metrics,
        limiter=RateLimiter(share=1.0 / settings.workers),
        proxies=parsing.TrustedProxies.parse(settings.trusted_proxies),
    )

    app = web.Application(client_max_size=settings.max_request_bytes)
    app[INGEST_KEY] = ingest
    health = Health(registry)

    async def sources_ready() -> tuple[bool, str]:
        metrics.sources_loaded.set(len(sources))
        return sources.status()

    async def kafka_ready() -> tuple[bool, str]:
        return publisher.status()

    health.add_check("sources", sources_ready)

    async def spool_ready() -> tuple[bool, str]:
        return publisher.spool_status()

    health.add_check("kafka", kafka_ready)
    health.add_check("spool", spool_ready)
    add_health_routes(app, health)
    add_routes(app)
    add_settings_route(app)
    doc = orjson.dumps(openapi.build(settings, VERSION))

    async def openapi_json(_: web.Request) -> web.Response:
        return web.Response(body=doc, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)

    service = Service("ingest", app)
    service.resource("sources", sources.running)
    service.resource("publisher", publisher.running)
    if settings.metrics_port is not None:
        own = web.Application()
        add_health_routes(own, health)
        service.add(Site("worker metrics", own, settings.http_host, settings.metrics_port + worker))
    return service


def create_app(settings: Settings, worker: int = 0, guard: ConnectionGuard | None = None) -> web.Application:
    """The application with its components run by aiohttp (tests' TestServer)."""
    return build_service(settings, worker, guard).mount()


def run_worker(settings: Settings, index: int) -> int:
    """One worker process: serve on the shared port until SIGTERM; the exit code."""
    configure_logging(settings.service_name, settings.log_level)
    guard = ConnectionGuard(usable_connections(settings.max_connections))

    # auto_decompress off: ingest decodes bodies itself, with the size limit
    # applied to the decoded bytes as they stream in. keepalive_timeout closes
    # connections idle (or without complete headers) for client_idle_timeout_s;
    # lingering_time bounds how long an unread body is drained after an answer
    # that did not need it (a 408, 413 or 415) before the connection closes.
    return run(
        lambda: build_service(settings, index, guard),
        host=settings.http_host,
        port=settings.http_port,
        worker=index,
        drain_timeout_s=settings.shutdown_timeout_s,
        gc_young_threshold=settings.gc_young_threshold,
        protocol_wrapper=guard.wrap,
        auto_decompress=False,
        keepalive_timeout=settings.client_idle_timeout_s,
        lingering_time=1.0,
    )
