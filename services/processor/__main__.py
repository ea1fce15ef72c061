"""headwater-processor: run the processor (one or more processes in one consumer group)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.common.errors import DependencyUnavailable
from services.common.health import Health, add_health_routes
from services.common.kafka import kafka_ready
from services.common.logging import configure_logging
from services.common.process import exit_on_config_error, supervise
from services.common.runner import Service, run, tune_gc
from services.common.settings import load_settings
from services.common.sources import SourceRegistry
from services.processor.enrich import Enricher
from services.processor.metrics import make_metrics
from services.processor.pipeline import Pipeline
from services.processor.settings import Settings
from services.processor.transactions import quiet_fenced_futures
from services.processor.worker import Processor

log = structlog.get_logger(__name__)


def build_service(settings: Settings) -> Service:
    """The source registry, then the processor's loop (which waits for Kafka first, so
    /healthz answers while Kafka restarts), behind /metrics, /healthz and /readyz."""
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    health = Health(registry)
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    enricher = Enricher(
        geoip_path=settings.geoip_path, ua_cache_size=settings.ua_cache_size, geo_cache_size=settings.geo_cache_size
    )
    processor = Processor(settings, Pipeline(settings, sources, enricher), metrics)

    async def kafka_check() -> tuple[bool, str]:
        return await kafka_ready(settings.kafka_bootstrap)

    async def sources_check() -> tuple[bool, str]:
        return sources.status()

    health.add_check("kafka", kafka_check)
    health.add_check("sources", sources_check)
    health.add_check("consumer", processor.status)
    app = web.Application()
    add_health_routes(app, health)

    async def close_enricher() -> None:
        enricher.close()

    stop = asyncio.Event()

    async def work() -> None:
        quiet_fenced_futures(asyncio.get_running_loop())
        if await _start_when_kafka_answers(processor, settings, stop):
            # GC was about a tenth of the CPU with the default threshold.
            tune_gc(settings.gc_young_threshold)
            await processor.run(stop)

    service = Service("processor", app)
    service.hooks("enricher", stop=close_enricher)
    service.resource("sources", sources.running)
    # Stopped after the loop has drained: leave the group, close the producers.
    service.hooks("processor", stop=processor.close)
    # A drain that overruns leaves the open transaction to be aborted by the partition's next owner.
    service.loop("processor-run", work, stop.set, drain_timeout_s=settings.shutdown_timeout_s)
    return service


async def _start_when_kafka_answers(processor: Processor, settings: Settings, stop: asyncio.Event) -> bool:
    """Kafka may be restarting when the processor starts: wait for it. False when asked to stop first."""
    while True:
        try:
            await processor.start()
        except DependencyUnavailable as exc:
            log.warning("Kafka not ready; retrying", error=str(exc), retry_s=settings.retry_backoff_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(settings.retry_backoff_s, 1.0))
            if stop.is_set():
                return False
        else:
            return True


def _worker(index: int) -> int:
    settings = load_settings(Settings)
    configure_logging(settings.service_name, settings.log_level)
    return run(
        lambda: build_service(settings),
        host=settings.http_host,
        port=settings.http_port,
        worker=index,
        drain_timeout_s=settings.shutdown_timeout_s,
    )


@exit_on_config_error
def main() -> int:
    settings = load_settings(Settings)
    configure_logging(settings.service_name, settings.log_level)
    return supervise(_worker, settings.workers)


if __name__ == "__main__":
    sys.exit(main())
