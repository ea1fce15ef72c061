"""Step 3.4 of the bridge loop: a shard's checkpoint, written under its lease, and what
makes it safe after a Cassandra failure (read back first: see ``Checkpoints.write``)."""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from services.bridge.errors import CASSANDRA_ERRORS
from services.bridge.kinesis import Backoff
from services.bridge.metrics import BridgeMetrics
from services.bridge.settings import Settings
from services.bridge.store import Lease, ParityEntry, Store

log = structlog.get_logger(__name__)
T = TypeVar("T")


class Step(enum.Enum):
    """How a checkpoint ended (``Checkpoints.write``)."""

    DONE = "done"  # written
    LOST = "lost"  # the lease is another process's, or this process is stopping
    REWOUND = "rewound"  # Cassandra held an older checkpoint: read the shard again from it


async def while_held(
    call: Callable[[], Awaitable[T]],
    lease: Lease,
    stop: asyncio.Event,
    settings: Settings,
    *,
    errors: tuple[type[BaseException], ...],
    failed: str,
) -> T | None:
    """``call()`` again, with backoff, on ``errors`` (logged as ``failed``) until it succeeds;
    None once this process stops or the lease is gone."""
    backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
    while True:
        try:
            return await call()
        except errors as exc:
            log.warning(failed, stream=lease.stream, shard=lease.shard_id, error=f"{type(exc).__name__}: {exc}")
            if stop.is_set() or lease.lost.is_set():
                return None
            await backoff.wait(stop)


class Checkpoints:
    """Writes the checkpoints of the shards one ShardWorker reads."""

    def __init__(self, settings: Settings, store: Store, metrics: BridgeMetrics, stop: asyncio.Event) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._stop = stop

    async def write(
        self,
        lease: Lease,
        sequence: str | None,
        *,
        finished: bool,
        duration_ms: int,
        parity: Sequence[ParityEntry] = (),
    ) -> Step:
        """Step 3.4, tried again while Cassandra is away (the batch is in Kafka already; giving
        up would only send it once more).

        A node killed with a periodic commitlog loses what it acknowledged since its last
        sync: earlier checkpoints and parity rows, which a checkpoint written into the
        restarted node would pass for good. So after any failure since the lease's checkpoint
        was last confirmed (``Store.failures`` moved), the stored checkpoint is read back
        first. Older than ours: REWOUND, the shard is read again from it (its batches go to
        Kafka again, at least once, and their parity rows are written again). The same: only
        this batch's ``parity`` rows can be gone, and they are written again before the
        checkpoint. REWOUND, DONE or LOST: see ``Step``."""
        step = await while_held(
            functools.partial(self._attempt, lease, sequence, finished, duration_ms, parity),
            lease,
            self._stop,
            self.settings,
            errors=CASSANDRA_ERRORS,
            failed="checkpoint not written; trying again",
        )
        return Step.LOST if step is None else step

    async def _attempt(
        self, lease: Lease, sequence: str | None, finished: bool, duration_ms: int, parity: Sequence[ParityEntry]
    ) -> Step:
        if self.store.failures != lease.confirmed:
            step = await self._confirm(lease, sequence, parity)
            if step is not None:
                return step
        applied = await self.store.checkpoint(lease, sequence, finished=finished, duration_ms=duration_ms)
        return Step.DONE if applied else Step.LOST

    async def _confirm(self, lease: Lease, sequence: str | None, parity: Sequence[ParityEntry]) -> Step | None:
        """Check the lease's checkpoint against Cassandra's after a failure; None when it holds.

        The stored one is ``sequence`` itself when the attempt that failed was applied after
        all (a timeout): done, and its parity rows, written before it, are stored too."""
        mark = self.store.failures
        row = await self.store.stored(lease)
        if row is None or row.counter != lease.counter or row.owner != lease.owner:
            return Step.LOST
        if row.checkpoint == lease.checkpoint:
            if parity:
                await self.store.record_parity(parity)
            lease.confirmed = mark
            return None
        lease.confirmed = mark
        if row.checkpoint == sequence:
            lease.checkpoint = sequence
            return Step.DONE
        log.warning(
            "the stored checkpoint is not the one this lease last wrote (lost by a node, or written by "
            "the last owner after the lease was read); reading the shard again from it",
            stream=lease.stream,
            shard=lease.shard_id,
            checkpoint=row.checkpoint,
            ours=lease.checkpoint,
        )
        self.metrics.rewinds.labels(lease.stream).inc()
        lease.checkpoint = row.checkpoint
        return Step.REWOUND
