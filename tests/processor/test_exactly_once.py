"""Processor subprocesses against the real Kafka: kill -9 under load, and a
rebalance between two processes. Every messageId must come out exactly once."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

from services.processor.settings import Settings
from tests.helpers import read_topic
from tests.processor.conftest import envelope
from tests.processor.kafka_helpers import (
    free_port,
    make_settings,
    produce,
    start_subprocess,
    wait_committed,
)

NewTopic = Callable[..., Awaitable[str]]
NewGroup = Callable[[str], str]


def batch(start: int, count: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(start, start + count):
        user = f"user-{i % 97}"
        event = {"type": "track", "event": "Clicked", "userId": user, "properties": {"i": i}}
        out.append((f"web:{user}".encode(), envelope(event, message_id=f"m-{i}")))
    return out


async def count_ids(bootstrap: str, settings: Settings) -> Counter[str]:
    """Every messageId in events.enriched (read_committed), read until the topic stays quiet."""
    records = await read_topic(bootstrap, settings.enriched_topic, expected=None, timeout_s=90)
    return Counter(orjson.loads(r.value)["messageId"] for r in records)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def test_kill_9_under_load_loses_nothing_and_doubles_nothing(
    kafka_bootstrap: str,
    new_topic: NewTopic,
    new_group: NewGroup,
    sources_file: Path,
    tmp_path: Path,
) -> None:
    settings = await make_settings(
        kafka_bootstrap, new_topic, new_group, sources_file, partitions=4, batch_max_records=50
    )
    chunk, kills_wanted = 200, 6
    rng = random.Random(4)
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[bytes]] = []
    kills_done = asyncio.Event()
    produced = 0
    loader: asyncio.Task[None] | None = None

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return start_subprocess(settings.model_copy(update={"http_port": ports[i]}), tmp_path / f"p{i}.log")

    try:
        procs = [spawn(0), spawn(1)]

        async def load() -> None:
            # Load runs until every kill is done (and a little after), so every kill hits a busy group.
            nonlocal produced
            extra = 10
            while not kills_done.is_set() or extra > 0:
                if kills_done.is_set():
                    extra -= 1
                await produce(kafka_bootstrap, settings.raw_topic, batch(produced, chunk))
                produced += chunk
                await asyncio.sleep(0.05)  # pacing the load, not waiting for a result

        loader = asyncio.create_task(load())
        for _ in range(kills_wanted):
            victim = rng.randrange(len(procs))
            # Kill only a process that owns partitions and has committed since it started,
            # so the kill lands mid-stream, not during start-up.
            await wait_working(ports[victim])
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            procs[victim].kill()  # SIGKILL: no drain, a transaction may be open mid-batch
            procs[victim].wait()
            procs[victim] = spawn(victim)
        kills_done.set()
        await loader
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, produced, timeout_s=180)
    finally:
        kills_done.set()
        if loader is not None and not loader.done():
            loader.cancel()
        for proc in procs:
            stop(proc)
    total = produced
    ids = await count_ids(kafka_bootstrap, settings)
    missing = [f"m-{i}" for i in range(total) if ids[f"m-{i}"] == 0]
    doubled = {k: n for k, n in ids.items() if n > 1}
    assert not missing, f"{len(missing)} lost, e.g. {missing[:5]}"
    assert not doubled, f"{len(doubled)} duplicated, e.g. {list(doubled.items())[:5]}"
    assert len(ids) == total
    assert await read_topic(kafka_bootstrap, settings.dlq_topic, timeout_s=2) == []


async def metric(port: int, name: str) -> float | None:
    """A sample's value from a processor's /metrics, None while it does not answer."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def wait_working(port: int, timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        owned = await metric(port, "headwater_processor_partitions_assigned")
        committed = await metric(port, 'headwater_processor_transactions_total{outcome="committed"}')
        if owned and committed:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"processor on port {port} never started committing")


async def assigned(port: int) -> int | None:
    value = await metric(port, "headwater_processor_partitions_assigned")
    return None if value is None else int(value)


async def wait_for_split(ports: list[int], expected: list[int], timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen: list[int | None] = []
    while loop.time() < deadline:
        seen = [await assigned(p) for p in ports]
        if seen == expected:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"partitions per process {seen}, wanted {expected}")


async def test_two_processors_split_partitions_and_survive_rebalance(
    kafka_bootstrap: str,
    new_topic: NewTopic,
    new_group: NewGroup,
    sources_file: Path,
    tmp_path: Path,
) -> None:
    settings = await make_settings(kafka_bootstrap, new_topic, new_group, sources_file, partitions=4)
    ports = [free_port(), free_port()]
    first = start_subprocess(settings.model_copy(update={"http_port": ports[0]}), tmp_path / "a.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for_split(ports[:1], [4])
        await produce(kafka_bootstrap, settings.raw_topic, batch(0, 1500))
        second = start_subprocess(settings.model_copy(update={"http_port": ports[1]}), tmp_path / "b.log")
        # Load while the group rebalances from one member to two.
        await produce(kafka_bootstrap, settings.raw_topic, batch(1500, 1500))
        await wait_for_split(ports, [2, 2])
        await produce(kafka_bootstrap, settings.raw_topic, batch(3000, 1500))
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 4500)
        # The first leaves (graceful stop) while more arrives: the second takes everything.
        loader = asyncio.create_task(produce(kafka_bootstrap, settings.raw_topic, batch(4500, 1500)))
        await asyncio.to_thread(stop, first)
        assert first.returncode == 0, "SIGTERM should drain and exit 0"
        await loader
        await wait_for_split(ports[1:], [4])
        # Client retries of events the first process handled: the dedupe state moved with
        # the partitions, so the second drops them.
        await produce(kafka_bootstrap, settings.raw_topic, batch(0, 1500))
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 7500)
        assert await metric(ports[1], "headwater_processor_events_duplicate_total") == 1500
    finally:
        stop(first)
        if second is not None:
            stop(second)
    ids = await count_ids(kafka_bootstrap, settings)
    assert sorted(ids) == sorted(f"m-{i}" for i in range(6000))
    assert set(ids.values()) == {1}
