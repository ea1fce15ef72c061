"""headwater-processor: run the processor (one or more processes in one consumer group)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import structlog
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.common.errors import DependencyUnavailable
from services.common.health import Health, add_health_routes
from services.common.kafka import kafka_ready
from services.common.logging import configure_logging
from services.common.runner import exit_on_config_error, supervise, tune_gc
from services.common.settings import load_settings
from services.common.sources import SourceRegistry
from services.processor.enrich import Enricher
from services.processor.metrics import make_metrics
from services.processor.pipeline import Pipeline
from services.processor.settings import Settings
from services.processor.worker import Processor

log = structlog.get_logger(__name__)


async def serve(settings: Settings, worker: int = 0) -> int:
    """Run until SIGTERM/SIGINT, then drain: finish the batch in flight (bounded), leave the group."""
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    health = Health(registry)
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    enricher = Enricher(geoip_path=settings.geoip_path, ua_cache_size=settings.ua_cache_size,
                        geo_cache_size=settings.geo_cache_size)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The handler only asks for a stop; the drain happens below.
        loop.add_signal_handler(sig, stop.set)

    async with contextlib.AsyncExitStack() as stack:
        stack.callback(enricher.close)
        await stack.enter_async_context(sources.running())
        processor = Processor(settings, Pipeline(settings, sources, enricher), metrics)
        stack.push_async_callback(processor.close)

        await _serve_http(stack, settings, health, sources, processor)
        log.info("serving", port=settings.http_port, worker=worker)
        if not await _start_when_kafka_answers(processor, settings, stop):
            return 0

        # GC was about a tenth of the CPU with the default threshold.
        tune_gc(settings.gc_young_threshold)
        work = asyncio.create_task(processor.run(stop), name="processor-run")
        stopped = asyncio.create_task(stop.wait(), name="stop-wait")
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            stopped.cancel()
            failure = work.exception()
            if failure is not None:
                log.error("processor loop failed", error=repr(failure), exc_info=failure)
                return 1
            return 0
        log.info("draining", timeout_s=settings.shutdown_timeout_s)
        try:
            await asyncio.wait_for(work, settings.shutdown_timeout_s)
        except TimeoutError:
            # The open transaction is aborted by the next owner of the partition.
            log.warning("drain timed out; leaving the open transaction to be fenced")
    return 0


async def _serve_http(stack: contextlib.AsyncExitStack, settings: Settings, health: Health,
                      sources: SourceRegistry, processor: Processor) -> None:
    """/metrics, /healthz and /readyz (Kafka, the source registry, the consumer's partitions)."""

    async def kafka_check() -> tuple[bool, str]:
        return await kafka_ready(settings.kafka_bootstrap)

    async def sources_check() -> tuple[bool, str]:
        return sources.status()

    health.add_check("kafka", kafka_check)
    health.add_check("sources", sources_check)
    health.add_check("consumer", processor.status)
    app = web.Application()
    add_health_routes(app, health)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, settings.http_host, settings.http_port, reuse_port=True).start()


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


def _worker(index: int) -> None:
    settings = load_settings(Settings)
    configure_logging(settings.service_name, settings.log_level)
    code = uvloop.run(serve(settings, index))
    if code:
        sys.exit(code)


@exit_on_config_error
def main() -> int:
    settings = load_settings(Settings)
    configure_logging(settings.service_name, settings.log_level)
    if settings.workers > 1:
        return supervise(_worker, settings.workers)
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
