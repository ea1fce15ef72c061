"""Series written by other producers through POST /api/v1/datapoints (the KairosDB write API).

Tables (created by schema.migrations()): ``external_datapoints`` holds the points, one
Cassandra partition per metric and UTC day; ``external_metrics`` the metric names;
``external_buckets`` the days a metric has points in (reads and deletes touch only those);
``external_series`` each metric's tag sets (query/tags, tagnames, tagvalues without
reading points).

Reads stop as soon as they have what was asked: a query's ``limit`` ends the read at that
many matching points, and more than ``max_rows`` points is refused (QueryTooLarge) when
the page that crosses it arrives, so no query holds more than one page over the bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from cassandra.query import PreparedStatement

from services.common.cassandra import CassandraClient, apply_consistency
from services.metrics.errors import QueryTooLarge, RangeTooLarge
from services.metrics.gather import bounded_gather
from services.metrics.settings import Settings

# One Cassandra partition per metric and day.
EXTERNAL_BUCKET_MS = 86_400_000
# Rows per page of a read.
PAGE_ROWS = 5000

# (metric, ts, tags json with sorted keys, value, is_long, ttl or None)
ExternalRow = tuple[str, int, str, float, bool, int | None]


@dataclass(frozen=True)
class ExternalPoint:
    ts: int
    tags: str
    value: float
    is_long: bool


class ExternalStore:
    """Prepared statements over the external tables of one keyspace."""

    def __init__(self, client: CassandraClient, settings: Settings) -> None:
        self.client = client
        self.ks = settings.cassandra_keyspace
        self.concurrency = settings.write_concurrency
        self.timeout = settings.cassandra_timeout_s
        self.max_buckets = settings.query_max_buckets
        self.read_consistency = settings.read_consistency
        self.write_consistency = settings.write_consistency
        self._ps: dict[str, PreparedStatement] = {}

    async def prepare(self) -> None:
        ks = self.ks
        cols = "metric, bucket, ts, tags, value, is_long"
        cql = {
            "put": f"INSERT INTO {ks}.external_datapoints ({cols}) VALUES (?, ?, ?, ?, ?, ?)",
            "put_ttl": f"INSERT INTO {ks}.external_datapoints ({cols}) VALUES (?, ?, ?, ?, ?, ?) USING TTL ?",
            "get_asc": f"SELECT ts, tags, value, is_long FROM {ks}.external_datapoints "
            "WHERE metric = ? AND bucket = ? AND ts >= ? AND ts <= ?",
            "get_desc": f"SELECT ts, tags, value, is_long FROM {ks}.external_datapoints "
            "WHERE metric = ? AND bucket = ? AND ts >= ? AND ts <= ? ORDER BY ts DESC",
            "del_range": f"DELETE FROM {ks}.external_datapoints WHERE metric = ? AND bucket = ? "
            "AND ts >= ? AND ts <= ?",
            "del_point": f"DELETE FROM {ks}.external_datapoints WHERE metric = ? AND bucket = ? "
            "AND ts = ? AND tags = ?",
            "del_bucket": f"DELETE FROM {ks}.external_datapoints WHERE metric = ? AND bucket = ?",
            "metric_put": f"INSERT INTO {ks}.external_metrics (k, metric) VALUES (0, ?)",
            "metric_del": f"DELETE FROM {ks}.external_metrics WHERE k = 0 AND metric = ?",
            "metrics": f"SELECT metric FROM {ks}.external_metrics WHERE k = 0",
            "bucket_put": f"INSERT INTO {ks}.external_buckets (metric, bucket) VALUES (?, ?)",
            "buckets": f"SELECT bucket FROM {ks}.external_buckets WHERE metric = ? AND bucket >= ? AND bucket <= ?",
            "buckets_all": f"SELECT bucket FROM {ks}.external_buckets WHERE metric = ?",
            "buckets_del": f"DELETE FROM {ks}.external_buckets WHERE metric = ?",
            "series_put": f"INSERT INTO {ks}.external_series (metric, tags) VALUES (?, ?)",
            "series": f"SELECT tags FROM {ks}.external_series WHERE metric = ?",
            "series_del": f"DELETE FROM {ks}.external_series WHERE metric = ?",
            "series_every": f"SELECT metric, tags FROM {ks}.external_series",
        }
        names = list(cql)
        prepared = await bounded_gather((self.client.prepare(cql[n]) for n in names), 8)
        apply_consistency(prepared, read=self.read_consistency, write=self.write_consistency)
        self._ps = dict(zip(names, prepared, strict=True))

    # --- writes ------------------------------------------------------------------------------

    async def _pooled(self, items: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        """Run (statement, params) items with ``write_concurrency`` workers: memory stays
        flat however many points a request holds (no task or coroutine per point)."""
        iterator = iter(items)

        async def worker() -> None:
            for name, params in iterator:
                await self.client.execute(self._ps[name], params)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.concurrency):
                    group.create_task(worker())
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None

    async def write(self, points: Sequence[ExternalRow]) -> None:
        """Store the points, then index their metric names, days and tag sets."""

        def statements() -> Iterator[tuple[str, tuple[Any, ...]]]:
            for metric, ts, tags, value, is_long, ttl in points:
                params: tuple[Any, ...] = (metric, ts // EXTERNAL_BUCKET_MS, ts, tags, value, is_long)
                yield ("put_ttl", (*params, ttl)) if ttl else ("put", params)

        await self._pooled(statements())
        index: list[tuple[str, tuple[Any, ...]]] = []
        index += [("bucket_put", k) for k in sorted({(p[0], p[1] // EXTERNAL_BUCKET_MS) for p in points})]
        index += [("series_put", k) for k in sorted({(p[0], p[2]) for p in points})]
        index += [("metric_put", (m,)) for m in sorted({p[0] for p in points})]
        await self._pooled(index)

    # --- reads -------------------------------------------------------------------------------

    async def _pages(self, name: str, params: tuple[Any, ...]) -> AsyncIterator[list[Any]]:
        """The rows of one read, a page at a time (the caller may stop early)."""
        bound = self._ps[name].bind(params)
        bound.fetch_size = PAGE_ROWS
        session = self.client.session
        state: bytes | None = None
        while True:

            def page(paging_state: bytes | None = state) -> tuple[list[Any], bytes | None]:
                rs = session.execute(bound, timeout=self.timeout, paging_state=paging_state)
                return list(rs.current_rows), rs.paging_state

            rows, state = await asyncio.to_thread(page)
            yield rows
            if state is None:
                return

    async def _all(self, name: str, params: tuple[Any, ...]) -> list[Any]:
        return [row async for rows in self._pages(name, params) for row in rows]

    async def buckets(self, metric: str, start_ms: int, end_ms: int, *, bounded: bool = True) -> list[int]:
        """The days holding points of ``metric`` in a range; a range over query_max_buckets days
        is refused when ``bounded`` (reads and deletes: each day is a read)."""
        first, last = start_ms // EXTERNAL_BUCKET_MS, end_ms // EXTERNAL_BUCKET_MS
        if bounded and last - first + 1 > self.max_buckets:
            raise RangeTooLarge(last - first + 1, self.max_buckets)
        return sorted(int(r.bucket) for r in await self._all("buckets", (metric, first, last)))

    async def read(
        self,
        metric: str,
        start_ms: int,
        end_ms: int,
        *,
        max_rows: int,
        keep: Callable[[str], bool] = lambda _: True,
        limit: int | None = None,
        descending: bool = False,
        done: Callable[[], bool] | None = None,
    ) -> list[ExternalPoint]:
        """Points of ``metric`` in [start_ms, end_ms] whose tags ``keep`` accepts, in time order
        (newest first when ``descending``), at most ``limit`` of them; the read also ends as
        soon as ``done()`` says the caller has all it needs."""
        buckets = await self.buckets(metric, start_ms, end_ms)
        out: list[ExternalPoint] = []
        name = "get_desc" if descending else "get_asc"
        for bucket in reversed(buckets) if descending else buckets:
            async for rows in self._pages(name, (metric, bucket, start_ms, end_ms)):
                for r in rows:
                    if keep(r.tags):
                        out.append(ExternalPoint(int(r.ts), r.tags, float(r.value), bool(r.is_long)))
                        if (limit is not None and len(out) >= limit) or (done is not None and done()):
                            return out
                if len(out) > max_rows:
                    raise QueryTooLarge(max_rows)
        return out

    async def metrics(self) -> list[str]:
        return [r.metric for r in await self._all("metrics", ())]

    async def series(self, metric: str) -> list[dict[str, str]]:
        """The tag sets ever written for ``metric`` (until it is deleted)."""
        return [orjson.loads(text) for text in await self.series_texts(metric)]

    async def series_texts(self, metric: str) -> list[str]:
        """The same, as the stored tag texts (JSON, sorted keys) the points carry."""
        return [r.tags for r in await self._all("series", (metric,))]

    async def all_series(self, max_rows: int) -> list[tuple[str, dict[str, str]]]:
        """(metric, tags) of every external series, refused past ``max_rows``."""
        out: list[tuple[str, dict[str, str]]] = []
        async for rows in self._pages("series_every", ()):
            out.extend((r.metric, orjson.loads(r.tags)) for r in rows)
            if len(out) > max_rows:
                raise QueryTooLarge(max_rows)
        return out

    # --- deletes -----------------------------------------------------------------------------

    async def delete(
        self, metric: str, start_ms: int, end_ms: int, keep: Callable[[str], bool] | None, max_rows: int
    ) -> int | None:
        """Delete the points in a range (those whose tags ``keep`` accepts when given).

        Without a tag filter each day is one range delete; with one the matching points are
        read (at most ``max_rows``) and deleted one by one. Returns the points deleted when known.
        """
        buckets = await self.buckets(metric, start_ms, end_ms)
        if keep is None:
            await self._pooled(("del_range", (metric, b, start_ms, end_ms)) for b in buckets)
            return None
        points = await self.read(metric, start_ms, end_ms, max_rows=max_rows, keep=keep)
        await self._pooled(("del_point", (metric, p.ts // EXTERNAL_BUCKET_MS, p.ts, p.tags)) for p in points)
        return len(points)

    async def delete_metric(self, metric: str) -> None:
        """Delete every point of ``metric`` and forget its name, days and tag sets."""
        buckets = [int(r.bucket) for r in await self._all("buckets_all", (metric,))]
        await self._pooled(("del_bucket", (metric, b)) for b in buckets)
        for name in ("buckets_del", "series_del", "metric_del"):
            await self.client.execute(self._ps[name], (metric,))
