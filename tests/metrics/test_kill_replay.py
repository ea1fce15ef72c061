"""kill -9 the metrics service again and again while it consumes; after a last
clean run every window equals what the input says, none counted twice or lost."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from services.common.badrow import BadRow
from services.common.cassandra import CassandraClient
from tests.helpers import read_topic
from tests.metrics.conftest import SUMS, MakeSettings
from tests.metrics.helpers import (
    assert_windows_equal,
    checkpoints,
    end_offsets,
    expected,
    poll,
    produce,
    start_service,
    stored_windows,
)
from tests.metrics.test_rollups import HOUR, workload

KILLS = 6


async def test_kill_9_while_consuming_never_double_counts_or_loses(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str, tmp_path: Path
) -> None:
    # Small polls and frequent flushes so kills land between row writes and checkpoints.
    settings = await metrics_settings(
        partitions=3, max_poll_records=200, flush_interval_s=0.05, max_dirty_rows=50, write_concurrency=8
    )
    base = (int(time.time() * 1000) // HOUR - 3) * HOUR
    sent = await produce(kafka_bootstrap, settings.enriched_topic, workload(12_000, base, 3, seed=11))
    total = sum(end_offsets(sent).values())
    ks, group, topic = settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
    log_path = tmp_path / "metrics.log"

    progress = 0
    for kill in range(KILLS):
        proc = await start_service(settings, log_path)
        step = total // (KILLS + 2)
        target = progress + step

        async def advanced(target: int = target) -> bool:
            return sum((await checkpoints(cassandra, ks, group, topic)).values()) >= target

        try:
            await poll(advanced, 90, f"progress past {target} before kill {kill}")
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        progress = sum((await checkpoints(cassandra, ks, group, topic)).values())
        assert progress < total, "the service finished before the kills were done; make the input bigger"

    proc = await start_service(settings, log_path)
    try:
        want = end_offsets(sent)

        async def caught_up() -> bool:
            got = await checkpoints(cassandra, ks, group, topic)
            return all(got.get(p, 0) >= o for p, o in want.items())

        await poll(caught_up, 120, "the last run to reach the end of the input")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0

    want_windows, late = expected(sent, settings.max_event_age_ms, SUMS)
    assert_windows_equal(await stored_windows(cassandra, ks), want_windows)
    # Late events reach the side topic at least once (a kill may repeat a few, never drop one).
    rows = [
        BadRow.decode(r.value)
        for r in await read_topic(kafka_bootstrap, settings.late_topic, expected=len(late), timeout_s=30)
    ]
    assert {(r["input"]["partition"], r["input"]["offset"]) for r in rows} == late
    log_text = log_path.read_text()
    # A clean stop frees the sketches before exit: their bindings report none as leaked.
    assert "leaked" not in log_text
    assert log_text.count("partition resumed") >= 3 * (KILLS + 1)
