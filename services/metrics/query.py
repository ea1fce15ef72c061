"""The query service: reads the stored points of a KairosDB query (rollup rows through
Store, write-API points through ExternalStore), groups them as KairosDB does (series by tag,
then time/value/bin), runs the aggregator chain and shapes the answers; also query/tags,
tag names and values, deletes and save_as writes.

kairosparse.py parses the query language into kairos.py's model; aggregators.py and
groupby.py hold KairosDB's semantics. Reads are bounded: at most ``query_max_rows`` rows
(a 400 as soon as the page that crosses it arrives), and a write-API series' read stops at
the query's ``limit``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.metrics import aggregators as aggs
from services.metrics import groupby, kairos, kairosparse
from services.metrics.errors import QueryError
from services.metrics.external import ExternalRow, ExternalStore
from services.metrics.metrics import MetricsMetrics
from services.metrics.rollup import union_estimate
from services.metrics.schema import retentions
from services.metrics.settings import Settings
from services.metrics.store import Store


class NeedsWriteAccess(QueryError):
    """A read that writes (save_as) sent without the write credentials."""


# --- grouping ----------------------------------------------------------------------------------


@dataclass
class Series:
    """One stored series of a query: its tags and its points (rollup rows of several
    partitions with the same time are kept together in one point's value list)."""

    tags: dict[str, str]
    points: dict[int, list[Any]] = field(default_factory=dict)


@dataclass
class TagGroup:
    group: dict[str, str]
    tags: dict[str, set[str]] = field(default_factory=dict)
    series: list[Series] = field(default_factory=list)


def tag_groups(metric: kairos.MetricQuery, series: list[Series]) -> list[TagGroup]:
    """KairosDB's tag groups, sorted by tag names and values run together."""
    groups: dict[str, TagGroup] = {}
    names = metric.tag_group.tags if metric.tag_group else ()
    for s in series:
        # A series without a grouped tag groups under "" for it, as in KairosDB.
        matching = {t: s.tags.get(t, "") for t in names}
        key = "".join(k + v for k, v in matching.items())
        group = groups.setdefault(key, TagGroup(matching))
        group.series.append(s)
        for k, v in s.tags.items():
            group.tags.setdefault(k, set()).add(v)
    return [groups[k] for k in sorted(groups)]


def _json_value(ts: int, value: Any) -> Any:
    if not -kairos.MAX_TIME_MS <= ts <= kairos.MAX_TIME_MS:
        raise QueryError(f"a period of this query ends past the last time there is ({kairos.MAX_TIME_MS} ms)")
    if isinstance(value, float):
        if not math.isfinite(value):
            # KairosDB fails such a query too (a 500 there): least_squares over points of one time.
            text = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            raise QueryError(
                f"NaN or Infinity:{text} data point at {ts}; precede the aggregator "
                "with one that gives each time one point"
            )
        return groupby.json_number(value)
    return value


@dataclass
class SaveAs:
    metric: str
    tags: dict[str, str]
    ttl: int
    points: list[aggs.Point]


class QueryService:
    """Answers parsed KairosDB queries from the rollup tables and the external datapoints."""

    def __init__(self, store: Store, external: ExternalStore, settings: Settings, metrics: MetricsMetrics) -> None:
        self.store = store
        self.external = external
        self.settings = settings
        self.metrics = metrics
        self.retention = retentions(settings)
        # Large write bodies are read, parsed and written one at a time.
        self.large_bodies = asyncio.Semaphore(1)

    # --- reading series ----------------------------------------------------------------------

    async def _rollup_series(
        self, query: kairos.Query, metric: kairos.MetricQuery, now: int
    ) -> tuple[list[Series], int]:
        res = kairos.pick_resolution(metric, query.start_ms, now, self.retention)
        wanted_sources = metric.tags.get("source")
        known = await self.store.all_series()
        index_tags = {k: v for k, v in metric.tags.items() if k in ("type", "event")}
        sources = sorted(
            {
                s
                for s, t, e, _ in known
                if (wanted_sources is None or s in wanted_sources)
                and kairos.matches({"type": t, "event": e}, index_tags)
            }
        )
        by_key: dict[tuple[str, ...], Series | None] = {}
        # A users row carries an HLL sketch (up to a few KiB at lg_k 12, where a count row is
        # tens of bytes): such reads get an eighth of the row budget, so a query's memory stays
        # about the same whichever metric it reads.
        budget = self.settings.query_max_rows
        if metric.name == kairos.USERS_METRIC:
            budget = max(1, budget // 8)
        rows_read = 0
        sums = metric.name == kairos.SUM_METRIC
        counts = metric.name == kairos.COUNT_METRIC

        def series_of(key: tuple[str, ...]) -> Series | None:
            """The series of a tag set (None when the query's tags exclude it), made once."""
            if key not in by_key:
                tags = dict(zip(("source", "type", "event", "resolution", "property"), key, strict=False))
                by_key[key] = Series(tags) if kairos.matches(tags, metric.tags) else None
            return by_key[key]

        # Asked events are filtered by the node (a read each); otherwise every row of the source.
        events: tuple[str | None, ...] = metric.tags.get("event") or (None,)
        for source, event in [(source, event) for source in sources for event in events]:
            rows = await self.store.read_windows(res, source, query.start_ms, query.end_ms, budget, event)
            budget -= len(rows)
            for row in rows:
                items: list[tuple[tuple[str, ...], Any]]
                if sums:
                    items = [((source, row.type, row.event, res, p), v) for p, v in row.sums.items()]
                else:
                    items = [((source, row.type, row.event, res), row.count if counts else row.users)]
                for key, value in items:
                    s = series_of(key)
                    if s is not None:
                        s.points.setdefault(row.window_start, []).append(value)
                        rows_read += 1
        series = [s for s in by_key.values() if s is not None]
        if metric.limit is None:
            return series, rows_read
        # KairosDB reads at most `limit` points of each series; sample_size counts what was read.
        kept = 0
        for s in series:
            times = sorted(s.points, reverse=metric.order == "desc")[: metric.limit]
            s.points = {t: s.points[t] for t in times}
            kept += sum(len(v) for v in s.points.values())
        return series, kept

    async def _external_series(self, query: kairos.Query, metric: kairos.MetricQuery) -> tuple[list[Series], int]:
        keep = kairos.tag_matcher(metric.tags, orjson.loads)
        per_series: dict[str, int] = {}
        limit = metric.limit
        # With a limit the read ends once every matching series (from the series index) has it.
        matching = {t for t in await self.external.series_texts(metric.name) if keep(t)} if limit is not None else set()
        full: set[str] = set()

        def wanted(tags: str) -> bool:
            if not keep(tags):
                return False
            if limit is None:
                return True
            seen = per_series.get(tags, 0)
            per_series[tags] = seen + 1
            if seen + 1 >= limit:
                full.add(tags)
            return seen < limit

        points = await self.external.read(
            metric.name,
            query.start_ms,
            query.end_ms,
            max_rows=self.settings.query_max_rows,
            keep=wanted,
            descending=metric.order == "desc",
            done=(lambda: full >= matching) if matching else None,
        )
        by_tags: dict[str, Series] = {}
        for p in points:
            s = by_tags.get(p.tags) or by_tags.setdefault(p.tags, Series(orjson.loads(p.tags)))
            s.points.setdefault(p.ts, []).append(int(p.value) if p.is_long else p.value)
        return list(by_tags.values()), len(points)

    # --- one metric --------------------------------------------------------------------------

    def _combine(self, metric: kairos.MetricQuery, distinct_first: bool) -> Callable[[list[Any]], Any] | None:
        """How a group merges the values of one time (None: keep every point, as KairosDB)."""
        lg_k = self.settings.hll_lg_k
        if metric.name == kairos.COUNT_METRIC:
            return sum
        if metric.name == kairos.SUM_METRIC:
            return math.fsum
        if metric.name == kairos.USERS_METRIC:
            if distinct_first:
                return lambda blobs: blobs
            return lambda blobs: round(union_estimate(blobs, lg_k))
        return None

    def _group_points(self, metric: kairos.MetricQuery, group: TagGroup, distinct_first: bool) -> list[aggs.Point]:
        combine = self._combine(metric, distinct_first)
        merged: dict[int, list[Any]] = {}
        for s in group.series:
            for ts, values in s.points.items():
                merged.setdefault(ts, []).extend(values)
        descending = metric.order == "desc"
        times = sorted(merged, reverse=descending)
        if combine is None:
            # Points of one time in KairosDB's merge order: by value (the other way round for desc).
            points = [(ts, v) for ts in times for v in sorted(merged[ts], reverse=descending)]
        else:
            points = [(ts, combine(merged[ts])) for ts in times]
        return points[: metric.limit] if metric.limit else points

    async def _metric(
        self, query: kairos.Query, metric: kairos.MetricQuery, now: int, saves: list[SaveAs]
    ) -> dict[str, Any]:
        if metric.name in kairos.ROLLUP_METRICS:
            series, sample_size = await self._rollup_series(query, metric, now)
        else:
            series, sample_size = await self._external_series(query, metric)
        distinct_first = bool(metric.aggregators) and metric.aggregators[0].name == aggs.DISTINCT
        lg_k = self.settings.hll_lg_k

        def union(values: list[Any]) -> int:
            return round(union_estimate([b for blobs in values for b in blobs], lg_k))

        window = aggs.Window(query.start_ms, query.end_ms, self.settings.query_max_rows)
        results = []
        groups = tag_groups(metric, series)
        for tag_group in groups or [TagGroup({})]:
            points = self._group_points(metric, tag_group, distinct_first)
            if not groups:
                # No series: one empty group without group_by entries (gaps still marks its periods).
                entries_tail = []
            elif metric.tag_group:
                entries_tail = [groupby.tag_entry(metric.tag_group, tag_group.group), groupby.TYPE_ENTRY]
            else:
                entries_tail = [groupby.TYPE_ENTRY]
            for entries, group_points in groupby.split(list(metric.groupers), query.start_ms, points):
                out = group_points
                for agg in metric.aggregators:
                    out = aggs.aggregate(agg, out, window, now, union)
                    if agg.name == "save_as":
                        saves.append(self._save_as(metric, agg, tag_group, out))
                if not out:
                    continue  # KairosDB leaves groups without points out of the answer
                values = [[ts, _json_value(ts, v)] for ts, v in out]
                results.append(kairos.result(metric, entries + entries_tail, tag_group.tags, values))
        return {"sample_size": sample_size, "results": results}

    @staticmethod
    def _save_as(metric: kairos.MetricQuery, agg: aggs.Aggregator, group: TagGroup, points: list[aggs.Point]) -> SaveAs:
        tags = dict(agg.options["tags"])
        if agg.options["add_saved_from"]:
            tags["saved_from"] = metric.name
        for name in metric.group_by:
            values = group.tags.get(name, set())
            if len(values) == 1:
                tags[name] = next(iter(values))
        return SaveAs(agg.options["metric_name"], tags, agg.options["ttl"], points)

    async def run(self, body: Any, now_ms: int | None = None, *, can_write: bool = True) -> dict[str, Any]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        query = kairosparse.parse_query(body, now)
        if not can_write and any(a.name == "save_as" for m in query.metrics for a in m.aggregators):
            raise NeedsWriteAccess("save_as writes a series: send the write credentials")
        saves: list[SaveAs] = []
        try:
            answer = {"queries": [await self._metric(query, m, now, saves) for m in query.metrics]}
        except OverflowError:
            # Calendar units on a time near the end of bigint (about 292 million years on).
            raise QueryError("a time of this query is beyond the calendar (year 9999) for its sampling unit") from None
        rows: list[ExternalRow] = []
        for save in saves:
            tag_text = orjson.dumps(save.tags, option=orjson.OPT_SORT_KEYS).decode()
            rows.extend(
                (save.metric, ts, tag_text, float(v), isinstance(v, int), save.ttl or None)
                for ts, v in save.points
                if isinstance(v, int | float) and math.isfinite(v)
            )
        if rows:
            await self.external.write(rows)
        return answer

    # --- tags, names, deletes ----------------------------------------------------------------

    async def _rollup_tag_sets(self, name: str) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for source, etype, event, props in await self.store.all_series():
            base = {"source": source, "type": etype, "event": event}
            for res in self.retention:
                tagged = {**base, "resolution": res}
                if name == kairos.SUM_METRIC:
                    out.extend({**tagged, "property": p} for p in sorted(props))
                else:
                    out.append(tagged)
        return out

    async def query_tags(self, body: Any, now_ms: int | None = None) -> dict[str, Any]:
        """The tags of the series each metric has (KairosDB's /datapoints/query/tags), from the
        series indexes: no point is read."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        query = kairosparse.parse_query(body, now)
        queries = []
        for metric in query.metrics:
            if metric.name in kairos.ROLLUP_METRICS:
                tag_sets = await self._rollup_tag_sets(metric.name)
            # One read of the day index, whatever the range (Grafana asks from start_absolute 0).
            elif await self.external.buckets(metric.name, query.start_ms, query.end_ms, bounded=False):
                tag_sets = await self.external.series(metric.name)
            else:
                tag_sets = []
            tags: dict[str, set[str]] = {}
            for t in tag_sets:
                if kairos.matches(t, metric.tags):
                    for k, v in t.items():
                        tags.setdefault(k, set()).add(v)
            queries.append(
                {
                    "results": [
                        {"name": metric.name, "tags": {k: sorted(v) for k, v in sorted(tags.items())}, "values": []}
                    ]
                }
            )
        return {"queries": queries}

    async def metric_names(self, prefix: str | None) -> list[str]:
        names = sorted({*kairos.ROLLUP_METRICS, *await self.external.metrics()})
        return [n for n in names if not prefix or n.startswith(prefix)]

    async def _all_tag_sets(self) -> list[dict[str, str]]:
        sets = [t for name in kairos.ROLLUP_METRICS for t in await self._rollup_tag_sets(name)]
        sets += [t for _, t in await self.external.all_series(self.settings.query_max_rows)]
        return sets

    async def tag_names(self) -> list[str]:
        return sorted({k for t in await self._all_tag_sets() for k in t})

    async def tag_values(self) -> list[str]:
        return sorted({v for t in await self._all_tag_sets() for v in t.values()})

    async def delete(self, body: Any, now_ms: int | None = None) -> None:
        """POST /datapoints/delete: the points of each metric in the range that match its tags."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        query = kairosparse.parse_query(body, now)
        for metric in query.metrics:
            _refuse_derived(metric.name)
        for metric in query.metrics:
            keep = kairos.tag_matcher(metric.tags, orjson.loads) if metric.tags else None
            await self.external.delete(metric.name, query.start_ms, query.end_ms, keep, self.settings.query_max_rows)

    async def delete_metric(self, name: str) -> None:
        _refuse_derived(name)
        await self.external.delete_metric(name)


def _refuse_derived(name: str) -> None:
    if name in kairos.ROLLUP_METRICS:
        raise QueryError(
            f"{name} is derived from the event stream (a rollup) and cannot be deleted; "
            "only series written through POST /api/v1/datapoints can"
        )
