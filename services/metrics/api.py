"""The KairosDB-compatible HTTP API: routes, Basic auth, CORS, bounded bodies, and the query
service that answers from the rollup tables and the external datapoints.

kairos.py parses the query language, aggregators.py and groupby.py hold KairosDB's
semantics; this module reads the stored points, groups them and shapes the answers.

Bounds: a query reads at most ``query_max_rows`` rows (refused with a 400 when the page that
crosses it arrives) and stops reading a series at its ``limit``; a write body is at most
16 MiB once decompressed (413), at most ``write_max_points`` points, ``write_max_metrics``
metric names and ``write_max_tags`` tags per metric (400), is parsed in a worker thread when
it is larger than ``write_inline_bytes``, and such large bodies are taken one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import math
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web

from services.common.cassandra import CassandraClient
from services.metrics import aggregators as aggs
from services.metrics import groupby, kairos
from services.metrics.errors import QueryError
from services.metrics.external import ExternalRow, ExternalStore
from services.metrics.metrics import MetricsMetrics
from services.metrics.rollup import union_estimate
from services.metrics.settings import Settings
from services.metrics.store import Store, retentions

log = structlog.get_logger(__name__)

KAIROS_VERSION = "KairosDB 1.3.2 (headwater 0.1.0)"
# Bodies of POST /api/v1/datapoints from other producers, as sent and once decompressed.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Cassandra's largest TTL (20 years).
MAX_TTL_S = 630_720_000
# Tag names and values accepted by the write API.
_MAX_TAG_CHARS = 256


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
    if isinstance(value, float):
        if not math.isfinite(value):
            # KairosDB fails such a query too (a 500 there): least_squares over points of one time.
            text = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            raise QueryError(f"NaN or Infinity:{text} data point at {ts}; precede the aggregator "
                             "with one that gives each time one point")
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

    async def _rollup_series(self, query: kairos.Query, metric: kairos.MetricQuery, now: int
                             ) -> tuple[list[Series], int]:
        res = kairos.pick_resolution(metric, query.start_ms, now, self.retention)
        wanted_sources = metric.tags.get("source")
        known = await self.store.all_series()
        index_tags = {k: v for k, v in metric.tags.items() if k in ("type", "event")}
        sources = sorted({s for s, t, e, _ in known
                          if (wanted_sources is None or s in wanted_sources)
                          and kairos.matches({"type": t, "event": e}, index_tags)})
        by_key: dict[tuple[str, ...], Series | None] = {}
        budget = self.settings.query_max_rows
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
            times = sorted(s.points, reverse=metric.order == "desc")[:metric.limit]
            s.points = {t: s.points[t] for t in times}
            kept += sum(len(v) for v in s.points.values())
        return series, kept

    async def _external_series(self, query: kairos.Query, metric: kairos.MetricQuery
                               ) -> tuple[list[Series], int]:
        keep = kairos.tag_matcher(metric.tags, orjson.loads)
        per_series: dict[str, int] = {}
        limit = metric.limit

        def wanted(tags: str) -> bool:
            if not keep(tags):
                return False
            if limit is None:
                return True
            seen = per_series.get(tags, 0)
            per_series[tags] = seen + 1
            return seen < limit

        points = await self.external.read(metric.name, query.start_ms, query.end_ms,
                                          max_rows=self.settings.query_max_rows, keep=wanted,
                                          descending=metric.order == "desc")
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
        return points[:metric.limit] if metric.limit else points

    async def _metric(self, query: kairos.Query, metric: kairos.MetricQuery, now: int,
                      saves: list[SaveAs]) -> dict[str, Any]:
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
    def _save_as(metric: kairos.MetricQuery, agg: aggs.Aggregator, group: TagGroup,
                 points: list[aggs.Point]) -> SaveAs:
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
        query = kairos.parse_query(body, now)
        if not can_write and any(a.name == "save_as" for m in query.metrics for a in m.aggregators):
            raise NeedsWriteAccess("save_as writes a series: send the write credentials")
        saves: list[SaveAs] = []
        answer = {"queries": [await self._metric(query, m, now, saves) for m in query.metrics]}
        rows: list[ExternalRow] = []
        for save in saves:
            tag_text = orjson.dumps(save.tags, option=orjson.OPT_SORT_KEYS).decode()
            rows.extend((save.metric, ts, tag_text, float(v), isinstance(v, int), save.ttl or None)
                        for ts, v in save.points if isinstance(v, int | float) and math.isfinite(v))
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
        query = kairos.parse_query(body, now)
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
            queries.append({"results": [{"name": metric.name, "tags": {k: sorted(v) for k, v in sorted(tags.items())},
                                         "values": []}]})
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
        query = kairos.parse_query(body, now)
        for metric in query.metrics:
            _refuse_derived(metric.name)
        for metric in query.metrics:
            keep = kairos.tag_matcher(metric.tags, orjson.loads) if metric.tags else None
            await self.external.delete(metric.name, query.start_ms, query.end_ms, keep,
                                       self.settings.query_max_rows)

    async def delete_metric(self, name: str) -> None:
        _refuse_derived(name)
        await self.external.delete_metric(name)


def _refuse_derived(name: str) -> None:
    if name in kairos.ROLLUP_METRICS:
        raise QueryError(f"{name} is derived from the event stream (a rollup) and cannot be deleted; "
                         "only series written through POST /api/v1/datapoints can")


# --- the write format --------------------------------------------------------------------------

@dataclass(frozen=True)
class WriteLimits:
    points: int = 200_000
    metrics: int = 10_000
    tags: int = 64


def _bad_tags(tags: dict[str, Any]) -> str | None:
    return next((k for k, v in tags.items()
                 if not isinstance(v, str) or not k or not v or len(k) > _MAX_TAG_CHARS
                 or len(v) > _MAX_TAG_CHARS), None)


def parse_datapoints(body: Any, limits: WriteLimits | None = None) -> list[ExternalRow]:
    """Validate a KairosDB write body into (metric, ts, tags json, value, is_long, ttl) rows.

    Long because it is one pass over a body that may hold hundreds of thousands of points, and
    it stops at the first cap crossed instead of building the rest.
    """
    limits = limits or WriteLimits()
    metrics = body if isinstance(body, list) else [body]
    if len(metrics) > limits.metrics:
        raise QueryError(f"a write may hold at most {limits.metrics} metrics, this one has {len(metrics)}")
    errors: list[str] = []
    out: list[ExternalRow] = []
    names: set[str] = set()
    for i, metric in enumerate(metrics):
        if not isinstance(metric, dict):
            errors.append(f"metric[{i}] must be an object")
            continue
        name = metric.get("name")
        where = f"metric[{i}](name={name})"
        if not isinstance(name, str) or not name.strip():
            errors.append(f"metric[{i}].name may not be empty")
            continue
        if name in kairos.ROLLUP_METRICS:
            errors.append(f"{where}: {name} is written by the service itself")
            continue
        names.add(name)
        if len(names) > limits.metrics:
            raise QueryError(f"a write may name at most {limits.metrics} metrics")
        kind = metric.get("type")
        if kind is not None and kind not in ("long", "double", "number"):
            errors.append(f"{where}.type {kind!r} is not supported: only numbers are stored")
            continue
        tags = metric.get("tags")
        if not isinstance(tags, dict) or not tags:
            errors.append(f"{where}.tags count must be greater than or equal to 1")
            continue
        if len(tags) > limits.tags:
            errors.append(f"{where}.tags: at most {limits.tags} tags per metric")
            continue
        bad_tag = _bad_tags(tags)
        if bad_tag is not None:
            errors.append(f"{where}.tag[{bad_tag}] must be a non-empty string of at most "
                          f"{_MAX_TAG_CHARS} characters")
            continue
        tag_text = orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode()
        ttl = metric.get("ttl")
        # KairosDB takes a TTL of 0 or below as none (the table's default applies).
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl > MAX_TTL_S):
            errors.append(f"{where}.ttl must be a whole number of seconds, at most {MAX_TTL_S}")
            continue
        ttl = ttl if ttl and ttl > 0 else None
        points = metric.get("datapoints")
        if points is None and "timestamp" in metric:
            points = [[metric.get("timestamp"), metric.get("value")]]
        if points is None:
            continue  # KairosDB accepts a metric without points, and stores nothing
        if not isinstance(points, list):
            errors.append(f"{where}.datapoints must be a list of [timestamp, value]")
            continue
        if len(out) + len(points) > limits.points:
            raise QueryError(f"a write may hold at most {limits.points} data points")
        for j, point in enumerate(points):
            if not isinstance(point, list) or len(point) != 2:
                errors.append(f"{where}.datapoints[{j}] must be [timestamp, value]")
                continue
            ts, value = point
            if isinstance(ts, str) and ts.strip().isdecimal():
                ts = int(ts)  # KairosDB reads a timestamp given as a string of digits
            if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= kairos.MAX_TIME_MS:
                errors.append(f"{where}.datapoints[{j}].timestamp must be ms since the epoch")
            elif isinstance(value, bool) or not isinstance(value, int | float) or (
                    isinstance(value, float) and not math.isfinite(value)):
                errors.append(f"{where}.datapoints[{j}].value must be a finite number")
            else:
                out.append((name, ts, tag_text, float(value), isinstance(value, int), ttl))
            if len(errors) > 100:
                raise QueryError(*errors, "(more errors not listed)")
    if errors:
        raise QueryError(*errors)
    return out


# --- HTTP ------------------------------------------------------------------------------------

QUERY_SERVICE = web.AppKey("query_service", QueryService)
CASSANDRA = web.AppKey("cassandra", CassandraClient)


def _dumps(payload: Any) -> str:
    return orjson.dumps(payload).decode()


def _errors(errors: list[str], status: int = 400) -> web.Response:
    return web.json_response({"errors": errors}, status=status, dumps=_dumps)


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


class BodyTooLarge(QueryError):
    """A body over MAX_BODY_BYTES, as sent or decompressed (a 413)."""


def gunzip(raw: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    """Decompress a gzip body (members in sequence) to at most ``limit`` bytes.

    Streaming with an output bound: a small compressed body may expand to gigabytes.
    """
    out: list[bytes] = []
    size = 0
    rest = raw
    while rest:
        inflater = zlib.decompressobj(31)
        try:
            chunk = inflater.decompress(rest, limit - size + 1)
        except zlib.error as exc:
            raise QueryError(f"the gzip body could not be read: {exc}") from None
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes once decompressed")
        if not inflater.eof:
            raise QueryError("the gzip body could not be read: it ends before its last member")
        out.append(chunk)
        rest = inflater.unused_data
    return b"".join(out)


def _decode(raw: bytes, gzipped: bool) -> Any:
    if gzipped:
        raw = gunzip(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise QueryError(f"the body is not JSON: {exc}") from None


def _gzipped(request: web.Request) -> bool:
    return request.content_type == "application/gzip" or request.headers.get("Content-Encoding") == "gzip"


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    return _decode(raw, _gzipped(request))


# The routes: path -> {method: (handler, needs write access)}.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _query(request: web.Request) -> web.Response:
    service = request.app[QUERY_SERVICE]
    started = time.monotonic()
    try:
        if request.method == "GET":
            try:
                body = orjson.loads(request.query.get("query", "null"))
            except orjson.JSONDecodeError as exc:
                raise QueryError(f"the query parameter is not JSON: {exc}") from None
        else:
            body = await _read_json(request)
        answer = await service.run(body, can_write=request.get(CAN_WRITE, True))
    except NeedsWriteAccess as exc:
        return _unauthorized(exc.errors)
    except QueryError:
        service.metrics.queries.labels("bad_request").inc()
        raise
    service.metrics.queries.labels("ok").inc()
    service.metrics.query_seconds.observe(time.monotonic() - started)
    return _json(answer)


async def _query_tags(request: web.Request) -> web.Response:
    """/datapoints/query/tags: the tags of the matching series, no values (Grafana's tag pickers)."""
    return _json(await request.app[QUERY_SERVICE].query_tags(await _read_json(request)))


def _write_limits(settings: Settings) -> WriteLimits:
    return WriteLimits(settings.write_max_points, settings.write_max_metrics, settings.write_max_tags)


async def _write(request: web.Request) -> web.Response:
    service = request.app[QUERY_SERVICE]
    settings = service.settings
    limits = _write_limits(settings)
    size = request.content_length
    # A gzip body of any size may inflate to 16 MiB: it always goes the large way.
    if size is not None and size <= settings.write_inline_bytes and not _gzipped(request):
        points = parse_datapoints(await _read_json(request), limits)
        await service.external.write(points)
    else:
        # Large (or unsized) bodies: one at a time, read, decoded and validated in a thread.
        async with service.large_bodies:
            raw = await request.read()
            gzipped = _gzipped(request)
            points = await asyncio.to_thread(lambda: parse_datapoints(_decode(raw, gzipped), limits))
            del raw
            await service.external.write(points)
    service.metrics.external_points.inc(len(points))
    return web.Response(status=204)


async def _delete(request: web.Request) -> web.Response:
    await request.app[QUERY_SERVICE].delete(await _read_json(request))
    return web.Response(status=204)


async def _delete_metric(request: web.Request) -> web.Response:
    await request.app[QUERY_SERVICE].delete_metric(request.match_info["name"])
    return web.Response(status=204)


async def _metric_names(request: web.Request) -> web.Response:
    names = await request.app[QUERY_SERVICE].metric_names(request.query.get("prefix"))
    return _json({"results": names})


async def _tag_names(request: web.Request) -> web.Response:
    return _json({"results": await request.app[QUERY_SERVICE].tag_names()})


async def _tag_values(request: web.Request) -> web.Response:
    return _json({"results": await request.app[QUERY_SERVICE].tag_values()})


async def _health_check(request: web.Request) -> web.Response:
    ok, _ = await request.app[CASSANDRA].ready()
    return web.Response(status=204 if ok else 500)


async def _health_status(request: web.Request) -> web.Response:
    ok, _ = await request.app[CASSANDRA].ready()
    return _json(["JVM-Thread-Deadlock: OK", "Datastore-Query: OK" if ok else "Datastore-Query: FAIL"])


async def _version(_: web.Request) -> web.Response:
    return _json({"version": KAIROS_VERSION})


ROUTES: dict[str, dict[str, tuple[Handler, bool]]] = {
    "/api/v1/datapoints/query": {"GET": (_query, False), "POST": (_query, False)},
    "/api/v1/datapoints/query/tags": {"POST": (_query_tags, False)},
    "/api/v1/datapoints": {"POST": (_write, True)},
    "/api/v1/datapoints/delete": {"POST": (_delete, True)},
    "/api/v1/metric/{name}": {"DELETE": (_delete_metric, True)},
    "/api/v1/metricnames": {"GET": (_metric_names, False)},
    "/api/v1/tagnames": {"GET": (_tag_names, False)},
    "/api/v1/tagvalues": {"GET": (_tag_values, False)},
    "/api/v1/health/check": {"GET": (_health_check, False)},
    "/api/v1/health/status": {"GET": (_health_status, False)},
    "/api/v1/version": {"GET": (_version, False)},
}
_WRITES = web.AppKey("kairos_writes", frozenset)
# Whether the request carried the write credentials (auth configured); absent: auth is off.
CAN_WRITE = web.RequestKey("can_write", bool)


def _unauthorized(errors: list[str]) -> web.Response:
    resp = _errors(errors, status=401)
    resp.headers["WWW-Authenticate"] = 'Basic realm="headwater-metrics"'
    return resp


def _authenticated(request: web.Request, settings: Settings) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    want_user = settings.api_user.get_secret_value().encode()
    want_password = settings.api_password.get_secret_value().encode()
    # Both compared, always: the time taken says nothing about which one differs.
    same_user = hmac.compare_digest(user.encode(), want_user)
    same_password = hmac.compare_digest(password.encode(), want_password)
    return bool(sep) and same_user and same_password


def _cors_origin(request: web.Request, settings: Settings) -> str | None:
    """The Access-Control-Allow-Origin value for this request, None when not allowed."""
    origins = settings.api_cors_origins
    if "*" in origins:
        return "*"
    origin = request.headers.get("Origin")
    return origin if origin in origins else None


def _vary(resp: web.StreamResponse, allowed: str) -> None:
    """A named origin may send credentials (Grafana's "with credentials"); "*" may not."""
    if allowed != "*":
        resp.headers["Vary"] = "Origin"
        resp.headers["Access-Control-Allow-Credentials"] = "true"


def _preflight(methods: list[str]) -> Handler:
    async def answer(request: web.Request) -> web.Response:
        settings = request.app[QUERY_SERVICE].settings
        allowed = _cors_origin(request, settings)
        if allowed is None:
            return _errors([f"origin {request.headers.get('Origin')!r} is not allowed"], status=403)
        resp = web.Response(status=200)
        resp.headers["Access-Control-Allow-Origin"] = allowed
        resp.headers["Access-Control-Allow-Methods"] = ", ".join([*methods, "OPTIONS"])
        resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type")
        resp.headers["Access-Control-Max-Age"] = "86400"
        _vary(resp, allowed)
        return resp

    return answer


@web.middleware
async def kairos_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """For /api/v1: Basic auth, CORS headers, and every error in KairosDB's {"errors": [...]}."""
    if not request.path.startswith("/api/v1/"):
        return await handler(request)
    settings = request.app[QUERY_SERVICE].settings
    resp = await _guarded(request, handler, settings)
    allowed = _cors_origin(request, settings)
    if allowed is not None and request.method != "OPTIONS":
        resp.headers["Access-Control-Allow-Origin"] = allowed
        _vary(resp, allowed)
    return resp


async def _guarded(request: web.Request, handler: Handler, settings: Settings) -> web.StreamResponse:
    """The handler's answer behind Basic auth, its errors in KairosDB's shape."""
    if request.method != "OPTIONS" and settings.auth_enabled:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else ""
        writes = (path, request.method) in request.app[_WRITES]
        ok = _authenticated(request, settings)
        if not ok and (writes or settings.api_auth_reads):
            return _unauthorized(["authentication required (HTTP Basic)"])
        request[CAN_WRITE] = ok
    try:
        resp = await handler(request)
    except BodyTooLarge as exc:
        resp = _errors(exc.errors, status=413)
    except QueryError as exc:
        resp = _errors(exc.errors)
    except web.HTTPRequestEntityTooLarge:
        resp = _errors([f"the body is larger than {MAX_BODY_BYTES} bytes"], status=413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _errors([exc.reason], status=exc.status)
    return resp


def add_kairos_routes(app: web.Application, service: QueryService, client: CassandraClient) -> None:
    app[QUERY_SERVICE] = service
    app[CASSANDRA] = client
    app[_WRITES] = frozenset((path, method) for path, methods in ROUTES.items()
                             for method, (_, writes) in methods.items() if writes)
    app.middlewares.append(kairos_middleware)
    for path, methods in ROUTES.items():
        for method, (handler, _) in methods.items():
            app.router.add_route(method, path, handler)
        app.router.add_route("OPTIONS", path, _preflight(list(methods)))
