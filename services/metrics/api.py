"""The KairosDB-compatible HTTP API (see kairos.py for the query language and metric names)."""

from __future__ import annotations

import math
import time
import zlib
from typing import Any

import orjson
import structlog
from aiohttp import web

from services.common.cassandra import CassandraClient
from services.metrics import kairos
from services.metrics.errors import QueryError
from services.metrics.external import ExternalStore
from services.metrics.metrics import MetricsMetrics
from services.metrics.rollup import union_estimate
from services.metrics.settings import Settings
from services.metrics.store import Store, retentions

log = structlog.get_logger(__name__)

KAIROS_VERSION = "KairosDB 1.3.0 (headwater 0.1.0)"
# Bodies of POST /api/v1/datapoints from other producers, as sent and once decompressed.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Cassandra's largest TTL (20 years).
MAX_TTL_S = 630_720_000
# Tag names and values accepted by the write API: KairosDB's own rule (no spaces, no '=').
_MAX_TAG_CHARS = 256


class QueryService:
    """Answers parsed KairosDB queries from the rollup tables and the external datapoints."""

    def __init__(self, store: Store, external: ExternalStore, settings: Settings, metrics: MetricsMetrics) -> None:
        self.store = store
        self.external = external
        self.settings = settings
        self.metrics = metrics
        self.retention = retentions(settings)

    async def run(self, body: Any, now_ms: int | None = None) -> dict[str, Any]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        query = kairos.parse_query(body, now)
        return {"queries": [await self._metric(query, m, now) for m in query.metrics]}

    async def _rollup_series(self, query: kairos.Query, metric: kairos.MetricQuery, now: int
                             ) -> list[tuple[dict[str, str], kairos.Point]]:
        res = kairos.pick_resolution(metric, query.start_ms, now, self.retention)
        wanted_sources = metric.tags.get("source")
        known = await self.store.all_series()
        sources = sorted({s for s, t, e, _ in known
                          if (wanted_sources is None or s in wanted_sources)
                          and kairos.matches({"type": t, "event": e}, {k: v for k, v in metric.tags.items()
                                                                       if k in ("type", "event")})})
        series: list[tuple[dict[str, str], kairos.Point]] = []
        budget = self.settings.query_max_rows
        for source in sources:
            rows = await self.store.read_windows(res, source, query.start_ms, query.end_ms, budget)
            budget -= len(rows)
            for row in rows:
                tags = {"source": source, "type": row.type, "event": row.event, "resolution": res}
                if metric.name == kairos.COUNT_METRIC:
                    series.append((tags, (row.window_start, row.count)))
                elif metric.name == kairos.USERS_METRIC:
                    series.append((tags, (row.window_start, row.users)))
                else:
                    series.extend(({**tags, "property": prop}, (row.window_start, value))
                                  for prop, value in row.sums.items())
        return [(tags, point) for tags, point in series if kairos.matches(tags, metric.tags)]

    async def _external_series(self, query: kairos.Query, metric: kairos.MetricQuery
                               ) -> list[tuple[dict[str, str], kairos.Point]]:
        points = await self.external.read(metric.name, query.start_ms, query.end_ms,
                                          max_rows=self.settings.query_max_rows)
        out = []
        for p in points:
            tags = orjson.loads(p.tags)
            if kairos.matches(tags, metric.tags):
                out.append((tags, (p.ts, int(p.value) if p.is_long else p.value)))
        return out

    async def _metric(self, query: kairos.Query, metric: kairos.MetricQuery, now: int) -> dict[str, Any]:
        rollup = metric.name in kairos.ROLLUP_METRICS
        series = (await self._rollup_series(query, metric, now) if rollup
                  else await self._external_series(query, metric))
        groups = kairos.group_series(metric, series)
        results = []
        lg_k = self.settings.hll_lg_k
        for group in groups:
            aggregators = list(metric.aggregators)
            points = group.points
            if metric.name == kairos.USERS_METRIC:
                if aggregators and aggregators[0].name == kairos.DISTINCT:
                    points.sort(key=lambda p: p[0])
                    points = [(ts, round(union_estimate(blobs, lg_k))) for ts, blobs in
                              kairos.buckets(aggregators.pop(0), points, query.start_ms, query.end_ms)]
                else:
                    points = kairos.merge_same_time(points, lambda blobs: round(union_estimate(blobs, lg_k)))
            elif metric.name == kairos.COUNT_METRIC:
                points = kairos.merge_same_time(points, sum)
            elif metric.name == kairos.SUM_METRIC:
                points = kairos.merge_same_time(points, math.fsum)
            else:
                points.sort(key=lambda p: p[0])
            for agg in aggregators:
                points = kairos.aggregate(agg, points, query.start_ms, query.end_ms)
            results.append(kairos.result(metric, group, points))
        return {"sample_size": len(series), "results": results or [kairos.empty_result(metric)]}

    async def metric_names(self, prefix: str | None) -> list[str]:
        names = sorted({*kairos.ROLLUP_METRICS, *await self.external.metrics()})
        return [n for n in names if not prefix or n.startswith(prefix)]


def parse_datapoints(body: Any) -> list[tuple[str, int, str, float, bool, int | None]]:
    """Validate a KairosDB write body into (metric, ts, tags json, value, is_long, ttl) rows."""
    metrics = body if isinstance(body, list) else [body]
    errors: list[str] = []
    out: list[tuple[str, int, str, float, bool, int | None]] = []
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
        tags = metric.get("tags")
        if not isinstance(tags, dict) or not tags:
            errors.append(f"{where}.tags count must be greater than or equal to 1")
            continue
        bad_tag = next((k for k, v in tags.items()
                        if not isinstance(v, str) or not k or not v or len(k) > _MAX_TAG_CHARS
                        or len(v) > _MAX_TAG_CHARS), None)
        if bad_tag is not None:
            errors.append(f"{where}.tag[{bad_tag}] must be a non-empty string of at most "
                          f"{_MAX_TAG_CHARS} characters")
            continue
        tag_text = orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode()
        ttl = metric.get("ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL_S):
            errors.append(f"{where}.ttl must be a whole number of seconds, at most {MAX_TTL_S}")
            continue
        points = metric.get("datapoints")
        if points is None and "timestamp" in metric:
            points = [[metric.get("timestamp"), metric.get("value")]]
        if not isinstance(points, list) or not points:
            errors.append(f"{where} needs datapoints or a timestamp and value")
            continue
        for j, point in enumerate(points):
            if not isinstance(point, list) or len(point) != 2:
                errors.append(f"{where}.datapoints[{j}] must be [timestamp, value]")
                continue
            ts, value = point
            if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= kairos.MAX_TIME_MS:
                errors.append(f"{where}.datapoints[{j}].timestamp must be ms since the epoch")
            elif isinstance(value, bool) or not isinstance(value, int | float) or (
                    isinstance(value, float) and not math.isfinite(value)):
                errors.append(f"{where}.datapoints[{j}].value must be a finite number")
            else:
                out.append((name, ts, tag_text, float(value), isinstance(value, int), ttl or None))
    if errors:
        raise QueryError(*errors)
    return out


QUERY_SERVICE = web.AppKey("query_service", QueryService)
CASSANDRA = web.AppKey("cassandra", CassandraClient)


def _errors(errors: list[str], status: int = 400) -> web.Response:
    return web.json_response({"errors": errors}, status=status, dumps=lambda o: orjson.dumps(o).decode())


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


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
            raise web.HTTPRequestEntityTooLarge(
                max_size=limit, actual_size=size, content_type="application/json",
                text=orjson.dumps({"errors": [f"the body is larger than {limit} bytes once decompressed"]
                                   }).decode())
        if not inflater.eof:
            raise QueryError("the gzip body could not be read: it ends before its last member")
        out.append(chunk)
        rest = inflater.unused_data
    return b"".join(out)


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    if request.content_type == "application/gzip":
        raw = gunzip(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise QueryError(f"the body is not JSON: {exc}") from None


async def _query(request: web.Request) -> web.Response:
    service = request.app[QUERY_SERVICE]
    started = time.monotonic()
    try:
        if request.method == "GET":
            body = orjson.loads(request.query.get("query", "null"))
        else:
            body = await _read_json(request)
        answer = await service.run(body)
    except QueryError as exc:
        service.metrics.queries.labels("bad_request").inc()
        return _errors(exc.errors)
    except orjson.JSONDecodeError as exc:
        service.metrics.queries.labels("bad_request").inc()
        return _errors([f"the query parameter is not JSON: {exc}"])
    service.metrics.queries.labels("ok").inc()
    service.metrics.query_seconds.observe(time.monotonic() - started)
    return _json(answer)


async def _query_tags(request: web.Request) -> web.Response:
    """/datapoints/query/tags: the tags of the matching series, no values (Grafana's tag pickers)."""
    service = request.app[QUERY_SERVICE]
    try:
        body = await _read_json(request)
        if isinstance(body, dict) and isinstance(body.get("metrics"), list):
            body = {**body, "metrics": [{**m, "aggregators": [], "group_by": []} if isinstance(m, dict) else m
                                        for m in body.get("metrics") or []]}
        answer = await service.run(body)
    except QueryError as exc:
        return _errors(exc.errors)
    for q in answer["queries"]:
        for r in q["results"]:
            r["values"] = []
            r.pop("group_by", None)
    return _json(answer)


async def _write(request: web.Request) -> web.Response:
    service = request.app[QUERY_SERVICE]
    try:
        points = parse_datapoints(await _read_json(request))
    except QueryError as exc:
        return _errors(exc.errors)
    await service.external.write(points)
    service.metrics.external_points.inc(len(points))
    return web.Response(status=204)


async def _metric_names(request: web.Request) -> web.Response:
    names = await request.app[QUERY_SERVICE].metric_names(request.query.get("prefix"))
    return _json({"results": names})


async def _health_check(request: web.Request) -> web.Response:
    ok, _ = await request.app[CASSANDRA].ready()
    return web.Response(status=204 if ok else 500)


async def _health_status(request: web.Request) -> web.Response:
    ok, detail = await request.app[CASSANDRA].ready()
    return _json({"status": ["JVM-Thread-Deadlock: OK",
                             "Datastore-Query: OK" if ok else f"Datastore-Query: FAIL {detail}"]})


async def _version(_: web.Request) -> web.Response:
    return _json({"version": KAIROS_VERSION})


def add_kairos_routes(app: web.Application, service: QueryService, client: CassandraClient) -> None:
    app[QUERY_SERVICE] = service
    app[CASSANDRA] = client
    app.router.add_post("/api/v1/datapoints/query", _query)
    app.router.add_get("/api/v1/datapoints/query", _query)
    app.router.add_post("/api/v1/datapoints/query/tags", _query_tags)
    app.router.add_post("/api/v1/datapoints", _write)
    app.router.add_get("/api/v1/metricnames", _metric_names)
    app.router.add_get("/api/v1/health/check", _health_check)
    app.router.add_get("/api/v1/health/status", _health_status)
    app.router.add_get("/api/v1/version", _version)
