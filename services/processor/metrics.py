"""Every Prometheus metric of the processor, declared by one factory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.plainmetrics import PlainHistogram
from services.processor.pipeline import Kind

if TYPE_CHECKING:
    from aiokafka import TopicPartition

    from services.processor.partitions import Batch, Partition


@dataclass(frozen=True)
class Metrics:
    events_in: Counter
    events_out: Counter
    events_dlq: Counter
    duplicates: Counter
    transactions: Counter
    batch_seconds: Histogram
    latency_seconds: PlainHistogram
    lag: Gauge
    partitions: Gauge
    partitions_stalled: Gauge
    dedupe_entries: Gauge
    dedupe_evicted: Counter
    watchdog_failures: Counter
    stuck_seconds: Gauge


def make_metrics(registry: CollectorRegistry) -> Metrics:  # long: a table of metric declarations
    # Observed once per event: plain numbers, read at scrape time.
    latency = PlainHistogram(
        "headwater_processor_latency_seconds",
        "From ingest's receivedAt to the commit that wrote the event.",
        (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    )
    registry.register(latency)
    return Metrics(
        events_in=Counter("headwater_processor_events_in", "Records read from events.raw.", registry=registry),
        events_out=Counter(
            "headwater_processor_events_out", "Records written, by kind (enriched, dest).", ["kind"], registry=registry
        ),
        # source: the registry's source id, "" when the record named none (an undecodable envelope).
        events_dlq=Counter(
            "headwater_processor_events_dlq",
            "Bad rows written to events.dlq, by failure type and source.",
            ["reason", "source"],
            registry=registry,
        ),
        duplicates=Counter(
            "headwater_processor_events_duplicate",
            "Events dropped as a repeat of (source, messageId) within the window.",
            registry=registry,
        ),
        transactions=Counter(
            "headwater_processor_transactions", "Kafka transactions, by outcome.", ["outcome"], registry=registry
        ),
        # One transaction: a few ms to a few seconds when a broker is slow.
        batch_seconds=Histogram(
            "headwater_processor_batch_seconds",
            "Time to process and commit one batch.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        ),
        # receivedAt at ingest to commit here: sub-second normally, minutes after an outage.
        latency_seconds=latency,
        lag=Gauge(
            "headwater_processor_lag_records",
            "Records behind the high watermark, per raw partition.",
            ["partition"],
            registry=registry,
        ),
        partitions=Gauge(
            "headwater_processor_partitions_assigned", "events.raw partitions this process owns.", registry=registry
        ),
        partitions_stalled=Gauge(
            "headwater_processor_partitions_stalled",
            "Owned events.raw partitions taking no batches: fenced, resetting or not yet open.",
            registry=registry,
        ),
        dedupe_entries=Gauge(
            "headwater_processor_dedupe_entries", "Keys held in the dedupe windows of this process.", registry=registry
        ),
        dedupe_evicted=Counter(
            "headwater_processor_dedupe_evicted",
            "Keys pushed out of a full dedupe window before it expired.",
            registry=registry,
        ),
        # Counted just before the process exits (its supervisor starts it again), so a scrape
        # rarely sees it: alert on stuck_seconds, which grows while the processor is stuck.
        watchdog_failures=Counter(
            "headwater_processor_watchdog_failures",
            "Times the watchdog stopped the processor, by reason (rejoin, no_progress).",
            ["reason"],
            registry=registry,
        ),
        stuck_seconds=Gauge(
            "headwater_processor_stuck_seconds",
            "Seconds out of the consumer group, or in it without progress while records wait.",
            registry=registry,
        ),
    )


def account(m: Metrics, part: Partition, batch: Batch, seconds: float, dedupe_entries: int) -> None:
    """The counts of one committed batch."""
    m.transactions.labels("committed").inc()
    m.batch_seconds.observe(seconds)
    m.events_in.inc(len(batch.records))
    now_ms = time.time() * 1000
    enriched = dest = duplicates = 0
    dlq: dict[tuple[str, str], int] = {}
    latency = m.latency_seconds
    for result in batch.results:
        if result.kind is Kind.ENRICHED:
            enriched += 1
            dest += len(result.destinations)
            if result.received_at_ms:
                latency.observe(max(0.0, (now_ms - result.received_at_ms) / 1000))
        elif result.kind is Kind.DLQ:
            key = (result.reason.value if result.reason else "unknown", result.source_id or "")
            dlq[key] = dlq.get(key, 0) + 1
        else:
            duplicates += 1
    if enriched:
        m.events_out.labels("enriched").inc(enriched)
    if dest:
        m.events_out.labels("dest").inc(dest)
    if duplicates:
        m.duplicates.inc(duplicates)
    for (reason, source), count in dlq.items():
        m.events_dlq.labels(reason, source).inc(count)
    window = part.window
    if window is not None and window.evicted:
        m.dedupe_evicted.inc(window.evicted)
        window.evicted = 0
    m.dedupe_entries.set(dedupe_entries)


def observe_lag(
    m: Metrics,
    parts: dict[TopicPartition, Partition],
    highwater: Callable[[TopicPartition], int | None],
    lagging: set[int],
) -> tuple[set[int], bool]:
    """Lag per owned partition from our own next offset, so a stalled partition's lag
    grows (it is not only updated when a commit happens); the series of partitions no
    longer owned (``lagging`` minus those) are removed. Returns the partitions with a
    series, and whether records wait on any owned partition (or it cannot be told yet)."""
    lag = m.lag
    owned: set[int] = set()
    waiting = False
    for tp, part in parts.items():
        high = highwater(tp)
        if high is not None and part.next_offset is not None:
            lag.labels(str(tp.partition)).set(max(0, high - part.next_offset))
            owned.add(tp.partition)
        waiting = waiting or high is None or part.next_offset is None or high > part.next_offset
    for gone in lagging - owned:
        with contextlib.suppress(KeyError):
            lag.remove(str(gone))
    return owned, waiting
