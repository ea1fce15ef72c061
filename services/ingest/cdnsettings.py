"""The analytics.js settings document: ``GET /v1/projects/{writeKey}/settings``.

analytics-next loads ``${cdnURL}/v1/projects/<writeKey>/settings`` before it
sends anything, unless a page inlines its settings. With ``cdnURL`` pointed at
ingest, this answers per source: the ``Segment.io`` integration aimed at this
ingest (``apiHost``, ``protocol``), the ``plan`` and ``metrics`` sections
analytics-next reads (its own telemetry off: sampleRate 0), and no
device-mode destinations. An unknown or disabled write key is a 404.

The one answer that carries a write key: ``integrations["Segment.io"].apiKey``
is the key in the URL the page asked for, which analytics-next puts back
into each event's Basic credentials; it never names another source's key.

Caching: ``Cache-Control: public, max-age=<settings_max_age_s>`` and an ETag
(a repeat with If-None-Match is a 304), ``Vary: Origin``. CORS: the page's
origin when the source allows it (``*`` for a source that allows any).
"""

from __future__ import annotations

import hashlib

import orjson
from aiohttp import web
from multidict import CIMultiDict

from services.common.sources import Source
from services.ingest.request import INGEST_KEY, Ingest

SETTINGS_ROUTE = "/v1/projects/{writeKey}/settings"


def settings_document(source: Source, api_host: str, protocol: str) -> dict[str, object]:
    """What analytics-next reads from its CDN settings, for one source."""
    return {
        "integrations": {
            "Segment.io": {
                "apiKey": source.write_key,
                "apiHost": api_host,
                "protocol": protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"componentTypes": []},
            }
        },
        "plan": {
            "track": {"__default": {"enabled": True, "integrations": {}}},
            "identify": {"__default": {"enabled": True}},
            "group": {"__default": {"enabled": True}},
        },
        "metrics": {"sampleRate": 0, "host": api_host},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }


def _cors(origin: str | None, source: Source | None) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Vary": "Origin"})
    if source is not None and "*" in source.allowed_origins:
        headers["Access-Control-Allow-Origin"] = "*"
    elif origin and source is not None and origin in source.allowed_origins:
        headers["Access-Control-Allow-Origin"] = origin
    return headers


def _not_found(origin: str | None) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict({"Cache-Control": "no-store"})
    if origin:
        headers["Access-Control-Allow-Origin"] = origin  # the page may read why
    body = orjson.dumps(
        {"success": False, "error": "unknown_write_key", "message": "no enabled source has this write key"}
    )
    return web.Response(status=404, body=body, content_type="application/json", headers=headers)


async def handle_settings(request: web.Request) -> web.Response:
    ing: Ingest = request.app[INGEST_KEY]
    origin = request.headers.get("Origin")
    source = ing.sources.by_write_key(request.match_info["writeKey"])
    if source is None or not source.enabled:
        response = _not_found(origin)
    else:
        s = ing.settings
        # A configured public address, not the Host header: the document is cached
        # by whatever sits in front, and a forged Host must not end up in it.
        api_host = s.settings_api_host or f"{request.host}/v1"
        protocol = s.settings_protocol or request.scheme
        body = orjson.dumps(settings_document(source, api_host, protocol))
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = _cors(origin, source)
        headers["Cache-Control"] = f"public, max-age={s.settings_max_age_s}"
        headers["ETag"] = etag
        if etag in request.headers.get("If-None-Match", ""):
            response = web.Response(status=304, headers=headers)
        else:
            response = web.Response(body=body, content_type="application/json", headers=headers)
    ing.metrics.requests.observe(SETTINGS_ROUTE, response.status, 0.0)
    return response


def add_settings_route(app: web.Application) -> None:
    app.router.add_get(SETTINGS_ROUTE, handle_settings)
