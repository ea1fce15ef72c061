"""A real Segment SDK (segment-analytics-python) pointed at ingest."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from segment.analytics.client import Client

from tests.helpers import read_topic
from tests.ingest.conftest import SERVER_KEY, WEB_KEY, IngestClient, decode


def _send_with_sdk(host: str, errors: list[Any]) -> None:
    client = Client(
        SERVER_KEY, host=host, gzip=True, max_retries=1, upload_size=50, on_error=lambda exc, batch: errors.append(exc)
    )
    when = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
    client.identify("user-1", {"email": "u1@example.com", "plan": "pro"}, timestamp=when)
    client.track(
        "user-1",
        "Order Completed",
        {"revenue": 42.5, "currency": "EUR"},
        context={"campaign": {"source": "newsletter"}},
        timestamp=when,
        message_id="sdk-m-1",
    )
    client.page("user-1", "Docs", "Install", {"url": "https://example.com/docs"}, timestamp=when)
    client.screen("user-1", "App", "Home", timestamp=when)
    client.group("user-1", "acme", {"employees": 10}, timestamp=when)
    client.alias("user-1", "user-1-old", timestamp=when)
    client.track(anonymous_id="anon-7", event="Viewed", properties={"n": 1})
    client.flush()
    client.join()


async def test_segment_python_sdk_events_arrive_field_by_field(ingest: IngestClient, kafka_bootstrap: str) -> None:
    client, settings = await ingest()
    host = str(client.make_url("")).rstrip("/")
    errors: list[Any] = []
    await asyncio.to_thread(_send_with_sdk, host, errors)
    assert errors == []
    records = await read_topic(kafka_bootstrap, settings.raw_topic, expected=7)
    events = {}
    for record in records:
        env, event = decode(record)
        assert env.path == "/v1/batch"
        assert env.source_id == "server"
        assert env.user_agent.startswith("analytics-python")
        events[(event["type"], event.get("event") or event.get("name") or "")] = (record, event)
    assert len(events) == 7

    _, track = events[("track", "Order Completed")]
    assert track["userId"] == "user-1"
    assert track["messageId"] == "sdk-m-1"
    assert track["properties"] == {"revenue": 42.5, "currency": "EUR"}
    assert track["context"]["campaign"] == {"source": "newsletter"}
    assert track["context"]["library"]["name"] == "analytics-python"
    assert track["timestamp"] == "2026-11-24T12:00:00.000+00:00"  # kept exactly as the SDK sent it
    assert "anonymousId" not in track or track["anonymousId"] is None
    assert track["sentAt"]
    assert track["receivedAt"].endswith("Z")

    _, identify = events[("identify", "")]
    assert identify["traits"] == {"email": "u1@example.com", "plan": "pro"}
    _, page = events[("page", "Install")]
    assert page["category"] == "Docs" and page["properties"]["url"] == "https://example.com/docs"
    _, group = events[("group", "")]
    assert group["groupId"] == "acme" and group["traits"] == {"employees": 10}
    _, alias = events[("alias", "")]
    assert alias["previousId"] == "user-1" and alias["userId"] == "user-1-old"  # alias(previous_id, user_id)
    record, anon = events[("track", "Viewed")]
    assert anon["anonymousId"] == "anon-7"
    assert record.key == b"server:anon-7"


def _one_sdk_client(host: str, key: str, user: str, n: int, errors: list[Any]) -> None:
    """One SDK client sending every event type in turn, a third of them a year and more old."""
    client = Client(key, host=host, max_retries=1, upload_size=7, on_error=lambda exc, batch: errors.append(exc))
    old = datetime(2025, 10, 1, 8, 30, 0, tzinfo=UTC)
    for seq in range(n):
        when = old if seq % 3 == 0 else None
        common = {"timestamp": when, "message_id": f"{user}-{seq}"}
        kind = seq % 6
        if kind == 0:
            client.track(user, "Seq", {"seq": seq}, **common)
        elif kind == 1:
            client.identify(user, {"seq": seq}, **common)
        elif kind == 2:
            client.page(user, "Docs", "Page", {"seq": seq}, **common)
        elif kind == 3:
            client.screen(user, "App", "Screen", {"seq": seq}, **common)
        elif kind == 4:
            client.group(user, "acme", {"seq": seq}, **common)
        else:
            client.alias(f"{user}-prev-{seq}", user, **common)
    client.flush()
    client.join()


async def test_concurrent_sdk_clients_of_two_sources_every_event_once_and_in_order(
    ingest: IngestClient, kafka_bootstrap: str
) -> None:
    """Six SDK clients at once, on a source with optional settings (allowed origins) and one
    without, through ingest's two producers: what the SDKs were answered 200 for is counted
    against events.raw, each event once, each user's events in the order sent."""
    client, settings = await ingest(kafka_producers=2, raw_partitions=3)
    host = str(client.make_url("")).rstrip("/")
    errors: list[Any] = []
    n = 60
    users = {f"sdk-user-{i}": (WEB_KEY if i % 2 else SERVER_KEY) for i in range(6)}
    await asyncio.gather(
        *(asyncio.to_thread(_one_sdk_client, host, key, user, n, errors) for user, key in users.items())
    )
    assert errors == []
    records = await read_topic(kafka_bootstrap, settings.raw_topic, expected=n * len(users), timeout_s=60)
    seen: dict[str, list[tuple[int, int, str]]] = {}
    for record in records:
        env, event = decode(record)
        user = event["userId"]
        assert env.source_id == ("web" if users[user] == WEB_KEY else "server")
        seen.setdefault(user, []).append((record.partition, record.offset, env.message_id))
    assert sum(map(len, seen.values())) == n * len(users), "every event once"
    for user, got in seen.items():
        assert len({p for p, _, _ in got}) == 1, f"{user} is on one partition"
        assert [m for _, _, m in sorted(got)] == [f"{user}-{seq}" for seq in range(n)], f"{user} in order"
    old = [decode(r)[1] for r in records if decode(r)[1]["messageId"].endswith("-0")]
    assert all(e["timestamp"].startswith("2025-10-01T08:30:00") for e in old), "old timestamps kept as sent"
