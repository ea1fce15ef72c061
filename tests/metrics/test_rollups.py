"""Rollups against the real Kafka and Cassandra: windows, sums, sketch unions,
lateness, bad input, replay over rows that are ahead of their checkpoint, TTL."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer
from cassandra.cluster import NoHostAvailable
from prometheus_client import CollectorRegistry

from services.common.badrow import BadRow
from services.common.cassandra import CassandraClient
from services.common.sources import SourceRegistry
from services.metrics.app import build_app
from services.metrics.consumer import RollupConsumer
from services.metrics.metrics import make_metrics
from services.metrics.rollup import RowKey, WindowRow
from services.metrics.schema import migrate_schema
from services.metrics.settings import Settings
from services.metrics.store import Store
from tests.helpers import read_topic
from tests.metrics.conftest import SUMS, MakeSettings
from tests.metrics.helpers import (
    Sent,
    all_rows,
    assert_windows_equal,
    checkpoints,
    end_offsets,
    enriched,
    expected,
    poll,
    produce,
    stored_windows,
)

HOUR = 3_600_000


def workload(n: int, base_ms: int, partitions: int, seed: int = 7, late_share: float = 0.03) -> list[tuple[int, bytes]]:
    """Events over ~2 hours with a few late ones and a few undecodable records."""
    rnd = random.Random(seed)
    out: list[tuple[int, bytes]] = []
    for i in range(n):
        received = base_ms + i * (2 * HOUR // n)
        delay = rnd.randint(5_000, 3_000_000) if rnd.random() < late_share else rnd.randint(0, 200_000)
        source = rnd.choice(["web", "srv"])
        etype = rnd.choice(["track", "track", "page", "identify"])
        name = (
            rnd.choice(["Order Completed", "Signed Up"])
            if etype == "track"
            else (rnd.choice(["Home", "Pricing"]) if etype == "page" else None)
        )
        user = rnd.choice([f"u{rnd.randint(0, 300)}", f"a{rnd.randint(0, 300)}"])
        props = {"revenue": round(rnd.uniform(1, 100), 2), "quantity": rnd.randint(1, 5), "flag": True}
        doc = enriched(source, etype, name, user, received - delay, received, props, message_id=f"m{i}")
        out.append((rnd.randrange(partitions), orjson.dumps(doc)))
    return out


def counter_total(registry: CollectorRegistry, name: str) -> float:
    """A counter's value, summed over its labels (``name`` without ``_total``)."""
    return sum(s.value for m in registry.collect() if m.name == name for s in m.samples if s.name.endswith("_total"))


async def run_until_caught_up(
    settings: Settings, client: CassandraClient, sent: list[Sent], timeout_s: float = 90.0
) -> CollectorRegistry:
    registry = CollectorRegistry()
    app = await build_app(settings, registry=registry)
    async with TestClient(TestServer(app)):
        want = end_offsets(sent)

        async def caught_up() -> bool:
            got = await checkpoints(
                client, settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
            )
            return all(got.get(p, 0) >= o for p, o in want.items())

        await poll(caught_up, timeout_s, "the checkpoints to reach the end of the input")
    return registry


async def test_windows_sums_users_and_lateness_match_the_input(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    settings = await metrics_settings(partitions=3)
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    records = workload(3000, base, 3)
    records.insert(100, (1, b"not json"))
    records.insert(200, (2, orjson.dumps({"type": "track"})))  # no _hw.source_id, no timestamp
    sent = await produce(kafka_bootstrap, settings.enriched_topic, records)

    registry = await run_until_caught_up(settings, cassandra, sent)

    want, late = expected(sent, settings.max_event_age_ms, SUMS)
    assert late, "the workload must contain late events"
    assert_windows_equal(await stored_windows(cassandra, settings.cassandra_keyspace), want)

    late_rows = [
        BadRow.decode(r.value) for r in await read_topic(kafka_bootstrap, settings.late_topic, expected=len(late))
    ]
    assert {(r["input"]["partition"], r["input"]["offset"]) for r in late_rows} == late
    assert {r["failure_type"] for r in late_rows} == {"late_event"}
    by_offset = {(s.partition, s.offset): s for s in sent}
    for r in late_rows:  # the original bytes travel with the bad row
        assert orjson.loads(r["original"]) == by_offset[(r["input"]["partition"], r["input"]["offset"])].doc
    assert counter_total(registry, "headwater_metrics_dropped_late") == len(late)

    bad = [BadRow.decode(r.value) for r in await read_topic(kafka_bootstrap, settings.dlq_topic, expected=2)]
    assert sorted(r["failure_type"] for r in bad) == ["invalid_json", "schema_violation"]
    assert sorted(r["original"] for r in bad) == sorted([b"not json", orjson.dumps({"type": "track"})])


async def test_a_restart_replays_without_double_counting(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    """Rows written, checkpoint not (the process died between the two): the next run
    reads those events again and each row takes only what it lacks."""
    settings = await metrics_settings(partitions=2)
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    first = await produce(kafka_bootstrap, settings.enriched_topic, workload(1500, base, 2, seed=1))

    original, original_commit = Store.save_checkpoint, RollupConsumer._commit
    saved = 0

    async def save_first_only(self: Store, *args: object) -> None:
        nonlocal saved
        if saved < 2:  # one checkpoint per partition, then "die" before any other
            saved += 1
            await original(self, *args)  # type: ignore[arg-type]

    async def no_commit(self: RollupConsumer, offsets: object) -> None:
        """A process that dies before its checkpoint has not committed to Kafka either."""

    Store.save_checkpoint = save_first_only  # type: ignore[method-assign, assignment]
    RollupConsumer._commit = no_commit  # type: ignore[method-assign]
    try:
        # A flush after every poll of at most 100 records: the first checkpoints stay early.
        app = await build_app(settings.model_copy(update={"max_dirty_rows": 1, "max_poll_records": 100}))
        async with TestClient(TestServer(app)):

            async def rows_ahead() -> bool:
                # every event rolled into some 1m row, though the checkpoint stays behind
                rows = await all_rows(cassandra, f"SELECT max(upto) AS m FROM {settings.cassandra_keyspace}.rollup_1d")
                marks = {s.partition: s.offset for s in first}
                return (rows[0].m or -1) >= min(marks.values())

            await poll(rows_ahead, 60, "rows written past the checkpoint")
    finally:
        Store.save_checkpoint = original  # type: ignore[method-assign]
        RollupConsumer._commit = original_commit  # type: ignore[method-assign]
    cps = await checkpoints(cassandra, settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic)
    assert all(v < end_offsets(first)[p] for p, v in cps.items()), cps

    second = await produce(kafka_bootstrap, settings.enriched_topic, workload(500, base + HOUR, 2, seed=2))
    registry = await run_until_caught_up(settings, cassandra, first + second)
    skipped = counter_total(registry, "headwater_metrics_replay_skipped")
    want, _ = expected(first + second, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, settings.cassandra_keyspace), want)
    assert skipped > 0, "the second run must have met rows that already held its events"


async def test_a_checkpoint_is_never_retried_past_rows_the_node_may_have_lost(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed Cassandra node loses what it acknowledged since its last commitlog sync
    (periodic mode): a flush's series, horizons and rows can be acknowledged and then gone,
    and the call after them fails. That call's retry must not write the checkpoint into the
    restarted node; the consumer resumes from what Cassandra holds and rolls those events,
    and their series, up again.

    Here everything the first flush writes is acknowledged and dropped (the node's loss), its
    row write answering after a second, and the checkpoint attempt after it fails once with
    the error a killed node gives (NoHostAvailable). The second lets the loop roll up the next
    batch and wait for that flush, as it does when a node is down, instead of resuming at once."""
    settings = await metrics_settings(partitions=1, max_poll_records=100, max_dirty_rows=1)
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    sent = await produce(kafka_bootstrap, settings.enriched_topic, workload(1500, base, 1, seed=5))
    real = {name: getattr(Store, name) for name in ("write_rows", "note_series", "save_horizon", "save_checkpoint")}
    lost = {"write_rows": 0, "note_series": 0, "save_horizon": 0}
    failed: list[str] = []

    def losing(name: str) -> Any:
        async def call(self: Store, *args: Any) -> None:
            if failed:
                return await real[name](self, *args)  # type: ignore[no-any-return]
            if name == "write_rows":
                await asyncio.sleep(1.0)
            lost[name] += 1
            return None

        return call

    async def fail_after_the_loss(self: Store, *args: Any) -> None:
        if lost["write_rows"] and not failed:
            failed.append("save_checkpoint")
            raise NoHostAvailable("injected: the node was killed", {})
        await real["save_checkpoint"](self, *args)

    for name in lost:
        monkeypatch.setattr(Store, name, losing(name))
    monkeypatch.setattr(Store, "save_checkpoint", fail_after_the_loss)
    registry = await run_until_caught_up(settings, cassandra, sent)
    assert all(lost.values()) and failed == ["save_checkpoint"], (lost, failed)
    assert counter_total(registry, "headwater_metrics_flush_errors") >= 1
    want, _ = expected(sent, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, settings.cassandra_keyspace), want)
    store = Store(cassandra, settings)
    await store.prepare()
    indexed = {(source, etype, name) for source, etype, name, _ in await store.all_series()}
    assert indexed == {(source, etype, name) for _, source, etype, name, _ in want}


async def test_sketches_union_across_partitions_and_windows(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    settings = await metrics_settings(partitions=4)
    base = (int(time.time() * 1000) // HOUR - 2) * HOUR
    # The same 50 users on every partition and in 5 different minutes: 50 distinct, not 1000.
    records = [
        (
            i % 4,
            orjson.dumps(enriched("web", "track", "Signed Up", f"u{i % 50}", base + (i % 5) * 60_000, base + 300_000)),
        )
        for i in range(1000)
    ]
    sent = await produce(kafka_bootstrap, settings.enriched_topic, records)
    await run_until_caught_up(settings, cassandra, sent)
    rows = await all_rows(cassandra, f"SELECT kpart, users FROM {settings.cassandra_keyspace}.rollup_1h")
    assert len({r.kpart for r in rows}) == 4
    stored = await stored_windows(cassandra, settings.cassandra_keyspace)
    assert round(stored[("1h", "web", "track", "Signed Up", base)]["users"]) == 50
    minutes = [k for k in stored if k[0] == "1m"]
    assert len(minutes) == 5
    assert all(round(stored[k]["users"]) == 10 for k in minutes)


async def test_rows_expire_after_their_resolution_ttl(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    settings = await metrics_settings(partitions=1, retention_1m_s=3)
    now = int(time.time() * 1000)
    sent = await produce(
        kafka_bootstrap, settings.enriched_topic, [(0, orjson.dumps(enriched("web", "track", "X", "u1", now, now)))]
    )
    await run_until_caught_up(settings, cassandra, sent)
    ks = settings.cassandra_keyspace
    assert len(list(await cassandra.execute(f"SELECT * FROM {ks}.rollup_1m"))) == 1

    async def minute_gone() -> bool:
        return not list(await cassandra.execute(f"SELECT * FROM {ks}.rollup_1m"))

    await poll(minute_gone, 30, "the 1m row to expire")
    assert len(list(await cassandra.execute(f"SELECT * FROM {ks}.rollup_1h"))) == 1
    ttl = (
        await cassandra.execute(
            "SELECT default_time_to_live FROM system_schema.tables "
            "WHERE keyspace_name = %s AND table_name = 'rollup_1h'",
            (ks,),
        )
    )[0]
    assert ttl.default_time_to_live == settings.retention_1h_s
    compaction = (
        await cassandra.execute(
            "SELECT compaction FROM system_schema.tables WHERE keyspace_name = %s AND table_name = 'rollup_1m'", (ks,)
        )
    )[0]
    # Rows are rewritten by late events at offset timestamps: compacted by levels, not time windows.
    assert compaction.compaction["class"].endswith("LeveledCompactionStrategy")


async def test_a_second_member_takes_partitions_over_without_loss_or_double_count(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    """Scale-out: a member joins mid-stream; revoked partitions are flushed, the new owner
    resumes at their checkpoints."""
    settings = await metrics_settings(partitions=4, max_poll_records=100, max_dirty_rows=20)
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    first = await produce(kafka_bootstrap, settings.enriched_topic, workload(4000, base, 4, seed=5))
    ks, group, topic = settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
    app_a = await build_app(settings, registry=CollectorRegistry())
    async with TestClient(TestServer(app_a)):

        async def started() -> bool:
            return sum((await checkpoints(cassandra, ks, group, topic)).values()) >= 400

        await poll(started, 60, "member A to make progress")
        registry_b = CollectorRegistry()
        app_b = await build_app(settings, registry=registry_b)
        async with TestClient(TestServer(app_b)):
            # Keep sending until B owns partitions (the group rebalances on A's next heartbeat).
            second: list[Sent] = []
            seed = 6

            async def b_consumes() -> bool:
                nonlocal seed
                seed += 1
                second.extend(await produce(kafka_bootstrap, topic, workload(200, base + HOUR, 4, seed=seed)))
                return rolled(registry_b) > 0

            await poll(b_consumes, 60, "member B to own partitions")
            want = end_offsets(first + second)

            async def caught_up() -> bool:
                got = await checkpoints(cassandra, ks, group, topic)
                return all(got.get(p, 0) >= o for p, o in want.items())

            await poll(caught_up, 120, "both members to reach the end of the input")
    windows, _ = expected(first + second, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, ks), windows)
    assert 0 < rolled(registry_b) < len(first) + len(second), "B must have owned some partitions, not all"


def rolled(registry: CollectorRegistry) -> float:
    return counter_total(registry, "headwater_metrics_events")


async def test_a_small_row_cache_evicts_and_reads_back_without_changing_results(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    settings = await metrics_settings(partitions=2, max_cached_rows=100, max_poll_records=50)
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    sent = await produce(kafka_bootstrap, settings.enriched_topic, workload(2000, base, 2, seed=9))
    registry = await run_until_caught_up(settings, cassandra, sent)
    cached = next(s.value for m in registry.collect() if m.name == "headwater_metrics_cached_rows" for s in m.samples)
    assert cached <= 100 + 3 * 50  # the limit, plus at most one poll's rows before the next flush
    want, _ = expected(sent, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, settings.cassandra_keyspace), want)


async def test_a_failure_half_way_through_a_batch_writes_nothing_after_it(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    """An error no retry can help (here: injected into the row reads) ends the loop without
    another row or checkpoint, though the batch had already moved the partition's offset."""
    # Windows leave the cache as soon as they close: rows are read back often, the second read comes early.
    settings = await metrics_settings(partitions=1, max_poll_records=100, max_dirty_rows=1, allowed_lateness_s=0)
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    sent = await produce(kafka_bootstrap, settings.enriched_topic, workload(1000, base, 1, seed=41))
    ks = settings.cassandra_keyspace
    client = CassandraClient(["127.0.0.1"], settings.cassandra_port)
    await client.connect()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    original = Store.load_rows
    try:
        await migrate_schema(client, settings)
        store = Store(client, settings)
        await store.prepare()
        calls = 0

        async def fail_on_second(self: Store, kpart: int, keys: Sequence[RowKey]) -> list[WindowRow]:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("injected")
            return await original(self, kpart, keys)

        Store.load_rows = fail_on_second  # type: ignore[method-assign]
        async with SourceRegistry(settings.sources_file).running() as sources:
            consumer = RollupConsumer(settings, store, sources, producer, make_metrics(CollectorRegistry()))
            with pytest.raises(RuntimeError, match="injected"):
                await asyncio.wait_for(consumer.run(), 60)
        state = consumer.states.get(0)
        saved = (await checkpoints(cassandra, ks, settings.consumer_group, settings.enriched_topic)).get(0, 0)
        assert state is None or state.saved is None or saved <= state.saved.next_offset
    finally:
        Store.load_rows = original  # type: ignore[method-assign]
        await producer.stop()
        await client.close()
    await run_until_caught_up(settings, cassandra, sent)
    want, _ = expected(sent, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, ks), want)
