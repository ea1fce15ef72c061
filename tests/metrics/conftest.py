"""Fixtures of the metrics tests: a settings factory on fresh topics and a fresh keyspace."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.metrics.settings import Settings
from tests.metrics.helpers import write_sources

SUMS = {"web": ["revenue"], "srv": ["revenue", "quantity"]}

MakeSettings = Callable[..., Awaitable[Settings]]


@pytest.fixture
def metrics_settings(
    kafka_bootstrap: str,
    cassandra_port: int,
    new_topic: Callable[..., Awaitable[str]],
    new_group: Callable[[str], str],
    new_keyspace: Callable[[], str],
    tmp_path: Path,
) -> MakeSettings:
    """Factory: Settings on a fresh enriched topic (``partitions``), late and DLQ topics,
    consumer group and keyspace; keyword overrides win."""

    async def make(partitions: int = 3, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap": kafka_bootstrap,
            "enriched_topic": await new_topic("enriched", partitions=partitions),
            "late_topic": await new_topic("late"),
            "dlq_topic": await new_topic("dlq"),
            "consumer_group": new_group("metrics"),
            "cassandra_port": cassandra_port,
            "cassandra_keyspace": new_keyspace(),
            "sources_file": write_sources(tmp_path / "sources.json", SUMS),
            "flush_interval_s": 0.2,
            # Rows of windows closed 10 minutes behind the watermark leave the cache; events up to
            # 30 minutes old still count (read back); older ones go to the late topic.
            "allowed_lateness_s": 600.0,
            "max_event_age_s": 1800.0,
            "http_port": 0,
        }
        values.update(overrides)
        return Settings(**values)

    return make
