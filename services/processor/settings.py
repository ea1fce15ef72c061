"""Settings of the processor (environment prefix HEADWATER_PROCESSOR_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common import topics
from services.common.settings import CommonSettings

DAY_MS = 24 * 3600 * 1000


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="HEADWATER_PROCESSOR_", frozen=True, extra="ignore")

    service_name: str = "processor"
    http_port: int = 8081
    # Processes in this consumer group started by one command (each its own consumer).
    workers: int = Field(default=1, ge=1, le=64)

    # Topics.
    raw_topic: str = "events.raw"
    enriched_topic: str = "events.enriched"
    dlq_topic: str = "events.dlq"
    dest_topic_prefix: str = "dest."
    # Compacted changelog of the dedupe state; empty: "<group_id>.dedupe-changelog".
    dedupe_topic: str = ""
    # Partitions when the processor creates a topic, and the retention of the topics it alone
    # writes: defaults from the declarations (services/common/topics.py; events.dlq's configs
    # are fixed there, as several services write it).
    raw_partitions: int = Field(default=topics.RAW.partitions, ge=1)
    enriched_partitions: int = Field(default=topics.ENRICHED.partitions, ge=1)
    dlq_partitions: int = Field(default=topics.DLQ.partitions, ge=1)
    dest_partitions: int = Field(default=topics.DEST.partitions, ge=1)
    enriched_retention_ms: int = Field(default=topics.ENRICHED.retention_ms, ge=60_000)
    dest_retention_ms: int = Field(default=topics.DEST.retention_ms, ge=60_000)

    # Consumer group and transactions.
    group_id: str = "headwater-processor"
    # Prefix of the per-partition transactional ids; empty: the group id.
    transactional_id_prefix: str = ""
    transaction_timeout_ms: int = Field(default=60_000, ge=1000)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=2_000, ge=100)
    # Records per partition per transaction, and how long a fetch waits to fill a batch.
    batch_max_records: int = Field(default=500, ge=1)
    # Transactions per partition dispatched at once: the one in flight and the batches
    # worked out and queued behind it, so the CPU keeps working while Kafka commits
    # (1: no overlap). Bounds memory: at most this many batches of batch_max_records
    # per owned partition are held uncommitted.
    max_pending_batches: int = Field(default=3, ge=1, le=16)
    batch_linger_ms: int = Field(default=50, ge=0)
    fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Pause after a failed transaction before the partition is tried again.
    retry_backoff_s: float = Field(default=1.0, ge=0)
    # Bounded wait for each step of opening a partition on assignment: the producer's start
    # (which fences the previous owner), the dedupe changelog read back, the committed offset.
    restore_timeout_s: float = Field(default=60.0, gt=0)
    # Liveness (watchdog.py): out of the consumer group (revoked, or never assigned) or in
    # it with records waiting and nothing committed, for longer than this while Kafka
    # answers, the processor fails (exit 1) and its supervisor starts it again. Longer than
    # restore_timeout_s, since an assignment may spend that long opening its partitions.
    rejoin_timeout_s: float = Field(default=120.0, gt=0)
    kafka_compression: Literal["zstd", "gzip", "lz4", "snappy", "none"] = "zstd"
    # Producer request ceiling; events.dlq takes records up to topics.DLQ.max_message_bytes (8 MiB).
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024 * 1024)

    # Processing.
    # An event larger than this (JSON bytes) goes to the DLQ as size_violation.
    max_event_bytes: int = Field(default=512 * 1024, ge=256)
    # An enriched record larger than this goes to the DLQ as size_violation instead: a record
    # the topic would refuse must not fail the transaction again and again.
    max_output_bytes: int = Field(default=1_000_000, ge=1024)
    # Tries of one record's processing before it goes to the DLQ as poison.
    poison_max_tries: int = Field(default=3, ge=1)
    # Event time further ahead of receivedAt than this is clamped to receivedAt and flagged.
    max_future_skew_s: float = Field(default=600.0, ge=0)

    # Dedupe on (source, messageId).
    dedupe_window_ms: int = Field(default=DAY_MS, ge=1000)
    dedupe_max_entries_per_partition: int = Field(default=500_000, ge=1)

    # Enrichment.
    geoip_path: Path | None = None
    ua_cache_size: int = Field(default=10_000, ge=0)
    geo_cache_size: int = Field(default=10_000, ge=0)

    @field_validator("geoip_path")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no geo-IP database at {value}")
        return value

    @model_validator(mode="after")
    def _rejoin_outlasts_restore(self) -> Settings:
        if self.rejoin_timeout_s <= self.restore_timeout_s:
            raise ValueError(
                f"HEADWATER_PROCESSOR_REJOIN_TIMEOUT_S ({self.rejoin_timeout_s}) must be longer than "
                f"HEADWATER_PROCESSOR_RESTORE_TIMEOUT_S ({self.restore_timeout_s}): opening partitions "
                "on assignment may take that long"
            )
        return self

    @property
    def dedupe_changelog(self) -> str:
        return self.dedupe_topic or f"{self.group_id}.dedupe-changelog"

    @property
    def transactional_prefix(self) -> str:
        return self.transactional_id_prefix or self.group_id
