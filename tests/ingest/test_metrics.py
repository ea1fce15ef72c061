"""Ingest's hot-path counters as Prometheus reads them (no servers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.ingest.metrics import make_metrics


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_by_path_status_and_source_with_latency_buckets() -> None:
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    for seconds in (0.0004, 0.001, 0.003, 7.0):
        metrics.requests.observe("/v1/track", 200, seconds, "shop")
    metrics.requests.observe("/v1/batch", 413, 0.002)
    got = _samples(registry)
    assert got[("headwater_ingest_requests_total", (("path", "/v1/track"), ("source", "shop"), ("status", "200")))] == 4
    assert got[("headwater_ingest_requests_total", (("path", "/v1/batch"), ("source", ""), ("status", "413")))] == 1

    def bucket(le: str) -> float:
        return got[("headwater_ingest_request_seconds_bucket", (("le", le), ("path", "/v1/track")))]

    # Cumulative, and a value equal to a bound counts in that bound's bucket.
    assert (bucket("0.0005"), bucket("0.001"), bucket("0.0025"), bucket("0.005"), bucket("2.5"), bucket("+Inf")) == (
        1,
        2,
        2,
        3,
        3,
        4,
    )
    assert got[("headwater_ingest_request_seconds_count", (("path", "/v1/track"),))] == 4
    assert abs(got[("headwater_ingest_request_seconds_sum", (("path", "/v1/track"),))] - 7.0044) < 1e-9


def test_events_by_outcome_and_reason() -> None:
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    metrics.events.accepted(20)
    metrics.events.accepted()
    metrics.events.rejected("schema_violation")
    metrics.events.rejected("schema_violation", 2)
    metrics.events.rejected("invalid_json")
    got = _samples(registry)
    assert got[("headwater_ingest_events_total", (("outcome", "accepted"), ("reason", "")))] == 21
    assert got[("headwater_ingest_events_total", (("outcome", "rejected"), ("reason", "schema_violation")))] == 3
    assert got[("headwater_ingest_events_total", (("outcome", "rejected"), ("reason", "invalid_json")))] == 1
    assert metrics.events.count("accepted") == 21 and metrics.events.count("rejected", "invalid_json") == 1
