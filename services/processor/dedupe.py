"""Dedupe state of one events.raw partition: (source, messageId) seen within a window.

Memory is bounded (oldest entries are evicted past ``max_entries``). The
state survives restarts and rebalances through a changelog topic that the
processor writes in the same transaction as the outputs (one record per
batch, holding that batch's new keys) and reads back when it is given the
partition. The changelog's retention is the window, so it stays small.

The read back (``restore``) goes newest first, in growing chunks, and stops
once the bounded window is full: a busy partition's day of history is not
read in full. It reads with read_committed, so a batch whose transaction was
aborted leaves no key behind, and it runs after the new owner's producer has
fenced the previous one, so nothing the previous owner wrote is still open.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.processor.settings import Settings

log = structlog.get_logger(__name__)

_SEP = "\x1f"


def dedupe_key(source_id: str, message_id: str) -> str:
    return f"{source_id}{_SEP}{message_id}"


def encode_entries(entries: dict[str, int]) -> bytes:
    """One changelog record for a batch: {key: receivedAt ms}."""
    return orjson.dumps(entries)


def decode_entries(value: bytes | None) -> list[tuple[str, int]]:
    """The entries of a changelog record; a damaged record yields none (dedupe is best effort)."""
    if not value:
        return []
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(data, dict):
        return []
    return [(k, v) for k, v in data.items() if isinstance(v, int)]


class DedupeWindow:
    """Keys with the receivedAt (ms) they were first seen at; insertion order is age order."""

    def __init__(self, window_ms: int, max_entries: int) -> None:
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def is_duplicate(self, key: str, received_at_ms: int) -> bool:
        first = self._seen.get(key)
        # Ingest processes' clocks differ a little, so a retry may look slightly older.
        return first is not None and abs(received_at_ms - first) < self.window_ms

    def add(self, key: str, received_at_ms: int) -> None:
        if key in self._seen:
            return
        self._seen[key] = received_at_ms
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
            self.evicted += 1

    def add_all(self, entries: Iterable[tuple[str, int]]) -> None:
        for key, ts in entries:
            self.add(key, ts)

    def expire(self, now_ms: int) -> None:
        """Forget keys older than the window (the oldest sit at the front)."""
        cutoff = now_ms - self.window_ms
        while self._seen:
            key, ts = next(iter(self._seen.items()))
            if ts >= cutoff:
                break
            del self._seen[key]


async def restore(settings: Settings, partition: int) -> DedupeWindow:
    """The window of events.raw ``partition`` as its committed changelog records left it."""
    s = settings
    window = DedupeWindow(s.dedupe_window_ms, s.dedupe_max_entries_per_partition)
    tp = TopicPartition(s.dedupe_changelog, partition)
    reader = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        group_id=None,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id=f"{s.service_name}-restore",
    )
    await reader.start()
    try:
        reader.assign([tp])
        end = (await asyncio.wait_for(reader.end_offsets([tp]), s.restore_timeout_s))[tp]
        begin = (await asyncio.wait_for(reader.beginning_offsets([tp]), s.restore_timeout_s))[tp]
        deadline = asyncio.get_running_loop().time() + s.restore_timeout_s
        chunks: list[list[tuple[str, int]]] = []
        held, stop_at = 0, end
        # A changelog record holds one batch (at most batch_max_records keys).
        span = max(1, s.dedupe_max_entries_per_partition // max(1, s.batch_max_records))
        while stop_at > begin and held < window.max_entries:
            start = max(begin, stop_at - span)
            chunk = await _read_range(reader, tp, start, stop_at, deadline)
            if chunk is None:
                log.error(
                    "dedupe state only partly read back; duplicates may pass",
                    end=end,
                    read_from=stop_at,
                    **{"kafka.topic": tp.topic, "kafka.partition": partition},
                )
                break
            chunks.append(chunk)
            held += len(chunk)
            stop_at, span = start, span * 2
        newest = 0
        for chunk in reversed(chunks):  # oldest first: the window evicts from the front
            for key, ts in chunk:
                window.add(key, ts)
                newest = max(newest, ts)
        window.expire(newest)
        log.info(
            "dedupe state read back",
            changelog_end=end,
            read_from=stop_at,
            entries=len(window),
            **{"kafka.topic": tp.topic, "kafka.partition": partition},
        )
    finally:
        await reader.stop()
    return window


async def _read_range(
    reader: AIOKafkaConsumer, tp: TopicPartition, start: int, stop: int, deadline: float
) -> list[tuple[str, int]] | None:
    """Entries of changelog records in [start, stop); None when the deadline passed."""
    loop = asyncio.get_running_loop()
    reader.seek(tp, start)
    entries: list[tuple[str, int]] = []
    while await reader.position(tp) < stop:
        if loop.time() > deadline:
            return None
        batch = await reader.getmany(tp, timeout_ms=500)
        for record in batch.get(tp, ()):
            if record.offset >= stop:
                return entries
            entries.extend(decode_entries(record.value))
    return entries
