"""Settings of the metrics service (environment prefix HEADWATER_METRICS_)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.common import topics
from services.common.cassandra import ConsistencyName, consistency_level, replication_factor
from services.common.settings import CommonSettings

_CQL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class Settings(CommonSettings):
    """Everything the metrics service reads from its environment, once, at start."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_METRICS_", frozen=True, extra="ignore")

    service_name: str = "metrics"
    http_port: int = 8083

    # Kafka
    enriched_topic: str = "events.enriched"
    dlq_topic: str = "events.dlq"
    late_topic: str = "events.late"
    # Partitions when metrics creates a topic, and the retention of events.late (which it
    # alone writes): defaults from the declarations in services/common/topics.py.
    late_topic_partitions: int = Field(default=topics.LATE.partitions, ge=1)
    late_topic_retention_ms: int = Field(default=topics.LATE.retention_ms, ge=60_000)
    dlq_partitions: int = Field(default=topics.DLQ.partitions, ge=1)
    consumer_group: str = "headwater-metrics"
    max_poll_records: int = Field(default=2000, ge=1)
    poll_timeout_ms: int = Field(default=500, ge=10)

    # Cassandra
    cassandra_hosts: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = 9042
    cassandra_keyspace: str = "headwater_metrics"
    # The keyspace's replication when metrics creates it (production: RF 3, e.g.
    # "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"); an existing keyspace keeps its own.
    cassandra_replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    # Consistency of reads and writes; unset: LOCAL_QUORUM when the replication above keeps
    # more than one replica, else LOCAL_ONE.
    cassandra_read_consistency: ConsistencyName | None = None
    cassandra_write_consistency: ConsistencyName | None = None
    cassandra_timeout_s: float = Field(default=10.0, gt=0)
    # Rows written at once during a flush (bounded so a flush does not flood the node).
    write_concurrency: int = Field(default=64, ge=1)

    # Rollups: retention of each resolution (the table's default_time_to_live).
    retention_1m_s: int = Field(default=7 * 86_400, ge=1)
    retention_1h_s: int = Field(default=90 * 86_400, ge=1)
    retention_1d_s: int = Field(default=2 * 365 * 86_400, ge=1)
    # Series written by other producers through POST /api/v1/datapoints.
    retention_external_s: int = Field(default=90 * 86_400, ge=1)
    # The oldest event (receivedAt minus timestamp) rolled up; older ones go to the late topic.
    # Unset: the 1-minute resolution's retention, which is what every table can still hold.
    # A resolution whose retention is shorter than an event's age skips that event alone.
    max_event_age_s: float | None = Field(default=None, gt=0)
    # How long a window row stays cached once its window closed this far behind the partition's
    # watermark (the newest receivedAt seen). Bounds memory, not correctness: an event for an
    # evicted window reads the stored row back (in batches) and rewrites the whole aggregate.
    allowed_lateness_s: float = Field(default=3600.0, ge=0)
    # HyperLogLog precision: 2^lg_k buckets, about 1.6% error at 12.
    hll_lg_k: int = Field(default=12, ge=4, le=21)
    # Window rows kept in memory across all partitions; over it, the service
    # flushes and evicts the least recently used rows.
    max_cached_rows: int = Field(default=200_000, ge=100)
    # Flush (write rollups, then the partition checkpoint, then commit offsets) this often.
    flush_interval_s: float = Field(default=1.0, gt=0)
    max_dirty_rows: int = Field(default=20_000, ge=1)
    # Rows of one Cassandra partition written in one unlogged batch (one mutation on the node),
    # bounded in count and in bytes so batches stay under the node's batch size warning.
    write_batch_rows: int = Field(default=64, ge=1)
    write_batch_bytes: int = Field(default=5_000, ge=256)
    # Rows of one Cassandra partition read back in one SELECT ... IN.
    read_batch_rows: int = Field(default=100, ge=1)
    # A rebalance callback (resume from or flush to Cassandra) gives up after this long and the
    # service stops for a restart, instead of holding the whole group's rebalance for ever.
    rebalance_retry_s: float = Field(default=30.0, gt=0)
    # Migrating the schema at start (each step idempotent) is tried again for this long when
    # Cassandra times out or is unavailable, then the service stops for a restart.
    schema_retry_s: float = Field(default=120.0, gt=0)
    # A checkpoint ahead of the topic's end (topic recreated, cluster moved): "halt" keeps the
    # partition paused and /readyz failing until an operator acts; "restart" rolls the partition
    # up again from its beginning, counting its offsets on from the old checkpoint.
    on_checkpoint_ahead: Literal["halt", "restart"] = "halt"

    # Optional sink to an external KairosDB (REST). Empty: off.
    kairosdb_url: str = ""
    kairosdb_batch_size: int = Field(default=500, ge=1)
    kairosdb_timeout_s: float = Field(default=10.0, gt=0)
    # Datapoint batches waiting for the sink; over it the oldest batch is dropped and counted.
    kairosdb_max_pending: int = Field(default=100, ge=1)

    # Query API: the most raw rows one query may read.
    query_max_rows: int = Field(default=500_000, ge=1)
    # The most Cassandra partitions (day buckets of 1m rows and external points, 30 / 360 days
    # of 1h / 1d rows) one query reads per series; each is one read, even when empty.
    query_max_buckets: int = Field(default=4000, ge=1)

    @property
    def max_event_age_ms(self) -> int:
        age = self.max_event_age_s if self.max_event_age_s is not None else self.retention_1m_s
        return int(age * 1000)

    @property
    def read_consistency(self) -> int:
        return consistency_level(self.cassandra_read_consistency, self.cassandra_replication)

    @property
    def write_consistency(self) -> int:
        return consistency_level(self.cassandra_write_consistency, self.cassandra_replication)

    @field_validator("cassandra_replication")
    @classmethod
    def _replication(cls, value: str) -> str:
        if replication_factor(value) < 1:  # raises ValueError when there is no factor at all
            raise ValueError("a replication factor is at least 1")
        return value

    @field_validator("cassandra_keyspace")
    @classmethod
    def _cql_name(cls, value: str) -> str:
        if not _CQL_NAME.match(value):
            raise ValueError("a keyspace name is lower-case letters, digits and '_', starting with a letter")
        return value

    # Query API: access and limits
    # Loopback unless told otherwise: the API stores series for whoever can reach it.
    http_host: str = "127.0.0.1"
    # HTTP Basic credentials (KairosDB's basic auth). Unset: the API is open (local development).
    # Set: writes and deletes need them always, reads too when api_auth_reads is on.
    api_user: SecretStr = SecretStr("")
    api_password: SecretStr = SecretStr("")
    api_auth_reads: bool = False
    # Origins a browser may call the API from (CORS); "*" is KairosDB's answer.
    api_cors_origins: tuple[str, ...] = ("*",)
    # One POST /api/v1/datapoints: at most this many points, metric names and tags per metric.
    write_max_points: int = Field(default=200_000, ge=1)
    write_max_metrics: int = Field(default=10_000, ge=1)
    write_max_tags: int = Field(default=64, ge=1)
    # Bodies over this size are parsed in a worker thread, off the event loop.
    write_inline_bytes: int = Field(default=256 * 1024, ge=0)

    @field_validator("api_password")
    @classmethod
    def _password_with_user(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        user = info.data.get("api_user")
        if bool(value.get_secret_value()) != bool(user and user.get_secret_value()):
            raise ValueError("api_user and api_password are set together or not at all")
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_user.get_secret_value())
