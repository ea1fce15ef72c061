"""Settings of the bridge, the mirror and the parity report (``HEADWATER_BRIDGE_*``).

AWS credentials are not settings here: the client reads the standard AWS
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_PROFILE, ...) as every AWS tool does, so none of them is ever logged.
Which stream a source uses, and which way, is in the source registry
(``legacy`` of a source in sources.json), reloaded live.
"""

from __future__ import annotations

import os
import socket
import uuid

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common import topics
from services.common.settings import CommonSettings


def _owner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="HEADWATER_BRIDGE_", frozen=True, extra="ignore")

    service_name: str = "bridge"
    http_port: int = 8084
    # Kafka side.
    raw_topic: str = "events.raw"
    # Partitions when the bridge creates a topic (configs: services/common/topics.py).
    raw_partitions: int = Field(default=topics.RAW.partitions, ge=1)
    dlq_topic: str = "events.dlq"
    dlq_partitions: int = Field(default=topics.DLQ.partitions, ge=1)
    enriched_topic: str = "events.enriched"
    # Larger Envelopes are dead-lettered (cut) instead of sent: the broker would refuse them.
    max_raw_bytes: int = Field(default=900 * 1024, ge=1024)
    # AWS side: region and endpoint (None = AWS itself); credentials from the standard variables.
    aws_region: str = "us-east-1"
    aws_endpoint_url: str | None = None
    # Leases, checkpoints and the parity counts live in Cassandra (see store.py for why).
    cassandra_hosts: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = 9042
    cassandra_keyspace: str = Field(default="headwater_bridge", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,47}$")
    cassandra_replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    # This process's name in the lease table; unique per process.
    owner_id: str = Field(default_factory=_owner_id)
    lease_duration_s: float = Field(default=10.0, gt=0)
    # How often shards are listed and leases renewed (must be well under the lease duration).
    discovery_interval_s: float = Field(default=2.0, gt=0)
    get_records_limit: int = Field(default=1000, ge=1, le=10_000)
    # Kinesis allows five GetRecords per second per shard; an empty answer waits this long.
    idle_poll_s: float = Field(default=1.0, ge=0)
    backoff_initial_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    # As the processor's: an event time further ahead of receivedAt is receivedAt.
    max_future_skew_s: float = Field(default=600.0, ge=0)
    # How long the per-minute messageIds of the parity report are kept.
    parity_ttl_s: int = Field(default=14 * 86_400, ge=3600)
    # The mirror.
    mirror_group_id: str = "headwater-mirror"
    mirror_http_port: int = 8085
    mirror_batch_max_records: int = Field(default=500, ge=1, le=500)
    mirror_batch_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, le=5 * 1024 * 1024)
    mirror_poll_ms: int = Field(default=200, ge=1)
    # The parity report reads Headwater's rollups from the metrics service's KairosDB API.
    metrics_url: str = "http://127.0.0.1:8083"
    metrics_user: str | None = None
    metrics_password: SecretStr | None = None
    # Records of events.enriched the report scans at most for Headwater's messageIds.
    parity_scan_limit: int = Field(default=2_000_000, ge=1)
    # The bridge's own comparison for the parity gauges: how often (0 = never), over how
    # long a span, ending how long ago (events still in the pipeline are not missing).
    parity_interval_s: float = Field(default=60.0, ge=0)
    parity_window_s: float = Field(default=900.0, gt=0)
    parity_lag_s: float = Field(default=300.0, ge=0)
