"""Every Kafka topic of the fleet, declared once: its name setting, partitions,
configs (retention, largest message, cleanup policy), who writes it and who
reads it. proto/topics/*.md describe the same topics for other teams and list
the same writers, readers and configs (tests/common/test_topics.py holds them
to it).

Invariants:

- A topic's configs come from its declaration and nowhere else. Every service
  that writes a topic ensures it with ``ensure``: a missing topic is created
  with the declared partitions and configs, and an existing one whose configs
  drifted (made by whichever service started first in an older release, or by
  hand) is brought back to them. Before this, events.dlq got 2 partitions and
  no configs from ingest, 3 from metrics, 30-day retention and an 8 MiB
  message limit from the processor: whichever started first won.
- A topic with several writers (events.raw, events.dlq) has fixed configs: if
  one writer's setting could change them, two services would rewrite each
  other's configs at every start. A topic with one writer (events.enriched,
  dest.*, events.late, the dedupe changelog) takes its retention from that
  writer's setting, whose default is the one declared here.
- Partitions only matter when a topic is created; an existing topic's count is
  never changed here (more partitions would move keys, and one user's events
  would lose their order). Each writer's partitions setting defaults to the
  declared count, so the first to start creates the same topic whichever it is.
  The dedupe changelog's count follows events.raw's (the processor checks it).
- Only declared configs are changed; other per-topic overrides an operator set
  are kept (services/common/kafka.py ``ensure_topic_configs``).
- Replication is declared too: the production shape is 3 replicas and
  ``min.insync.replicas`` 2, so with acks=all a write is on two brokers before
  it is acknowledged and one broker lost stops nothing (tests/cluster/). A topic
  is created with the declared factor, or with as many replicas as the cluster
  has brokers when it has fewer (a one-broker development stack), with a
  warning. ``min.insync.replicas`` is the declared value capped at the topic's
  own replication factor minus one (at least 1): a topic made with fewer
  replicas (or by an older release, with one) stays writable, and it is
  ensured as a config like the others. The replication of an existing topic is
  never changed here (that is a partition reassignment, an operator's job).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import DependencyUnavailable
from services.common.kafka import (
    TopicSpec,
    ensure_topic_configs,
    ensure_topics,
    replication_factors,
)

DAY_MS = 24 * 3600 * 1000
MIB = 1024 * 1024
MIN_INSYNC = "min.insync.replicas"


def min_insync(declared: int, replication: int) -> int:
    """The declared ``min.insync.replicas``, at most the replication factor minus one, at least 1."""
    return max(1, min(declared, replication - 1))


@dataclass(frozen=True)
class Topic:
    """One topic's declaration. ``retention_setting`` names the setting of the topic's
    single writer that may change the retention; None: the retention is fixed."""

    default_name: str
    name_setting: str
    partitions: int
    retention_ms: int
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    doc: str
    max_message_bytes: int | None = None  # None: the broker's default (1 MiB)
    cleanup_policy: str = "delete"
    retention_setting: str | None = None
    replication: int = 3
    min_insync_replicas: int = 2

    def configs(self, retention_ms: int | None = None) -> dict[str, str]:
        """The topic-level configs every writer ensures (and ``min.insync.replicas``, which
        ``ensure`` works out from the topic's actual replication factor)."""
        if retention_ms is not None and retention_ms != self.retention_ms and self.retention_setting is None:
            raise ValueError(
                f"{self.default_name} has several writers: its retention is fixed "
                f"at {self.retention_ms} ms in services/common/topics.py"
            )
        configs = {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms if retention_ms is None else retention_ms),
        }
        if self.max_message_bytes is not None:
            configs["max.message.bytes"] = str(self.max_message_bytes)
        return configs

    def spec(self, name: str, partitions: int, *, retention_ms: int | None = None) -> TopicSpec:
        """What ``ensure`` creates or brings up to date, under the name a service's settings give."""
        return TopicSpec(
            name,
            partitions,
            self.replication,
            configs=self.configs(retention_ms),
            min_insync_replicas=self.min_insync_replicas,
        )

    def replication_doc(self) -> str:
        """The replication as proto/topics/*.md write it."""
        return f"replication {self.replication}, `{MIN_INSYNC}={self.min_insync_replicas}`"

    def configs_doc(self) -> str:
        """The configs as proto/topics/*.md write them (one-writer topics: the default)."""
        return ", ".join(f"`{k}={v}`" for k, v in sorted(self.configs().items()))


RAW = Topic(
    default_name="events.raw",
    name_setting="raw_topic",
    partitions=8,
    retention_ms=7 * DAY_MS,
    writers=("ingest", "bridge"),
    readers=("processor",),
    doc="events.raw.md",
)

ENRICHED = Topic(
    default_name="events.enriched",
    name_setting="enriched_topic",
    partitions=8,
    retention_ms=7 * DAY_MS,
    retention_setting="HEADWATER_PROCESSOR_ENRICHED_RETENTION_MS",
    writers=("processor",),
    readers=("metrics", "mirror", "parity", "sinks"),
    doc="events.enriched.md",
)

# Bad rows carry their original: up to 8 MiB (the processor's producer request ceiling,
# HEADWATER_PROCESSOR_MAX_REQUEST_BYTES) so a large one does not fail a transaction on
# every retry. 30 days: people read it, and a fix may take a while.
DLQ = Topic(
    default_name="events.dlq",
    name_setting="dlq_topic",
    partitions=2,
    retention_ms=30 * DAY_MS,
    max_message_bytes=8 * MIB,
    writers=("ingest", "processor", "metrics", "bridge", "mirror"),
    readers=("people", "replay tools"),
    doc="events.dlq.md",
)

LATE = Topic(
    default_name="events.late",
    name_setting="late_topic",
    partitions=3,
    retention_ms=7 * DAY_MS,
    retention_setting="HEADWATER_METRICS_LATE_TOPIC_RETENTION_MS",
    writers=("metrics",),
    readers=("people", "backfills"),
    doc="events.late.md",
)

# The name is the prefix setting plus a destination name from sources.json.
DEST = Topic(
    default_name="dest.",
    name_setting="dest_topic_prefix",
    partitions=4,
    retention_ms=7 * DAY_MS,
    retention_setting="HEADWATER_PROCESSOR_DEST_RETENTION_MS",
    writers=("processor",),
    readers=("destination workers",),
    doc="dest.md",
)

# "<group id>.dedupe-changelog" unless named; partitions = events.raw's; records have no
# key, so it must not be compacted; entries older than the dedupe window are useless,
# so retention is the window plus a margin (the processor passes it).
DEDUPE_CHANGELOG = Topic(
    default_name="<group id>.dedupe-changelog",
    name_setting="dedupe_topic",
    partitions=RAW.partitions,
    retention_ms=DAY_MS + 3600 * 1000,
    retention_setting="HEADWATER_PROCESSOR_DEDUPE_WINDOW_MS (+ 1 h)",
    writers=("processor",),
    readers=("processor",),
    doc="events.enriched.md",
)

ALL: tuple[Topic, ...] = (RAW, ENRICHED, DLQ, LATE, DEST, DEDUPE_CHANGELOG)


async def ensure(bootstrap: str, specs: Iterable[TopicSpec], *, timeout_ms: int = 30_000) -> None:
    """Create the topics that are missing (with no more replicas than the cluster has
    brokers), then bring every one's configs up to date (``min.insync.replicas`` from
    the topic's actual replication factor)."""
    specs = list(specs)
    await ensure_topics(bootstrap, specs, timeout_ms=timeout_ms)
    factors = await _replication_factors(
        bootstrap, [s.name for s in specs if s.min_insync_replicas], timeout_ms=timeout_ms
    )
    for spec in specs:
        configs = dict(spec.configs)
        if spec.min_insync_replicas:
            # Unknown (not in the metadata after several tries): 1, which never makes a topic unwritable.
            configs[MIN_INSYNC] = str(min_insync(spec.min_insync_replicas, factors.get(spec.name, 1)))
        if configs:
            await ensure_configs(bootstrap, spec.name, configs, timeout_ms=timeout_ms)


async def _replication_factors(
    bootstrap: str, names: list[str], *, tries: int = 5, timeout_ms: int = 30_000
) -> dict[str, int]:
    """replication_factors, given a moment: a topic created a moment ago may not be in the
    metadata of the broker asked yet."""
    factors: dict[str, int] = {}
    for attempt in range(1, tries + 1):
        factors = await replication_factors(bootstrap, names, timeout_ms=timeout_ms)
        if len(factors) == len(set(names)):
            break
        await asyncio.sleep(0.2 * attempt)
    return factors


async def ensure_configs(
    bootstrap: str, topic: str, configs: dict[str, str], *, tries: int = 5, timeout_ms: int = 30_000
) -> dict[str, str]:
    """ensure_topic_configs, given a moment: a topic created a moment ago may not be in
    the metadata of the broker asked yet (error 3, unknown topic). Returns what changed."""
    for attempt in range(1, tries + 1):
        try:
            return await ensure_topic_configs(bootstrap, topic, configs, timeout_ms=timeout_ms)
        except DependencyUnavailable:
            if attempt == tries:
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
