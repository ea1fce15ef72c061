"""Wiring: the metrics service's resources, in start order, closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from services.common import topics
from services.common.cassandra import CassandraClient
from services.common.health import Health, add_health_routes
from services.common.kafka import kafka_ready
from services.common.sources import SourceRegistry
from services.metrics.api import add_kairos_routes
from services.metrics.consumer import RollupConsumer
from services.metrics.external import ExternalStore
from services.metrics.metrics import make_metrics
from services.metrics.query import QueryService
from services.metrics.settings import Settings
from services.metrics.sink import KairosSink
from services.metrics.store import Store, migrate_schema
from services.metrics.writes import MAX_BODY_BYTES

log = structlog.get_logger(__name__)


def cassandra_client(settings: Settings) -> CassandraClient:
    return CassandraClient(settings.cassandra_hosts, settings.cassandra_port,
                           request_timeout_s=settings.cassandra_timeout_s)


@contextlib.asynccontextmanager
async def _cassandra(settings: Settings) -> AsyncIterator[CassandraClient]:
    client = cassandra_client(settings)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True, client_id="headwater-metrics-side")
    await producer.start()
    try:
        yield producer
    finally:
        await stop_producer(producer, settings.shutdown_timeout_s)


async def stop_producer(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop the side producer within ``timeout_s``: with Kafka down its flush never ends."""
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
    except TimeoutError:
        log.warning("side producer did not stop in time; records not yet acknowledged are dropped "
                    "(no checkpoint passed them)", timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def _sink(sink: KairosSink) -> AsyncIterator[KairosSink]:
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


@contextlib.asynccontextmanager
async def _consuming(consumer: RollupConsumer, timeout_s: float) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run(), name="rollup-consumer")

    def finished(t: asyncio.Task[None]) -> None:
        if t.cancelled() or t.exception() is None:
            return
        # The loop only ends on its own for a bug or a non-retriable error: say so and
        # ask the process to stop (as SIGTERM would), so its supervisor starts it again.
        log.error("rollup consumer failed; stopping the service", error=repr(t.exception()))
        os.kill(os.getpid(), signal.SIGTERM)

    task.add_done_callback(finished)
    try:
        yield task
    finally:
        consumer.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            log.warning("rollup consumer did not drain in time; the checkpoint in Cassandra stands")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception as exc:  # noqa: BLE001 - already logged by the done callback
            log.debug("rollup consumer ended with an error", error=repr(exc))


async def build_app(settings: Settings, *, consume: bool = True,
                    registry: CollectorRegistry | None = None) -> web.Application:
    """The service: Cassandra (schema migrated), side producer, source registry,
    consumer task, optional KairosDB sink, and the HTTP API."""
    registry = registry or CollectorRegistry()
    metrics = make_metrics(registry)
    health = Health(registry)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    stack = contextlib.AsyncExitStack()
    try:
        client = await stack.enter_async_context(_cassandra(settings))
        await migrate_schema(client, settings)
        store = Store(client, settings)
        await store.prepare()
        external = ExternalStore(client, settings)
        await external.prepare()
        health.add_check("cassandra", client.ready)
        add_kairos_routes(app, QueryService(store, external, settings, metrics), client)
        if consume:
            # One rollup writer per keyspace: a second group or topic would mix its partitions' rows.
            await store.claim(settings.consumer_group, settings.enriched_topic)
            await topics.ensure(settings.kafka_bootstrap, [
                topics.LATE.spec(settings.late_topic, settings.late_topic_partitions,
                                 retention_ms=settings.late_topic_retention_ms),
                topics.DLQ.spec(settings.dlq_topic, settings.dlq_partitions),
            ])
            sources = await stack.enter_async_context(
                SourceRegistry(settings.sources_file, settings.sources_reload_s).running())
            producer = await stack.enter_async_context(_producer(settings))
            sink = None
            if settings.kairosdb_url:
                sink = await stack.enter_async_context(_sink(KairosSink(settings, metrics)))
            consumer = RollupConsumer(settings, store, sources, producer, metrics,
                                      on_flush=sink.enqueue if sink else None)
            task = await stack.enter_async_context(_consuming(consumer, settings.shutdown_timeout_s))

            async def consumer_alive() -> tuple[bool, str]:
                if task.done():
                    return False, "stopped"
                problems = consumer.problems()
                return (not problems, "; ".join(problems) or "consuming")

            async def sources_ok() -> tuple[bool, str]:
                return sources.status()

            async def kafka_ok() -> tuple[bool, str]:
                return await kafka_ready(settings.kafka_bootstrap)

            health.add_check("kafka", kafka_ok)
            health.add_check("sources", sources_ok)
            health.add_check("consumer", consumer_alive)
    except BaseException:
        await stack.aclose()
        raise

    async def close(_: web.Application) -> None:
        await stack.aclose()

    app.on_cleanup.append(close)
    add_health_routes(app, health)
    return app
