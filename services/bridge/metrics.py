"""Every Prometheus metric of the bridge, the mirror and the parity report, declared once."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class BridgeMetrics:
    records: Counter  # legacy records read, by stream and outcome (bridged, dlq, skipped) and reason
    throttled: Counter  # Kinesis calls answered with a throughput / throttling error
    shards_held: Gauge  # shard leases this process holds, per stream
    behind_ms: Gauge  # MillisBehindLatest of the last GetRecords, per stream and shard
    checkpoints: Counter  # shard checkpoints written
    leases_lost: Counter  # leases taken over by another process while held
    checkpoints_refused: Counter  # checkpoints Kinesis no longer knows (past retention): records lost upstream
    rewinds: Counter  # shards read again from their stored checkpoint after a Cassandra failure


@dataclass(frozen=True)
class MirrorMetrics:
    records: Counter  # events.enriched records, by stream and outcome (sent, dlq, skipped) and reason
    put_retries: Counter  # records PutRecords refused and sent again, by stream and reason (the error code)
    batches: Counter  # PutRecords calls that ended with every record accepted


@dataclass(frozen=True)
class ParityMetrics:
    difference: Gauge  # the last comparison's largest |legacy - headwater| for one minute and event
    minutes_differing: Gauge  # how many (minute, type, event) cells differed
    last_run: Gauge  # when that comparison ran, Unix seconds


def make_bridge_metrics(registry: CollectorRegistry) -> BridgeMetrics:
    return BridgeMetrics(
        records=Counter(
            "headwater_bridge_records", "Legacy records read", ["stream", "outcome", "reason"], registry=registry
        ),
        throttled=Counter(
            "headwater_bridge_throttled", "Kinesis calls throttled", ["stream", "reason"], registry=registry
        ),
        shards_held=Gauge("headwater_bridge_shards_held", "Shard leases held", ["stream"], registry=registry),
        behind_ms=Gauge(
            "headwater_bridge_millis_behind_latest",
            "MillisBehindLatest of the last read",
            ["stream", "shard"],
            registry=registry,
        ),
        checkpoints=Counter("headwater_bridge_checkpoints", "Shard checkpoints written", ["stream"], registry=registry),
        leases_lost=Counter("headwater_bridge_leases_lost", "Leases lost while held", ["stream"], registry=registry),
        checkpoints_refused=Counter(
            "headwater_bridge_checkpoints_refused",
            "Checkpoints Kinesis refused (past the retention)",
            ["stream"],
            registry=registry,
        ),
        rewinds=Counter(
            "headwater_bridge_rewinds",
            "Shards read again from their stored checkpoint after a Cassandra failure",
            ["stream"],
            registry=registry,
        ),
    )


def make_mirror_metrics(registry: CollectorRegistry) -> MirrorMetrics:
    return MirrorMetrics(
        records=Counter(
            "headwater_mirror_records",
            "events.enriched records handled",
            ["stream", "outcome", "reason"],
            registry=registry,
        ),
        put_retries=Counter(
            "headwater_mirror_put_retries",
            "Records PutRecords refused and sent again",
            ["stream", "reason"],
            registry=registry,
        ),
        batches=Counter("headwater_mirror_batches", "PutRecords calls fully accepted", ["stream"], registry=registry),
    )


def make_parity_metrics(registry: CollectorRegistry) -> ParityMetrics:
    return ParityMetrics(
        difference=Gauge(
            "headwater_parity_difference",
            "Largest per-minute difference in the last comparison",
            ["source"],
            registry=registry,
        ),
        minutes_differing=Gauge(
            "headwater_parity_minutes_differing",
            "Cells that differed in the last comparison",
            ["source"],
            registry=registry,
        ),
        last_run=Gauge(
            "headwater_parity_last_run_timestamp_seconds", "When the last comparison ran", ["source"], registry=registry
        ),
    )
