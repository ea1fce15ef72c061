"""The topics the processor reads and writes, ensured from their declarations
(services/common/topics.py): events.raw, events.enriched and events.dlq at
start (events.raw too, which it only reads, so the changelog can be sized from
it whichever service starts first), the dedupe changelog before it joins the
group (its partitions must cover events.raw's), dest.<name> the first time a
batch routes to one (topic creation cannot be part of a transaction)."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.common import topics
from services.common.errors import ConfigError, DependencyUnavailable
from services.processor.pipeline import Result
from services.processor.settings import Settings


async def ensure_outputs(settings: Settings) -> None:
    """events.raw, events.enriched and events.dlq, created or brought up to date."""
    s = settings
    await topics.ensure(
        s.kafka_bootstrap,
        [
            topics.RAW.spec(s.raw_topic, s.raw_partitions),
            topics.ENRICHED.spec(s.enriched_topic, s.enriched_partitions, retention_ms=s.enriched_retention_ms),
            topics.DLQ.spec(s.dlq_topic, s.dlq_partitions),
        ],
    )


async def ensure_changelog(settings: Settings) -> int:
    """The dedupe changelog, one partition per events.raw partition at least; returns
    events.raw's partition count."""
    s = settings
    partitions = await partition_count(s.kafka_bootstrap, s.raw_topic)
    # Entries older than the window are useless, so retention is the window (plus a margin).
    # A changelog made by an older release was compacted, which refuses the keyless
    # records written now (every transaction would fail): ensure brings it up to date.
    await topics.ensure(
        s.kafka_bootstrap,
        [topics.DEDUPE_CHANGELOG.spec(s.dedupe_changelog, partitions, retention_ms=s.dedupe_window_ms + 3600 * 1000)],
    )
    changelog_partitions = await partition_count(s.kafka_bootstrap, s.dedupe_changelog)
    if changelog_partitions < partitions:
        raise ConfigError(
            f"{s.dedupe_changelog} has {changelog_partitions} partitions but {s.raw_topic} has "
            f"{partitions}; add partitions to the changelog to match"
        )
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
            await topics.ensure(
                s.kafka_bootstrap,
                [
                    topics.DEST.spec(name, s.dest_partitions, retention_ms=s.dest_retention_ms)
                    for name in sorted(wanted)
                ],
            )
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
