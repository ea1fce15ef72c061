"""Helpers for processor tests against the real Kafka: settings with unique
topics, an in-process processor, producing envelopes, and subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from services.common.sources import SourceRegistry
from services.processor.enrich import Enricher
from services.processor.metrics import make_metrics
from services.processor.pipeline import Pipeline
from services.processor.settings import Settings
from services.processor.worker import Processor

REPO = Path(__file__).resolve().parents[2]


async def make_settings(
    kafka_bootstrap: str,
    new_topic: Callable[..., Awaitable[str]],
    new_group: Callable[[str], str],
    sources_file: Path,
    *,
    partitions: int = 4,
    **overrides: Any,
) -> Settings:
    raw = await new_topic("raw", partitions=partitions)
    values: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap,
        "raw_topic": raw,
        "enriched_topic": f"{raw}.enriched",
        "dlq_topic": f"{raw}.dlq",
        "dest_topic_prefix": f"{raw}.dest.",
        "group_id": new_group("proc"),
        "sources_file": sources_file,
        "sources_reload_s": 0.2,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "batch_linger_ms": 20,
        "retry_backoff_s": 0.2,
        "enriched_partitions": 3,
        "dlq_partitions": 1,
        "dest_partitions": 1,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a processor subprocess use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_PROCESSOR_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[f"HEADWATER_PROCESSOR_{name.upper()}"] = str(value)
    return env


@contextlib.asynccontextmanager
async def running_processor(settings: Settings) -> AsyncIterator[Processor]:
    """A processor in this event loop, stopped (batch in flight finished) on exit."""
    registry = SourceRegistry(settings.sources_file, settings.sources_reload_s)
    enricher = Enricher(geoip_path=settings.geoip_path, ua_cache_size=100, geo_cache_size=100)
    async with registry.running():
        processor = Processor(settings, Pipeline(settings, registry, enricher), make_metrics(CollectorRegistry()))
        await processor.start()
        stop = asyncio.Event()
        task = asyncio.create_task(processor.run(stop))
        try:
            yield processor
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, 30)
            finally:
                await processor.close()
                enricher.close()


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    headers: list[tuple[str, bytes]] | None = None,
) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    count = 0
    try:
        futures = []
        for key, value in records:
            futures.append(
                await producer.send(topic, value, key=key, headers=headers or [("hw-schema", b"envelope/1")])
            )
            count += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_subprocess(
    settings: Settings, log_path: Path, *, module: str = "services.processor", env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m services.processor`` (or ``module``) with ``settings`` and ``env`` in its environment."""
    log = log_path.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=REPO,
            env={**settings_env(settings), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Sum of the group's committed offsets on ``topic`` (how many raw records it finished)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def wait_committed(bootstrap: str, group: str, topic: str, total: int, timeout_s: float = 60) -> None:
    """Poll until the group has committed ``total`` records of ``topic``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    done = 0
    while loop.time() < deadline:
        try:
            done = await committed_total(bootstrap, group, topic)
        except KafkaError:  # a broker that is (re)starting has no group coordinator yet
            done = 0
        if done >= total:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"group {group} committed {done} of {total} records of {topic}")
