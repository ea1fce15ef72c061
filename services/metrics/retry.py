"""The one backoff helper of the rollup consumer, and which failures it retries.

A Cassandra or Kafka call that failed for a reason that may pass (a node
restarting, a timeout) is tried again with exponential backoff. Inside a
rebalance callback the whole group waits for us, so there the retry is bounded
by a deadline (the ``rebalance_retry_s`` setting) and then gives up with the
last error; the consumer stops and its supervisor starts it again. At start,
the schema migration is retried the same way, on timeouts and unavailability
only (SCHEMA_RETRIABLE), for the ``schema_retry_s`` setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from aiokafka.errors import KafkaError
from cassandra import DriverException, OperationTimedOut, Timeout, Unavailable
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionBusy, ConnectionException

from services.common.errors import DependencyUnavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A connection lost or refused, a store not connected, a timeout: what any call can outlast.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    NoHostAvailable,
    ConnectionException,
    ConnectionBusy,
    DependencyUnavailable,
    OSError,
    TimeoutError,
)
# Failures a retry can outlast: Cassandra or Kafka restarting, a timeout.
RETRIABLE: tuple[type[BaseException], ...] = (DriverException, KafkaError, *_UNREACHABLE)
# What a schema change can outlast: a node slow to answer or agree, or restarting. Not
# the rest of DriverException: an invalid statement fails the same way every time.
SCHEMA_RETRIABLE: tuple[type[BaseException], ...] = (OperationTimedOut, Timeout, Unavailable, *_UNREACHABLE)
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 5.0


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    retriable: tuple[type[BaseException], ...] = RETRIABLE,
) -> T:
    """Await ``call()`` until it succeeds; retriable failures are retried with backoff.

    ``on_failure`` sees every retriable failure (the consumer counts them and, for
    Cassandra, asks for a resync). Past ``deadline_s`` the last failure is raised.
    ``retriable``: the failures tried again (RETRIABLE by default); any other is raised at once.
    """
    loop = asyncio.get_running_loop()
    give_up = None if deadline_s is None else loop.time() + deadline_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return await call()
        except retriable as exc:
            if on_failure is not None:
                on_failure(exc)
            if give_up is not None and loop.time() + delay > give_up:
                log.exception(
                    "giving up after retrying", what=what, error=f"{type(exc).__name__}: {exc}", deadline_s=deadline_s
                )
                raise
            log.warning(
                "storage call failed; retrying", what=what, error=f"{type(exc).__name__}: {exc}", retry_in_s=delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
