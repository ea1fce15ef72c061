"""Fast unit tests: event parsing, windows, row arithmetic, the sink's number formats. No servers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from services.metrics import app as app_module
from services.metrics.consumer import RollupConsumer
from services.metrics.errors import ConsumerBroken, RangeTooLarge
from services.metrics.gather import bounded_gather
from services.metrics.metrics import make_metrics
from services.metrics.rollup import BadEvent, RowKey, WindowRow, numeric, parse_event, parse_time_ms, row_keys
from services.metrics.settings import Settings
from services.metrics.sink import datapoints
from services.metrics.store import Store
from tests.metrics.helpers import enriched

T0 = 1_795_525_200_000  # a whole hour


def test_parse_event_reads_the_enriched_contract() -> None:
    doc = enriched("web", "track", "Order Completed", "u1", T0 + 61_234, T0 + 70_000, {"revenue": 5})
    event = parse_event(orjson.dumps(doc))
    assert (event.source, event.type, event.name, event.user) == ("web", "track", "Order Completed", "u1")
    assert event.time_ms == T0 + 61_234 and event.received_ms == T0 + 70_000
    page = parse_event(orjson.dumps(enriched("web", "page", "Home", "a7", T0, T0)))
    assert (page.name, page.user) == ("Home", "a7")
    ident = parse_event(orjson.dumps(enriched("web", "identify", None, None, T0, T0)))
    assert (ident.name, ident.user) == ("", None)


@pytest.mark.parametrize(
    ("raw", "failure"),
    [
        (b"\xff", "invalid_json"),
        (b"[1]", "invalid_json"),
        (orjson.dumps({"type": "track", "timestamp": "2026-01-01T00:00:00Z"}), "schema_violation"),
        (
            orjson.dumps({"_hw": {"source_id": "s", "received_at_ms": 1}, "type": "track", "timestamp": "x"}),
            "schema_violation",
        ),
        (
            orjson.dumps({"_hw": {"source_id": "s", "received_at_ms": 1}, "timestamp": "2026-01-01T00:00:00Z"}),
            "schema_violation",
        ),
    ],
)
def test_unusable_records_are_typed(raw: bytes, failure: str) -> None:
    with pytest.raises(BadEvent) as info:
        parse_event(raw)
    assert info.value.failure == failure


def test_times_and_numbers() -> None:
    assert parse_time_ms("2026-11-24T15:00:00.123Z") == parse_time_ms("2026-11-24T16:00:00.123+01:00")
    assert parse_time_ms("2026-11-24T15:00:00.123") == parse_time_ms("2026-11-24T15:00:00.123Z")
    assert parse_time_ms("yesterday") is None and parse_time_ms(5) is None
    assert numeric(3) == 3.0 and numeric("12.5") == 12.5
    assert numeric(True) is None and numeric("abc") is None and numeric(float("nan")) is None


def test_an_event_updates_one_window_per_resolution() -> None:
    event = parse_event(orjson.dumps(enriched("web", "track", "X", "u1", T0 + 3_723_456, T0 + 3_800_000)))
    keys = row_keys(event)
    assert [(k.resolution, k.window_start) for k in keys] == [
        ("1m", T0 + 3_720_000),
        ("1h", T0 + 3_600_000),
        ("1d", T0 - T0 % 86_400_000),
    ]
    assert RowKey("1m", "s", "t", "e", 86_400_000 * 3 + 5).bucket == 3


def test_window_row_counts_sums_and_sketches() -> None:
    row = WindowRow(12)
    for i in range(10):
        props = {"revenue": 1.5, "quantity": "2", "other": 100}
        row.add(
            parse_event(orjson.dumps(enriched("web", "track", "X", f"u{i % 4}", T0, T0, props))),
            ("revenue", "quantity"),
        )
    assert row.count == 10 and row.sums == {"revenue": 15.0, "quantity": 20.0} and row.dirty
    blob = row.users_blob()
    again = WindowRow(12, count=10, sketch_blob=blob)
    assert round(again.sketch().get_estimate()) == 4


def test_sink_uses_one_number_format_per_metric() -> None:
    row = WindowRow(12)
    row.add(parse_event(orjson.dumps(enriched("web", "identify", None, "u1", T0, T0, {"revenue": 3}))), ("revenue",))
    points = datapoints([(2, RowKey("1m", "web", "identify", "", T0), row)])
    by_name = {p["name"]: p for p in points}
    assert by_name["headwater.events.count"]["datapoints"] == [[T0, 1]]
    assert by_name["headwater.users.distinct"]["datapoints"] == [[T0, 1]]
    revenue = by_name["headwater.property.sum"]["datapoints"][0][1]
    assert isinstance(revenue, float) and b"3.0" in orjson.dumps(revenue)
    assert by_name["headwater.events.count"]["tags"] == {
        "source": "web",
        "type": "identify",
        "event": "_",
        "resolution": "1m",
        "kpart": "2",
    }


async def _writes_after_a_failure(run: Callable[[list[Awaitable[None]]], Awaitable[object]]) -> list[int]:
    """Start 6 writes (one fails at once, the rest are queued or slow); the writes that land later."""
    landed: list[int] = []
    done = False

    async def write(i: int) -> None:
        if i == 0:
            raise TimeoutError("write 0 failed")
        await asyncio.sleep(0.01 * i)
        if done:
            landed.append(i)

    with pytest.raises(TimeoutError):
        await run([write(i) for i in range(6)])
    done = True
    await asyncio.sleep(0.1)
    return landed


async def test_bounded_gather_leaves_no_write_behind_after_a_failure() -> None:
    # A retry starts as soon as the error leaves; a stale write of the failed attempt landing
    # after it would put an older value back (Cassandra keeps the last write).
    assert await _writes_after_a_failure(lambda aws: bounded_gather(aws, 2)) == []


async def test_store_row_writes_leave_no_write_behind_after_a_failure() -> None:
    async def run(aws: list[Awaitable[None]]) -> None:
        pending = iter(aws)
        client = SimpleNamespace(execute=lambda *_: next(pending))
        store = Store(client, Settings(write_concurrency=2, write_batch_rows=1))  # type: ignore[arg-type]
        # A plain statement string: BatchStatement.add binds its values without a server.
        store._ps = {"put_1m": "INSERT INTO t VALUES (" + ", ".join(["%s"] * 11) + ")"}
        # One row per batch: each batch is one of the writes above.
        await store.write_rows([(0, RowKey("1m", "s", "t", f"e{i}", T0), WindowRow(12), 1) for i in range(len(aws))])

    assert await _writes_after_a_failure(run) == []


class _FakeKafka:
    """Stands in for AIOKafkaConsumer in unit tests of the loop: getmany runs the rebalance
    callbacks it is given and, like aiokafka, logs and swallows their errors."""

    def __init__(self, rebalances: list[tuple[str, list[TopicPartition]]]) -> None:
        self.rebalances = rebalances
        self.listener: Any = None
        self.assigned: set[TopicPartition] = set()

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        return None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        return None

    def pause(self, *tps: TopicPartition) -> None:
        return None

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def commit(self, offsets: object) -> None:
        return None

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[object]]:
        if self.rebalances:
            kind, tps = self.rebalances.pop(0)
            with contextlib.suppress(Exception):
                if kind == "assign":
                    self.assigned |= set(tps)
                    await self.listener.on_partitions_assigned(tps)
                else:
                    self.assigned -= set(tps)
                    await self.listener.on_partitions_revoked(tps)
        await asyncio.sleep(0.01)
        return {}


async def _unit_consumer(rebalances: list[tuple[str, list[TopicPartition]]], store: Any) -> RollupConsumer:
    store.client = SimpleNamespace(
        session=SimpleNamespace(
            cluster=SimpleNamespace(register_listener=lambda _: None, unregister_listener=lambda _: None)
        )
    )
    settings = Settings(enriched_topic="enriched", flush_interval_s=3600.0, poll_timeout_ms=10)
    consumer = RollupConsumer(settings, store, None, None, make_metrics(CollectorRegistry()))  # type: ignore[arg-type]
    await consumer.consumer.stop()
    consumer.consumer = _FakeKafka(rebalances)
    return consumer


async def test_a_failed_partition_resume_ends_the_consumer_with_an_error() -> None:
    async def no_checkpoint(*_: object) -> None:
        raise ValueError("unreadable checkpoint")

    consumer = await _unit_consumer(
        [("assign", [TopicPartition("enriched", 0)])], SimpleNamespace(load_checkpoint=no_checkpoint)
    )
    # An error, not a normal return: the service's done-callback stops the process only then.
    with pytest.raises(ConsumerBroken):
        await asyncio.wait_for(consumer.run(), 5)


async def test_a_failed_partition_release_ends_the_consumer_with_an_error() -> None:
    async def none(*_: object) -> None:
        return None

    async def nothing(*_: object) -> dict[str, int]:
        return {}

    tp = TopicPartition("enriched", 0)
    consumer = await _unit_consumer(
        [("assign", [tp]), ("revoke", [tp])], SimpleNamespace(load_checkpoint=none, load_horizons=nothing)
    )

    async def failing_flush(*_: object, **__: object) -> dict[TopicPartition, int]:
        raise ValueError("flush failed half-way")

    consumer.flush = failing_flush  # type: ignore[method-assign]
    with pytest.raises(ConsumerBroken):
        await asyncio.wait_for(consumer.run(), 5)


async def test_a_range_over_too_many_buckets_is_refused_before_any_read() -> None:
    reads: list[tuple[Any, ...]] = []

    async def all_pages(name: str, params: tuple[Any, ...] = (), limit: int | None = None) -> list[Any]:
        reads.append(params)
        return []

    store = Store(SimpleNamespace(), Settings(query_max_buckets=10))  # type: ignore[arg-type]
    store._all_pages = all_pages  # type: ignore[method-assign]
    day = 86_400_000
    assert await store.read_windows("1m", "web", T0, T0 + 9 * day, 100) == []
    assert len(reads) == 10
    reads.clear()
    with pytest.raises(RangeTooLarge) as info:
        await store.read_windows("1m", "web", T0, T0 + 10 * day, 100)
    assert info.value.errors
    assert reads == []


async def test_the_side_producer_stops_within_the_shutdown_timeout() -> None:
    class StuckProducer:
        """Kafka down: stop() flushes for ever."""

        def __init__(self) -> None:
            self.stopping = asyncio.Event()

        async def stop(self) -> None:
            self.stopping.set()
            await asyncio.Event().wait()

    producer = StuckProducer()
    started = time.monotonic()
    await asyncio.wait_for(app_module.stop_producer(producer, 0.2), 5)
    assert producer.stopping.is_set()
    assert time.monotonic() - started < 2
