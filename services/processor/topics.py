"""The topics the processor reads and writes: events.raw, events.enriched and
events.dlq ensured at start, the dedupe changelog before it joins the group
(its partitions must cover events.raw's), dest.<name> the first time a batch
routes to one (topic creation cannot be part of a transaction)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.common.errors import ConfigError, DependencyUnavailable
from services.common.kafka import TopicSpec, ensure_topic_configs, ensure_topics
from services.processor.pipeline import Result
from services.processor.settings import Settings


async def ensure_outputs(settings: Settings) -> None:
    """events.raw, events.enriched and events.dlq (30-day retention, bad rows up to the request size)."""
    s = settings
    await ensure_topics(s.kafka_bootstrap, [
        TopicSpec(s.raw_topic, s.raw_partitions),
        TopicSpec(s.enriched_topic, s.enriched_partitions, configs={"retention.ms": str(s.enriched_retention_ms)}),
        TopicSpec(s.dlq_topic, s.dlq_partitions,
                  configs={"retention.ms": str(s.dlq_retention_ms), "max.message.bytes": str(s.max_request_bytes)}),
    ])


async def ensure_changelog(settings: Settings) -> int:
    """The dedupe changelog, one partition per events.raw partition at least; returns
    events.raw's partition count."""
    s = settings
    partitions = await partition_count(s.kafka_bootstrap, s.raw_topic)
    # Entries older than the window are useless, so retention is the window (plus a margin).
    configs = {"cleanup.policy": "delete", "retention.ms": str(s.dedupe_window_ms + 3600 * 1000)}
    await ensure_topics(s.kafka_bootstrap, [TopicSpec(s.dedupe_changelog, partitions, configs=configs)])
    # A changelog made by an older release was compacted, which refuses the keyless
    # records written now (every transaction would fail): bring it up to date.
    await _ensure_configs(s.kafka_bootstrap, s.dedupe_changelog, configs)
    changelog_partitions = await partition_count(s.kafka_bootstrap, s.dedupe_changelog)
    if changelog_partitions < partitions:
        raise ConfigError(
            f"{s.dedupe_changelog} has {changelog_partitions} partitions but {s.raw_topic} has "
            f"{partitions}; add partitions to the changelog to match")
    return partitions


class DestTopics:
    """dest.<name> topics, created the first time a batch routes to them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._known: set[str] = set()

    async def ensure(self, results: Iterable[Result]) -> None:
        s = self.settings
        names: set[str] = set()
        for r in results:
            if r.destinations:
                names.update(r.destinations)
        wanted = {s.dest_topic_prefix + name for name in names} - self._known
        if wanted:
            await ensure_topics(s.kafka_bootstrap, [
                TopicSpec(name, s.dest_partitions, configs={"retention.ms": str(s.dest_retention_ms)})
                for name in sorted(wanted)])
            self._known |= wanted


async def partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        [described] = await admin.describe_topics([topic])
    except KafkaError as exc:
        raise DependencyUnavailable(f"Kafka at {bootstrap} did not describe {topic}: {exc}") from exc
    finally:
        await admin.close()
    if described["error_code"] or not described["partitions"]:
        raise DependencyUnavailable(f"topic {topic} is not available (error {described['error_code']})")
    return len(described["partitions"])


async def _ensure_configs(bootstrap: str, topic: str, configs: dict[str, str], tries: int = 5) -> None:
    """ensure_topic_configs, given a moment: a topic created a moment ago may not be in
    the metadata of the broker asked yet (error 3, unknown topic)."""
    for attempt in range(1, tries + 1):
        try:
            await ensure_topic_configs(bootstrap, topic, configs)
        except DependencyUnavailable:
            if attempt == tries:
                raise
            await asyncio.sleep(0.2 * attempt)
        else:
            return
