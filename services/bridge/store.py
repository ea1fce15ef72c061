"""Shard leases, checkpoints and the parity counts, in Cassandra.

Why Cassandra and not a compacted Kafka topic: a lease needs compare-and-set
(take a shard only if nobody renewed it since we looked; write a checkpoint
only while we still hold the lease), which Cassandra's lightweight
transactions give per row and a Kafka topic does not (a compacted topic
keeps the last write, whoever made it, so two processes could both believe
they hold a shard, and a stale one could move a checkpoint backwards). It
is the KCL's DynamoDB table with conditional writes, on the database the
fleet already runs.

Invariants:

* One row per (stream, shard): owner, expiry, a lease counter that grows on
  every change of owner, the checkpoint (last sequence number whose record
  Kafka acknowledged) and ``finished`` (read to the end of a closed shard).
* Every write to a lease row is conditional on the lease counter the writer
  saw (LWT), so a process that lost its lease can neither renew it nor move
  its checkpoint: it learns it lost the shard and stops reading it.
* Parity rows are keyed by messageId, so re-reading records after a crash
  (at least once) writes the same rows again: counts stay exact.
* A node killed with a periodic commitlog loses what it acknowledged since its
  last sync, checkpoints and parity rows alike. ``Store.failures`` counts failed
  calls and nodes going down or up; a reader that sees it move reads its stored
  checkpoint back before it writes the next one (checkpoints.py), so no checkpoint
  passes parity rows that are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from services.bridge.errors import CASSANDRA_ERRORS
from services.bridge.settings import Settings
from services.common.cassandra import CassandraClient, HostChanges, Migration, migrate

MIGRATIONS = (
    Migration(
        1,
        "shard leases and checkpoints",
        (
            "CREATE TABLE IF NOT EXISTS {keyspace}.shard_leases ("
            " stream text, shard_id text, owner text, expires_at_ms bigint, lease_counter bigint,"
            " checkpoint text, finished boolean, PRIMARY KEY ((stream), shard_id))",
        ),
    ),
    Migration(
        2,
        "legacy messageIds per source and minute, for the parity report",
        (
            "CREATE TABLE IF NOT EXISTS {keyspace}.parity_ids ("
            " source_id text, minute_ms bigint, type text, event text, message_id text,"
            " PRIMARY KEY ((source_id, minute_ms), type, event, message_id))",
        ),
    ),
)


@dataclass(frozen=True)
class LeaseRow:
    stream: str
    shard_id: str
    owner: str | None
    expires_at_ms: int
    counter: int
    checkpoint: str | None
    finished: bool


@dataclass
class Lease:
    """A lease this process holds; ``counter`` is what its conditional writes check."""

    stream: str
    shard_id: str
    owner: str
    counter: int
    checkpoint: str | None
    lost: asyncio.Event
    # Store.failures when ``checkpoint`` was last known to be what Cassandra holds; never yet
    # for a lease just taken (the row it was taken from may have been read before a loss).
    confirmed: int = -1

    @property
    def key(self) -> tuple[str, str]:
        return self.stream, self.shard_id


@dataclass(frozen=True)
class ParityEntry:
    source_id: str
    minute_ms: int
    type: str
    event: str
    message_id: str


def _applied(rows: Any) -> bool:
    """Whether an LWT was applied: its first column is ``[applied]`` (the client hands rows over)."""
    rows = list(rows)
    return bool(rows) and bool(rows[0][0])


def _lease_row(stream: str, r: Any) -> LeaseRow:
    return LeaseRow(
        stream, r.shard_id, r.owner, r.expires_at_ms or 0, r.lease_counter or 0, r.checkpoint, bool(r.finished)
    )


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    """Leases, checkpoints and parity rows. ``failures`` counts the Cassandra calls that
    failed and the nodes seen going down or up: a node killed with a periodic commitlog
    loses what it acknowledged since its last sync, so a reader that sees the count move
    reads its stored checkpoint back before it writes another (checkpoints.py)."""

    def __init__(self, client: CassandraClient, keyspace: str, *, parity_ttl_s: int) -> None:
        self.client = client
        self.keyspace = keyspace
        self.parity_ttl_s = parity_ttl_s
        self._stmts: dict[str, PreparedStatement] = {}
        self._failures = itertools.count(1)
        self.failures = 0

    def failed(self) -> None:
        """Thread-safe: one more failure (a failed call, a node down or up)."""
        self.failures = next(self._failures)

    def watch_hosts(self) -> Callable[[], None]:
        """Count nodes going down or up as failures; returns what stops it."""
        watch = HostChanges(self.failed)
        cluster = self.client.session.cluster
        cluster.register_listener(watch)
        return lambda: cluster.unregister_listener(watch)

    async def _execute(self, stmt: Any, params: Any = None) -> Any:
        try:
            return await self.client.execute(stmt, params)
        except CASSANDRA_ERRORS:
            self.failed()
            raise

    async def _read_all(self, stmt: PreparedStatement, params: Any) -> list[Any]:
        """Every row of a read that may span pages."""
        try:
            return await asyncio.to_thread(lambda: list(self.client.session.execute(stmt, params)))
        except CASSANDRA_ERRORS:
            self.failed()
            raise

    async def migrate(self, replication: str) -> list[int]:
        return await migrate(self.client, self.keyspace, MIGRATIONS, replication=replication)

    async def prepare(self) -> None:
        ks = self.keyspace
        cql = {
            "list": f"SELECT shard_id, owner, expires_at_ms, lease_counter, checkpoint, finished "
            f"FROM {ks}.shard_leases WHERE stream = ?",
            "get": f"SELECT shard_id, owner, expires_at_ms, lease_counter, checkpoint, finished "
            f"FROM {ks}.shard_leases WHERE stream = ? AND shard_id = ?",
            "create": f"INSERT INTO {ks}.shard_leases (stream, shard_id, owner, expires_at_ms, lease_counter, "
            f"finished) VALUES (?, ?, ?, ?, 1, false) IF NOT EXISTS",
            "take": f"UPDATE {ks}.shard_leases SET owner = ?, expires_at_ms = ?, lease_counter = ? "
            f"WHERE stream = ? AND shard_id = ? IF lease_counter = ?",
            "renew": f"UPDATE {ks}.shard_leases SET expires_at_ms = ? WHERE stream = ? AND shard_id = ? "
            f"IF lease_counter = ? AND owner = ?",
            "checkpoint": f"UPDATE {ks}.shard_leases SET checkpoint = ?, finished = ?, expires_at_ms = ? "
            f"WHERE stream = ? AND shard_id = ? IF lease_counter = ? AND owner = ?",
            "parity": f"INSERT INTO {ks}.parity_ids (source_id, minute_ms, type, event, message_id) "
            f"VALUES (?, ?, ?, ?, ?) USING TTL {int(self.parity_ttl_s)}",
            "parity_read": f"SELECT type, event, message_id FROM {ks}.parity_ids WHERE source_id = ? AND minute_ms = ?",
        }
        for name, text in cql.items():
            stmt = await self.client.prepare(text)
            # Lease rows are read and written at quorum, LWTs at SERIAL: one truth per shard.
            stmt.consistency_level = ConsistencyLevel.QUORUM
            self._stmts[name] = stmt

    # -- leases ------------------------------------------------------------------

    async def leases(self, stream: str) -> dict[str, LeaseRow]:
        rows = await self._read_all(self._stmts["list"], (stream,))
        return {r.shard_id: _lease_row(stream, r) for r in rows}

    async def stored(self, lease: Lease) -> LeaseRow | None:
        """The shard's lease row as Cassandra holds it now."""
        rows = list(await self._execute(self._stmts["get"], (lease.stream, lease.shard_id)))
        return _lease_row(lease.stream, rows[0]) if rows else None

    async def take(
        self, stream: str, shard_id: str, seen: LeaseRow | None, owner: str, duration_ms: int
    ) -> Lease | None:
        """Take a shard nobody holds (no row, or an expired lease whose counter is
        still what we saw). None when another process was quicker."""
        expires = now_ms() + duration_ms
        if seen is None:
            result = await self._execute(self._stmts["create"], (stream, shard_id, owner, expires))
            if not _applied(result):
                return None
            return Lease(stream, shard_id, owner, 1, None, asyncio.Event())
        counter = seen.counter + 1
        result = await self._execute(self._stmts["take"], (owner, expires, counter, stream, shard_id, seen.counter))
        if not _applied(result):
            return None
        return Lease(stream, shard_id, owner, counter, seen.checkpoint, asyncio.Event())

    async def renew(self, lease: Lease, duration_ms: int) -> bool:
        result = await self._execute(
            self._stmts["renew"], (now_ms() + duration_ms, lease.stream, lease.shard_id, lease.counter, lease.owner)
        )
        return _applied(result)

    async def checkpoint(self, lease: Lease, sequence: str | None, *, finished: bool, duration_ms: int) -> bool:
        """Move the checkpoint (and renew) while the lease is ours; False when it is not."""
        result = await self._execute(
            self._stmts["checkpoint"],
            (sequence, finished, now_ms() + duration_ms, lease.stream, lease.shard_id, lease.counter, lease.owner),
        )
        if _applied(result):
            lease.checkpoint = sequence
        return _applied(result)

    async def release(self, lease: Lease) -> bool:
        """Let another process take the shard at once (a clean stop)."""
        result = await self._execute(
            self._stmts["renew"], (0, lease.stream, lease.shard_id, lease.counter, lease.owner)
        )
        return _applied(result)

    # -- parity -------------------------------------------------------------------

    async def record_parity(self, entries: Iterable[ParityEntry]) -> None:
        """One unlogged batch per (source, minute) partition: cheap, and idempotent."""
        by_partition: dict[tuple[str, int], list[ParityEntry]] = defaultdict(list)
        for e in entries:
            by_partition[(e.source_id, e.minute_ms)].append(e)
        statements = []
        for group in by_partition.values():
            for start in range(0, len(group), 200):
                # A batch has a consistency level of its own; its statements' are ignored.
                batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=ConsistencyLevel.QUORUM)
                for e in group[start : start + 200]:
                    batch.add(self._stmts["parity"], (e.source_id, e.minute_ms, e.type, e.event, e.message_id))
                statements.append(batch)
        await asyncio.gather(*(self._execute(b) for b in statements))

    async def parity_ids(self, source_id: str, minute_ms: int) -> list[Any]:
        """Every (type, event, message_id) the bridge saw for the source in that minute (paged)."""
        return await self._read_all(self._stmts["parity_read"], (source_id, minute_ms))


@contextlib.asynccontextmanager
async def cassandra_store(settings: Settings) -> AsyncIterator[Store]:
    """A connected, migrated, prepared Store; the connection closes on exit."""
    client = CassandraClient(list(settings.cassandra_hosts), settings.cassandra_port)
    await client.connect()
    try:
        store = Store(client, settings.cassandra_keyspace, parity_ttl_s=settings.parity_ttl_s)
        await store.migrate(settings.cassandra_replication)
        await store.prepare()
        unwatch = store.watch_hosts()
        try:
            yield store
        finally:
            unwatch()
    finally:
        await client.close()
