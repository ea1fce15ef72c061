"""Per-process limits on client connections, below aiohttp.

Slow clients must not hold ingest: thousands of connections that send part of
a request and then nothing would keep their file descriptors and memory for
ever, until real clients are refused. Three bounds, each a setting:

- ``max_connections`` (lowered to fit the file descriptor limit, keeping
  RESERVED_FDS free): beyond this many open client connections a new one is
  answered ``503`` (JSON, ``Retry-After``, ``Connection: close``) at once,
  without reaching aiohttp, and closed after a short linger that lets the
  client read the answer. Refused connections being answered are capped as
  well (aborted beyond ``max_connections`` of them), so a flood cannot turn
  them into the new leak.
- ``client_idle_timeout_s``: aiohttp's keep-alive timeout. It closes a
  connection that has no complete request headers this long after it opened
  or after its previous answer: idle keep-alive connections and headers sent
  in part or trickled both end there.
- ``client_body_timeout_s``: the POST handlers read a body that is not all
  buffered yet under this deadline, then answer ``408`` and close.

The guard wraps the protocol factory of the listening socket (services/common/
runner.py ``protocol_wrapper``); the wrapped aiohttp protocol sees every event
as before.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from typing import cast

import orjson
import structlog

log = structlog.get_logger(__name__)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# How long a refused connection stays open so the client reads its 503 before
# the close (closing with unread request bytes would reset it, losing the answer).
REFUSED_LINGER_S = 1.0


def refusal(retry_after_s: int) -> bytes:
    body = orjson.dumps(
        {
            "success": False,
            "error": "too_many_connections",
            "message": "this ingest process has as many open connections as it takes; retry",
        }
    )
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (retry_after_s, len(body), body)
    )


# File descriptors kept free of client connections: Kafka, the spool, the
# registry file, the listening socket, logging.
RESERVED_FDS = 64


def usable_connections(wanted: int) -> int:
    """``wanted``, lowered to what the process's file descriptor limit leaves once
    RESERVED_FDS are kept (a cap above the limit would not stop the exhaustion)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft - RESERVED_FDS:
        return wanted
    usable = max(1, soft - RESERVED_FDS)
    log.warning(
        "max_connections is above what the file descriptor limit allows; lowered",
        max_connections=wanted,
        nofile_limit=soft,
        used=usable,
    )
    return usable


class ConnectionGuard:
    """Counts this process's client connections and refuses those past the cap."""

    def __init__(self, max_connections: int, retry_after_s: int = 1) -> None:
        self.max_connections = max_connections
        self.open = 0  # connections handed to aiohttp
        self.refusing = 0  # refused connections still lingering
        self.refused_total = 0
        self.answer = refusal(retry_after_s)

    def wrap(self, factory: ProtocolFactory) -> ProtocolFactory:
        """The protocol factory to listen with: ``factory``'s protocols, counted and capped."""
        return lambda: _Guarded(self, factory)


class _Guarded(asyncio.Protocol):
    __slots__ = ("_factory", "_guard", "_inner", "_linger", "_transport")

    def __init__(self, guard: ConnectionGuard, factory: ProtocolFactory) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        guard = self._guard
        transport = cast(asyncio.Transport, base)  # uvloop's transports are not asyncio's classes
        if guard.open < guard.max_connections:
            guard.open += 1
            inner = cast(asyncio.Protocol, self._factory())
            self._inner = inner
            inner.connection_made(transport)
            return
        guard.refused_total += 1
        if guard.refusing >= guard.max_connections:
            transport.abort()  # a flood of refusals: no answer, no linger
            return
        guard.refusing += 1
        self._transport = transport
        transport.write(guard.answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
        # A refused connection's request is read and dropped.

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        return False  # refused: the client is done; close

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._guard.open -= 1
            self._inner.connection_lost(exc)
            self._inner = None
        elif self._transport is not None:
            self._guard.refusing -= 1
            self._transport = None
            if self._linger is not None:
                self._linger.cancel()
