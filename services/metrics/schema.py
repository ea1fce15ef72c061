"""The metrics keyspace's schema: the tables, the migrations that create them (rollups below
100, the write API's external datapoints from 100 up), their compaction, and each table's
TTL from the retention settings. The statements over these tables are store.py's and
external.py's.
"""

from __future__ import annotations

from services.common.cassandra import CassandraClient, Migration, migrate
from services.metrics.rollup import RESOLUTIONS
from services.metrics.settings import Settings

# TWCS window per table: about 20-40 SSTable windows over the default retention.
_TWCS = {"1m": ("HOURS", 6), "1h": ("DAYS", 3), "1d": ("DAYS", 30), "external": ("DAYS", 3)}


def table(resolution: str) -> str:
    return f"rollup_{resolution}"


def _twcs(kind: str) -> str:
    unit, size = _TWCS[kind]
    # Doubled braces: migrate() formats statements with the keyspace name.
    return (
        "compaction = {{'class': 'TimeWindowCompactionStrategy', "
        f"'compaction_window_unit': '{unit}', 'compaction_window_size': '{size}'}}}}"
    )


def migrations() -> list[Migration]:  # long: the schema steps as one list of CQL
    """The schema steps, in order. Retentions are applied after, from the settings."""
    rollups = tuple(
        f"CREATE TABLE IF NOT EXISTS {{keyspace}}.{table(res)} ("
        "source text, bucket bigint, window_start bigint, type text, event text, kpart int, "
        "count bigint, users blob, sums map<text, double>, upto bigint, "
        "PRIMARY KEY ((source, bucket), window_start, type, event, kpart)"
        f") WITH {_twcs(res)}"
        for res in RESOLUTIONS
    )
    return [
        Migration(1, "rollup tables, one per resolution", rollups),
        Migration(
            2,
            "partition checkpoints and the series index",
            (
                "CREATE TABLE IF NOT EXISTS {keyspace}.checkpoints (consumer_group text, topic text, "
                "kpart int, next_offset bigint, watermark_ms bigint, updated_at timestamp, "
                "PRIMARY KEY ((consumer_group, topic), kpart))",
                "CREATE TABLE IF NOT EXISTS {keyspace}.series (k int, source text, type text, event text, "
                "props set<text>, PRIMARY KEY (k, source, type, event))",
            ),
        ),
        Migration(
            3,
            "datapoints written by other producers (KairosDB write API)",
            (
                "CREATE TABLE IF NOT EXISTS {keyspace}.external_datapoints (metric text, bucket bigint, "
                "ts bigint, tags text, value double, is_long boolean, "
                f"PRIMARY KEY ((metric, bucket), ts, tags)) WITH {_twcs('external')}",
                "CREATE TABLE IF NOT EXISTS {keyspace}.external_metrics (k int, metric text, PRIMARY KEY (k, metric))",
            ),
        ),
        Migration(
            4,
            "per-partition window horizons (no read for a window never written)",
            (
                "CREATE TABLE IF NOT EXISTS {keyspace}.horizons (consumer_group text, topic text, kpart int, "
                "resolution text, max_window bigint, PRIMARY KEY ((consumer_group, topic), kpart, resolution))",
            ),
        ),
        # Rows are rewritten while their window is open and again by late events up to the maximum
        # age, at offset timestamps (see store.py): time windows of SSTables would not
        # hold one time range each, so the rollups compact by levels, which suits rows updated often.
        Migration(
            5,
            "fenced writes: checkpoint offset base, keyspace owner, leveled compaction",
            (
                "ALTER TABLE {keyspace}.checkpoints ADD IF NOT EXISTS base bigint",
                "CREATE TABLE IF NOT EXISTS {keyspace}.owner (k int PRIMARY KEY, consumer_group text, "
                "topic text, claimed_at timestamp)",
                *(
                    f"ALTER TABLE {{keyspace}}.{table(res)} WITH compaction = "
                    "{{'class': 'LeveledCompactionStrategy'}}"
                    for res in RESOLUTIONS
                ),
            ),
        ),
        # Versions 100 and up belong to the external datapoints (external.py), so steps of the
        # rollups and of the write API never take the same number.
        Migration(
            100,
            "days and tag sets of each external metric (reads, deletes, tag lists)",
            (
                "CREATE TABLE IF NOT EXISTS {keyspace}.external_buckets (metric text, bucket bigint, "
                "PRIMARY KEY (metric, bucket))",
                "CREATE TABLE IF NOT EXISTS {keyspace}.external_series (metric text, tags text, "
                "PRIMARY KEY (metric, tags))",
            ),
        ),
    ]


def retentions(settings: Settings) -> dict[str, int]:
    return {"1m": settings.retention_1m_s, "1h": settings.retention_1h_s, "1d": settings.retention_1d_s}


async def migrate_schema(client: CassandraClient, settings: Settings) -> list[int]:
    """Create or migrate the schema, then set each table's TTL from the settings (idempotent)."""
    ks = settings.cassandra_keyspace
    applied = await migrate(client, ks, migrations(), replication=settings.cassandra_replication)
    for res, ttl in retentions(settings).items():
        await client.execute(f"ALTER TABLE {ks}.{table(res)} WITH default_time_to_live = {int(ttl)}")
    await client.execute(
        f"ALTER TABLE {ks}.external_datapoints WITH default_time_to_live = {int(settings.retention_external_s)}"
    )
    return applied
