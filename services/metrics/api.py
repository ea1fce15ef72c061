"""The KairosDB-compatible HTTP API: routes, HTTP Basic auth, CORS, KairosDB's error shape,
and the bounded handling of write bodies. query.py answers the queries, writes.py validates
the write format.

Large write bodies (over ``write_inline_bytes``, or gzipped) are read, decompressed, parsed
and validated in a worker thread, one at a time; every /api/v1 error is {"errors": [...]}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import importlib.metadata
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from services.common.cassandra import CassandraClient
from services.metrics.errors import QueryError
from services.metrics.query import NeedsWriteAccess, QueryService
from services.metrics.settings import Settings
from services.metrics.writes import MAX_BODY_BYTES, BodyTooLarge, WriteLimits, decode, parse_datapoints

log = structlog.get_logger(__name__)


def _kairos_version() -> str:
    try:
        ours = importlib.metadata.version("headwater")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return f"KairosDB 1.3.2 (headwater {ours})"


# What /api/v1/version answers: the KairosDB release whose API this serves, then ours.
KAIROS_VERSION = _kairos_version()
# How long a large write body may take to arrive, and to wait for its turn.
LARGE_BODY_READ_S = 60.0


# --- HTTP ------------------------------------------------------------------------------------

QUERY_SERVICE = web.AppKey("query_service", QueryService)
CASSANDRA = web.AppKey("cassandra", CassandraClient)


def _dumps(payload: Any) -> str:
    return orjson.dumps(payload).decode()


def _errors(errors: list[str], status: int = 400) -> web.Response:
    return web.json_response({"errors": errors}, status=status, dumps=_dumps)


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _gzipped(request: web.Request) -> bool:
    return request.content_type == "application/gzip" or request.headers.get("Content-Encoding") == "gzip"


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    return decode(raw, _gzipped(request))


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
        if points:
            await service.external.write(points)
    else:
        # Large (or unsized) bodies: one at a time, read, decoded and validated in a thread. A
        # sender that trickles its body may hold the turn for LARGE_BODY_READ_S at most, and a
        # request waits at most as long for its turn (503, retry).
        try:
            await asyncio.wait_for(service.large_bodies.acquire(), LARGE_BODY_READ_S)
        except TimeoutError:
            resp = _errors(["busy with other large writes; retry"], status=503)
            resp.headers["Retry-After"] = "5"
            return resp
        try:
            try:
                raw = await asyncio.wait_for(request.read(), LARGE_BODY_READ_S)
            except TimeoutError:
                return _errors([f"the body did not arrive within {LARGE_BODY_READ_S:.0f} s"], status=408)
            gzipped = _gzipped(request)
            points = await asyncio.to_thread(lambda: parse_datapoints(decode(raw, gzipped), limits))
            del raw
            if points:
                await service.external.write(points)
        finally:
            service.large_bodies.release()
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
            "Access-Control-Request-Headers", "Authorization, Content-Type"
        )
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
            # Never the header itself: it may hold a password, right or nearly right.
            log.warning(
                "request refused",
                status=401,
                error="no valid credentials",
                method=request.method,
                path=request.path,
                remote=request.remote,
            )
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
    app[_WRITES] = frozenset(
        (path, method) for path, methods in ROUTES.items() for method, (_, writes) in methods.items() if writes
    )
    app.middlewares.append(kairos_middleware)
    for path, methods in ROUTES.items():
        for method, (handler, _) in methods.items():
            app.router.add_route(method, path, handler)
        app.router.add_route("OPTIONS", path, _preflight(list(methods)))
