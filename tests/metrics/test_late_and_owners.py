"""Rollups as a user queries them, against the real Kafka and Cassandra: every source and event
type listed and counted (with and without summed properties), old events in their own windows,
a checkpoint ahead of its topic, one writer per keyspace, and a member frozen past the group
timeout that resumes writing after the new owner moved on."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.common.badrow import BadRow
from services.common.cassandra import CassandraClient
from services.metrics.app import build_app
from services.metrics.rollup import RowKey, WindowRow
from services.metrics.schema import migrate_schema
from services.metrics.settings import Settings
from services.metrics.store import Checkpoint, KeyspaceOwned, Store
from tests.helpers import free_port, read_topic
from tests.metrics.conftest import MakeSettings
from tests.metrics.helpers import (
    assert_windows_equal,
    checkpoints,
    count_body,
    counts,
    end_offsets,
    enriched,
    expected,
    poll,
    produce,
    start_service,
    stored_windows,
)
from tests.metrics.test_rollups import run_until_caught_up, workload

ApiClient = TestClient[web.Request, web.Application]

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
SUMS = {"web": ["revenue"], "node": []}


def sources(path: Path) -> Path:
    """ "web" sums revenue; "node" has no sum_properties setting at all."""
    path.write_text(
        json.dumps(
            {
                "sources": [
                    {"id": "web", "name": "web", "write_key": "web-key", "sum_properties": ["revenue"]},
                    {"id": "node", "name": "node", "write_key": "node-key"},
                ]
            }
        )
    )
    return path


async def count_query(
    api: ApiClient, start: int, end: int, group: str = "source", tags: dict[str, list[str]] | None = None
) -> dict[str, int]:
    resp = await api.post("/api/v1/datapoints/query", json=count_body(start, end, group, tags))
    assert resp.status == 200, await resp.text()
    return counts(await resp.json(), group)


async def test_every_source_type_and_old_event_is_in_its_own_window(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = await metrics_settings(
        partitions=2, sources_file=sources(tmp_path / "s.json"), max_event_age_s=None
    )  # the default: the 1m retention, 7 days
    now = int(time.time() * 1000)
    live = now - now % MIN - 5 * MIN
    docs = [enriched("web", "track", "Order Completed", "u1", live, now, {"revenue": 5})]
    for i, etype in enumerate(["track", "page", "screen", "identify", "group", "alias"]):
        docs.append(enriched("node", etype, "Signed Up" if etype == "track" else "Home", f"u{i}", live, now))
    # Sent now with their original times: an offline mobile queue, a device days offline,
    # /v1/import of history, and one past the maximum age.
    olds = {"2h": now - 2 * HOUR, "3d": now - 3 * DAY, "5d": now - 5 * DAY, "8d": now - 8 * DAY}
    for label, t in olds.items():
        docs += [
            enriched(
                "node", "track", f"Old {label}", f"u{i}", t - t % MIN + i, now + 1000, message_id=f"old-{label}-{i}"
            )
            for i in range(4)
        ]
    sent = await produce(
        kafka_bootstrap, settings.enriched_topic, [(i % 2, orjson.dumps(d)) for i, d in enumerate(docs)]
    )
    await run_until_caught_up(settings, cassandra, sent)
    want, late = expected(sent, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, settings.cassandra_keyspace), want)

    app = await build_app(settings, consume=False, registry=CollectorRegistry())
    async with TestClient(TestServer(app)) as api:
        # Both sources are listed: the one without summed properties was missing before.
        assert await count_query(api, live, live + MIN - 1) == {"web": 1, "node": 6}
        assert await count_query(api, live, live + MIN - 1, "type", {"source": ["node"]}) == dict.fromkeys(
            ["track", "page", "screen", "identify", "group", "alias"], 1
        )
        for label in ("2h", "3d", "5d"):
            t = olds[label] - olds[label] % MIN
            assert await count_query(api, t, t + MIN - 1, "event") == {f"Old {label}": 4}, label
        t = olds["8d"] - olds["8d"] % MIN
        assert await count_query(api, t, t + MIN - 1, "event") == {}
        resp = await api.post(
            "/api/v1/datapoints/query/tags",
            json={
                "start_absolute": live,
                "end_absolute": live + MIN - 1,
                "metrics": [{"name": "headwater.events.count", "tags": {"resolution": ["1m"]}}],
            },
        )
        assert resp.status == 200, await resp.text()
        tags = (await resp.json())["queries"][0]["results"][0]["tags"]
        assert set(tags["source"]) == {"web", "node"}
        assert set(tags["type"]) >= {"track", "page", "screen", "identify", "group", "alias"}

    rows = [BadRow.decode(r.value) for r in await read_topic(kafka_bootstrap, settings.late_topic, expected=4)]
    assert len(late) == 4
    assert {(r["input"]["partition"], r["input"]["offset"]) for r in rows} == late
    assert {r["extra"]["reason"] for r in rows} == {"max_event_age"}
    assert sorted(r["message_id"] for r in rows) == [f"old-8d-{i}" for i in range(4)]


async def _halted(settings: Settings) -> tuple[int, str]:
    app = await build_app(settings, registry=CollectorRegistry())
    async with TestClient(TestServer(app)) as client:

        async def reported() -> bool:
            resp = await client.get("/readyz")
            return resp.status == 503 and "ahead" in await resp.text()

        await poll(reported, 30, "/readyz to report the halted partition")
        metrics = await (await client.get("/metrics")).text()
        return (await client.get("/readyz")).status, metrics


async def test_a_checkpoint_ahead_of_its_topic_halts_or_rolls_the_partition_up_again(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    """The topic was recreated under a checkpoint: nothing is skipped silently."""
    settings = await metrics_settings(partitions=1)
    now = int(time.time() * 1000)
    sent = await produce(
        kafka_bootstrap,
        settings.enriched_topic,
        [(0, orjson.dumps(enriched("web", "track", "X", f"u{i}", now - i, now))) for i in range(5)],
    )
    await migrate_schema(cassandra, settings)
    store = Store(cassandra, settings)
    await store.prepare()
    await store.save_checkpoint(settings.consumer_group, settings.enriched_topic, 0, Checkpoint(0, 1000, now))

    status, metrics = await _halted(settings)
    assert status == 503
    assert "headwater_metrics_halted_partitions 1.0" in metrics
    assert 'headwater_metrics_partition_problems_total{reason="checkpoint_ahead"} 1.0' in metrics
    assert await stored_windows(cassandra, settings.cassandra_keyspace) == {}
    cps = await checkpoints(cassandra, settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic)
    assert cps == {0: 1000}

    restart = settings.model_copy(update={"on_checkpoint_ahead": "restart"})
    app = await build_app(restart, registry=CollectorRegistry())
    async with TestClient(TestServer(app)):

        async def rolled_up() -> bool:
            cps = await checkpoints(
                cassandra, settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
            )
            return cps.get(0) == 5

        await poll(rolled_up, 30, "the partition rolled up again from its beginning")
    want, _ = expected(sent, settings.max_event_age_ms, {"web": ["revenue"]})
    assert_windows_equal(await stored_windows(cassandra, settings.cassandra_keyspace), want)
    base = await store.load_checkpoint(settings.consumer_group, settings.enriched_topic, 0)
    assert base is not None and base.base > 1000  # offsets counted on above the old checkpoint


async def test_one_keyspace_has_one_rollup_writer_until_it_is_handed_over(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> None:
    settings = await metrics_settings(partitions=2)
    base = (int(time.time() * 1000) // HOUR - 2) * HOUR
    sent = await produce(kafka_bootstrap, settings.enriched_topic, workload(300, base, 2, seed=3))
    await run_until_caught_up(settings, cassandra, sent)

    renamed = settings.model_copy(update={"consumer_group": settings.consumer_group + "-renamed"})
    with pytest.raises(KeyspaceOwned, match="claim --from-group"):
        await build_app(renamed, registry=CollectorRegistry())
    # The query API alone (no consumer) is not a writer.
    await build_app(renamed, consume=False, registry=CollectorRegistry())

    store = Store(cassandra, settings)
    await store.prepare()
    assert await store.hand_over(settings.consumer_group, renamed.consumer_group, settings.enriched_topic) == 2
    more = await produce(kafka_bootstrap, settings.enriched_topic, workload(200, base + HOUR, 2, seed=4))
    await run_until_caught_up(renamed, cassandra, sent + more)
    want, _ = expected(sent + more, settings.max_event_age_ms, {"web": ["revenue"], "srv": ["revenue", "quantity"]})
    # Resumed at the old group's checkpoints: nothing counted twice.
    assert_windows_equal(await stored_windows(cassandra, settings.cassandra_keyspace), want)
    with pytest.raises(KeyspaceOwned):
        await build_app(settings, registry=CollectorRegistry())


async def _rolled(http: aiohttp.ClientSession, port: int) -> float:
    try:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return 0.0
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("headwater_metrics_events_total{")
    )


@pytest.mark.slow
async def test_a_member_frozen_past_the_group_timeout_cannot_overwrite_the_new_owner(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A holds unflushed rows when it is frozen (SIGSTOP); B takes the partition over, rolls up
    everything and writes; A resumes (SIGCONT), learns it lost the partition and flushes what it
    held on the way out. Whatever A managed to apply by then, every window equals the input.
    (A often catches up before its flush, so the overwrite itself is shown deterministically by
    the test below.)"""
    settings = await metrics_settings(partitions=1)
    base = (int(time.time() * 1000) // HOUR - 2) * HOUR
    first = await produce(kafka_bootstrap, settings.enriched_topic, workload(600, base, 1, seed=21))
    ks, group, topic = settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
    # A flushes only on its way out: it holds every row it applied as dirty until then.
    holder = settings.model_copy(update={"flush_interval_s": 3600.0, "max_dirty_rows": 1_000_000})
    port_a, port_b = free_port(), free_port()
    a = await start_service(holder, tmp_path / "a.log", port=port_a)
    b: Any = None
    try:
        async with aiohttp.ClientSession() as http:
            _, late = expected(first, settings.max_event_age_ms, {})

            async def a_applied() -> bool:  # every event but the late ones
                return await _rolled(http, port_a) >= len(first) - len(late)

            await poll(a_applied, 60, "member A to apply the first events")
            assert await checkpoints(cassandra, ks, group, topic) == {}, "A must not have flushed yet"
            a.send_signal(signal.SIGSTOP)
            b = await start_service(settings, tmp_path / "b.log", port=port_b)
            second = await produce(kafka_bootstrap, topic, workload(400, base + HOUR, 1, seed=22))
            want = end_offsets(first + second)

            async def b_caught_up() -> bool:
                return (await checkpoints(cassandra, ks, group, topic)).get(0, 0) >= want[0]

            await poll(b_caught_up, 90, "member B to take over and reach the end")
            a.send_signal(signal.SIGCONT)
            # A learns it lost the partition and flushes what it held (its stale rows) on the way.
            await asyncio.sleep(8)
            assert a.returncode is None, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for proc in (a, b):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 60)
    log_a = (tmp_path / "a.log").read_text()
    assert "partition resumed" in log_a
    windows, _ = expected(
        first + second, settings.max_event_age_ms, {"web": ["revenue"], "srv": ["revenue", "quantity"]}
    )
    assert_windows_equal(await stored_windows(cassandra, ks), windows)
    assert (await checkpoints(cassandra, ks, group, topic)) == want


async def test_stale_writes_lose_to_the_writes_that_include_more_offsets(
    metrics_settings: MakeSettings, cassandra: CassandraClient
) -> None:
    """The overwrite itself, deterministically: the new owner writes rows, checkpoint and horizon;
    then a cut-off member writes older ones (fewer offsets, a lower horizon) later in wall time."""
    settings = await metrics_settings(partitions=1)
    await migrate_schema(cassandra, settings)
    new_owner, stale = Store(cassandra, settings), Store(cassandra, settings)
    await new_owner.prepare()
    await stale.prepare()
    group, topic = settings.consumer_group, settings.enriched_topic
    key = RowKey("1m", "web", "track", "X", 1_780_000_020_000)
    await new_owner.write_rows([(0, key, WindowRow(12, count=10, upto=999), 999)])
    await new_owner.save_checkpoint(group, topic, 0, Checkpoint(0, 1000, 5))
    await new_owner.save_horizon(group, topic, 0, "1m", key.window_start)
    await stale.write_rows([(0, key, WindowRow(12, count=6, upto=599), 599)])
    await stale.save_checkpoint(group, topic, 0, Checkpoint(0, 600, 4))
    await stale.save_horizon(group, topic, 0, "1m", key.window_start - 60_000)
    (row,) = await new_owner.load_rows(0, [key])
    assert (row.count, row.upto) == (10, 999)
    assert await new_owner.load_checkpoint(group, topic, 0) == Checkpoint(0, 1000, 5)
    assert await new_owner.load_horizons(group, topic, 0) == {"1m": key.window_start}
    # A later write that holds more offsets wins, as the new owner's next flush must.
    await new_owner.write_rows([(0, key, WindowRow(12, count=11, upto=1000), 1000)])
    assert [(r.count, r.upto) for r in await stale.load_rows(0, [key])] == [(11, 1000)]
