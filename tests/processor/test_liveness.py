"""A consumer that cannot get back into its group, against the real Kafka.

Two ways it could hang for good, both seen as the CI run where, after the broker was
killed and restarted, the consumer never rejoined: a revocation waiting on a transaction
whose broker call never answers, and any other wait inside a rebalance that never ends.
The first must be cut off within a session timeout; the second must fail the process
(exit 1) within rejoin_timeout_s. Every event still comes out exactly once.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from services.processor import transactions
from services.processor.settings import Settings
from tests.helpers import eventually
from tests.processor.kafka_helpers import (
    free_port,
    make_settings,
    produce,
    running_processor,
    start_subprocess,
    wait_committed,
)
from tests.processor.test_dispatch import sample
from tests.processor.test_exactly_once import batch, count_ids, stop

NewTopic = Callable[..., Awaitable[str]]
NewGroup = Callable[[str], str]


def intruder(settings: Settings) -> AIOKafkaConsumer:
    """Another member of the processor's group (it commits nothing): joining and leaving
    makes the group rebalance."""
    return AIOKafkaConsumer(
        settings.raw_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.group_id,
        enable_auto_commit=False,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )


async def join_until_assigned(member: AIOKafkaConsumer, timeout_s: float) -> None:
    """Start ``member`` and wait until the rebalance gave it partitions (every member,
    the processor too, has joined again by then)."""
    await member.start()

    async def assigned() -> bool:
        return bool(member.assignment())

    await eventually(assigned, timeout_s, "the rebalance gave the new member partitions")


def assert_exactly_once(ids: dict[str, int], total: int) -> None:
    assert sorted(ids) == sorted(f"m-{i}" for i in range(total)), f"{total - len(ids)} lost"
    assert set(ids.values()) == {1}, "duplicates"


@pytest.mark.slow
async def test_a_transaction_stuck_on_kafka_is_cut_off_so_the_group_settles(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, batch_max_records=20)
    real_write = transactions.write_outputs
    armed, stuck = asyncio.Event(), asyncio.Event()

    async def write_or_hang(producer: Any, outputs: list[Any]) -> list[asyncio.Future[Any]]:
        if armed.is_set() and not stuck.is_set():
            stuck.set()
            await asyncio.Event().wait()  # a broker call that never answers
        return await real_write(producer, outputs)

    monkeypatch.setattr(transactions, "write_outputs", write_or_hang)
    total = 3000
    async with running_processor(settings) as processor:
        await produce(kafka_bootstrap, settings.raw_topic, batch(0, 1000))
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 200)
        armed.set()
        await produce(kafka_bootstrap, settings.raw_topic, batch(1000, 1000))
        await asyncio.wait_for(stuck.wait(), 30)
        # A rebalance: the processor's revocation meets the stuck transaction. Without a
        # bound it waits for ever, and so does the group (up to its rebalance timeout).
        member = intruder(settings)
        try:
            await join_until_assigned(member, timeout_s=40)
            await produce(kafka_bootstrap, settings.raw_topic, batch(2000, 1000))
        finally:
            await member.stop()
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, total, timeout_s=90)
        assert sample(processor.metrics.transactions, {"outcome": "cut_off"}) >= 1
        assert processor.watchdog.stuck() is None
    assert_exactly_once(await count_ids(kafka_bootstrap, settings), total)


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while proc.poll() is None and loop.time() < deadline:
        await asyncio.sleep(0.2)
    return proc.poll()


@pytest.mark.slow
async def test_a_consumer_that_never_gets_back_into_its_group_fails_the_processor(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path, tmp_path: Path
) -> None:
    rejoin_timeout_s = 10.0
    settings = await make_settings(
        kafka_bootstrap,
        new_topic,
        new_group,
        sources_file,
        restore_timeout_s=2,
        rejoin_timeout_s=rejoin_timeout_s,
        shutdown_timeout_s=5,
        http_port=free_port(),
    )
    total = 3000
    await produce(kafka_bootstrap, settings.raw_topic, batch(0, 1000))
    # It opens its four partitions, then no more: the next assignment that gives it one
    # it does not hold never returns.
    log_path = tmp_path / "stuck.log"
    proc = start_subprocess(
        settings, log_path, module="tests.processor.stuck_processor", env={"HEADWATER_TEST_RESTORES": "4"}
    )
    try:
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 1000, timeout_s=60)
        member = intruder(settings)
        try:
            await join_until_assigned(member, timeout_s=40)
            await produce(kafka_bootstrap, settings.raw_topic, batch(1000, 1000))
        finally:
            await member.stop()  # its partitions go back to the processor, which hangs opening them
        left = asyncio.get_running_loop().time()
        code = await wait_exit(proc, rejoin_timeout_s + settings.shutdown_timeout_s + 20)
        waited_s = asyncio.get_running_loop().time() - left
    finally:
        stop(proc)
    log = log_path.read_text()
    assert code == 1, f"the stuck processor did not fail (exit {code}); its log:\n{log[-3000:]}"
    assert '"reason":"rejoin"' in log and "consumer stuck" in log
    assert waited_s >= rejoin_timeout_s
    # Its supervisor starts it again: everything comes out, once.
    await produce(kafka_bootstrap, settings.raw_topic, batch(2000, 1000))
    again = start_subprocess(settings, tmp_path / "processor.log")
    try:
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, total, timeout_s=90)
    finally:
        stop(again)
    assert again.returncode == 0
    assert_exactly_once(await count_ids(kafka_bootstrap, settings), total)
