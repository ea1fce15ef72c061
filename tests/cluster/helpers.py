"""Helpers of the cluster failure tests: partition leaders and replicas, a progress
timeline that measures how long a failure took to heal and the rate during it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

# Lines printed at the end of the session (tests/cluster/conftest.py) and kept in CI's log.
FIGURES: list[str] = []


async def partitions(bootstrap: str, topic: str) -> list[dict[str, object]]:
    """The topic's partitions as the cluster's metadata describes them (leader, replicas, isr)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return list(described["partitions"])


async def busiest_leader(bootstrap: str, topic: str) -> int:
    """The broker that leads most of the topic's partitions."""
    leaders = Counter(int(str(p["leader"])) for p in await partitions(bootstrap, topic))
    return leaders.most_common(1)[0][0]


async def led_without(bootstrap: str, topic: str, broker: int) -> bool:
    """Every partition has a leader, none of them ``broker``."""
    try:
        parts = await partitions(bootstrap, topic)
    except Exception:  # a metadata request may fail while a broker is away
        return False
    return bool(parts) and all(int(str(p["leader"])) not in (-1, broker) for p in parts)


async def fully_replicated(bootstrap: str, topic: str, replicas: int) -> bool:
    """Every partition has ``replicas`` in sync: the cluster has settled."""
    try:
        parts = await partitions(bootstrap, topic)
    except Exception:
        return False
    return bool(parts) and all(len(list(p["isr"])) >= replicas for p in parts)  # type: ignore[call-overload]


async def end_total(bootstrap: str, topic: str) -> int:
    """The sum of the topic's end offsets (records written, for a non-transactional writer)."""
    tps = [TopicPartition(topic, int(str(p["partition"]))) for p in await partitions(bootstrap, topic)]
    assert tps, f"{topic} has no partitions"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return sum(ends.values())


@dataclass
class Timeline:
    """Progress samples (monotonic time, a running total), and the failure's moments."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    killed_at: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def add(self, total: int) -> None:
        self.samples.append((time.monotonic(), total))

    def kill(self) -> None:
        self.killed_at = time.monotonic()

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def progress_resumed(self) -> float | None:
        """Seconds from the kill to the first sample above the total at the kill."""
        at_kill = max((n for t, n in self.samples if t <= self.killed_at), default=0)
        after = [t for t, n in self.samples if t > self.killed_at and n > at_kill]
        return after[0] - self.killed_at if after else None

    def longest_stall(self) -> tuple[float, float]:
        """The longest time without progress from the kill on: (start, end), monotonic times.
        Its end is when the failure healed for the clients."""
        prev_n = max((n for t, n in self.samples if t <= self.killed_at), default=0)
        last_rise, best = self.killed_at, (self.killed_at, self.killed_at)
        for t, n in sorted(self.samples):
            if t <= self.killed_at or n <= prev_n:
                continue
            if t - last_rise > best[1] - best[0]:
                best = (last_rise, t)
            last_rise, prev_n = t, n
        return best

    def rate(self, start: float, end: float) -> float:
        """Progress per second between two moments (from the samples nearest them)."""
        before = [(t, n) for t, n in self.samples if t <= start]
        inside = [(t, n) for t, n in self.samples if start < t <= end]
        points = before[-1:] + inside
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return 0.0
        return (points[-1][1] - points[0][1]) / (end - start)

    def report(self, name: str, unit: str, back: str) -> str:
        """One line: the longest stall after the kill (the heal time), the moments marked,
        and the rates before the kill, while the node was away (kill to ``back``) and after."""
        stall_start, stall_end = self.longest_stall()
        back_at = self.marks[back]
        last = self.samples[-1][0] if self.samples else back_at
        k = self.killed_at
        parts = [
            f"{name}: healed {stall_end - k:.1f}s after the kill -9 (longest stall "
            f"{stall_end - stall_start:.1f}s, +{stall_start - k:.1f}s..+{stall_end - k:.1f}s)",
            *(f"{m} +{v - k:.1f}s" for m, v in self.marks.items()),
            f"{unit}/s: before {self.rate(k - 10, k):.0f}, first 10 s after the kill {self.rate(k, k + 10):.0f}, "
            f"node away {self.rate(k, back_at):.0f}, after {self.rate(back_at, last):.0f}",
        ]
        line = "; ".join(parts)
        FIGURES.append(line)
        print(line)
        return line


async def sample_every(
    timeline: Timeline, read: Callable[[], Awaitable[int]], stop: asyncio.Event, interval_s: float = 0.25
) -> None:
    """Sample ``read()`` (a running total) into the timeline until ``stop``."""
    while not stop.is_set():
        try:
            timeline.add(await read())
        except Exception:
            pass  # a sample missed while a server is away is just missing
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            continue
