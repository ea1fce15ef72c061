"""Settings of the ingest service (environment prefix HEADWATER_INGEST_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common import topics
from services.common.settings import CommonSettings
from services.ingest.parsing import TrustedProxies


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="HEADWATER_INGEST_", frozen=True, extra="ignore")

    service_name: str = "ingest"
    http_port: int = 8080
    # Processes sharing the port through SO_REUSEPORT.
    workers: int = Field(default=1, ge=1, le=64)
    # Set: worker i also serves /metrics, /healthz and /readyz on metrics_port + i, so
    # Prometheus scrapes every worker (through the shared port a scrape reaches any one).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    raw_topic: str = "events.raw"
    dlq_topic: str = "events.dlq"
    # Partitions when ingest creates a topic (their configs are fixed in services/common/topics.py).
    raw_partitions: int = Field(default=topics.RAW.partitions, ge=1)
    dlq_partitions: int = Field(default=topics.DLQ.partitions, ge=1)

    # Limits (Segment's own): bytes per event, per request (decoded), events per batch.
    max_event_bytes: int = Field(default=32 * 1024, ge=256)
    max_request_bytes: int = Field(default=500 * 1024, ge=1024)
    max_batch_events: int = Field(default=2500, ge=1)
    # Events accepted but not yet acknowledged, per process; above it: 503.
    max_inflight_events: int = Field(default=50_000, ge=1)

    # X-Forwarded-For is believed only from these networks (CIDR list).
    trusted_proxies: list[str] = Field(default_factory=list)

    # Kafka producer.
    kafka_ack_timeout_s: float = Field(default=2.0, gt=0)
    # Extra wait before a flush; 0 is right for most loads, since batches grow by
    # themselves while the flushes in flight wait for their acks.
    kafka_linger_ms: int = Field(default=0, ge=0)
    # Producer connections per process. A flush awaits its acks on one of them, so
    # this many flushes overlap their round trips (aiokafka has one produce request
    # in flight per connection); more cost broker connections and smaller batches.
    kafka_producers: int = Field(default=2, ge=1, le=8)
    kafka_max_batch_bytes: int = Field(default=512 * 1024, ge=16 * 1024)
    kafka_compression: Literal["zstd", "gzip", "lz4", "snappy", "none"] = "zstd"
    # A partition's share of a flush smaller than this goes uncompressed (0: always
    # compress): a few hundred bytes cost more CPU to compress than they save.
    kafka_small_batch_bytes: int = Field(default=4096, ge=0)

    # Local spool used while Kafka is down or slower than the ack timeout.
    spool_dir: Path = Path("var/spool/ingest")
    spool_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    spool_segment_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    spool_retry_after_s: int = Field(default=5, ge=1)

    # Slow clients (services/ingest/connections.py). Open client connections per
    # process; beyond it a new one is answered 503 at once.
    max_connections: int = Field(default=2048, ge=1)
    # A connection without complete request headers this long after it opened or
    # after its previous answer (idle keep-alive, or headers sent in part) is closed.
    client_idle_timeout_s: float = Field(default=15.0, gt=0)
    # A request body must have arrived this long after its headers, else 408 and close.
    client_body_timeout_s: float = Field(default=10.0, gt=0)

    # The analytics.js settings document (services/ingest/cdnsettings.py): the
    # address events go to ("events.example.com/v1"; default: the Host asked,
    # fine locally) and its scheme (default: the request's), and its cache life.
    settings_api_host: str | None = None
    settings_protocol: Literal["http", "https"] | None = None
    settings_max_age_s: int = Field(default=300, ge=0)

    # Seconds a 429 asks the client to wait at least.
    rate_limit_retry_after_s: int = Field(default=1, ge=1)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        TrustedProxies.parse(value)  # raises ValueError naming the bad network
        return value
