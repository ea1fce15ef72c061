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
import sys
from collections.abc import AsyncIterator
from importlib import metadata

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
from services.common.process import exit_on_config_error
from services.common.runner import Service, run
from services.common.settings import load_settings
from services.common.sources import SourceRegistry

log = structlog.get_logger(__name__)

try:
    VERSION = metadata.version("headwater")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    VERSION = "0.0.0"


@contextlib.asynccontextmanager
async def kafka_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        compression_type="zstd",
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=1024 * 1024 + 64 * 1024,
    )
    try:
        await producer.start()
    except Exception as exc:
        raise DependencyUnavailable(f"Kafka at {settings.kafka_bootstrap} did not answer: {exc}") from exc
    try:
        yield producer
    finally:
        await producer.stop()


def _service(name: str, health: Health) -> Service:
    app = web.Application()
    add_health_routes(app, health)
    return Service(name, app)


def build_bridge(settings: Settings) -> Service:
    """Sources, topics, Cassandra, the Kafka producer and the Kinesis client, then the
    bridge (and the parity watch) as one loop: one fails, both stop."""
    registry = CollectorRegistry()
    metrics = make_bridge_metrics(registry)
    health = Health(registry)
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    service = _service("bridge", health)
    service.resource("sources", sources.running)
    service.hooks(
        "topics",
        lambda: topics.ensure(
            settings.kafka_bootstrap,
            [
                topics.RAW.spec(settings.raw_topic, settings.raw_partitions),
                topics.DLQ.spec(settings.dlq_topic, settings.dlq_partitions),
            ],
        ),
    )
    store = service.resource("cassandra", lambda: cassandra_store(settings))
    producer = service.resource("kafka producer", lambda: kafka_producer(settings))
    kinesis = service.resource("kinesis", lambda: kinesis_client(settings))
    parity_metrics = make_parity_metrics(registry)
    made: list[tuple[Bridge, ParityWatch]] = []

    async def make_bridge() -> None:
        bridge = Bridge(settings, sources, store.value, kinesis.value, producer.value, metrics, version=VERSION)
        health.add_check("cassandra", store.value.client.ready)
        health.add_check("bridge", bridge.status)
        made.append((bridge, ParityWatch(settings, sources, store.value, parity_metrics)))

    async def kafka_check() -> tuple[bool, str]:
        return await kafka_ready(settings.kafka_bootstrap)

    async def sources_check() -> tuple[bool, str]:
        return sources.status()

    health.add_check("kafka", kafka_check)
    health.add_check("sources", sources_check)
    service.hooks("bridge", make_bridge)
    stop = asyncio.Event()

    async def work() -> None:
        # One fails, both stop (the TaskGroup cancels the other) and the failure is reported.
        bridge, watch = made[0]
        async with asyncio.TaskGroup() as group:
            group.create_task(bridge.run(stop), name="bridge-run")
            if settings.parity_interval_s > 0:
                group.create_task(watch.run(stop), name="parity-watch")

    service.loop("bridge", work, stop.set, drain_timeout_s=settings.shutdown_timeout_s)
    return service


def build_mirror(settings: Settings) -> Service:
    """Sources, topics, the Kafka producer and the Kinesis client, then the mirror's
    consumer (closed by the mirror) and its loop."""
    registry = CollectorRegistry()
    metrics = make_mirror_metrics(registry)
    health = Health(registry)
    sources = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    service = _service("mirror", health)
    service.resource("sources", sources.running)
    service.hooks(
        "topics",
        lambda: topics.ensure(settings.kafka_bootstrap, [topics.DLQ.spec(settings.dlq_topic, settings.dlq_partitions)]),
    )
    producer = service.resource("kafka producer", lambda: kafka_producer(settings))
    kinesis = service.resource("kinesis", lambda: kinesis_client(settings))
    made: list[Mirror] = []

    async def make_mirror() -> None:
        consumer = AIOKafkaConsumer(
            settings.enriched_topic,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.mirror_group_id,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        mirror = Mirror(settings, sources, kinesis.value, consumer, producer.value, metrics, version=VERSION)
        health.add_check("mirror", mirror.status)
        made.append(mirror)

    async def close_mirror() -> None:
        if made:
            await made.pop().close()

    async def sources_check() -> tuple[bool, str]:
        return sources.status()

    health.add_check("sources", sources_check)
    service.hooks("mirror", make_mirror, close_mirror)
    stop = asyncio.Event()

    async def work() -> None:
        await made[0].run(stop)

    service.loop("mirror", work, stop.set, drain_timeout_s=settings.shutdown_timeout_s)
    return service


async def run_migrate(settings: Settings) -> int:
    async with cassandra_store(settings):
        pass
    print(f"keyspace {settings.cassandra_keyspace} is up to date")  # noqa: T201
    return 0


@exit_on_config_error
def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else "bridge"
    commands = ("bridge", "mirror", "migrate")
    if command not in commands:
        raise ConfigError(f"unknown command {command!r}; use one of {', '.join(commands)}")
    settings = load_settings(Settings)
    configure_logging(
        f"{settings.service_name}-{command}" if command == "mirror" else settings.service_name, settings.log_level
    )
    if command == "migrate":
        return uvloop.run(run_migrate(settings))
    build, port = (
        (build_bridge, settings.http_port) if command == "bridge" else (build_mirror, settings.mirror_http_port)
    )
    return run(lambda: build(settings), host=settings.http_host, port=port, drain_timeout_s=settings.shutdown_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
