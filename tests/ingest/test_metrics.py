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


def test_events_by_outcome_reason_and_source() -> None:
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    assert (
        _samples(registry)[("headwater_ingest_events_total", (("outcome", "accepted"), ("reason", ""), ("source", "")))]
        == 0
    ), "the accepted series exists before the first event"
    metrics.events.accepted(20, "shop")
    metrics.events.accepted(1, "app")
    metrics.events.rejected("schema_violation", source="shop")
    metrics.events.rejected("schema_violation", 2, source="app")
    metrics.events.rejected("invalid_json")
    got = _samples(registry)

    def events(outcome: str, reason: str, source: str) -> float:
        return got[("headwater_ingest_events_total", (("outcome", outcome), ("reason", reason), ("source", source)))]

    assert events("accepted", "", "shop") == 20 and events("accepted", "", "app") == 1
    assert events("rejected", "schema_violation", "shop") == 1
    assert events("rejected", "schema_violation", "app") == 2
    assert events("rejected", "invalid_json", "") == 1
    assert ("headwater_ingest_events_total", (("outcome", "accepted"), ("reason", ""), ("source", ""))) not in got
    assert metrics.events.count("accepted") == 21 and metrics.events.count("rejected", "schema_violation") == 3
