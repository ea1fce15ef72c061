"""The metrics service's Cassandra schema and every statement it runs."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cassandra.query import PreparedStatement

from services.common.cassandra import CassandraClient, Migration, migrate
from services.metrics.errors import QueryTooLarge, RangeTooLarge
from services.metrics.rollup import BUCKET_MS, RESOLUTIONS, RowKey, WindowRow
from services.metrics.settings import Settings

T = TypeVar("T")

# TWCS window per table: about 20-40 SSTable windows over the default retention.
_TWCS = {"1m": ("HOURS", 6), "1h": ("DAYS", 3), "1d": ("DAYS", 30), "external": ("DAYS", 3)}


def table(resolution: str) -> str:
    return f"rollup_{resolution}"


def _twcs(kind: str) -> str:
    unit, size = _TWCS[kind]
    # Doubled braces: migrate() formats statements with the keyspace name.
    return ("compaction = {{'class': 'TimeWindowCompactionStrategy', "
            f"'compaction_window_unit': '{unit}', 'compaction_window_size': '{size}'}}}}")


def migrations() -> list[Migration]:
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
        Migration(2, "partition checkpoints and the series index", (
            "CREATE TABLE IF NOT EXISTS {keyspace}.checkpoints (consumer_group text, topic text, "
            "kpart int, next_offset bigint, watermark_ms bigint, updated_at timestamp, "
            "PRIMARY KEY ((consumer_group, topic), kpart))",
            "CREATE TABLE IF NOT EXISTS {keyspace}.series (k int, source text, type text, event text, "
            "props set<text>, PRIMARY KEY (k, source, type, event))",
        )),
        Migration(3, "datapoints written by other producers (KairosDB write API)", (
            "CREATE TABLE IF NOT EXISTS {keyspace}.external_datapoints (metric text, bucket bigint, "
            "ts bigint, tags text, value double, is_long boolean, "
            f"PRIMARY KEY ((metric, bucket), ts, tags)) WITH {_twcs('external')}",
            "CREATE TABLE IF NOT EXISTS {keyspace}.external_metrics (k int, metric text, "
            "PRIMARY KEY (k, metric))",
        )),
        Migration(4, "per-partition window horizons (no read for a window never written)", (
            "CREATE TABLE IF NOT EXISTS {keyspace}.horizons (consumer_group text, topic text, kpart int, "
            "resolution text, max_window bigint, PRIMARY KEY ((consumer_group, topic), kpart, resolution))",
        )),
        # Versions 100 and up belong to the external datapoints (external.py), so steps of the
        # rollups and of the write API never take the same number.
        Migration(100, "days and tag sets of each external metric (reads, deletes, tag lists)", (
            "CREATE TABLE IF NOT EXISTS {keyspace}.external_buckets (metric text, bucket bigint, "
            "PRIMARY KEY (metric, bucket))",
            "CREATE TABLE IF NOT EXISTS {keyspace}.external_series (metric text, tags text, "
            "PRIMARY KEY (metric, tags))",
        )),
    ]


def retentions(settings: Settings) -> dict[str, int]:
    return {"1m": settings.retention_1m_s, "1h": settings.retention_1h_s, "1d": settings.retention_1d_s}


async def migrate_schema(client: CassandraClient, settings: Settings) -> list[int]:
    """Create or migrate the schema, then set each table's TTL from the settings (idempotent)."""
    ks = settings.cassandra_keyspace
    applied = await migrate(client, ks, migrations(), replication=settings.cassandra_replication)
    for res, ttl in retentions(settings).items():
        await client.execute(f"ALTER TABLE {ks}.{table(res)} WITH default_time_to_live = {int(ttl)}")
    await client.execute(f"ALTER TABLE {ks}.external_datapoints "
                         f"WITH default_time_to_live = {int(settings.retention_external_s)}")
    return applied


async def bounded_gather(aws: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """Await all, at most ``limit`` at a time, in order; the first error is raised.

    A TaskGroup, not gather: when one fails the others are cancelled and awaited before the
    error leaves, so no stale write of a failed attempt can land after a retry's write.
    """
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        try:
            async with sem:
                return await aw
        finally:
            # Cancelled while queued: the coroutine never ran; close it (no "never awaited").
            if inspect.iscoroutine(aw) and inspect.getcoroutinestate(aw) == inspect.CORO_CREATED:
                aw.close()

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(a)) for a in aws]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


@dataclass(frozen=True)
class StoredRow:
    """A rollup row as read back for a query."""

    window_start: int
    type: str
    event: str
    kpart: int
    count: int
    users: bytes
    sums: dict[str, float]


class Store:
    """Prepared statements over one keyspace."""

    def __init__(self, client: CassandraClient, settings: Settings) -> None:
        self.client = client
        self.ks = settings.cassandra_keyspace
        self.lg_k = settings.hll_lg_k
        self.concurrency = settings.write_concurrency
        self.timeout = settings.cassandra_timeout_s
        self.max_buckets = settings.query_max_buckets
        self.series_ttl = max(retentions(settings).values())
        self._ps: dict[str, PreparedStatement] = {}

    async def prepare(self) -> None:
        ks = self.ks
        cql = {
            "checkpoint_get": f"SELECT next_offset, watermark_ms FROM {ks}.checkpoints "
                              "WHERE consumer_group = ? AND topic = ? AND kpart = ?",
            "checkpoint_put": f"INSERT INTO {ks}.checkpoints (consumer_group, topic, kpart, next_offset, "
                              "watermark_ms, updated_at) VALUES (?, ?, ?, ?, ?, toTimestamp(now()))",
            "horizon_get": f"SELECT resolution, max_window FROM {ks}.horizons "
                           "WHERE consumer_group = ? AND topic = ? AND kpart = ?",
            "horizon_put": f"INSERT INTO {ks}.horizons (consumer_group, topic, kpart, resolution, max_window) "
                           "VALUES (?, ?, ?, ?, ?)",
            "series_put": f"UPDATE {ks}.series USING TTL {self.series_ttl} SET props = props + ? "
                          "WHERE k = 0 AND source = ? AND type = ? AND event = ?",
            "series_all": f"SELECT source, type, event, props FROM {ks}.series WHERE k = 0",
        }
        for res in RESOLUTIONS:
            t = f"{ks}.{table(res)}"
            cql[f"get_{res}"] = (f"SELECT count, users, sums, upto FROM {t} WHERE source = ? AND bucket = ? "
                                 "AND window_start = ? AND type = ? AND event = ? AND kpart = ?")
            cql[f"put_{res}"] = (f"INSERT INTO {t} (source, bucket, window_start, type, event, kpart, count, "
                                 "users, sums, upto) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            cql[f"range_{res}"] = (f"SELECT window_start, type, event, kpart, count, users, sums FROM {t} "
                                   "WHERE source = ? AND bucket = ? AND window_start >= ? AND window_start <= ?")
        names = list(cql)
        prepared = await bounded_gather((self.client.prepare(cql[n]) for n in names), 8)
        self._ps = dict(zip(names, prepared, strict=True))

    # --- checkpoints -------------------------------------------------------------------------

    async def load_checkpoint(self, group: str, topic: str, kpart: int) -> tuple[int, int] | None:
        rows = list(await self.client.execute(self._ps["checkpoint_get"], (group, topic, kpart)))
        if not rows:
            return None
        return int(rows[0].next_offset), int(rows[0].watermark_ms)

    async def save_checkpoint(self, group: str, topic: str, kpart: int, next_offset: int,
                              watermark_ms: int) -> None:
        await self.client.execute(self._ps["checkpoint_put"], (group, topic, kpart, next_offset, watermark_ms))

    async def load_horizons(self, group: str, topic: str, kpart: int) -> dict[str, int]:
        rows = await self.client.execute(self._ps["horizon_get"], (group, topic, kpart))
        return {r.resolution: int(r.max_window) for r in rows}

    async def save_horizon(self, group: str, topic: str, kpart: int, resolution: str, max_window: int) -> None:
        await self.client.execute(self._ps["horizon_put"], (group, topic, kpart, resolution, max_window))

    # --- window rows -------------------------------------------------------------------------

    async def load_row(self, kpart: int, key: RowKey) -> WindowRow:
        rows = list(await self.client.execute(self._ps[f"get_{key.resolution}"], (
            key.source, key.bucket, key.window_start, key.type, key.event, kpart)))
        if not rows:
            return WindowRow(self.lg_k)
        r = rows[0]
        return WindowRow(self.lg_k, count=int(r.count or 0), sums=dict(r.sums or {}), upto=int(r.upto),
                         sketch_blob=bytes(r.users) if r.users else None)

    async def load_rows(self, kpart: int, keys: Sequence[RowKey]) -> list[WindowRow]:
        return await bounded_gather((self.load_row(kpart, k) for k in keys), self.concurrency)

    async def write_row(self, kpart: int, key: RowKey, row: WindowRow, upto: int) -> None:
        await self.client.execute(self._ps[f"put_{key.resolution}"], (
            key.source, key.bucket, key.window_start, key.type, key.event, kpart,
            row.count, row.users_blob(), row.sums, upto))

    async def note_series(self, source: str, etype: str, event: str, props: Iterable[str]) -> None:
        await self.client.execute(self._ps["series_put"], (set(props), source, etype, event))

    async def _all_pages(self, name: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Every row of a read that may span pages (CassandraClient.execute returns the first page only)."""
        bound = self._ps[name].bind(params)
        bound.fetch_size = 5000
        session = self.client.session
        return await asyncio.to_thread(lambda: list(session.execute(bound, timeout=self.timeout)))

    async def all_series(self) -> list[tuple[str, str, str, frozenset[str]]]:
        rows = await self._all_pages("series_all")
        return [(r.source, r.type, r.event, frozenset(r.props or ())) for r in rows]

    def _buckets(self, start_ms: int, end_ms: int, size: int) -> range:
        """The buckets of a time range, refused when there are more than the setting allows."""
        first, last = start_ms // size, end_ms // size
        if last - first + 1 > self.max_buckets:
            raise RangeTooLarge(last - first + 1, self.max_buckets)
        return range(first, last + 1)

    async def read_windows(self, resolution: str, source: str, start_ms: int, end_ms: int,
                           limit: int) -> list[StoredRow]:
        """Every row of ``source`` with a window starting in [start_ms, end_ms]."""
        out: list[StoredRow] = []
        for bucket in self._buckets(start_ms, end_ms, BUCKET_MS[resolution]):
            rows = await self._all_pages(f"range_{resolution}", (source, bucket, start_ms, end_ms))
            for r in rows:
                out.append(StoredRow(int(r.window_start), r.type, r.event, int(r.kpart), int(r.count or 0),
                                     bytes(r.users or b""), dict(r.sums or {})))
                if len(out) > limit:
                    raise QueryTooLarge(limit)
        return out
