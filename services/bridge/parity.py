"""The parity report: what the legacy stream carried against what Headwater counted.

Both sides are cut the same way: per minute of event time, source, type and
event name (the rollups' ``event`` tag: the track event or the page/screen
name, "" otherwise).

* Legacy side: the messageIds the bridge recorded per (source, minute) in
  Cassandra (store.py, ``parity_ids``); a count is the number of distinct
  messageIds, so it is exact however often the bridge re-read a shard.
* Headwater side: ``headwater.events.count`` at 1m resolution from the metrics
  service's KairosDB API, and, only for the minutes whose counts differ, the
  messageIds of events.enriched (read_committed) found by scanning the topic
  from the start of the range (less the processor's future-skew allowance,
  since event time can be ahead of the record's time by that much).

``compare`` is pure; the rest fetches.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.bridge.store import Store

Cell = tuple[int, str, str]  # (minute start ms, type, event name)
MINUTE_MS = 60_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> int:
    """ISO-8601 (naive = UTC) or epoch milliseconds, to epoch ms."""
    if text.isdigit():
        return int(text)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def minutes(from_ms: int, to_ms: int) -> list[int]:
    """The minute starts in [from, to): a minute is in when it starts in the range."""
    first = from_ms + (-from_ms % MINUTE_MS)
    return list(range(first, to_ms, MINUTE_MS))


@dataclass
class Report:
    source: str
    from_ms: int
    to_ms: int
    threshold: int
    cells: list[dict[str, Any]] = field(default_factory=list)
    only_legacy: dict[str, list[str]] = field(default_factory=dict)
    only_headwater: dict[str, list[str]] = field(default_factory=dict)
    ids_complete: bool = True

    @property
    def max_difference(self) -> int:
        return max((abs(int(c["difference"])) for c in self.cells), default=0)

    @property
    def exceeded(self) -> bool:
        return self.max_difference > self.threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "from": iso(self.from_ms),
            "to": iso(self.to_ms),
            "threshold": self.threshold,
            "max_difference": self.max_difference,
            "exceeded": self.exceeded,
            "differences": self.cells,
            "only_legacy": self.only_legacy,
            "only_headwater": self.only_headwater,
            "ids_complete": self.ids_complete,
        }

    def to_text(self) -> str:
        if not self.cells:
            return f"parity {self.source} {iso(self.from_ms)} .. {iso(self.to_ms)}: both sides agree"
        lines = [
            f"parity {self.source} {iso(self.from_ms)} .. {iso(self.to_ms)}: {len(self.cells)} differences "
            f"(largest {self.max_difference}, threshold {self.threshold})",
            f"{'minute':<21} {'type':<9} {'event':<24} {'legacy':>7} {'headwater':>9} {'diff':>6}",
        ]
        lines.extend(
            f"{c['minute']:<21} {c['type']:<9} {c['event'][:24]:<24} {c['legacy']:>7} "
            f"{c['headwater']:>9} {c['difference']:>+6}"
            for c in self.cells
        )
        for title, ids in (("only in the legacy stream", self.only_legacy), ("only in Headwater", self.only_headwater)):
            for minute, values in ids.items():
                lines.append(f"{title}, {minute}: {', '.join(values)}")
        if not self.ids_complete:
            lines.append("(events.enriched scan stopped at its limit: the Headwater messageIds may be incomplete)")
        return "\n".join(lines)


def compare(
    source: str,
    from_ms: int,
    to_ms: int,
    legacy: dict[Cell, set[str]],
    headwater: dict[Cell, int],
    headwater_ids: dict[int, set[str]] | None,
    *,
    threshold: int,
) -> Report:
    """Cells whose counts differ, and per differing minute the messageIds on one side only."""
    report = Report(source, from_ms, to_ms, threshold)
    differing: set[int] = set()
    for cell in sorted(set(legacy) | set(headwater)):
        ours, theirs = len(legacy.get(cell, set())), headwater.get(cell, 0)
        if ours != theirs:
            minute, kind, name = cell
            differing.add(minute)
            report.cells.append(
                {
                    "minute": iso(minute),
                    "type": kind,
                    "event": name,
                    "legacy": ours,
                    "headwater": theirs,
                    "difference": ours - theirs,
                }
            )
    if headwater_ids is not None:
        for minute in sorted(differing):
            ours_ids = set().union(*(ids for cell, ids in legacy.items() if cell[0] == minute))
            theirs_ids = headwater_ids.get(minute, set())
            if only := sorted(ours_ids - theirs_ids):
                report.only_legacy[iso(minute)] = only
            if only := sorted(theirs_ids - ours_ids):
                report.only_headwater[iso(minute)] = only
    return report


async def legacy_side(store: Store, source: str, from_ms: int, to_ms: int) -> dict[Cell, set[str]]:
    """One Cassandra partition per minute; read 32 at a time (a day is 1,440 of them)."""
    out: dict[Cell, set[str]] = defaultdict(set)
    wanted = minutes(from_ms, to_ms)
    for start in range(0, len(wanted), 32):
        chunk = wanted[start : start + 32]
        for minute, rows in zip(
            chunk, await asyncio.gather(*(store.parity_ids(source, m) for m in chunk)), strict=True
        ):
            for row in rows:
                out[(minute, row.type, row.event)].add(row.message_id)
    return dict(out)


async def headwater_side(
    metrics_url: str, source: str, from_ms: int, to_ms: int, auth: aiohttp.BasicAuth | None = None
) -> dict[Cell, int]:
    """1m rollup counts per type and event from the KairosDB API."""
    query = {
        "start_absolute": from_ms,
        "end_absolute": to_ms - 1,
        "metrics": [
            {
                "name": "headwater.events.count",
                "tags": {"source": [source], "resolution": ["1m"]},
                "group_by": [{"name": "tag", "tags": ["type", "event"]}],
            }
        ],
    }
    async with (
        aiohttp.ClientSession(auth=auth) as http,
        http.post(f"{metrics_url.rstrip('/')}/api/v1/datapoints/query", json=query) as resp,
    ):
        if resp.status != 200:
            raise RuntimeError(f"the metrics API answered {resp.status}: {(await resp.text())[:500]}")
        body = await resp.json()
    out: dict[Cell, int] = defaultdict(int)
    for result in body["queries"][0]["results"]:
        tags = result.get("tags", {})
        kind = (tags.get("type") or [""])[0]
        name = (tags.get("event") or [""])[0]
        for ts, value in result.get("values", []):
            minute = int(ts) - int(ts) % MINUTE_MS
            if from_ms <= minute < to_ms:
                out[(minute, kind, name)] += int(value)
    return dict(out)


async def headwater_ids(
    bootstrap: str, topic: str, source: str, wanted: set[int], from_ms: int, *, scan_limit: int, skew_ms: int
) -> tuple[dict[int, set[str]], bool]:
    """messageIds of the source's events.enriched events whose event minute is wanted.
    Returns them and whether the scan reached the end of the topic within ``scan_limit``."""
    out: dict[int, set[str]] = defaultdict(set)
    if not wanted:
        return {}, True
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] != 0:
        raise RuntimeError(f"topic {topic} could not be described: error {described['error_code']}")
    parts = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        starts = await consumer.offsets_for_times({tp: max(0, from_ms - skew_ms) for tp in parts})
        remaining = {}
        for tp in parts:
            found = starts.get(tp)
            if found is None:
                continue  # nothing at or after the range start in this partition
            consumer.seek(tp, found.offset)
            if found.offset < ends[tp]:
                remaining[tp] = ends[tp]
        scanned = 0
        loop = asyncio.get_running_loop()
        # Transaction markers take offsets too; a bound in time as well as in records.
        deadline = loop.time() + 120
        while remaining and scanned < scan_limit and loop.time() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=1000, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    scanned += 1
                    _collect(record.value, source, wanted, out)
                    if record.offset + 1 >= remaining.get(tp, 0):
                        remaining.pop(tp, None)
            for tp in list(remaining):
                if await consumer.position(tp) >= remaining[tp]:
                    remaining.pop(tp)
        return dict(out), not remaining
    finally:
        await consumer.stop()


def _collect(value: bytes | None, source: str, wanted: set[int], out: dict[int, set[str]]) -> None:
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return
    if not isinstance(doc, dict):
        return
    hw = doc.get("_hw")
    if not isinstance(hw, dict) or hw.get("source_id") != source:
        return
    stamp, mid = doc.get("timestamp"), doc.get("messageId")
    if not isinstance(stamp, str) or not isinstance(mid, str):
        return
    try:
        ms = parse_time(stamp)
    except ValueError:
        return
    minute = ms - ms % MINUTE_MS
    if minute in wanted:
        out[minute].add(mid)


async def run_parity(
    store: Store,
    *,
    source: str,
    from_ms: int,
    to_ms: int,
    metrics_url: str,
    bootstrap: str,
    enriched_topic: str,
    threshold: int,
    scan_limit: int,
    skew_ms: int,
    auth: aiohttp.BasicAuth | None = None,
    with_ids: bool = True,
) -> Report:
    """Counts from both sides; with ``with_ids``, the one-side messageIds of differing minutes too."""
    legacy, headwater = await asyncio.gather(
        legacy_side(store, source, from_ms, to_ms), headwater_side(metrics_url, source, from_ms, to_ms, auth)
    )
    first = compare(source, from_ms, to_ms, legacy, headwater, None, threshold=threshold)
    if not with_ids:
        return first
    wanted = {parse_time(c["minute"]) for c in first.cells}
    ids, complete = await headwater_ids(
        bootstrap, enriched_topic, source, wanted, from_ms, scan_limit=scan_limit, skew_ms=skew_ms
    )
    report = compare(source, from_ms, to_ms, legacy, headwater, ids, threshold=threshold)
    report.ids_complete = complete
    return report
