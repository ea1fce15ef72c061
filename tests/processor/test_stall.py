"""A transaction that runs past transaction_timeout_ms against the real Kafka: the broker
aborts it and fences the producer, and no rebalance comes. The partition must show as
stalled, then recover by itself, and every event must come out exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from services.processor import transactions
from services.processor.worker import Processor
from tests.helpers import read_topic
from tests.processor.conftest import envelope
from tests.processor.kafka_helpers import make_settings, produce, running_processor, wait_committed
from tests.processor.test_dispatch import sample

NewTopic = Callable[..., Awaitable[str]]
NewGroup = Callable[[str], str]


@pytest.mark.slow
async def test_a_transaction_past_its_timeout_recovers_without_a_rebalance(
    kafka_bootstrap: str, new_topic: NewTopic, new_group: NewGroup, sources_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = await make_settings(
        kafka_bootstrap,
        new_topic,
        new_group,
        sources_file,
        partitions=1,
        transaction_timeout_ms=1000,
        batch_max_records=10,
        max_pending_batches=2,
    )
    real_write = transactions.write_outputs
    slowed: list[int] = []

    async def slow_write(producer: Any, outputs: list[Any]) -> list[asyncio.Future[Any]]:
        futures = await real_write(producer, outputs)
        if not slowed:
            slowed.append(len(outputs))
            # A slow batch: past transaction_timeout_ms and past the broker's next check for
            # timed-out transactions (every 10 s on the dev stack), with the transaction open.
            await asyncio.sleep(13)
        return futures

    monkeypatch.setattr(transactions, "write_outputs", slow_write)
    revocations: list[list[TopicPartition]] = []
    real_revoked = Processor.on_revoked

    async def counting_revoked(self: Processor, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        if revoked:
            revocations.append(revoked)
        await real_revoked(self, revoked)

    monkeypatch.setattr(Processor, "on_revoked", counting_revoked)
    events = [(b"web:u", envelope({"type": "identify", "userId": "u"}, message_id=f"m-{i}")) for i in range(30)]
    async with running_processor(settings) as processor:
        await produce(kafka_bootstrap, settings.raw_topic, events)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40
        detail = ""
        while loop.time() < deadline:
            ok, detail = await processor.status()
            if not ok:
                break
            await asyncio.sleep(0.1)
        assert "partition 0 fenced" in detail, f"the stall never showed in readiness: {detail!r}"
        assert sample(processor.metrics.partitions_stalled) == 1
        # Lag is measured from the last commit, so it shows the stall too.
        assert sample(processor.metrics.lag, {"partition": "0"}) == 30
        await wait_committed(kafka_bootstrap, settings.group_id, settings.raw_topic, 30, timeout_s=60)
        assert await processor.status() == (True, "1 partitions")
        assert sample(processor.metrics.partitions_stalled) == 0
        assert sample(processor.metrics.transactions, {"outcome": "fenced"}) == 1
    assert slowed, "the slow batch never ran"
    assert revocations == [], "it recovered through a rebalance, not by itself"
    records = await read_topic(kafka_bootstrap, settings.enriched_topic, expected=None, timeout_s=10)
    ids = Counter(orjson.loads(r.value)["messageId"] for r in records)
    assert sorted(ids) == sorted(f"m-{i}" for i in range(30)), "events lost"
    assert max(ids.values()) == 1, "events doubled"
