"""A private Kafka killed and restarted under a running processor: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pytest

from services.common.kafka import TopicSpec, ensure_topics
from services.devstack import stack
from services.processor.settings import Settings
from tests.helpers import read_topic, unique_name
from tests.processor.kafka_helpers import (
    committed_total,
    free_port,
    produce,
    start_subprocess,
    wait_committed,
)
from tests.processor.test_exactly_once import batch, stop


# Once in the CI rehearsals of 2026-12-01 the consumer never rejoined its group after the
# broker came back (nothing logged or committed for 4 minutes): a revocation can wait on a
# transaction stuck on a broker call. That wait is bounded now and the watchdog fails a
# processor stuck out of its group (test_liveness.py); this scenario runs once.
@pytest.mark.timeout(420)
async def test_kafka_killed_and_restarted_under_load(
    private_stack: stack.StackSettings, sources_file: Path, tmp_path: Path
) -> None:
    await asyncio.to_thread(stack.up, private_stack, cassandra=False)
    bootstrap = private_stack.kafka_bootstrap
    raw = unique_name("test.raw")
    await ensure_topics(bootstrap, [TopicSpec(raw, 4)])
    settings = Settings(
        kafka_bootstrap=bootstrap,
        raw_topic=raw,
        enriched_topic=f"{raw}.enriched",
        dlq_topic=f"{raw}.dlq",
        dest_topic_prefix=f"{raw}.dest.",
        group_id=unique_name("test-proc"),
        sources_file=sources_file,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        retry_backoff_s=0.5,
        enriched_partitions=2,
        dlq_partitions=1,
        dest_partitions=1,
        http_port=free_port(),
    )
    total = 40_000
    proc = start_subprocess(settings, tmp_path / "processor.log")
    try:
        await produce(bootstrap, raw, batch(0, total - 2000))
        await wait_committed(bootstrap, settings.group_id, raw, 2000, timeout_s=60)
        # kill -9 the broker while the processor is in the middle of that backlog.
        await asyncio.to_thread(stack.kafka_server(private_stack).kill)
        await asyncio.to_thread(stack.up, private_stack, cassandra=False)
        done = await committed_total(bootstrap, settings.group_id, raw)
        assert done < total - 2000, "the backlog was finished before the broker died; make it longer"
        await produce(bootstrap, raw, batch(total - 2000, 2000))
        await wait_committed(bootstrap, settings.group_id, raw, total, timeout_s=240)
        assert proc.poll() is None, "the processor exited (its watchdog: see processor.log)"
    finally:
        stop(proc)
    records = await read_topic(bootstrap, settings.enriched_topic, expected=None, timeout_s=90)
    ids = Counter(orjson.loads(r.value)["messageId"] for r in records)
    assert sorted(ids) == sorted(f"m-{i}" for i in range(total)), f"{total - len(ids)} lost"
    assert set(ids.values()) == {1}, "duplicates after the broker restart"
    assert proc.returncode == 0
