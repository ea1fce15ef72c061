"""Helpers every test may use: unique names, reading a topic back, waiting on a real call,
a free port. Fixtures live in conftest.py; these are plain functions, imported from here."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    expected: int | None = None,
    timeout_s: float = 30.0,
    isolation_level: str = "read_committed",
) -> list[ConsumerRecord]:
    """Read a topic from the start until ``expected`` records arrived or it stays quiet."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_rounds = 0
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            got = [r for rs in batch.values() for r in rs]
            records.extend(got)
            if expected is not None and len(records) >= expected:
                break
            quiet_rounds = 0 if got else quiet_rounds + 1
            if expected is None and quiet_rounds >= 4 and records:
                break
    finally:
        await consumer.stop()
    return records


async def eventually(predicate: Callable[[], Awaitable[object]], timeout_s: float, what: str) -> None:
    """Poll an async predicate with a real call until it is true; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
