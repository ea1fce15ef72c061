"""What a user looks at, through the whole fleet as processes: events from a source without
summed properties, offline SDK events hours and days old, /v1/import history, and a spool
drained late by a second ingest process all land in their own windows of the query API;
events past the maximum age are on events.late.

The spool is drained once Kafka is reachable again for the second ingest process, a few
seconds after the first one sent newer events; what the test shows is that arrival order
does not decide (the rule reads each event's age, receivedAt minus timestamp).
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from segment.analytics.client import Client

from services.common.badrow import BadRow
from tests import fleet as fleet_helpers
from tests.helpers import eventually, free_port, read_topic
from tests.metrics.helpers import count_body, counts

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
SHOP, NODE = "shop-e2e-key", "node-e2e-key"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def _send_with_sdk(host: str, live: int, offline: dict[str, int]) -> list[Any]:
    """analytics-python as a user calls it: every event type, and offline events sent now."""
    errors: list[Any] = []
    node = Client(
        NODE, host=host, gzip=True, max_retries=2, upload_size=20, on_error=lambda exc, batch: errors.append(exc)
    )
    at = datetime.fromtimestamp(live / 1000, tz=UTC)
    node.track(user_id="u1", event="Signed Up", timestamp=at)
    node.page(user_id="u1", name="Home", timestamp=at)
    node.screen(user_id="u1", name="Feed", timestamp=at)
    node.identify(user_id="u1", traits={"plan": "free"}, timestamp=at)
    node.group(user_id="u1", group_id="g1", timestamp=at)
    node.alias(previous_id="a1", user_id="u1", timestamp=at)
    for label, t in offline.items():
        for i in range(5):
            node.track(
                user_id=f"u{i}", event=f"Offline {label}", timestamp=datetime.fromtimestamp((t + i) / 1000, tz=UTC)
            )
    shop = Client(SHOP, host=host, gzip=True, max_retries=2, on_error=lambda exc, batch: errors.append(exc))
    for i in range(4):
        shop.track(user_id=f"u{i}", event="Order Completed", properties={"revenue": 10}, timestamp=at)
    for client in (node, shop):
        client.flush()
        client.join()
    return errors


def _batch(events: list[dict[str, Any]], sent_at: int) -> dict[str, Any]:
    return {"batch": events, "sentAt": iso(sent_at)}


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    auth = "Basic " + base64.b64encode(f"{NODE}:".encode()).decode()
    async with http.post(url, json=body, headers={"Authorization": auth}) as resp:
        assert resp.status == 200, await resp.text()


async def test_every_accepted_event_is_counted_in_its_own_window(
    kafka_bootstrap: str, cassandra_port: int, new_keyspace: Any, tmp_path: Path
) -> None:
    sources = tmp_path / "sources.json"
    sources.write_text(
        json.dumps(
            {
                "sources": [
                    {"id": "shop", "name": "Shop", "write_key": SHOP, "sum_properties": ["revenue"]},
                    {"id": "node", "name": "Node service", "write_key": NODE},
                ]
            }
        )
    )  # no sum_properties
    now = int(datetime.now(UTC).timestamp() * 1000)
    live = now - now % MIN - 2 * MIN
    offline = {"2h": now - 2 * HOUR, "3d": now - 3 * DAY}
    spooled_at = now - 2 * HOUR - 10 * MIN
    imported = {"5d": now - 5 * DAY, "8d": now - 8 * DAY}
    async with fleet_helpers.running(kafka_bootstrap, cassandra_port, new_keyspace(), sources, tmp_path) as fleet:
        ports, topics = fleet["ports"], fleet["topics"]
        # A second ingest process whose Kafka is away: it spools what it answers 200 for.
        second = dict(
            fleet["settings"]["ingest"],
            HTTP_PORT=free_port(),
            SPOOL_DIR=tmp_path / "spool-b",
            KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
            KAFKA_ACK_TIMEOUT_S=1,
        )
        log_b = tmp_path / "ingest-b.log"
        proc_b = fleet_helpers.start("ingest", second, log_b)
        async with aiohttp.ClientSession() as http:
            url_b = f"http://127.0.0.1:{second['HTTP_PORT']}/v1/batch"

            async def b_takes_events() -> bool:
                assert proc_b.poll() is None, log_b.read_text()[-3000:]
                try:
                    await _post(
                        http,
                        url_b,
                        _batch(
                            [
                                {
                                    "type": "track",
                                    "userId": f"u{i}",
                                    "event": "Spooled 2h",
                                    "messageId": f"spooled-{i}",
                                    "timestamp": iso(spooled_at + i),
                                }
                                for i in range(6)
                            ],
                            now,
                        ),
                    )
                except aiohttp.ClientError:
                    return False
                return True

            try:
                await eventually(b_takes_events, 60, "the second ingest process to answer")
            finally:
                fleet_helpers.stop([proc_b])

            # Meanwhile the first process takes live traffic, offline events and an import.
            errors = await asyncio.to_thread(_send_with_sdk, f"http://127.0.0.1:{ports['ingest']}", live, offline)
            assert errors == []
            for label, t in imported.items():
                await _post(
                    http,
                    f"http://127.0.0.1:{ports['ingest']}/v1/import",
                    _batch(
                        [
                            {
                                "type": "track",
                                "userId": f"u{i}",
                                "event": f"Imported {label}",
                                "messageId": f"imported-{label}-{i}",
                                "timestamp": iso(t + i),
                            }
                            for i in range(3)
                        ],
                        now,
                    ),
                )

            # The second process comes back with Kafka reachable and drains its spool.
            second["KAFKA_BOOTSTRAP"] = kafka_bootstrap
            proc_b = fleet_helpers.start("ingest", second, log_b)
            try:
                windows = {
                    (live, "source", None): {"node": 6, "shop": 4},
                    (live, "type", "node"): dict.fromkeys(["track", "page", "screen", "identify", "group", "alias"], 1),
                    (offline["2h"], "event", None): {"Offline 2h": 5},
                    (offline["3d"], "event", None): {"Offline 3d": 5},
                    (imported["5d"], "event", None): {"Imported 5d": 3},
                    (spooled_at, "event", None): {"Spooled 2h": 6},
                    (imported["8d"], "event", None): {},
                }
                got: dict[tuple[int, str, str | None], dict[str, int]] = {}

                async def all_counted() -> bool:
                    for (t, group, source), _ in windows.items():
                        start = t - t % MIN
                        tags = {"source": [source]} if source else None
                        async with http.post(
                            f"http://127.0.0.1:{ports['metrics']}/api/v1/datapoints/query",
                            json=count_body(start, start + MIN - 1, group, tags),
                        ) as resp:
                            assert resp.status == 200, await resp.text()
                            got[(t, group, source)] = counts(await resp.json(), group)
                    return got == windows

                try:
                    await eventually(all_counted, 120, "every window to hold its events")
                except AssertionError:
                    raise AssertionError(f"windows {got}, wanted {windows}") from None
            finally:
                fleet_helpers.stop([proc_b])
        late = [BadRow.decode(r.value) for r in await read_topic(kafka_bootstrap, topics["late"], expected=3)]
        assert sorted(r["message_id"] for r in late) == [f"imported-8d-{i}" for i in range(3)]
        assert {r["extra"]["reason"] for r in late} == {"max_event_age"}
