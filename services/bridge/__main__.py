"""headwater-bridge: run beside the legacy Kinesis path.

    headwater-bridge [bridge]   legacy streams -> events.raw (several processes split the shards)
    headwater-bridge mirror     events.enriched -> legacy streams
    headwater-bridge migrate    create / migrate the lease, checkpoint and parity tables

Configured by HEADWATER_BRIDGE_* variables (services/bridge/settings.py) and
the standard AWS variables; which sources go which way is in sources.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib import metadata
from typing import Any

import structlog
import uvloop
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from services.bridge.bridge import Bridge
from services.bridge.kinesis import kinesis_client
from services.bridge.metrics import make_bridge_metrics, make_mirror_metrics, make_parity_metrics
from services.bridge.mirror import Mirror
from services.bridge.report import ParityWatch
from services.bridge.settings import Settings
from services.bridge.store import cassandra_store
from services.common import topics
from services.common.errors import ConfigError, DependencyUnavailable
from services.common.health import Health, add_health_routes
from services.common.kafka import kafka_ready
from services.common.logging import configure_logging
from services.common.runner import exit_on_config_error
from services.common.settings import load_settings
from services.common.sources import SourceRegistry

log = structlog.get_logger(__name__)

try:
    VERSION = metadata.version("headwater")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    VERSION = "0.0.0"

@contextlib.asynccontextmanager
async def kafka_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True,
                                compression_type="zstd", linger_ms=5, max_batch_size=256 * 1024,
                                max_request_size=1024 * 1024 + 64 * 1024)
    try:
        await producer.start()
    except Exception as exc:
        raise DependencyUnavailable(f"Kafka at {settings.kafka_bootstrap} did not answer: {exc}") from exc
    try:
        yield producer
    finally:
        await producer.stop()


async def _serve_http(stack: contextlib.AsyncExitStack, settings: Settings, port: int, health: Health) -> None:
    app = web.Application()
    add_health_routes(app, health)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, settings.http_host, port, reuse_port=True).start()
    log.info("serving", port=port)


async def _until_stopped(work: Callable[[asyncio.Event], Coroutine[Any, Any, None]], what: str,
                         shutdown_timeout_s: float) -> int:
    """Run ``work(stop)`` until SIGTERM/SIGINT (then drain, bounded) or until it fails."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # only asks for a stop; the drain is below
    task = asyncio.create_task(work(stop), name=what)
    stopped = asyncio.create_task(stop.wait(), name="stop-wait")
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        log.info("draining", timeout_s=shutdown_timeout_s)
        try:
            await asyncio.wait_for(task, shutdown_timeout_s)
        except TimeoutError:
            log.warning("drain timed out", what=what)
            return 0
    failure = task.exception()
    if failure is not None:
        log.error("loop failed", what=what, error=repr(failure), exc_info=failure)
        return 1
    return 0


async def serve_bridge(settings: Settings) -> int:
    registry = CollectorRegistry()
    metrics = make_bridge_metrics(registry)
    health = Health(registry)
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(sources.running())
        await topics.ensure(settings.kafka_bootstrap, [
            topics.RAW.spec(settings.raw_topic, settings.raw_partitions),
            topics.DLQ.spec(settings.dlq_topic, settings.dlq_partitions)])
        store = await stack.enter_async_context(cassandra_store(settings))
        producer = await stack.enter_async_context(kafka_producer(settings))
        kinesis = await stack.enter_async_context(kinesis_client(settings))
        bridge = Bridge(settings, sources, store, kinesis, producer, metrics, version=VERSION)

        async def kafka_check() -> tuple[bool, str]:
            return await kafka_ready(settings.kafka_bootstrap)

        async def sources_check() -> tuple[bool, str]:
            return sources.status()

        health.add_check("kafka", kafka_check)
        health.add_check("cassandra", store.client.ready)
        health.add_check("sources", sources_check)
        health.add_check("bridge", bridge.status)
        watch = ParityWatch(settings, sources, store, make_parity_metrics(registry))

        async def work(stop: asyncio.Event) -> None:
            # One fails, both stop (the TaskGroup cancels the other) and the failure is reported.
            async with asyncio.TaskGroup() as group:
                group.create_task(bridge.run(stop), name="bridge-run")
                if settings.parity_interval_s > 0:
                    group.create_task(watch.run(stop), name="parity-watch")

        await _serve_http(stack, settings, settings.http_port, health)
        return await _until_stopped(work, "bridge", settings.shutdown_timeout_s)
    return 0


async def serve_mirror(settings: Settings) -> int:
    registry = CollectorRegistry()
    metrics = make_mirror_metrics(registry)
    health = Health(registry)
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(sources.running())
        await topics.ensure(settings.kafka_bootstrap, [topics.DLQ.spec(settings.dlq_topic, settings.dlq_partitions)])
        producer = await stack.enter_async_context(kafka_producer(settings))
        kinesis = await stack.enter_async_context(kinesis_client(settings))
        consumer = AIOKafkaConsumer(settings.enriched_topic, bootstrap_servers=settings.kafka_bootstrap,
                                    group_id=settings.mirror_group_id, isolation_level="read_committed",
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        mirror = Mirror(settings, sources, kinesis, consumer, producer, metrics, version=VERSION)
        stack.push_async_callback(mirror.close)

        async def sources_check() -> tuple[bool, str]:
            return sources.status()

        health.add_check("sources", sources_check)
        health.add_check("mirror", mirror.status)
        await _serve_http(stack, settings, settings.mirror_http_port, health)
        return await _until_stopped(mirror.run, "mirror", settings.shutdown_timeout_s)
    return 0


async def run_migrate(settings: Settings) -> int:
    async with cassandra_store(settings):
        pass
    print(f"keyspace {settings.cassandra_keyspace} is up to date")  # noqa: T201
    return 0


@exit_on_config_error
def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else "bridge"
    runners = {"bridge": serve_bridge, "mirror": serve_mirror, "migrate": run_migrate}
    if command not in runners:
        raise ConfigError(f"unknown command {command!r}; use one of {', '.join(runners)}")
    settings = load_settings(Settings)
    configure_logging(f"{settings.service_name}-{command}" if command == "mirror" else settings.service_name,
                      settings.log_level)
    return uvloop.run(runners[command](settings))


if __name__ == "__main__":
    sys.exit(main())
