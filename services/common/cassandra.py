"""Cassandra access for asyncio code, and idempotent schema migrations."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.policies import DCAwareRoundRobinPolicy, HostStateListener
from cassandra.query import PreparedStatement

from services.common.errors import DependencyUnavailable

log = structlog.get_logger(__name__)


class HostChanges(HostStateListener):  # type: ignore[misc]
    """Calls ``changed`` (on a driver thread) when a node goes down or comes up: a node killed
    with a periodic commitlog loses what it acknowledged since its last sync, so whoever
    relies on earlier writes must read them back. Register it with the session's cluster."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self.changed = changed

    def on_down(self, host: object) -> None:
        self.changed()

    def on_up(self, host: object) -> None:
        self.changed()

    def on_add(self, host: object) -> None:
        return None

    def on_remove(self, host: object) -> None:
        return None


def _bridge(future: ResponseFuture) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    result: asyncio.Future[Any] = loop.create_future()

    def settle(rows: Any = None, exc: BaseException | None = None) -> None:
        if result.done():  # the awaiting task was cancelled
            return
        if exc is None:
            result.set_result(rows)
        else:
            result.set_exception(exc)

    def ok(rows: Any) -> None:
        loop.call_soon_threadsafe(settle, rows)

    def failed(exc: BaseException) -> None:
        loop.call_soon_threadsafe(settle, None, exc)

    future.add_callbacks(ok, failed)
    return result


class CassandraClient:
    """One driver Cluster/Session, used from asyncio through execute()."""

    def __init__(
        self,
        hosts: Sequence[str],
        port: int,
        *,
        keyspace: str | None = None,
        request_timeout_s: float = 10.0,
        consistency_level: int | None = None,
    ) -> None:
        # consistency_level: of the statements that name none (None: the driver's LOCAL_ONE).
        profile = ExecutionProfile(
            load_balancing_policy=DCAwareRoundRobinPolicy(),
            request_timeout=request_timeout_s,
            consistency_level=(ConsistencyLevel.LOCAL_ONE if consistency_level is None else consistency_level),
        )
        self._cluster = Cluster(
            list(hosts),
            port=port,
            protocol_version=5,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            connect_timeout=request_timeout_s,
            control_connection_timeout=request_timeout_s,
        )
        self._keyspace = keyspace
        self._timeout = request_timeout_s
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            raise DependencyUnavailable("Cassandra client is not connected")
        return self._session

    async def connect(self) -> None:
        if self._session is not None:
            return
        try:
            session: Session = await asyncio.to_thread(self._cluster.connect)
        except Exception as exc:
            raise DependencyUnavailable(f"Cassandra did not answer: {exc}") from exc
        self._session = session
        if self._keyspace:
            await self.execute(f"USE {self._keyspace}")

    async def prepare(self, cql: str) -> PreparedStatement:
        return await asyncio.to_thread(self.session.prepare, cql)

    async def execute(
        self, statement: str | PreparedStatement | Any, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> Any:
        """Run one statement. The result holds the first page only (the driver's
        fetch_size, 5,000 rows by default): page explicitly for larger reads."""
        return await _bridge(self.session.execute_async(statement, params, timeout=self._timeout))

    async def close(self) -> None:
        """Close the driver's connections; safe to call twice."""
        self._session = None
        await asyncio.to_thread(self._cluster.shutdown)

    async def ready(self) -> tuple[bool, str]:
        try:
            await self.execute("SELECT release_version FROM system.local")
        except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
            return False, f"cassandra: {type(exc).__name__}: {exc}"
        return True, "ok"


# -- replication and consistency --------------------------------------------------------------

ConsistencyName = Literal["ANY", "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE"]

_REPLICAS = re.compile(r"'([A-Za-z0-9_.-]+)'\s*:\s*'?(\d+)'?")


def replication_factor(replication: str) -> int:
    """The replicas per data centre of a keyspace's CQL replication map: SimpleStrategy's
    ``replication_factor``, or the largest of NetworkTopologyStrategy's per-DC factors."""
    factors = {k: int(v) for k, v in _REPLICAS.findall(replication)}
    if not factors:
        raise ValueError(f"no replication factor in {replication!r}")
    return factors.get("replication_factor", max(factors.values()))


def consistency_level(name: ConsistencyName | None, replication: str) -> int:
    """``name``'s level; unset: LOCAL_QUORUM when the keyspace keeps more than one replica
    (a read then sees every acknowledged write, and one node down stops nothing at RF 3),
    else LOCAL_ONE (the driver's default, the only level one replica can answer)."""
    if name is not None:
        return int(getattr(ConsistencyLevel, name))
    return int(ConsistencyLevel.LOCAL_QUORUM if replication_factor(replication) > 1 else ConsistencyLevel.LOCAL_ONE)


def apply_consistency(statements: Iterable[PreparedStatement], *, read: int, write: int) -> None:
    """Give each prepared statement the read level (SELECT) or the write level (the rest);
    the statements bound from them inherit it."""
    for statement in statements:
        is_read = statement.query_string.lstrip().upper().startswith("SELECT")
        statement.consistency_level = read if is_read else write


@dataclass(frozen=True)
class Migration:
    """One schema step; ``version`` orders steps and must never be reused."""

    version: int
    description: str
    statements: tuple[str, ...]


async def migrate(
    client: CassandraClient,
    keyspace: str,
    migrations: Sequence[Migration],
    *,
    replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}",
) -> list[int]:
    """Create the keyspace and apply the migrations it has not seen, in order.

    Each statement must be idempotent (IF NOT EXISTS), so a migration that
    died half-way is simply run again. Returns the versions applied now.
    """
    await client.execute(f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}")
    await client.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations "
        "(version int PRIMARY KEY, description text, applied_at timestamp)"
    )
    rows = await client.execute(f"SELECT version FROM {keyspace}.schema_migrations")
    done = {row.version for row in rows}
    applied = []
    for step in sorted(migrations, key=lambda m: m.version):
        if step.version in done:
            continue
        for cql in step.statements:
            await client.execute(cql.format(keyspace=keyspace))
        await client.execute(
            f"INSERT INTO {keyspace}.schema_migrations (version, description, applied_at) "
            "VALUES (%s, %s, toTimestamp(now()))",
            (step.version, step.description),
        )
        log.info("schema migrated", keyspace=keyspace, version=step.version, description=step.description)
        applied.append(step.version)
    return applied
