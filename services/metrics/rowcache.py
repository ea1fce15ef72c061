"""The window rows one partition holds in memory, and how missing ones come back.

A row in the cache is the whole aggregate of its window for this partition,
as stored in Cassandra plus what the partition applied since (``dirty``).
A row that is not cached is read back before its first update, because the
stored row may already hold events (from before a restart, from a late event
days ago, or from the last owner of the partition). Two things keep that cheap:

* The horizon: per resolution, the newest window start this partition has ever
  written, saved in Cassandra before any row beyond it is written. A window
  starting after the horizon was never written, so its row starts empty with
  no read. Live traffic almost always lands there.
* What this process wrote since it resumed the partition: a window past the horizon
  it resumed with can only hold rows this process wrote, which are cached or were
  evicted (and are remembered as evicted, up to a bound). So a row there that is
  neither was never written, and starts empty with no read: live traffic whose
  events straddle a few windows costs no read-back.
* Read-backs are batched: the rows one batch of records needs are read with
  one ``SELECT ... IN`` per Cassandra partition (resolution, source, bucket),
  so an old event costs a share of a round trip, not one of its own.

Eviction bounds memory, never correctness: a clean row can always be read
back, and dirty rows are never evicted (a flush cleans them first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from services.metrics.rollup import RESOLUTIONS, RowKey, WindowRow

# The horizon of a partition whose checkpoint exists but whose horizons do not
# (written by an older version): read every row.
ALWAYS_READ = 2**62
# Evicted rows remembered per partition; past this, every row up to the horizon is read back.
MAX_EVICTED = 100_000


class RowCache:
    """Window rows of one partition in least-recently-used order."""

    def __init__(self, horizon: dict[str, int], lg_k: int) -> None:
        self.horizon = horizon
        # Windows past these were written by this process alone (or not at all).
        self.ours_after = dict(horizon)
        self.evicted: set[RowKey] = set()
        self.lg_k = lg_k
        self.rows: OrderedDict[RowKey, WindowRow] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def missing(self, keys: Iterable[RowKey]) -> list[RowKey]:
        """The keys that must be read back; keys past the horizon get an empty row at once."""
        out: list[RowKey] = []
        seen: set[RowKey] = set()
        for key in keys:
            if key in self.rows or key in seen:
                continue
            if key.window_start > self.horizon[key.resolution] or (
                key.window_start > self.ours_after[key.resolution] and key not in self.evicted
            ):
                self.rows[key] = WindowRow(self.lg_k)  # never written: nothing to read
            else:
                seen.add(key)
                out.append(key)
        return out

    def fill(self, keys: list[RowKey], rows: list[WindowRow]) -> None:
        for key, row in zip(keys, rows, strict=True):
            self.rows[key] = row

    def touch(self, key: RowKey) -> WindowRow:
        row = self.rows[key]
        self.rows.move_to_end(key)
        return row

    def dirty(self) -> list[tuple[RowKey, WindowRow]]:
        return [(k, r) for k, r in self.rows.items() if r.dirty]

    def dirty_count(self) -> int:
        return sum(1 for r in self.rows.values() if r.dirty)

    def newest_windows(self, keys: Iterable[RowKey]) -> dict[str, int]:
        """Per resolution, the newest window start among ``keys`` that is past the horizon."""
        newest: dict[str, int] = {}
        for key in keys:
            if key.window_start > max(self.horizon[key.resolution], newest.get(key.resolution, -1)):
                newest[key.resolution] = key.window_start
        return newest

    def evict_closed(self, before_ms: int) -> None:
        """Drop clean rows whose window ended before ``before_ms``; an event for them reads them back."""
        closed = [
            k for k, r in self.rows.items() if not r.dirty and k.window_start + RESOLUTIONS[k.resolution] <= before_ms
        ]
        for key in closed:
            self._drop(key)

    def evict_oldest(self, count: int) -> int:
        """Drop up to ``count`` clean rows, least recently used first; returns how many went."""
        dropped = 0
        for key in list(self.rows):
            if dropped >= count:
                break
            if not self.rows[key].dirty:
                self._drop(key)
                dropped += 1
        return dropped

    def _drop(self, key: RowKey) -> None:
        del self.rows[key]
        if key.window_start > self.ours_after[key.resolution]:
            if len(self.evicted) >= MAX_EVICTED:
                # Forget them all: from now on every row up to the horizon is read back.
                self.ours_after = dict(self.horizon)
                self.evicted.clear()
            else:
                self.evicted.add(key)
