"""Many Cassandra calls at once, at most so many in flight: ``bounded_gather``. A failed call
leaves nothing running behind it, which the fenced writes and their retries rely on.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


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
