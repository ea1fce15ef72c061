"""The rollups' statements over the metrics keyspace: checkpoints, horizons, window rows, the
series index, the keyspace's one owner, and the reads of queries (schema.py makes the tables).

Fencing. Rows, checkpoints and horizons are written ``USING TIMESTAMP`` taken
from what they include, never from a clock: a row at the timestamp of its
``upto`` (the last partition offset it holds), a checkpoint at that of its next
offset, a horizon at that of its window. Cassandra keeps the write with the
highest timestamp, so a member cut off from the group that resumes writing
after the partition's new owner moved on cannot overwrite a newer row or
checkpoint: its writes hold fewer offsets and lose. Two writes of the same
upto hold the same events and are the same aggregate. Offsets are "logical"
(a per-partition base plus the Kafka offset; the base grows when a partition
is rolled up again from a recreated topic), so they never go back. All these
timestamps sit above ``WRITE_TS_BASE`` (2^52 us, year 2112), above every
wall-clock write an older version made, so the first fenced write of a row
replaces an unfenced one.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cassandra.query import BatchStatement, BatchType, PreparedStatement

from services.common.cassandra import CassandraClient, apply_consistency
from services.common.errors import ConfigError
from services.metrics.errors import QueryTooLarge, RangeTooLarge
from services.metrics.gather import bounded_gather
from services.metrics.rollup import BUCKET_MS, RESOLUTIONS, RowKey, WindowRow
from services.metrics.schema import retentions, table
from services.metrics.settings import Settings

# Every fenced write's timestamp is this plus a logical offset (or a window start, for horizons).
WRITE_TS_BASE = 1 << 52
# Room left between the logical offsets of two incarnations of a partition (a recreated topic):
# more records than one flush can ever hold, so no row of the old one is ahead of the new base.
INCARNATION_GAP = 1 << 40
# Bytes a row adds to a batch beside its sketch and sums (keys, count, upto, framing).
_ROW_OVERHEAD_BYTES = 120


def write_timestamp(logical_offset: int) -> int:
    """The Cassandra write timestamp of a row or checkpoint that includes offsets up to this one."""
    return WRITE_TS_BASE + logical_offset


@dataclass(frozen=True)
class Checkpoint:
    """Where a partition resumes: its next Kafka offset, the logical base of its offsets, its watermark."""

    base: int
    next_offset: int
    watermark_ms: int

    @property
    def logical_next(self) -> int:
        return self.base + self.next_offset


class KeyspaceOwned(ConfigError):
    """Another consumer group (or topic) writes the rollups of this keyspace."""


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
        self.batch_rows = settings.write_batch_rows
        self.batch_bytes = settings.write_batch_bytes
        self.read_batch = settings.read_batch_rows
        self.timeout = settings.cassandra_timeout_s
        self.max_buckets = settings.query_max_buckets
        self.series_ttl = max(retentions(settings).values())
        self.read_consistency = settings.read_consistency
        self.write_consistency = settings.write_consistency
        self._ps: dict[str, PreparedStatement] = {}

    async def prepare(self) -> None:
        ks = self.ks
        cql = {
            "checkpoint_get": f"SELECT base, next_offset, watermark_ms FROM {ks}.checkpoints "
            "WHERE consumer_group = ? AND topic = ? AND kpart = ?",
            "checkpoint_all": f"SELECT kpart, base, next_offset, watermark_ms FROM {ks}.checkpoints "
            "WHERE consumer_group = ? AND topic = ?",
            "checkpoint_put": f"INSERT INTO {ks}.checkpoints (consumer_group, topic, kpart, base, next_offset, "
            "watermark_ms, updated_at) VALUES (?, ?, ?, ?, ?, ?, toTimestamp(now())) "
            "USING TIMESTAMP ?",
            "horizon_get": f"SELECT resolution, max_window FROM {ks}.horizons "
            "WHERE consumer_group = ? AND topic = ? AND kpart = ?",
            "horizon_all": f"SELECT kpart, resolution, max_window FROM {ks}.horizons "
            "WHERE consumer_group = ? AND topic = ?",
            "horizon_put": f"INSERT INTO {ks}.horizons (consumer_group, topic, kpart, resolution, max_window) "
            "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
            # The INSERT writes the row's primary key liveness, so a series with no summed
            # property is indexed too (an UPDATE adding an empty set would store nothing).
            "series_put": f"INSERT INTO {ks}.series (k, source, type, event) VALUES (0, ?, ?, ?) "
            f"USING TTL {self.series_ttl}",
            "series_props": f"UPDATE {ks}.series USING TTL {self.series_ttl} SET props = props + ? "
            "WHERE k = 0 AND source = ? AND type = ? AND event = ?",
            "series_all": f"SELECT source, type, event, props FROM {ks}.series WHERE k = 0",
            "owner_claim": f"INSERT INTO {ks}.owner (k, consumer_group, topic, claimed_at) "
            "VALUES (0, ?, ?, toTimestamp(now())) IF NOT EXISTS",
            "owner_set": f"UPDATE {ks}.owner SET consumer_group = ?, topic = ?, claimed_at = toTimestamp(now()) "
            "WHERE k = 0",
        }
        for res in RESOLUTIONS:
            t = f"{ks}.{table(res)}"
            cql[f"get_{res}"] = (
                f"SELECT window_start, type, event, count, users, sums, upto FROM {t} "
                "WHERE source = ? AND bucket = ? AND (window_start, type, event, kpart) IN ?"
            )
            cql[f"put_{res}"] = (
                f"INSERT INTO {t} (source, bucket, window_start, type, event, kpart, count, "
                "users, sums, upto) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            )
            cql[f"range_{res}"] = (
                f"SELECT window_start, type, event, kpart, count, users, sums FROM {t} "
                "WHERE source = ? AND bucket = ? AND window_start >= ? AND window_start <= ?"
            )
            # One event asked for: the node skips the other events' rows within the partition
            # slice, instead of this process decoding them all to drop them.
            cql[f"range_event_{res}"] = cql[f"range_{res}"] + " AND event = ? ALLOW FILTERING"
        names = list(cql)
        prepared = await bounded_gather((self.client.prepare(cql[n]) for n in names), 8)
        apply_consistency(prepared, read=self.read_consistency, write=self.write_consistency)
        self._ps = dict(zip(names, prepared, strict=True))

    # --- ownership ---------------------------------------------------------------------------

    async def claim(self, group: str, topic: str) -> None:
        """Make this (group, topic) the keyspace's one rollup writer, or refuse to start.

        Rows are kept per Kafka partition, not per group: a second group (a renamed
        deployment, another environment) writing the same keyspace would mix its
        partitions' aggregates with ours. So the first writer owns the keyspace, and any
        other is a configuration error; ``headwater-metrics claim --from-group OLD``
        hands the keyspace over with its checkpoints.
        """
        row = next(iter(await self.client.execute(self._ps["owner_claim"], (group, topic))))
        if row[0]:  # the "[applied]" column; when false the row holds the current owner
            return
        if (row.consumer_group, row.topic) != (group, topic):
            raise KeyspaceOwned(
                f"keyspace {self.ks} holds the rollups of consumer group {row.consumer_group!r} on topic "
                f"{row.topic!r}, not {group!r} on {topic!r}; give this deployment its own keyspace, or hand "
                f"the keyspace over with: headwater-metrics claim --from-group {row.consumer_group}"
            )

    async def hand_over(self, old_group: str, group: str, topic: str) -> int:
        """Copy ``old_group``'s checkpoints and horizons to ``group`` and make it the owner."""
        checkpoints = await self._all_pages("checkpoint_all", (old_group, topic))
        horizons = await self._all_pages("horizon_all", (old_group, topic))
        for c in checkpoints:
            await self.save_checkpoint(
                group, topic, int(c.kpart), Checkpoint(int(c.base or 0), int(c.next_offset), int(c.watermark_ms))
            )
        for h in horizons:
            await self.save_horizon(group, topic, int(h.kpart), h.resolution, int(h.max_window))
        await self.client.execute(self._ps["owner_set"], (group, topic))
        return len(checkpoints)

    # --- checkpoints -------------------------------------------------------------------------

    async def load_checkpoint(self, group: str, topic: str, kpart: int) -> Checkpoint | None:
        rows = list(await self.client.execute(self._ps["checkpoint_get"], (group, topic, kpart)))
        if not rows:
            return None
        r = rows[0]
        return Checkpoint(int(r.base or 0), int(r.next_offset), int(r.watermark_ms))

    async def save_checkpoint(self, group: str, topic: str, kpart: int, checkpoint: Checkpoint) -> None:
        await self.client.execute(
            self._ps["checkpoint_put"],
            (
                group,
                topic,
                kpart,
                checkpoint.base,
                checkpoint.next_offset,
                checkpoint.watermark_ms,
                write_timestamp(checkpoint.logical_next),
            ),
        )

    async def load_horizons(self, group: str, topic: str, kpart: int) -> dict[str, int]:
        rows = await self.client.execute(self._ps["horizon_get"], (group, topic, kpart))
        return {r.resolution: int(r.max_window) for r in rows}

    async def save_horizon(self, group: str, topic: str, kpart: int, resolution: str, max_window: int) -> None:
        # At the window's timestamp: a stale member cannot lower a horizon another one raised.
        await self.client.execute(
            self._ps["horizon_put"], (group, topic, kpart, resolution, max_window, WRITE_TS_BASE + max_window)
        )

    # --- window rows -------------------------------------------------------------------------

    async def load_rows(self, kpart: int, keys: Sequence[RowKey]) -> list[WindowRow]:
        """The stored rows of ``keys`` (an empty row where none is stored), in order.

        One ``SELECT ... IN`` per Cassandra partition and ``read_batch_rows`` keys."""
        groups: dict[tuple[str, str, int], list[RowKey]] = defaultdict(list)
        for key in keys:
            groups[(key.resolution, key.source, key.bucket)].append(key)
        reads = [
            (res, source, bucket, chunk[i : i + self.read_batch])
            for (res, source, bucket), chunk in groups.items()
            for i in range(0, len(chunk), self.read_batch)
        ]
        results = await bounded_gather(
            (
                self.client.execute(
                    self._ps[f"get_{res}"], (source, bucket, [(k.window_start, k.type, k.event, kpart) for k in chunk])
                )
                for res, source, bucket, chunk in reads
            ),
            self.concurrency,
        )
        found: dict[RowKey, WindowRow] = {}
        for (res, source, _, _), rows in zip(reads, results, strict=True):
            for r in rows:
                key = RowKey(res, source, r.type, r.event, int(r.window_start))
                found[key] = WindowRow(
                    self.lg_k,
                    count=int(r.count or 0),
                    sums=dict(r.sums or {}),
                    upto=int(r.upto),
                    sketch_blob=bytes(r.users) if r.users else None,
                )
        return [found.get(k) or WindowRow(self.lg_k) for k in keys]

    async def write_rows(self, writes: Sequence[tuple[int, RowKey, WindowRow, int]]) -> None:
        """Write each (kpart, key, row, upto) whole, fenced by upto, in unlogged batches per
        Cassandra partition (one batch is one mutation on the node), bounded in rows and bytes.

        Every write of a failed call is finished or cancelled before the error leaves
        (bounded_gather), so no write of this attempt lands after a retry's.
        """
        groups: dict[tuple[str, str, int], list[tuple[int, RowKey, WindowRow, int]]] = defaultdict(list)
        for write in writes:
            key = write[1]
            groups[(key.resolution, key.source, key.bucket)].append(write)
        batches: list[BatchStatement] = []
        for (res, _, _), group in groups.items():
            statement = self._ps[f"put_{res}"]
            batch, size = self._batch(), 0
            for kpart, key, row, upto in group:
                users = row.users_blob()
                cost = len(users) + _ROW_OVERHEAD_BYTES + sum(len(p) + 8 for p in row.sums)
                if len(batch) and (len(batch) >= self.batch_rows or size + cost > self.batch_bytes):
                    batches.append(batch)
                    batch, size = self._batch(), 0
                batch.add(
                    statement,
                    (
                        key.source,
                        key.bucket,
                        key.window_start,
                        key.type,
                        key.event,
                        kpart,
                        row.count,
                        users,
                        row.sums,
                        upto,
                        write_timestamp(upto),
                    ),
                )
                size += cost
            batches.append(batch)
        await bounded_gather((self.client.execute(b) for b in batches), self.concurrency)

    def _batch(self) -> BatchStatement:
        return BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self.write_consistency)

    async def note_series(self, source: str, etype: str, event: str, props: Iterable[str]) -> None:
        await self.client.execute(self._ps["series_put"], (source, etype, event))
        if props := set(props):
            await self.client.execute(self._ps["series_props"], (props, source, etype, event))

    async def _all_pages(self, name: str, params: tuple[Any, ...] = (), limit: int | None = None) -> list[Any]:
        """Every row of a read that may span pages (CassandraClient.execute returns the first page only).

        With ``limit``, reading stops with QueryTooLarge as soon as the rows pass it, page by page."""
        bound = self._ps[name].bind(params)
        bound.fetch_size = 5000 if limit is None else max(1, min(5000, limit + 1))
        session = self.client.session

        def read() -> list[Any]:
            out: list[Any] = []
            for row in session.execute(bound, timeout=self.timeout):
                out.append(row)
                if limit is not None and len(out) > limit:
                    raise QueryTooLarge(limit)
            return out

        return await asyncio.to_thread(read)

    async def all_series(self) -> list[tuple[str, str, str, frozenset[str]]]:
        rows = await self._all_pages("series_all")
        return [(r.source, r.type, r.event, frozenset(r.props or ())) for r in rows]

    def _buckets(self, start_ms: int, end_ms: int, size: int) -> range:
        """The buckets of a time range, refused when there are more than the setting allows."""
        first, last = start_ms // size, end_ms // size
        if last - first + 1 > self.max_buckets:
            raise RangeTooLarge(last - first + 1, self.max_buckets)
        return range(first, last + 1)

    async def read_windows(
        self, resolution: str, source: str, start_ms: int, end_ms: int, limit: int, event: str | None = None
    ) -> list[StoredRow]:
        """Every row of ``source`` (of one ``event`` if given) with a window starting in
        [start_ms, end_ms]; QueryTooLarge as soon as more than ``limit`` rows were read."""
        out: list[StoredRow] = []
        for bucket in self._buckets(start_ms, end_ms, BUCKET_MS[resolution]):
            params: tuple[Any, ...]
            if event is None:
                name, params = f"range_{resolution}", (source, bucket, start_ms, end_ms)
            else:
                name, params = f"range_event_{resolution}", (source, bucket, start_ms, end_ms, event)
            rows = await self._all_pages(name, params, limit - len(out))
            out.extend(
                StoredRow(
                    int(r.window_start),
                    r.type,
                    r.event,
                    int(r.kpart),
                    int(r.count or 0),
                    bytes(r.users or b""),
                    dict(r.sums or {}),
                )
                for r in rows
            )
        return out
