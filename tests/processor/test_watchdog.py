"""The watchdog's decisions, with a clock of our own and no Kafka (the Kafka side is
test_liveness.py)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from services.processor.errors import ConsumerStuck
from services.processor.metrics import make_metrics
from services.processor.settings import Settings
from services.processor.watchdog import GroupState, StuckReason, Watchdog
from tests.processor.test_dispatch import sample


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_watchdog(clock: Clock, answers: list[bool] | None = None) -> tuple[Watchdog, object]:
    failures = make_metrics(CollectorRegistry()).watchdog_failures

    async def kafka_answers() -> bool:
        return answers[-1] if answers else True

    dog = Watchdog(10.0, failures, "127.0.0.1:9", kafka_answers=kafka_answers, clock=clock)
    dog.started()
    return dog, failures


def test_out_of_the_group_past_the_timeout_is_stuck_and_an_assignment_ends_it() -> None:
    clock = Clock()
    dog, _ = make_watchdog(clock)
    clock.now += 10
    assert dog.stuck() is None
    clock.now += 0.5
    assert dog.stuck() is StuckReason.REJOIN
    dog.assigned()
    assert dog.state is GroupState.ASSIGNED
    assert dog.stuck() is None
    assert dog.stalled_s() == 0


def test_a_revocation_starts_the_clock_once_per_rebalance() -> None:
    clock = Clock()
    dog, _ = make_watchdog(clock)
    dog.assigned()
    clock.now += 100  # idle, but progressed() below
    dog.progressed()
    dog.joining()
    clock.now += 6
    dog.joining()  # a second revocation in the same rebalance does not restart the clock
    clock.now += 6
    assert dog.stuck() is StuckReason.REJOIN


def test_in_the_group_without_progress_is_stuck_progress_resets_it() -> None:
    clock = Clock()
    dog, _ = make_watchdog(clock)
    dog.assigned()
    clock.now += 9
    dog.progressed()
    clock.now += 9
    assert dog.stuck() is None
    clock.now += 2
    assert dog.stuck() is StuckReason.NO_PROGRESS


async def test_guard_cancels_the_loop_counts_and_raises_when_stuck_while_kafka_answers() -> None:
    clock = Clock()
    answers = [False]
    dog, failures = make_watchdog(clock, answers)
    loop_cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            loop_cancelled.set()

    guarded = asyncio.create_task(dog.guard(work()))
    clock.now += 11  # stuck, but Kafka does not answer: an outage, not a hang
    await asyncio.sleep(1.5)
    assert not guarded.done()
    answers.append(True)
    with pytest.raises(ConsumerStuck, match="rejoin"):
        await asyncio.wait_for(guarded, 5)
    assert loop_cancelled.is_set()
    assert sample(failures, {"reason": "rejoin"}) == 1


async def test_guard_returns_when_the_loop_ends_and_stops_watching() -> None:
    dog, _ = make_watchdog(Clock())

    async def work() -> None:
        return None

    await asyncio.wait_for(dog.guard(work()), 5)


def test_rejoin_timeout_must_outlast_the_restore_timeout() -> None:
    with pytest.raises(ValueError, match="HEADWATER_PROCESSOR_REJOIN_TIMEOUT_S"):
        Settings(rejoin_timeout_s=30, restore_timeout_s=60)
