"""Every path, content type and auth form, read back from the real events.raw."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import pytest

from services.common.badrow import BadRow
from tests.helpers import read_topic
from tests.ingest.conftest import DISABLED_KEY, SERVER_KEY, WEB_KEY, IngestClient, basic, decode

SINGLE: list[tuple[str, dict[str, Any]]] = [
    ("track", {"event": "Signed Up"}),
    ("t", {"event": "Signed Up"}),
    ("identify", {"traits": {"plan": "pro"}}),
    ("i", {}),
    ("page", {"name": "Home"}),
    ("p", {}),
    ("screen", {"name": "Main"}),
    ("s", {}),
    ("group", {"groupId": "g1"}),
    ("g", {"groupId": "g1"}),
    ("alias", {"previousId": "old"}),
    ("a", {"previousId": "old"}),
]
LONG = {"t": "track", "i": "identify", "p": "page", "s": "screen", "g": "group", "a": "alias"}


async def test_every_single_event_path_reaches_kafka(ingest: IngestClient, kafka_bootstrap: str) -> None:
    client, settings = await ingest()
    for path, extra in SINGLE:
        body = {"userId": f"u-{path}", "messageId": f"m-{path}", **extra}
        resp = await client.post(f"/v1/{path}", json=body, headers={"Authorization": basic(SERVER_KEY)})
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"success": True}
    records = await read_topic(kafka_bootstrap, settings.raw_topic, expected=len(SINGLE))
    by_id = {}
    for record in records:
        env, event = decode(record)
        by_id[env.message_id] = (record, env, event)
    assert len(by_id) == len(SINGLE)
    for path, extra in SINGLE:
        record, env, event = by_id[f"m-{path}"]
        assert event["type"] == LONG.get(path, path)
        assert event["userId"] == f"u-{path}"
        for key, value in extra.items():
            assert event[key] == value
        assert record.key == f"server:u-{path}".encode()
        assert env.source_id == "server"
        assert env.path == f"/v1/{path}"
        assert env.received_at_ms > 0
        assert event["receivedAt"].endswith("Z")
        assert event["context"]["ip"] == "127.0.0.1"
        assert dict(record.headers)["hw-schema"] == b"envelope/1"


@pytest.mark.parametrize("auth", ["basic", "basic-no-colon", "body", "query"])
@pytest.mark.parametrize("encoding", ["identity", "gzip", "deflate", "raw-deflate"])
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
async def test_auth_forms_encodings_and_content_types(
    ingest: IngestClient, kafka_bootstrap: str, auth: str, encoding: str, content_type: str
) -> None:
    client, settings = await ingest()
    body: dict[str, object] = {"batch": [{"type": "track", "event": "E", "anonymousId": "a1", "messageId": "m1"}]}
    headers = {"Content-Type": content_type}
    params = {}
    if auth == "basic":
        headers["Authorization"] = basic(WEB_KEY)
    elif auth == "basic-no-colon":
        headers["Authorization"] = basic(WEB_KEY, colon=False)
    elif auth == "body":
        body["writeKey"] = WEB_KEY
    else:
        params["writeKey"] = WEB_KEY
    raw = json.dumps(body).encode()
    if encoding == "gzip":
        raw, headers["Content-Encoding"] = gzip.compress(raw), "gzip"
    elif encoding == "deflate":
        raw, headers["Content-Encoding"] = zlib.compress(raw), "deflate"
    elif encoding == "raw-deflate":
        c = zlib.compressobj(wbits=-15)
        raw, headers["Content-Encoding"] = c.compress(raw) + c.flush(), "deflate"
    resp = await client.post("/v1/batch", data=raw, headers=headers, params=params)
    assert resp.status == 200, await resp.text()
    [record] = await read_topic(kafka_bootstrap, settings.raw_topic, expected=1)
    env, event = decode(record)
    assert env.source_id == "web"
    assert event["event"] == "E"
    assert "writeKey" not in event


async def test_batch_merges_context_and_dead_letters_invalid_events(ingest: IngestClient, kafka_bootstrap: str) -> None:
    client, settings = await ingest()
    body = {
        "batch": [
            {
                "type": "track",
                "event": "Good",
                "userId": "u1",
                "anonymousId": None,
                "context": {"page": {"path": "/a"}},
                "timestamp": "2026-11-24T10:00:00+00:00",
            },
            {"type": "track", "userId": "u1"},  # no event name
            {"type": "bogus", "userId": "u1"},  # unknown type
            {"type": "identify"},  # no ids
            {"type": "track", "event": "E", "userId": "u1", "messageId": "x" * 101},
            {"type": "page", "anonymousId": "anon", "name": "Home"},
        ],
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}, "page": {"path": "/batch"}},
        "integrations": {"All": True},
        "sentAt": "2026-11-24T10:00:01+00:00",
    }
    resp = await client.post("/v1/batch", json=body, headers={"Authorization": basic(SERVER_KEY)})
    assert resp.status == 200
    answer = await resp.json()
    assert answer["accepted"] == 2
    assert [r["index"] for r in answer["rejected"]] == [1, 2, 3, 4]
    assert "track needs a non-empty string 'event'" in answer["rejected"][0]["errors"]
    assert "userId or anonymousId is required" in answer["rejected"][2]["errors"]

    good = [decode(r)[1] for r in await read_topic(kafka_bootstrap, settings.raw_topic, expected=2)]
    by_type = {e["type"]: e for e in good}
    track = by_type["track"]
    assert track["context"]["library"]["name"] == "analytics-python"
    assert track["context"]["page"] == {"path": "/a"}  # the event's own context wins
    assert track["integrations"] == {"All": True}
    assert track["sentAt"] == "2026-11-24T10:00:01+00:00"
    assert track["timestamp"] == "2026-11-24T10:00:00+00:00"  # kept as sent
    assert track["messageId"].startswith("hw-")
    assert by_type["page"]["context"]["page"] == {"path": "/batch"}

    bad = [BadRow.decode(r.value) for r in await read_topic(kafka_bootstrap, settings.dlq_topic, expected=4)]
    assert sorted(b["extra"]["index"] for b in bad) == [1, 2, 3, 4]
    assert {b["failure_type"] for b in bad} == {"schema_violation"}
    assert all(b["source_id"] == "server" for b in bad)
    assert json.loads(bad[0]["original"])["userId"] == "u1"


async def test_auth_errors(ingest: IngestClient) -> None:
    client, _ = await ingest()
    event = {"event": "E", "userId": "u"}
    resp = await client.post("/v1/track", json=event)
    assert resp.status == 401 and (await resp.json())["error"] == "missing_write_key"
    resp = await client.post("/v1/track", json=event, headers={"Authorization": basic("nope")})
    assert resp.status == 401 and (await resp.json())["error"] == "unknown_write_key"
    resp = await client.post("/v1/track", json=event, headers={"Authorization": basic(DISABLED_KEY)})
    assert resp.status == 403 and (await resp.json())["error"] == "source_disabled"
    resp = await client.post("/v1/track", json=event, headers={"Authorization": "Basic %%%"})
    assert resp.status == 401 and (await resp.json())["error"] == "bad_authorization"


async def test_a_body_that_arrives_after_its_headers_is_read_whole(ingest: IngestClient, kafka_bootstrap: str) -> None:
    """Mostly the body comes with the headers and is taken from the buffer; a slow
    client's body, sent in pieces later, must be awaited, not cut."""
    import asyncio

    client, settings = await ingest()
    body = json.dumps(
        {"userId": "slow", "messageId": "m-slow", "event": "Slow Upload", "properties": {"pad": "x" * 3000}}
    ).encode()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /v1/track HTTP/1.1\r\nHost: ingest\r\nContent-Type: application/json\r\n"
        + f"Authorization: {basic(SERVER_KEY)}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    await writer.drain()
    for start in range(0, len(body), 1000):
        await asyncio.sleep(0.05)
        writer.write(body[start : start + 1000])
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    records = await read_topic(kafka_bootstrap, settings.raw_topic, expected=1)
    _, event = decode(records[0])
    assert event["messageId"] == "m-slow" and event["properties"]["pad"] == "x" * 3000


@pytest.mark.parametrize("producers", [1, 2])
async def test_with_several_producers_every_event_lands_once_and_each_clients_in_order(
    ingest: IngestClient, kafka_bootstrap: str, producers: int
) -> None:
    """Flushes overlap on separate producers; a client's next request is sent after
    the answer to its previous one, so its events must stay in order on their partition."""
    client, settings = await ingest(kafka_producers=producers, raw_partitions=3)
    clients, each = 12, 15

    async def one_client(n: int) -> None:
        for seq in range(each):
            body = {"userId": f"u{n}", "event": "E", "messageId": f"m{n}-{seq}", "properties": {"seq": seq}}
            resp = await client.post("/v1/track", json=body, headers={"Authorization": basic(SERVER_KEY)})
            assert resp.status == 200, await resp.text()

    await asyncio.gather(*(one_client(n) for n in range(clients)))
    records = await read_topic(kafka_bootstrap, settings.raw_topic, expected=clients * each)
    ids = [decode(r)[0].message_id for r in records]
    assert sorted(ids) == sorted(f"m{n}-{s}" for n in range(clients) for s in range(each))
    by_user: dict[str, list[tuple[int, int, int]]] = {}
    for record in records:
        _, event = decode(record)
        by_user.setdefault(event["userId"], []).append((record.partition, record.offset, event["properties"]["seq"]))
    for user, seen in by_user.items():
        assert len({p for p, _, _ in seen}) == 1, f"{user} is on one partition"
        assert [s for _, _, s in sorted(seen)] == list(range(each)), f"{user}'s events in the order sent"
