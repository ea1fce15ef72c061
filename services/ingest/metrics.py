"""Every Prometheus metric of the ingest service, made by one factory."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase


@dataclass(frozen=True)
class IngestMetrics:
    requests: Counter
    events: Counter
    kafka_ack_seconds: Histogram
    request_seconds: Histogram
    spool_events: Gauge
    spool_bytes: Gauge
    spooling: Gauge
    spooled_after_timeout: Counter
    bad_pixels: Counter
    sources_loaded: Gauge
    _children: dict[tuple[object, ...], MetricWrapperBase] = field(default_factory=dict)

    # Label lookups cost more than the increment; the hot path reuses children.
    def request(self, path: str, status: int) -> Counter:
        key = ("req", path, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(path, str(status))
        return child  # type: ignore[return-value]

    def latency(self, path: str) -> Histogram:
        key = ("lat", path)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.request_seconds.labels(path)
        return child  # type: ignore[return-value]

    @cached_property
    def accepted(self) -> Counter:
        return self.events.labels("accepted", "")


def make_metrics(registry: CollectorRegistry) -> IngestMetrics:
    return IngestMetrics(
        requests=Counter("headwater_ingest_requests", "HTTP requests by route and status",
                         ["path", "status"], registry=registry),
        events=Counter("headwater_ingest_events", "Events by outcome (accepted, rejected) and reason",
                       ["outcome", "reason"], registry=registry),
        # Kafka acks with acks=all land in milliseconds; spool fallbacks at the timeout.
        kafka_ack_seconds=Histogram(
            "headwater_ingest_kafka_ack_seconds", "Time from send to Kafka acknowledgement of a request's events",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry),
        request_seconds=Histogram(
            "headwater_ingest_request_seconds", "Request handling time by route",
            ["path"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5),
            registry=registry),
        spool_events=Gauge("headwater_ingest_spool_events", "Events in the local spool, not yet in Kafka",
                           registry=registry),
        spool_bytes=Gauge("headwater_ingest_spool_bytes", "Bytes in the local spool, not yet in Kafka",
                          registry=registry),
        spooling=Gauge("headwater_ingest_spooling", "1 while new events go to the spool instead of Kafka",
                       registry=registry),
        spooled_after_timeout=Counter(
            "headwater_ingest_spooled_after_timeout",
            "Events spooled after a Kafka send timed out; Kafka may also get them (a duplicate)",
            registry=registry),
        bad_pixels=Counter("headwater_ingest_bad_pixels", "Tracking pixel requests that could not be read",
                           ["reason"], registry=registry),
        sources_loaded=Gauge("headwater_ingest_sources_loaded", "Sources in the registry", registry=registry),
    )
