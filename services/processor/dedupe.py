"""Dedupe state of one events.raw partition: (source, messageId) seen within a window.

Memory is bounded (oldest entries are evicted past ``max_entries``). The
state survives restarts and rebalances through a changelog topic that the
processor writes in the same transaction as the outputs (one record per
batch, holding that batch's new keys) and reads back when it is given the
partition. The changelog's retention is the window, so it stays small.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import orjson

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
