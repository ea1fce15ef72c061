"""Every Prometheus metric of the ingest service, made by one factory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common.plainmetrics import PlainHistogram


class ConnectionCounts(Protocol):
    open: int
    refused_total: int


REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5)


class RequestStats:
    """Requests by route, status and source, and their latency by route.

    Every request lands here, so the hot path only bumps plain numbers (no
    label lookup, no lock: a worker is one thread); Prometheus reads them at
    scrape time as ``headwater_ingest_requests_total`` and the histogram
    ``headwater_ingest_request_seconds``. ``source`` is the registry's source
    id (never a write key), empty when the request named no valid source.
    """

    def __init__(self, buckets: tuple[float, ...] = REQUEST_BUCKETS) -> None:
        self._counts: dict[tuple[str, int, str], int] = {}
        self.latency = PlainHistogram(
            "headwater_ingest_request_seconds", "Request handling time by route", buckets, ["path"]
        )

    def observe(self, path: str, status: int, seconds: float, source: str = "") -> None:
        key = (path, status, source)
        self._counts[key] = self._counts.get(key, 0) + 1
        self.latency.observe(seconds, path)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "headwater_ingest_requests",
            "HTTP requests by route, status and source",
            labels=["path", "status", "source"],
        )
        for (path, status, source), n in sorted(self._counts.items()):
            requests.add_metric([path, str(status), source], n)
        yield requests
        yield from self.latency.collect()


class EventCounts:
    """Events by outcome, reason and source, as ``headwater_ingest_events_total``;
    plain numbers on the hot path, read by Prometheus at scrape time. ``source`` is
    the registry's source id (never a write key), empty when the request named no
    valid source (an unknown key, a body that is not JSON)."""

    def __init__(self) -> None:
        self._accepted: dict[str, int] = {}
        self._rejected: dict[tuple[str, str], int] = {}

    def accepted(self, n: int = 1, source: str = "") -> None:
        self._accepted[source] = self._accepted.get(source, 0) + n

    def rejected(self, reason: str, n: int = 1, source: str = "") -> None:
        key = (reason, source)
        self._rejected[key] = self._rejected.get(key, 0) + n

    def count(self, outcome: str, reason: str = "") -> int:
        """All sources together: the accepted, or the rejected for ``reason``."""
        if outcome == "accepted":
            return sum(self._accepted.values())
        return sum(n for (r, _), n in self._rejected.items() if r == reason)

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "headwater_ingest_events",
            "Events by outcome (accepted, rejected), reason and source",
            labels=["outcome", "reason", "source"],
        )
        if not self._accepted:
            events.add_metric(["accepted", "", ""], 0)  # the series exists from the start
        for source, n in sorted(self._accepted.items()):
            events.add_metric(["accepted", "", source], n)
        for (reason, source), n in sorted(self._rejected.items()):
            events.add_metric(["rejected", reason, source], n)
        yield events


class ConnectionStats:
    """Client connections of this process, read from the connection guard at
    scrape time: ``headwater_ingest_connections_open`` and
    ``headwater_ingest_connections_refused_total``."""

    def __init__(self, guard: ConnectionCounts) -> None:
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("headwater_ingest_connections_open", "Open client connections", value=self._guard.open)
        yield CounterMetricFamily(
            "headwater_ingest_connections_refused",
            "Client connections answered 503 because max_connections were open",
            value=self._guard.refused_total,
        )


@dataclass(frozen=True)
class IngestMetrics:
    requests: RequestStats
    events: EventCounts
    kafka_ack_seconds: Histogram
    spool_events: Gauge
    spool_bytes: Gauge
    spool_max_bytes: Gauge
    spooling: Gauge
    spool_damaged_segments: Gauge
    spooled_after_timeout: Counter
    bad_pixels: Counter
    sources_loaded: Gauge


def make_metrics(registry: CollectorRegistry) -> IngestMetrics:
    requests, events = RequestStats(), EventCounts()
    registry.register(requests)
    registry.register(events)
    return IngestMetrics(
        requests=requests,
        events=events,
        # Kafka acks with acks=all land in milliseconds; spool fallbacks at the timeout.
        kafka_ack_seconds=Histogram(
            "headwater_ingest_kafka_ack_seconds",
            "Time from a flush of batched events to Kafka's acknowledgement of all of them",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        ),
        spool_events=Gauge(
            "headwater_ingest_spool_events", "Events in the local spool, not yet in Kafka", registry=registry
        ),
        spool_bytes=Gauge(
            "headwater_ingest_spool_bytes", "Bytes in the local spool, not yet in Kafka", registry=registry
        ),
        spool_max_bytes=Gauge(
            "headwater_ingest_spool_max_bytes",
            "The spool's size limit (spool_max_bytes); at it, new events get 503",
            registry=registry,
        ),
        spooling=Gauge(
            "headwater_ingest_spooling", "1 while new events go to the spool instead of Kafka", registry=registry
        ),
        spool_damaged_segments=Gauge(
            "headwater_ingest_spool_damaged_segments",
            "Spool segments set aside because a frame failed its CRC; an operator must inspect them",
            registry=registry,
        ),
        spooled_after_timeout=Counter(
            "headwater_ingest_spooled_after_timeout",
            "Events spooled after a Kafka send timed out; Kafka may also get them (a duplicate)",
            registry=registry,
        ),
        bad_pixels=Counter(
            "headwater_ingest_bad_pixels",
            "Tracking pixel requests that could not be read",
            ["reason"],
            registry=registry,
        ),
        sources_loaded=Gauge("headwater_ingest_sources_loaded", "Sources in the registry", registry=registry),
    )
