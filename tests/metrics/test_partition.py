"""Unit tests of the rollup consumer's pure parts: the age rule, a batch's plan, the row
cache and its batched read-back, the series index, the fenced write timestamps."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from services.metrics.partition import PartitionState, PartitionStatus, plan
from services.metrics.rollup import AgeRule, RowKey, WindowRow, parse_event
from services.metrics.rowcache import RowCache
from services.metrics.series import SeriesIndex
from services.metrics.settings import Settings
from services.metrics.store import WRITE_TS_BASE, Checkpoint, Store, write_timestamp
from tests.metrics.helpers import enriched

DAY = 86_400_000
HOUR = 3_600_000
NOW = 1_780_000_000_000 - 1_780_000_000_000 % DAY
RULE = AgeRule(7 * DAY, {"1m": 7 * DAY, "1h": 90 * DAY, "1d": 730 * DAY})


def record(offset: int, doc: dict[str, Any] | bytes) -> SimpleNamespace:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return SimpleNamespace(offset=offset, value=value, key=b"k", topic="enriched", partition=0)


def state(next_offset: int = 0, base: int = 0) -> PartitionState:
    return PartitionState(0, base, next_offset, 0, RowCache({"1m": -1, "1h": -1, "1d": -1}, 12))


def test_the_age_rule_keeps_old_events_and_drops_only_what_no_table_can_hold() -> None:
    def kept(age_ms: int, rule: AgeRule = RULE) -> tuple[str, ...]:
        return rule.resolutions(parse_event(orjson.dumps(enriched("web", "track", "X", "u1", NOW - age_ms, NOW))))

    assert kept(0) == ("1m", "1h", "1d")
    assert kept(2 * HOUR) == ("1m", "1h", "1d")  # an offline mobile queue
    assert kept(5 * DAY) == ("1m", "1h", "1d")  # /v1/import of history
    assert kept(7 * DAY) == ("1m", "1h", "1d")
    assert kept(7 * DAY + 1) == ()  # past the maximum age: the late topic
    # A maximum age beyond the 1m retention: the 1m table alone skips the event.
    wide = AgeRule(30 * DAY, RULE.retention_ms)
    assert kept(10 * DAY, wide) == ("1h", "1d")
    # The age is receipt minus event time, not the wall clock: a replay decides the same.
    assert kept(-HOUR) == ("1m", "1h", "1d")


def test_a_plan_sorts_a_batch_into_windows_late_rows_and_bad_rows() -> None:
    s = state(next_offset=10, base=1000)
    records = [
        record(9, enriched("web", "track", "Seen", "u1", NOW, NOW)),  # before next_offset: skipped
        record(10, enriched("web", "track", "Now", "u1", NOW - 1000, NOW)),
        record(11, b"not json"),
        record(12, enriched("web", "page", "Home", "a1", NOW - 3 * DAY, NOW)),
        record(13, enriched("web", "identify", None, "u2", NOW - 8 * DAY, NOW + 5)),
    ]
    out = plan(s, records, RULE)
    assert [(offset, e.name) for offset, e, _ in out.events] == [(1010, "Now"), (1012, "Home")]
    # The 3-day-old page updates its own windows, one per resolution.
    page_keys = out.events[1][2]
    assert [(k.resolution, k.window_start) for k in page_keys] == [
        ("1m", NOW - 3 * DAY),
        ("1h", NOW - 3 * DAY),
        ("1d", NOW - 3 * DAY),
    ]
    assert [(r.offset, failure.value) for r, failure, _ in out.bad] == [(11, "invalid_json")]
    assert [(late.record.offset, late.reason) for late in out.late] == [(13, "max_event_age")]
    assert out.late[0].extra["age_ms"] == 8 * DAY + 5
    assert s.next_offset == 14
    assert s.watermark_ms == NOW + 5
    assert s.checkpoint() == Checkpoint(1000, 14, NOW + 5)


def test_a_plan_names_the_resolutions_an_event_skipped() -> None:
    rule = AgeRule(30 * DAY, RULE.retention_ms)
    out = plan(state(), [record(0, enriched("web", "track", "X", "u1", NOW - 10 * DAY, NOW))], rule)
    assert [k.resolution for k in out.events[0][2]] == ["1h", "1d"]
    assert out.late[0].reason == "retention"
    assert out.late[0].extra["skipped_resolutions"] == ["1m"]


def test_the_row_cache_reads_only_windows_at_or_before_the_horizon() -> None:
    cache = RowCache({"1m": NOW, "1h": NOW, "1d": NOW}, 12)
    old = RowKey("1m", "web", "track", "X", NOW - 60_000)
    at = RowKey("1m", "web", "track", "X", NOW)
    new = RowKey("1m", "web", "track", "X", NOW + 60_000)
    assert cache.missing([old, at, new, old]) == [old, at]
    assert new in cache.rows and old not in cache.rows  # never written: an empty row, no read
    cache.fill([old, at], [WindowRow(12, count=3, upto=7), WindowRow(12)])
    assert cache.missing([old, at, new]) == []
    assert cache.newest_windows([old, at, new]) == {"1m": NOW + 60_000}
    cache.touch(old).dirty = True
    assert cache.evict_oldest(10) == 2  # the dirty row stays
    assert list(cache.rows) == [old]
    cache.rows[old].dirty = False
    cache.evict_closed(NOW)
    assert not cache.rows


def test_rows_written_since_the_resume_are_read_back_only_once_evicted() -> None:
    cache = RowCache({"1m": NOW, "1h": NOW, "1d": NOW}, 12)  # stored rows end at NOW
    ours = [RowKey("1m", "web", "track", f"E{i}", NOW + 60_000) for i in range(3)]
    assert cache.missing(ours) == []  # past the horizon: no read
    cache.horizon["1m"] = NOW + 120_000  # a flush wrote rows up to here
    cache.evict_oldest(1)  # ours[0] leaves the cache: the store holds it now
    later = RowKey("1m", "web", "track", "New", NOW + 60_000)
    # Behind the horizon, but only this process wrote there since it resumed: only the evicted row is read.
    assert cache.missing([ours[0], ours[1], later]) == [ours[0]]
    assert later in cache.rows


async def test_read_backs_are_batched_per_cassandra_partition() -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = []

    async def execute(statement: str, params: tuple[Any, ...]) -> list[Any]:
        calls.append((statement, params))
        _, _, wanted = params
        # The store holds the first of every asked-for row.
        ws, etype, event, _ = wanted[0]
        return [SimpleNamespace(window_start=ws, type=etype, event=event, count=5, users=None, sums={}, upto=42)]

    store = Store(SimpleNamespace(execute=execute), Settings(read_batch_rows=100))  # type: ignore[arg-type]
    store._ps = {f"get_{r}": f"get {r}" for r in ("1m", "1h", "1d")}
    # 250 late events' minute rows over two days of one source, and their hour rows.
    keys = [RowKey("1m", "web", "track", f"E{i}", NOW - 2 * DAY + (i % 2) * DAY) for i in range(250)]
    keys += [RowKey("1h", "web", "track", f"E{i}", NOW - 2 * DAY) for i in range(10)]
    rows = await store.load_rows(3, keys)
    # Day buckets of the 1m table: 125 keys each -> 2 reads each; the 1h rows share one read.
    assert sorted(c[0] for c in calls) == ["get 1h"] + ["get 1m"] * 4
    assert all(all(k[3] == 3 for k in params[2]) for _, params in calls)  # this partition's rows only
    assert len(rows) == len(keys)
    assert sum(1 for r in rows if r.count == 5 and r.upto == 42) == len(calls)
    assert all(r.count == 0 and r.upto == -1 for r in rows if r.upto != 42)


async def test_every_series_is_noted_once_with_or_without_summed_properties() -> None:
    index = SeriesIndex()
    noted: list[tuple[str, str, str, set[str]]] = []

    async def note(source: str, etype: str, name: str, props: set[str]) -> None:
        noted.append((source, etype, name, set(props)))

    web = parse_event(orjson.dumps(enriched("web", "track", "Paid", "u1", NOW, NOW, {"revenue": 3})))
    node = parse_event(orjson.dumps(enriched("node", "identify", None, "u1", NOW, NOW)))
    index.see(web, ("revenue",))
    index.see(node, ())
    index.see(node, ())
    await index.write(note, 4)
    assert noted == [("web", "track", "Paid", {"revenue"}), ("node", "identify", "", set())]
    index.see(node, ())
    await index.write(note, 4)
    assert len(noted) == 2


@pytest.mark.parametrize(("older", "newer"), [(0, 1), (41, 42), (2**40 + 5, 2**40 + 6)])
def test_fenced_timestamps_order_by_offset_above_every_wall_clock_write(older: int, newer: int) -> None:
    assert write_timestamp(older) < write_timestamp(newer)
    # Wall-clock microseconds (what an older version wrote with) stay below every fenced write
    # for decades: the first fenced write of a row replaces an unfenced one.
    assert write_timestamp(0) == WRITE_TS_BASE > int(time.time() * 1_000_000) * 2


def test_a_partition_status_starts_sought() -> None:
    assert state().status is PartitionStatus.SOUGHT
    assert state().moved  # never saved: the first flush writes its checkpoint


async def test_a_refused_side_row_is_sent_again() -> None:
    """Kafka refusing a late row is Kafka's failure: the row is sent again. (The sender has no
    hold on the consumer's state: its retries cannot ask for a resync of the partitions.)"""
    import asyncio

    from aiokafka.errors import KafkaTimeoutError
    from prometheus_client import CollectorRegistry

    from services.metrics.metrics import make_metrics
    from services.metrics.sidesend import SideSender

    sent: list[tuple[str, bytes]] = []

    class Producer:
        async def send(self, topic: str, value: bytes, key: bytes | None, headers: object) -> asyncio.Future[None]:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(KafkaTimeoutError())  # the first send is never acknowledged
            return future

        async def send_and_wait(self, topic: str, value: bytes, key: bytes | None, headers: object) -> None:
            sent.append((topic, value))

    side = SideSender(Producer(), make_metrics(CollectorRegistry()), late_topic="late", dlq_topic="dlq")
    event = parse_event(orjson.dumps(enriched("web", "track", "X", "u1", NOW - 8 * DAY, NOW)))
    side.late(record(7, b"{}"), event, "max_event_age", "too old", {})
    assert side.pending == 1
    await side.settle()
    assert [topic for topic, _ in sent] == ["late"]
    assert side.pending == 0
