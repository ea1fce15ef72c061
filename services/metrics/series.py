"""The series index: which (source, type, event) series exist and which properties they sum.

Queries list series from the index, never by scanning the rollup tables, so a
series missing from it is missing from every answer. Every series is noted,
with or without summed properties. What this process noted is remembered so
the index is written once per series, not once per event; the memory is
bounded, and each series is noted again after a day (the index rows have a TTL).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from services.metrics.gather import bounded_gather
from services.metrics.rollup import Event

Series = tuple[str, str, str]
# Noted again after this long; everything forgotten past this many.
RENOTE_S = 86_400.0
MAX_KNOWN = 50_000


class SeriesIndex:
    """Collects the series a batch touches and writes the new ones at the next flush."""

    def __init__(self) -> None:
        self._new: dict[Series, set[str]] = {}
        self._known: dict[tuple[Series, frozenset[str]], float] = {}
        self._now = time.monotonic()

    def see(self, event: Event, props: tuple[str, ...]) -> None:
        """An applied event: its series (and the summed properties it carries)."""
        present = frozenset(p for p in props if p in event.properties) if props else frozenset()
        series = (event.source, event.type, event.name)
        noted = self._known.get((series, present))
        if noted is None or self._now - noted > RENOTE_S:
            self._new.setdefault(series, set()).update(present)

    def forget(self) -> None:
        """Note every series again from the next flush: after a Cassandra failure the index rows
        this process wrote may be gone with the node's last acknowledged writes, and the replay
        that rebuilds the rows must rebuild their series too."""
        self._known.clear()

    def tick(self) -> None:
        """Read the clock once per batch, not per event."""
        self._now = time.monotonic()

    async def write(self, note: Callable[[str, str, str, set[str]], Awaitable[None]], concurrency: int) -> None:
        """Note every new series through ``note`` (a retried store call), ``concurrency`` at a time;
        a series is remembered as noted only once its write succeeded."""
        if not self._new:
            return
        new, self._new = self._new, {}
        try:
            await bounded_gather((note(*series, props) for series, props in new.items()), concurrency)
        except BaseException:
            for series, props in new.items():  # written again at the next flush (idempotent)
                self._new.setdefault(series, set()).update(props)
            raise
        now = time.monotonic()
        if len(self._known) + len(new) > MAX_KNOWN:
            self._known.clear()
        for series, props in new.items():
            self._known[(series, frozenset(props))] = now
