"""Wiring: the metrics service's components, in start order (stopped in reverse)."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from services.common import topics
from services.common.cassandra import CassandraClient
from services.common.components import Component
from services.common.health import Health, add_health_routes
from services.common.kafka import kafka_ready
from services.common.runner import Service
from services.common.sources import SourceRegistry
from services.metrics.api import add_kairos_routes
from services.metrics.consumer import RollupConsumer
from services.metrics.external import ExternalStore
from services.metrics.metrics import MetricsMetrics, make_metrics
from services.metrics.query import QueryService
from services.metrics.retry import SCHEMA_RETRIABLE, retry
from services.metrics.schema import migrate_schema
from services.metrics.settings import Settings
from services.metrics.sink import KairosSink
from services.metrics.store import Store
from services.metrics.writes import MAX_BODY_BYTES

log = structlog.get_logger(__name__)


def cassandra_client(settings: Settings) -> CassandraClient:
    return CassandraClient(
        settings.cassandra_hosts, settings.cassandra_port, request_timeout_s=settings.cassandra_timeout_s
    )


async def stop_producer(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop the side producer within ``timeout_s``: with Kafka down its flush never ends."""
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
    except TimeoutError:
        log.warning(
            "side producer did not stop in time; records not yet acknowledged are dropped (no checkpoint passed them)",
            timeout_s=timeout_s,
        )


class RollupParts(Component):
    """The side producer (events.late, events.dlq) and the rollup consumer, made when
    started, not when the service is built: an aiokafka client made and never started
    warns when it is collected, as it was when Cassandra refused the start."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        sources: SourceRegistry,
        metrics: MetricsMetrics,
        sink: KairosSink | None,
    ) -> None:
        super().__init__("side producer")
        self.settings, self.store, self.sources, self.metrics, self.sink = settings, store, sources, metrics, sink
        self._consumer: RollupConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    @property
    def consumer(self) -> RollupConsumer:
        if self._consumer is None:
            raise RuntimeError("the rollup consumer is not made yet")
        return self._consumer

    async def _start(self) -> None:
        s = self.settings
        producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, acks="all", enable_idempotence=True, client_id="headwater-metrics-side"
        )
        await producer.start()
        self._producer = producer
        self._consumer = RollupConsumer(
            s, self.store, self.sources, producer, self.metrics, on_flush=self.sink.enqueue if self.sink else None
        )

    async def _stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_producer(producer, self.settings.shutdown_timeout_s)


def build_service(settings: Settings, *, consume: bool = True, registry: CollectorRegistry | None = None) -> Service:
    """The service in start order: Cassandra (schema migrated, the keyspace claimed),
    the source registry, the side producer, the optional KairosDB sink and the
    rollup consumer's loop, behind the HTTP API. Without ``consume``: the query API only."""
    registry = registry or CollectorRegistry()
    metrics = make_metrics(registry)
    health = Health(registry)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    service = Service("metrics", app)
    client = cassandra_client(settings)
    store = Store(client, settings)
    external = ExternalStore(client, settings)
    health.add_check("cassandra", client.ready)
    add_kairos_routes(app, QueryService(store, external, settings, metrics), client)
    add_health_routes(app, health)
    service.hooks("cassandra", client.connect, client.close)

    async def migrate() -> None:
        await migrate_schema(client, settings)
        await store.prepare()
        await external.prepare()

    async def prepare() -> None:
        # A schema change waits for every node to agree on it; one slow or restarting node
        # times it out. Every step is idempotent, so it is simply run again.
        await retry(migrate, what="schema migration", deadline_s=settings.schema_retry_s, retriable=SCHEMA_RETRIABLE)
        if consume:
            # One rollup writer per keyspace: a second group or topic would mix its partitions' rows.
            await store.claim(settings.consumer_group, settings.enriched_topic)
            await topics.ensure(
                settings.kafka_bootstrap,
                [
                    topics.LATE.spec(
                        settings.late_topic,
                        settings.late_topic_partitions,
                        retention_ms=settings.late_topic_retention_ms,
                    ),
                    topics.DLQ.spec(settings.dlq_topic, settings.dlq_partitions),
                ],
            )

    service.hooks("schema", prepare)
    if consume:
        _add_rollups(service, settings, store, metrics, health)
    return service


def _add_rollups(service: Service, settings: Settings, store: Store, metrics: MetricsMetrics, health: Health) -> None:
    """The source registry, the optional KairosDB sink, the side producer and the rollup
    consumer's loop, with their readiness checks."""
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    service.resource("sources", sources.running)
    sink = KairosSink(settings, metrics) if settings.kairosdb_url else None
    if sink is not None:
        service.hooks("kairosdb sink", sink.start, sink.stop)
    parts = service.add(RollupParts(settings, store, sources, metrics, sink))
    # The loop only ends on its own for a bug or a non-retriable error: the service
    # then stops with a failure, so its supervisor starts it again.
    rollups = service.loop(
        "rollup consumer",
        lambda: parts.consumer.run(),
        lambda: parts.consumer.stop(),
        drain_timeout_s=settings.shutdown_timeout_s,
    )

    async def consumer_alive() -> tuple[bool, str]:
        if not rollups.running:
            return False, "stopped"
        problems = parts.consumer.problems()
        return (not problems, "; ".join(problems) or "consuming")

    async def sources_ok() -> tuple[bool, str]:
        return sources.status()

    async def kafka_ok() -> tuple[bool, str]:
        return await kafka_ready(settings.kafka_bootstrap)

    health.add_check("kafka", kafka_ok)
    health.add_check("sources", sources_ok)
    health.add_check("consumer", consumer_alive)


async def build_app(
    settings: Settings, *, consume: bool = True, registry: CollectorRegistry | None = None
) -> web.Application:
    """The service started, as an application whose cleanup stops it (tests, benchmarks)."""
    service = build_service(settings, consume=consume, registry=registry)
    await service.start()

    async def close(_: web.Application) -> None:
        await service.stop()

    service.app.on_cleanup.append(close)
    return service.app
