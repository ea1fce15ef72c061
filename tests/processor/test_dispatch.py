"""The processor's dispatch against a stand-in consumer and producer (tests/processor/fakes.py):
failed commits, fences and rebalances in the middle of a stream, without Kafka. Every
input messageId must come out exactly once, and every partition must end committed."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry, Metric

from services.common.sources import SourceRegistry
from services.processor.enrich import Enricher
from services.processor.metrics import make_metrics
from services.processor.partitions import Batch, Partition, PartitionStatus
from services.processor.pipeline import Pipeline
from services.processor.settings import Settings
from services.processor.worker import Processor
from tests.processor.fakes import RAW, FakeBroker, FakeConsumer, FakeProducer

TPS = [TopicPartition(RAW, p) for p in range(3)]


def sample(metric: object, labels: dict[str, str] | None = None) -> float:
    """A sample's value read through the public collect() API (0 when absent)."""
    assert hasattr(metric, "collect")
    families: list[Metric] = metric.collect()
    for family in families:
        for s in family.samples:
            if s.labels == (labels or {}) and not s.name.endswith("_created"):
                return float(s.value)
    return 0.0


@contextlib.asynccontextmanager
async def running(
    broker: FakeBroker, sources_file: Path, **overrides: object
) -> AsyncIterator[tuple[Processor, FakeConsumer]]:
    values: dict[str, object] = {
        "sources_file": sources_file,
        "retry_backoff_s": 0.01,
        "session_timeout_ms": 1000,
        "max_pending_batches": 3,
        "batch_max_records": 7,
    }
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    registry = SourceRegistry(sources_file)
    registry.load()
    processor = Processor(
        settings,
        Pipeline(settings, registry, Enricher(geoip_path=None, ua_cache_size=10, geo_cache_size=10)),
        make_metrics(CollectorRegistry()),
        producer_factory=lambda _s, p: FakeProducer(broker, f"txn-{p}"),
        restore_window=broker.restore,
    )
    consumer = FakeConsumer(broker)
    processor.bind(consumer)
    consumer.assign_now(TPS)
    await processor.on_assigned(TPS)
    stop = asyncio.Event()
    task = asyncio.create_task(processor.run(stop))
    try:
        yield processor, consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await processor.close()


async def until(predicate: object, timeout_s: float = 10) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def assert_exactly_once(broker: FakeBroker, expected: set[str]) -> None:
    seen = Counter(broker.output_ids())
    assert set(seen) == expected, f"lost {sorted(expected - set(seen))[:5]}, extra {sorted(set(seen) - expected)[:5]}"
    assert max(seen.values()) == 1, f"doubled: {[k for k, n in seen.items() if n > 1][:5]}"


def fill(broker: FakeBroker, per_partition: int) -> set[str]:
    ids: set[str] = set()
    for p in broker.raw:
        batch = [f"p{p}-{i}" for i in range(per_partition)]
        broker.append(p, batch)
        ids.update(batch)
    return ids


async def test_failed_commits_rewind_and_queued_batches_are_dropped(sources_file: Path) -> None:
    broker = FakeBroker(3)
    expected = fill(broker, 120)
    # Client retries of events already in the stream: dedupe must drop them, also after rewinds.
    broker.append(0, ["p0-3", "p0-50", "p0-119"])
    broker.commit_failures.extend(KafkaConnectionError(f"injected {i}") for i in range(6))
    async with running(broker, sources_file) as (processor, _consumer):
        await until(broker.done)
        assert sample(processor.metrics.transactions, {"outcome": "failed"}) == 6
        assert sample(processor.metrics.duplicates) == 3
        assert await processor.status() == (True, "3 partitions")
    assert_exactly_once(broker, expected)


async def test_a_fenced_partition_resets_without_a_rebalance(sources_file: Path) -> None:
    broker = FakeBroker(3)
    expected = fill(broker, 60)
    async with running(broker, sources_file) as (processor, consumer):
        await until(lambda: broker.committed.get(0, 0) > 0)
        broker.fence(0)  # as the broker does to a transaction that ran past its timeout
        broker.append(0, [f"late-{i}" for i in range(30)])
        expected |= {f"late-{i}" for i in range(30)}
        await until(lambda: processor.txns is not None and bool(processor.txns.stalled()))
        ok, detail = await processor.status()
        assert not ok and "partition 0 fenced" in detail
        assert sample(processor.metrics.partitions_stalled) == 1
        assert TPS[0] in consumer.paused_tps
        await until(broker.done)
        assert await processor.status() == (True, "3 partitions")
        assert sample(processor.metrics.partitions_stalled) == 0
        assert sample(processor.metrics.transactions, {"outcome": "fenced"}) == 1
        assert TPS[0] not in consumer.paused_tps
    assert_exactly_once(broker, expected)


async def test_rebalances_in_the_middle_of_the_stream(sources_file: Path) -> None:
    broker = FakeBroker(3)
    expected = fill(broker, 200)
    async with running(broker, sources_file) as (processor, consumer):
        await until(lambda: sum(broker.committed.values()) > 60)
        # Partition 2 goes to another member; 0 and 1 stay (their producers are kept).
        await processor.on_revoked(TPS)
        producers = {tp: processor._parts.get(tp) for tp in TPS}
        consumer.assign_now(TPS[:2])
        await processor.on_assigned(TPS[:2])
        assert set(processor._parts) == set(TPS[:2])
        assert all(processor._parts[tp] is producers.get(tp) or producers.get(tp) is None for tp in TPS[:2])
        await until(lambda: sum(broker.committed.values()) > 300)
        # And partition 2 comes back: opened afresh, from the committed offset and changelog.
        await processor.on_revoked(TPS[:2])
        consumer.assign_now(TPS)
        await processor.on_assigned(TPS)
        assert all(p.status is PartitionStatus.ACTIVE for p in processor._parts.values())
        await until(broker.done)
    assert_exactly_once(broker, expected)


async def test_a_batch_fetched_before_a_rewind_is_dropped(sources_file: Path) -> None:
    broker = FakeBroker(3)
    expected = fill(broker, 5)
    async with running(broker, sources_file) as (processor, consumer):
        await until(broker.done)
        part = processor._parts[TPS[1]]
        stale = Batch(TPS[1], part.epoch, list(broker.raw[1][:2]))
        consumer.pause(TPS[1])  # so the loop itself does not read the partition again yet
        assert processor.txns is not None
        processor.txns.seek(part, 0)
        commits = broker.commits
        async with processor._lock:
            await processor._dispatch(stale)
        assert not part.chain and not part.pending, "a batch from before the rewind was dispatched"
        await asyncio.sleep(0.05)
        assert broker.commits == commits
        # Read again after the rewind, the same records are kept (and found to be duplicates).
        consumer.resume(TPS[1])
        await until(lambda: sample(processor.metrics.duplicates) == 5)
    assert_exactly_once(broker, expected)


def test_status_transitions_are_checked() -> None:
    part = Partition(TPS[0])
    assert part.stalled
    part.become(PartitionStatus.ACTIVE)
    assert not part.stalled and part.stalled_since is None
    with pytest.raises(RuntimeError, match="ACTIVE -> OPENING"):
        part.become(PartitionStatus.OPENING)
    part.become(PartitionStatus.FENCED)
    with pytest.raises(RuntimeError, match="FENCED -> ACTIVE"):
        part.become(PartitionStatus.ACTIVE)  # a fenced partition must reset first
    first = part.epoch
    assert part.bump() > first
    assert Partition(TPS[0]).epoch > part.epoch, "a new Partition must never reuse an epoch"
