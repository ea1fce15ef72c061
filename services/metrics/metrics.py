"""Every Prometheus metric of the metrics service, declared by one factory."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class MetricsMetrics:
    events: Counter
    late: Counter
    bad: Counter
    replay_skipped: Counter
    rows_written: Counter
    flushes: Histogram
    flush_errors: Counter
    cached_rows: Gauge
    halted_partitions: Gauge
    partition_problems: Counter
    watermark_lag: Gauge
    queries: Counter
    query_seconds: Histogram
    external_points: Counter
    sink_points: Counter
    sink_errors: Counter
    sink_dropped: Counter


def make_metrics(registry: CollectorRegistry) -> MetricsMetrics:  # long: a table of metric declarations
    """Declare the service's metrics on ``registry`` (one registry per process or test)."""
    return MetricsMetrics(
        events=Counter("headwater_metrics_events_total", "Enriched events rolled up", ["type"], registry=registry),
        late=Counter(
            "headwater_metrics_dropped_late_total",
            "Events some or all resolutions cannot hold (max_event_age: none; retention: some), sent to the late topic",
            ["source", "reason"],
            registry=registry,
        ),
        bad=Counter(
            "headwater_metrics_bad_input_total",
            "Records that were not a usable enriched event",
            ["reason"],
            registry=registry,
        ),
        replay_skipped=Counter(
            "headwater_metrics_replay_skipped_total",
            "Window updates skipped because the stored window already held them",
            registry=registry,
        ),
        rows_written=Counter(
            "headwater_metrics_rows_written_total", "Rollup rows upserted", ["resolution"], registry=registry
        ),
        flushes=Histogram(
            "headwater_metrics_flush_seconds",
            "Time to write a flush and its checkpoints",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        ),
        flush_errors=Counter(
            "headwater_metrics_flush_errors_total", "Flushes that failed and were retried", registry=registry
        ),
        cached_rows=Gauge("headwater_metrics_cached_rows", "Window rows held in memory", registry=registry),
        halted_partitions=Gauge(
            "headwater_metrics_halted_partitions",
            "Owned partitions halted because their checkpoint is ahead of the topic's end",
            registry=registry,
        ),
        partition_problems=Counter(
            "headwater_metrics_partition_problems_total",
            "Partitions resumed from a checkpoint the topic does not match (checkpoint_ahead, records_expired)",
            ["reason"],
            registry=registry,
        ),
        watermark_lag=Gauge(
            "headwater_metrics_watermark_lag_seconds",
            "Wall clock minus the oldest partition watermark",
            registry=registry,
        ),
        queries=Counter("headwater_metrics_queries_total", "KairosDB API queries", ["outcome"], registry=registry),
        query_seconds=Histogram(
            "headwater_metrics_query_seconds",
            "KairosDB datapoints query time",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        ),
        external_points=Counter(
            "headwater_metrics_external_datapoints_total",
            "Datapoints stored through POST /api/v1/datapoints",
            registry=registry,
        ),
        sink_points=Counter(
            "headwater_metrics_sink_datapoints_total", "Datapoints accepted by the external KairosDB", registry=registry
        ),
        sink_errors=Counter(
            "headwater_metrics_sink_errors_total",
            "Batches the external KairosDB refused or did not answer",
            registry=registry,
        ),
        sink_dropped=Counter(
            "headwater_metrics_sink_dropped_total",
            "Sink batches dropped because the pending queue was full",
            registry=registry,
        ),
    )
