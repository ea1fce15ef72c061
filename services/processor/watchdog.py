"""The processor's liveness watchdog: a consumer that cannot get back into its group, or
that makes no progress while records wait, fails the service instead of hanging silently.

Why it exists
-------------
aiokafka's group membership lives in a background task that calls our rebalance
listener and retries its broker calls (join, sync, offset fetch, a transactional
producer's init and commit) without a deadline, most of them logging nothing
below WARNING. When one of those waits never ends, for instance a revocation
that waits for a transaction stuck on a coordinator that went away, the consumer
stays out of its group: getmany() returns nothing, nothing is committed, and no
line is logged ("Heartbeat failed: local member_id was not recognized" was the
last one in the CI run this was written for).

What it watches
---------------
``GroupState`` follows the listener, with these transitions::

    JOINING  -> ASSIGNED  on_partitions_assigned finished (with no partition too:
                          more processes than partitions is fine)
    ASSIGNED -> JOINING   on_partitions_revoked began: a rebalance, or a rejoin after
                          the coordinator forgot this member

A processor is stuck when it has been JOINING (since start or since the
revocation) for longer than ``rejoin_timeout_s``, or when it has been ASSIGNED
and nothing counted as progress for that long. Progress is a committed batch, or
a pass of the loop that saw no owned partition lagging (an idle processor is not
stuck). Being stuck only counts while Kafka answers a metadata request: during
an outage nothing can move, and the kafka readiness check already says why.

What it does
------------
It counts the reason in ``headwater_processor_watchdog_failures_total``, logs at
error level and raises :class:`ConsumerStuck` out of the processor's run loop, so
the runner stops the service with exit code 1 and its supervisor starts a fresh
process. Not a rebuild inside the process: a consumer wedged inside aiokafka may
not stop (its heartbeat could keep its partitions assigned), while a new process
starts with nothing of it. Exactly once holds: the new process's producers take
the same per-partition transactional ids, which fences the old ones and aborts
whatever they left open, and it reads the committed offsets and dedupe state
back (transactions.py).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog
from prometheus_client import Counter

from services.common.kafka import kafka_ready
from services.processor.errors import ConsumerStuck

log = structlog.get_logger(__name__)


class GroupState(enum.Enum):
    JOINING = "joining"
    ASSIGNED = "assigned"


class StuckReason(enum.Enum):
    # Out of the group (revoked or never assigned) past the timeout.
    REJOIN = "rejoin"
    # In the group with records waiting, and nothing committed past the timeout.
    NO_PROGRESS = "no_progress"


KafkaAnswers = Callable[[], Awaitable[bool]]


class Watchdog:
    """Told by the processor about rebalances and progress; ``watch()`` raises when stuck."""

    def __init__(
        self,
        timeout_s: float,
        failures: Counter,
        kafka_bootstrap: str,
        *,
        kafka_answers: KafkaAnswers | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s = timeout_s
        self._failures = failures
        self._bootstrap = kafka_bootstrap
        # Whether Kafka answers a metadata request now (unit tests give a stand-in).
        self._kafka_answers = kafka_answers or self._ask_kafka
        self._clock = clock
        self.state = GroupState.JOINING
        self._since = clock()  # when the state was entered
        self._progress_at = self._since

    # -- what the processor reports ------------------------------------------------

    def started(self) -> None:
        """The consumer subscribed: JOINING from now (not from construction, which may
        have been long before Kafka answered)."""
        self.state, self._since = GroupState.JOINING, self._clock()

    def joining(self) -> None:
        """Started, or partitions revoked: out of the group until the next assignment."""
        if self.state is not GroupState.JOINING:
            self.state, self._since = GroupState.JOINING, self._clock()

    def assigned(self) -> None:
        """A rebalance finished; progress is counted from here."""
        self.state = GroupState.ASSIGNED
        self._since = self._progress_at = self._clock()

    def progressed(self) -> None:
        self._progress_at = self._clock()

    async def _ask_kafka(self) -> bool:
        return (await kafka_ready(self._bootstrap))[0]

    # -- what it decides -------------------------------------------------------------

    def stalled_s(self) -> float:
        """Seconds out of the group, or in it without progress (the stuck_seconds gauge)."""
        now = self._clock()
        return now - (self._since if self.state is GroupState.JOINING else self._progress_at)

    def stuck(self) -> StuckReason | None:
        """Why the processor is stuck, or None; Kafka's answer is not asked here."""
        if self.stalled_s() <= self.timeout_s:
            return None
        return StuckReason.REJOIN if self.state is GroupState.JOINING else StuckReason.NO_PROGRESS

    def out_of_group(self, grace_s: float) -> str | None:
        """For readiness: why the consumer counts as out of its group (JOINING for longer
        than ``grace_s``; a rebalance takes a moment), or None."""
        if self.state is GroupState.JOINING and (joining_s := self.stalled_s()) > grace_s:
            return f"out of the consumer group for {joining_s:.1f} s"
        return None

    async def guard(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (the processor's loop) while watching; ConsumerStuck cancels it."""
        job = asyncio.create_task(work, name="processor-loop")
        watch = asyncio.create_task(self.watch(), name="processor-watchdog")
        try:
            done, _ = await asyncio.wait([job, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, job):
                task.cancel()  # nothing for the one that finished
            await asyncio.gather(job, watch, return_exceptions=True)
        (job if job in done else watch).result()

    async def watch(self, interval_s: float = 1.0) -> None:
        """Check every ``interval_s``; raise ConsumerStuck once stuck while Kafka answers."""
        while True:
            await asyncio.sleep(interval_s)
            reason = self.stuck()
            if reason is None or not await self._kafka_answers():
                continue
            stalled_s = round(self.stalled_s(), 1)
            self._failures.labels(reason.value).inc()
            log.error(
                "consumer stuck while Kafka answers; stopping the processor so its supervisor starts it again",
                reason=reason.value,
                stuck_s=stalled_s,
                rejoin_timeout_s=self.timeout_s,
                group_state=self.state.value,
            )
            raise ConsumerStuck(f"{reason.value}: {self.state.value} for {stalled_s} s (rejoin_timeout_s)")
