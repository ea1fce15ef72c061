"""No write key leaves ingest: not in Kafka, the log, metrics or answers.

Ingest runs as its own process; the test sends bad pixels, partial batches,
bad single events and a broken registry that quote write keys every way a
client can, then searches every topic it wrote (record keys, values, headers,
the event JSON inside Envelopes, the originals inside bad rows), its whole log
and every answer for the keys, raw and as Basic credentials.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp

from services.common.badrow import BadRow
from tests.helpers import eventually, read_topic
from tests.ingest.conftest import SERVER_KEY, SOURCES, WEB_KEY, basic, decode
from tests.ingest.helpers import LiveIngest

KEYS = [s["write_key"] for s in SOURCES["sources"]]


def _b64(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _forms(key: str) -> list[bytes]:
    """A key as it could show: itself, and inside Basic credentials."""
    return [key.encode(), base64.b64encode(f"{key}:".encode()), base64.b64encode(key.encode()).rstrip(b"=")]


def _leaks(blob: bytes) -> list[str]:
    return [key for key in KEYS for form in _forms(key) if form in blob]


async def test_no_write_key_in_kafka_logs_metrics_or_answers(kafka_bootstrap: str, tmp_path: Path) -> None:
    live = LiveIngest(tmp_path, kafka_bootstrap, SOURCES, extra_env={"HEADWATER_INGEST_SOURCES_RELOAD_S": "0.2"})
    await asyncio.to_thread(live.start)
    answers: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def call(method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
                async with http.request(method, live.url + path, **kwargs) as resp:
                    body = await resp.read()
                    answers.append(f"{resp.status} {dict(resp.headers)}".encode() + b"\n" + body)
                    assert resp.status < 500, body
                    return resp.status, body

            # Bad pixels with a valid key: bad rows, the key nowhere in them.
            valid_bad_pixels = [
                {"writeKey": SERVER_KEY, "data": "%%%not-base64"},
                {"writeKey": SERVER_KEY, "data": _b64(f"not json {SERVER_KEY} {WEB_KEY}".encode())},
                {"data": _b64({"event": "E", "writeKey": SERVER_KEY, "properties": {"echo": WEB_KEY}})},
                {"writeKey": SERVER_KEY, "event": "E", "properties.echo": SERVER_KEY},  # no user id
            ]
            for query in valid_bad_pixels:
                await call("GET", "/v1/pixel/track", params=query)
            await call("GET", "/v1/pixel/bogus", params={"writeKey": SERVER_KEY, "userId": "u"})
            # Keyless and invalid-key pixels: counted only.
            for i in range(100):
                await call("GET", "/v1/pixel/track", params={"userId": f"u{i}", "event": "E"})
                await call("GET", "/v1/pixel/page", params={"writeKey": f"guess-{i}", "userId": "u"})
            # Partial batches: the key in the body, in events, echoed in values and errors.
            batch = {
                "writeKey": SERVER_KEY,
                "batch": [
                    {"type": "track", "event": "Good", "userId": "u1", "messageId": "good-1", "writeKey": SERVER_KEY},
                    {"type": "track", "event": "NoUser", "writeKey": SERVER_KEY, "properties": {"k": WEB_KEY}},
                    {"type": SERVER_KEY, "userId": "u2", "messageId": WEB_KEY},
                    {"type": "track", "userId": "u3", "context": {"writeKey": SERVER_KEY}},
                    {
                        "type": "track",
                        "event": "Deep",
                        "userId": "u4",
                        "writeKey": SERVER_KEY,
                        "properties": json.loads("[" * 300 + json.dumps(SERVER_KEY) + "]" * 300),
                    },
                ],
            }
            status, body = await call("POST", "/v1/batch", json=batch)
            assert status == 200 and json.loads(body)["accepted"] == 1
            status, body = await call(
                "POST", "/v1/import", json={"batch": batch["batch"][1:]}, headers={"Authorization": basic(WEB_KEY)}
            )
            assert status == 200 and json.loads(body)["accepted"] == 0
            # Single events: refused, the answer quotes no key.
            for event in (
                {"type": SERVER_KEY, "userId": "u"},
                {"event": "E", "writeKey": SERVER_KEY},
                {"event": "E", "userId": "u", "messageId": SERVER_KEY * 20},
            ):
                await call("POST", "/v1/track", json=event, headers={"Authorization": basic(SERVER_KEY)})
            await call(
                "POST", "/v1/track", json={"event": "E", "userId": "u"}, headers={"Authorization": basic(KEYS[2])}
            )  # the disabled source
            await call(
                "POST",
                "/v1/t",
                json={"event": "E", "userId": "u"},
                headers={"Authorization": basic(WEB_KEY), "Origin": f"https://{SERVER_KEY}.example"},
            )
            await call(
                "POST",
                "/v1/track",
                data=f'{{"writeKey": "{SERVER_KEY}", oops'.encode(),
                headers={"Content-Type": "application/json"},
            )
            # A broken registry: an entry without a name (pydantic would quote it whole,
            # keys included), then a file that is not JSON.
            broken = {"sources": [*SOURCES["sources"], {"id": "x", "write_key": SERVER_KEY + "-new"}]}
            live.sources_file.write_text(json.dumps(broken))

            async def degraded(fragment: str) -> bool:
                _, ready = await call("GET", "/readyz")
                return fragment in json.loads(ready)["checks"]["sources"]["detail"]

            await eventually(lambda: degraded("sources.4.name"), 15, "/readyz to report the broken registry")
            live.sources_file.write_text(f'{{"sources": [{{"write_key": "{SERVER_KEY}"')
            await eventually(lambda: degraded("not valid JSON"), 15, "/readyz to report the unreadable registry")
            await call("GET", "/metrics")
            await call("GET", "/openapi.json")
    finally:
        await asyncio.to_thread(live.stop)

    raw = await read_topic(kafka_bootstrap, live.raw_topic, expected=1)
    dlq = await read_topic(kafka_bootstrap, live.dlq_topic, expected=len(valid_bad_pixels) + 1 + 4 + 4)
    assert [decode(r)[0].message_id for r in raw] == ["good-1"]
    rows = [BadRow.decode(r.value) for r in dlq]
    assert len(rows) == len(valid_bad_pixels) + 1 + 4 + 4, [r["errors"] for r in rows]
    assert sum(r["failure_type"] == "pixel_decode" for r in rows) == len(valid_bad_pixels) + 1
    # Kafka: every byte of every record, and the decoded insides.
    for r in [*raw, *dlq]:
        blob = b"|".join([r.key or b"", r.value or b"", *(v for _, v in r.headers)])
        assert not _leaks(blob), (r.topic, blob[:500])
    for r in raw:
        env, event = decode(r)
        assert not _leaks(env.event) and "writeKey" not in event
    for row in rows:
        assert not _leaks(row["original"]), row
    log = live.log_path.read_bytes()
    assert b"source registry unreadable" in log
    assert not _leaks(log), [line for line in log.splitlines() if _leaks(line)][:3]
    for answer in answers:
        assert not _leaks(answer), answer[:500]
    metrics = next(a for a in answers if b"headwater_ingest_bad_pixels_total" in a)
    assert b'headwater_ingest_bad_pixels_total{reason="missing_write_key"} 100.0' in metrics
    assert b'headwater_ingest_bad_pixels_total{reason="unknown_write_key"} 100.0' in metrics
