"""Bad input gets its documented answer; pixels, CORS, rate limits, OpenAPI."""

from __future__ import annotations

import base64
import gzip
import json

from services.common.badrow import BadRow
from tests.helpers import read_topic
from tests.ingest.conftest import LIMITED_KEY, SERVER_KEY, WEB_KEY, IngestClient, basic, decode

AUTH = {"Authorization": basic(SERVER_KEY)}
EVENT_OK = {"event": "E", "userId": "u"}


async def test_malformed_and_wrong_types(ingest: IngestClient) -> None:
    client, _ = await ingest()
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'"a string"', 400, "invalid_json"),
    ]
    for body, status, error in cases:
        resp = await client.post("/v1/track", data=body, headers={**AUTH, "Content-Type": "application/json"})
        assert resp.status == status, body
        answer = await resp.json()
        assert answer["error"] == error and answer["success"] is False and answer["message"]
    for event, fragment in [
        ({"userId": "u"}, "track needs a non-empty string 'event'"),
        ({"event": "E"}, "userId or anonymousId is required"),
        ({"event": "E", "userId": None, "anonymousId": None}, "userId or anonymousId is required"),
        ({"event": 5, "userId": "u"}, "track needs a non-empty string 'event'"),
        ({"event": "E", "userId": {"x": 1}}, "userId must be a string or a number"),
        ({"event": "E", "userId": "u", "properties": []}, "properties must be an object"),
        ({"event": "E", "userId": "u", "type": "identify"}, "does not match the path's type"),
    ]:
        resp = await client.post("/v1/track", json=event, headers=AUTH)
        assert resp.status == 400, event
        assert any(fragment in e for e in (await resp.json())["errors"]), event
    resp = await client.post("/v1/batch", json={"batch": {"not": "a list"}}, headers=AUTH)
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_batch"
    resp = await client.post("/v1/track", data=b"{}", headers={**AUTH, "Content-Type": "application/xml"})
    assert resp.status == 415
    resp = await client.post("/v1/track", data=b"{}", headers={**AUTH, "Content-Encoding": "br"})
    assert resp.status == 415
    resp = await client.post("/v1/track", data=b"not gzip at all", headers={**AUTH, "Content-Encoding": "gzip"})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_encoding"
    resp = await client.post(
        "/v1/track",
        data=gzip.compress(b'{"event": "E", "userId": "u"}')[:-6],
        headers={**AUTH, "Content-Encoding": "gzip"},
    )
    assert resp.status == 400 and (await resp.json())["error"] == "bad_encoding"


async def test_limits_answer_413_naming_the_limit(ingest: IngestClient) -> None:
    client, _ = await ingest(max_event_bytes=1024, max_request_bytes=8192, max_batch_events=5)
    big = {"event": "E", "userId": "u", "properties": {"blob": "x" * 2000}}
    resp = await client.post("/v1/track", json=big, headers=AUTH)
    assert resp.status == 413 and (await resp.json())["limit"] == "max_event_bytes"

    resp = await client.post("/v1/batch", data=b'{"batch": [' + b" " * 9000 + b"]}", headers=AUTH)
    assert resp.status == 413 and (await resp.json())["limit"] == "max_request_bytes"

    many = {"batch": [{"type": "track", "event": "E", "userId": "u"}] * 6}
    resp = await client.post("/v1/batch", json=many, headers=AUTH)
    assert resp.status == 413 and (await resp.json())["limit"] == "max_batch_events"

    # In a batch an oversized event is rejected alone; the others are kept.
    mixed = {"batch": [{"type": "track", "event": "E", "userId": "u"}, {"type": "track", **big}]}
    resp = await client.post("/v1/batch", json=mixed, headers=AUTH)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["accepted"] == 1 and answer["rejected"][0]["index"] == 1


async def test_gzip_bomb_is_refused_without_inflating_it(ingest: IngestClient) -> None:
    client, _ = await ingest(max_request_bytes=64 * 1024)
    bomb = gzip.compress(b"{" + b" " * (200 * 1024 * 1024) + b"}", compresslevel=9)
    assert len(bomb) < 300 * 1024
    resp = await client.post("/v1/batch", data=bomb, headers={**AUTH, "Content-Encoding": "gzip"})
    assert resp.status == 413
    assert (await resp.json())["limit"] == "max_request_bytes"


async def test_pixels_always_answer_a_gif(ingest: IngestClient, kafka_bootstrap: str) -> None:
    client, settings = await ingest()
    data = (
        base64.urlsafe_b64encode(
            json.dumps(
                {"event": "Email Opened", "userId": "u1", "writeKey": SERVER_KEY, "properties": {"campaign": "nov"}}
            ).encode()
        )
        .decode()
        .rstrip("=")
    )
    resp = await client.get("/v1/pixel/track", params={"data": data})
    assert resp.status == 200 and resp.content_type == "image/gif"
    assert (await resp.read()).startswith(b"GIF89a")
    resp = await client.get(
        "/v1/pixel/page",
        params={"writeKey": SERVER_KEY, "anonymousId": "a9", "name": "Newsletter", "properties.issue": "42"},
    )
    assert resp.status == 200
    # With a valid write key a bad pixel gets a bad row; without one it is only counted.
    for bad in (
        {"data": "%%%not-base64", "writeKey": SERVER_KEY},
        {"data": base64.b64encode(b"not json").decode(), "writeKey": SERVER_KEY},
        {"data": base64.b64encode(b'{"event": "E"}').decode(), "writeKey": SERVER_KEY},
        {"data": "%%%not-base64"},
        {"data": base64.b64encode(b"not json").decode()},
        {"data": base64.b64encode(b'{"event": "E", "userId": "u"}').decode()},
        {"data": base64.b64encode(b'{"event": "E", "userId": "u"}').decode(), "writeKey": "nope"},
    ):
        resp = await client.get("/v1/pixel/track", params=bad)
        assert resp.status == 200 and resp.content_type == "image/gif"
    for _ in range(50):
        resp = await client.get("/v1/pixel/page", params={"anonymousId": "a"})  # keyless junk
        assert resp.status == 200 and resp.content_type == "image/gif"

    good = [decode(r)[1] for r in await read_topic(kafka_bootstrap, settings.raw_topic, expected=2)]
    by_type = {e["type"]: e for e in good}
    assert by_type["track"]["properties"] == {"campaign": "nov"}
    assert by_type["page"]["properties"] == {"issue": "42"} and by_type["page"]["name"] == "Newsletter"
    bad_rows = [BadRow.decode(r.value) for r in await read_topic(kafka_bootstrap, settings.dlq_topic)]
    assert len(bad_rows) == 3
    assert {b["failure_type"] for b in bad_rows} == {"pixel_decode"}
    assert {b["source_id"] for b in bad_rows} == {"server"}
    metrics = await (await client.get("/metrics")).text()
    assert 'headwater_ingest_bad_pixels_total{reason="bad_pixel"} 3.0' in metrics
    assert 'headwater_ingest_bad_pixels_total{reason="missing_write_key"} 53.0' in metrics
    assert 'headwater_ingest_bad_pixels_total{reason="unknown_write_key"} 1.0' in metrics
    assert "headwater_ingest_spool_events 0.0" in metrics  # none of it was spooled


async def test_cors_preflight_and_origin_per_source(ingest: IngestClient) -> None:
    client, _ = await ingest()
    resp = await client.options(
        "/v1/t",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    allowed = resp.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]

    event = {"event": "E", "anonymousId": "a"}
    resp = await client.post(
        "/v1/t",
        data=json.dumps(event),
        headers={"Origin": "https://shop.example", "Content-Type": "text/plain", "Authorization": basic(WEB_KEY)},
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    # The web source allows only its shop; the server source allows any origin.
    resp = await client.post(
        "/v1/t", json=event, headers={"Origin": "https://evil.example", "Authorization": basic(WEB_KEY)}
    )
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.post("/v1/t", json=event, headers={"Origin": "https://evil.example", **AUTH})
    assert resp.status == 200


async def test_rate_limit_answers_429_with_retry_after(ingest: IngestClient) -> None:
    client, _ = await ingest()
    auth = {"Authorization": basic(LIMITED_KEY)}
    statuses = []
    for _ in range(5):
        resp = await client.post("/v1/track", json={"event": "E", "userId": "u"}, headers=auth)
        statuses.append(resp.status)
    assert statuses[:3] == [200, 200, 200]
    assert 429 in statuses[3:]
    resp = await client.post("/v1/track", json={"event": "E", "userId": "u"}, headers=auth)
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert int(resp.headers["X-RateLimit-Reset"]) > 0
    assert (await resp.json())["error"] == "rate_limited"


async def test_openapi_health_and_readiness(ingest: IngestClient) -> None:
    client, _ = await ingest()
    doc = await (await client.get("/openapi.json")).json()
    for path in ("/v1/track", "/v1/t", "/v1/batch", "/v1/b", "/v1/import", "/v1/pixel/{type}", "/v1/alias"):
        assert path in doc["paths"], path
    assert "413" in doc["paths"]["/v1/track"]["post"]["responses"]
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    body = await ready.json()
    assert body["checks"]["kafka"]["detail"] == "kafka"
    assert body["checks"]["sources"]["ok"] is True


async def test_odd_headers_and_deep_nesting_get_clear_answers(ingest: IngestClient, kafka_bootstrap: str) -> None:
    client, settings = await ingest()
    # A Latin-1 User-Agent (not UTF-8) must not break the request.
    resp = await client.post("/v1/track", json=EVENT_OK, headers={**AUTH, "User-Agent": "Caf\xe9Browser/1.0"})
    assert resp.status == 200, await resp.text()
    deep: dict[str, object] = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    resp = await client.post("/v1/track", json={**EVENT_OK, "properties": deep}, headers=AUTH)
    assert resp.status == 400
    assert "nested deeper" in (await resp.json())["errors"][0]
    batch = {"batch": [{"type": "track", **EVENT_OK}, {"type": "track", **EVENT_OK, "properties": deep}]}
    resp = await client.post("/v1/batch", json=batch, headers=AUTH)
    assert resp.status == 200 and (await resp.json())["accepted"] == 1
    [bad] = await read_topic(kafka_bootstrap, settings.dlq_topic, expected=1)
    assert BadRow.decode(bad.value)["original"].startswith(b"{")
    [env, _] = [decode(r)[0] for r in await read_topic(kafka_bootstrap, settings.raw_topic, expected=2)]
    assert "Caf" in env.user_agent


async def test_events_are_counted_once_under_their_source(ingest: IngestClient) -> None:
    """headwater_ingest_events_total by outcome, reason and source, read from the app's own /metrics."""
    client, _ = await ingest()
    server, web = {"Authorization": basic(SERVER_KEY)}, {"Authorization": basic(WEB_KEY)}
    assert (await client.post("/v1/track", json={"userId": "u", "event": "E"}, headers=server)).status == 200
    assert (await client.post("/v1/track", json={"userId": "u"}, headers=server)).status == 400  # no event name
    batch = {"batch": [{"type": "track", "userId": "u", "event": "E"}] * 2 + [{"type": "track", "event": "E"}]}
    assert (await client.post("/v1/batch", json=batch, headers=web)).status == 200
    assert (await client.post("/v1/track", data=b"{not json", headers=web)).status == 400
    assert (await client.post("/v1/track", json={"userId": "u", "event": "E"}, headers=basic_unknown())).status == 401
    metrics = await (await client.get("/metrics")).text()
    events = {
        line.split("{", 1)[1].rsplit("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("headwater_ingest_events_total{")
    }
    assert events == {
        'outcome="accepted",reason="",source="server"': 1,
        'outcome="accepted",reason="",source="web"': 2,
        'outcome="rejected",reason="schema_violation",source="server"': 1,  # once, not again as invalid_event
        'outcome="rejected",reason="schema_violation",source="web"': 1,
        'outcome="rejected",reason="invalid_json",source=""': 1,  # read before any key was
        'outcome="rejected",reason="unknown_write_key",source=""': 1,
    }
    assert SERVER_KEY not in metrics and WEB_KEY not in metrics


def basic_unknown() -> dict[str, str]:
    return {"Authorization": basic("no-such-key")}
