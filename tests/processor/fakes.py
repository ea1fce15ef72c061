"""A stand-in broker, consumer and transactional producer for unit tests of the
processor's dispatch (rewinds, fences, rebalances) without Kafka.

Only the behaviour the processor relies on is modelled: a transaction's outputs,
changelog record and offsets become visible together at commit; a producer
whose transactional id was taken over (or whose epoch the broker bumped) is
fenced; a consumer reads from its positions, skips paused partitions and
starts a new assignment at the committed offsets. The real-broker tests
(test_processor_kafka.py, test_exactly_once.py) check the real thing.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, ProducerFenced

from services.processor.dedupe import DedupeWindow, decode_entries
from services.processor.settings import Settings
from tests.processor.conftest import envelope

RAW = "events.raw"


def _done(value: Any = None) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class FakeBroker:
    """Raw partitions in, committed transactions out."""

    def __init__(self, partitions: int) -> None:
        self.raw: dict[int, list[SimpleNamespace]] = {p: [] for p in range(partitions)}
        self.committed: dict[int, int] = {}
        # (topic, value) of every committed output record, in commit order.
        self.outputs: list[tuple[str, bytes]] = []
        self.changelog: dict[int, list[bytes]] = defaultdict(list)
        self.epochs: dict[str, int] = defaultdict(int)
        # Exceptions the next commits raise, one each, before anything is applied.
        self.commit_failures: list[BaseException] = []
        self.commits = 0

    def append(self, partition: int, message_ids: Iterable[str]) -> None:
        log = self.raw[partition]
        for mid in message_ids:
            event = {"type": "track", "event": "Tick", "userId": f"u{partition}"}
            log.append(
                SimpleNamespace(
                    topic=RAW,
                    partition=partition,
                    offset=len(log),
                    timestamp=0,
                    key=f"keep:u{partition}".encode(),
                    headers=(("hw-schema", b"envelope/1"),),
                    value=envelope(event, source_id="keep", message_id=mid),
                )
            )

    def fence(self, partition: int) -> None:
        """What the broker does to a transaction past its timeout, or a new owner's producer."""
        self.epochs[f"txn-{partition}"] += 1

    def output_ids(self) -> list[str]:
        return [orjson.loads(value)["messageId"] for topic, value in self.outputs if topic == "events.enriched"]

    def done(self) -> bool:
        return all(self.committed.get(p, 0) == len(log) for p, log in self.raw.items())

    async def restore(self, _settings: Settings, partition: int) -> DedupeWindow:
        window = DedupeWindow(3_600_000, 10_000)
        for value in self.changelog[partition]:
            window.add_all(decode_entries(value))
        return window


class _Builder:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes, headers: Any) -> object:
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class FakeProducer:
    def __init__(self, broker: FakeBroker, transactional_id: str) -> None:
        self.broker = broker
        self.id = transactional_id
        self.epoch = -1
        self.stopped = False
        self._records: list[tuple[str, bytes]] = []
        self._offsets: dict[TopicPartition, int] = {}
        self._in_transaction = False

    def _check(self) -> None:
        if self.stopped:
            raise KafkaConnectionError("producer stopped")
        if self.broker.epochs[self.id] != self.epoch:
            raise ProducerFenced()

    async def start(self) -> None:
        self.broker.epochs[self.id] += 1  # fences the previous producer with this id
        self.epoch = self.broker.epochs[self.id]

    async def stop(self) -> None:
        self.stopped = True

    async def begin_transaction(self) -> None:
        self._check()
        self._records, self._offsets, self._in_transaction = [], {}, True

    async def partitions_for(self, _topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> _Builder:
        return _Builder()

    async def send_batch(self, builder: _Builder, topic: str, partition: int) -> asyncio.Future[Any]:
        self._check()
        self._records.extend((topic, value) for _key, value in builder.records)
        return _done()

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None, headers: Any = None
    ) -> asyncio.Future[Any]:
        self._check()
        self._records.append((topic, value))
        return _done()

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], _group: str) -> None:
        self._check()
        self._offsets = dict(offsets)

    async def commit_transaction(self) -> None:
        self._check()
        self._in_transaction = False
        broker = self.broker
        if broker.commit_failures:
            raise broker.commit_failures.pop(0)
        await asyncio.sleep(0)  # a commit takes a round trip: let the loop run meanwhile
        for topic, value in self._records:
            if topic.endswith("dedupe-changelog"):
                broker.changelog[int(self.id.rsplit("-", 1)[1])].append(value)
            else:
                broker.outputs.append((topic, value))
        for tp, offset in self._offsets.items():
            broker.committed[tp.partition] = offset
        broker.commits += 1

    async def abort_transaction(self) -> None:
        self._in_transaction = False


class FakeConsumer:
    """Positions, pauses and an assignment, read the way AIOKafkaConsumer reads them."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.assigned: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.paused_tps: set[TopicPartition] = set()
        self.seeks = 0

    def assign_now(self, tps: Iterable[TopicPartition]) -> None:
        """A new assignment starts at the committed offsets, nothing paused."""
        self.assigned = set(tps)
        self.positions = {tp: self.broker.committed.get(tp.partition, 0) for tp in self.assigned}
        self.paused_tps.clear()

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        await asyncio.sleep(0.001)
        out: dict[TopicPartition, list[Any]] = {}
        for tp in sorted(self.assigned - self.paused_tps, key=lambda t: t.partition):
            start = self.positions[tp]
            records = self.broker.raw[tp.partition][start : start + 7]
            if records:
                out[tp] = records
                self.positions[tp] = start + len(records)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks += 1
        self.positions[tp] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_tps.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_tps.difference_update(tps)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.broker.raw[tp.partition])

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.broker.committed.get(tp.partition)

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def stop(self) -> None:
        self.assigned = set()
