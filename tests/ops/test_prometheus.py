"""The real Prometheus (Debian's package, as `headwater stack up --prometheus` runs it) scrapes the
real fleet (ingest, processor and metrics as processes, found through the file-SD targets file the
way `headwater run` announces them) under traffic that makes every series the dashboards and
alerts read:

1. every KairosDB panel of the traffic dashboard is answered by the metrics API, with results;
2. Kafka is stopped under traffic: IngestSpooling becomes firing in Prometheus's own
   /api/v1/alerts, and is gone once Kafka is back and the spool drained;
3. every PromQL expression of every panel, and every alert's expression without its threshold,
   returns series from what Prometheus scraped (a renamed metric returns none and fails).

Kafka here is a private broker (its own ports and data) so that stopping it disturbs no other
test; Cassandra is the shared one with a keyspace of the test's own. Prometheus scrapes and
evaluates every second and loads a copy of the shipped rules whose `for:` durations are cut to
2 s: the expressions are the shipped ones, which tests/ops/test_rules.py unit-tests as shipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from services.devstack import stack
from services.devstack.prometheus import prometheus_server, prometheus_url, start_prometheus, write_targets
from tests import fleet
from tests.helpers import eventually, free_port
from tests.ops.dashboards import kairos_body, kairos_targets, load_dashboards, promql_targets, without_threshold
from tests.ops.rules import RULES, alerting_rules

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus not installed (apt-get install prometheus)"
    ),
]

SOURCES = {
    "sources": [
        {"id": "shop", "name": "Shop", "write_key": "shop-key", "sum_properties": ["revenue"]},
        # A source over its limit all the time: its requests get 429s.
        {
            "id": "throttled",
            "name": "Throttled",
            "write_key": "throttled-key",
            "rate_limit_per_s": 2,
            "rate_limit_burst": 2,
        },
    ]
}
DAY_MS = 86_400_000


def fast_rules(out: Path) -> Path:
    """The shipped rules with every `for:` cut to 2 s (nothing else changed)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    out.write_text(yaml.safe_dump(rules, sort_keys=False))
    return out


def batch(n: int, prefix: str, *, bad: bool = False, timestamp: str | None = None) -> dict[str, Any]:
    events: list[dict[str, Any]] = [
        {
            "type": "track",
            "event": f"Order {i % 3}",
            "userId": f"u{i % 5}",
            "messageId": f"{prefix}-{i}",
            "properties": {"revenue": 2.5},
            **({"timestamp": timestamp} if timestamp else {}),
        }
        for i in range(n)
    ]
    if bad:
        events.append({"type": "track", "userId": "u1", "messageId": f"{prefix}-bad"})  # no event name: a bad row
    return {"batch": events}


class Traffic:
    """Requests to ingest, counted by status, in a background task until stopped."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.statuses: Counter[int] = Counter()
        self.sent = 0

    async def post(self, key: str, body: dict[str, Any], path: str = "/v1/batch") -> int:
        headers = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
        async with self.http.post(f"{self.url}{path}", json=body, headers=headers) as resp:
            self.statuses[resp.status] += 1
            return resp.status

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sent += 1
            await self.post("shop-key", batch(5, f"bg-{self.sent}", bad=self.sent % 4 == 0))
            await self.post("throttled-key", batch(1, f"th-{self.sent}"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


@contextlib.asynccontextmanager
async def background(traffic: Traffic) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(traffic.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task  # its failure (an exception) is shown, not lost


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"test")
    finally:
        await producer.stop()


async def query(http: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def alert_states(http: aiohttp.ClientSession, base: str, name: str) -> list[str]:
    async with http.get(f"{base}/api/v1/alerts") as resp:
        alerts = (await resp.json())["data"]["alerts"]
    return [a["state"] for a in alerts if a["labels"]["alertname"] == name]


async def timed(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    await eventually(predicate, timeout_s, what)
    return time.monotonic() - started


async def test_prometheus_scrapes_the_fleet_alerts_fire_and_every_query_answers(
    private_stack: stack.StackSettings, cassandra_port: int, new_keyspace: Callable[[], str], tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = private_stack.model_copy(update={"prometheus_port": free_port()})
    await asyncio.to_thread(stack.up, settings, cassandra=False)
    kafka_s = time.monotonic() - started
    bootstrap = settings.kafka_bootstrap
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps(SOURCES))
    envs, ports, topics = fleet.settings(bootstrap, cassandra_port, new_keyspace(), sources, tmp_path)
    # Kafka away is noticed within a second, and a small spool fills during the outage (503s).
    envs["ingest"].update(KAFKA_ACK_TIMEOUT_S=1, SPOOL_MAX_BYTES=16_384)
    procs = {name: fleet.start(name, values, tmp_path / f"{name}.log") for name, values in envs.items()}
    base = prometheus_url(settings)
    try:
        for name, port in ports.items():
            await fleet.wait_ready(name, procs[name], port, tmp_path / f"{name}.log")
        write_targets(settings, "headwater-run", {name: [f"127.0.0.1:{port}"] for name, port in ports.items()})
        _, prometheus_s = await asyncio.to_thread(
            start_prometheus,
            settings,
            rules=[fast_rules(tmp_path / "r.yml")],
            scrape_interval_s=1,
            evaluation_interval_s=1,
        )
        ready_s = time.monotonic() - started
        async with aiohttp.ClientSession() as http:
            await _scraped(http, base, ports)
            traffic = Traffic(http, f"http://127.0.0.1:{ports['ingest']}")
            await _every_series_source(traffic, http, bootstrap, topics, ports)
            await _kairos_panels_answer(http, ports["metrics"])
            panels_s = time.monotonic() - started

            async with background(traffic):
                # Traffic on a healthy fleet first: nothing spools, the alert is not even pending.
                await asyncio.sleep(3)
                assert await alert_states(http, base, "IngestSpooling") == []
                assert [r["value"][1] for r in await query(http, base, "headwater_ingest_spooling")] == ["0"]
                kafka = stack.kafka_server(settings)

                async def firing() -> bool:
                    return "firing" in await alert_states(http, base, "IngestSpooling")

                # Prometheus is watched while the broker shuts down: the times count from the stop.
                fire_s, stop_s = await asyncio.gather(
                    timed(firing, 60, "IngestSpooling to fire"), _timed_call(kafka.stop)
                )

                async def refused() -> bool:
                    return traffic.statuses[503] > 0

                await eventually(refused, 30, "503s once the small spool is full")
                assert "firing" in await alert_states(http, base, "IngestSpooling")

                async def resolved() -> bool:
                    return await alert_states(http, base, "IngestSpooling") == []

                resolve_s, restart_s = await asyncio.gather(
                    timed(resolved, 120, "IngestSpooling to resolve"),
                    _timed_call(lambda: stack.up(settings, cassandra=False)),
                )
            missing = await _queries_without_series(http, base)
            # The check tells a present metric from a renamed one.
            assert await query(http, base, "headwater_ingest_spooling")
            assert await query(http, base, "headwater_ingest_spooling_renamed") == []
        print(
            f"\nprivate Kafka up after {kafka_s:.1f}s, fleet and Prometheus ready after {ready_s:.1f}s "
            f"(Prometheus answered in {prometheus_s:.1f}s), "
            f"KairosDB panels answered at {panels_s:.1f}s; "
            f"IngestSpooling firing {fire_s:.1f}s after Kafka was told to stop (its stop took {stop_s:.1f}s), "
            f"resolved {resolve_s:.1f}s after its restart began (Kafka answered after {restart_s:.1f}s); "
            f"requests by status {dict(traffic.statuses)}"
        )
        assert missing == [], "expressions without series:\n" + "\n".join(missing)
    finally:
        prometheus_server(settings).kill()
        fleet.stop(list(procs.values()))


async def _timed_call(fn: Callable[[], object]) -> float:
    """Run a blocking call in a thread; how long it took."""
    began = time.monotonic()
    await asyncio.to_thread(fn)
    return time.monotonic() - began


async def _scraped(http: aiohttp.ClientSession, base: str, ports: dict[str, int]) -> None:
    """Each service is a target of its own job, up."""

    async def all_up() -> bool:
        result = await query(http, base, 'up{job=~"ingest|processor|metrics"} == 1')
        return {r["metric"]["job"] for r in result} == set(ports)

    await eventually(all_up, 30, "Prometheus to scrape ingest, processor and metrics")


async def _every_series_source(
    traffic: Traffic, http: aiohttp.ClientSession, bootstrap: str, topics: dict[str, str], ports: dict[str, int]
) -> None:
    """What makes the labelled series exist: accepted and dead-lettered events, a duplicate,
    a late event, 401s, 429s, a pixel, bad records on events.raw and events.enriched, queries."""
    assert await traffic.post("shop-key", batch(20, "first", bad=True)) == 200
    assert await traffic.post("shop-key", batch(20, "first")) == 200  # the same messageIds: duplicates
    old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 30 * DAY_MS / 1000))
    assert await traffic.post("shop-key", batch(3, "late", timestamp=old)) == 200
    assert await traffic.post("no-such-key", batch(1, "nokey")) == 401
    for i in range(5):
        await traffic.post("throttled-key", batch(1, f"throttle-{i}"))
    assert traffic.statuses[429] > 0
    async with http.get(
        f"{traffic.url}/v1/pixel/track", params={"writeKey": "shop-key", "event": "Opened", "userId": "u9"}
    ) as resp:
        assert resp.status == 200
    await produce(bootstrap, topics["raw"], [b"not an envelope"] * 3)
    await produce(bootstrap, topics["enriched"], [b"not an event"] * 3)


async def _kairos_panels_answer(http: aiohttp.ClientSession, metrics_port: int) -> None:
    """Each KairosDB target as the data source sends it: 200, and series with points once the
    rollups of the traffic above are written."""
    targets = kairos_targets(load_dashboards())
    assert targets

    async def answered() -> bool:
        now_ms = int(time.time() * 1000)
        for where, target, time_from in targets:
            body = kairos_body(target, time_from, now_ms)
            async with http.post(f"http://127.0.0.1:{metrics_port}/api/v1/datapoints/query", json=body) as resp:
                assert resp.status == 200, (where, body, await resp.text())
                results = (await resp.json())["queries"][0]["results"]
            if not any(r["values"] for r in results):
                return False
        return True

    await eventually(answered, 60, "every KairosDB panel to have points")


async def _queries_without_series(http: aiohttp.ClientSession, base: str) -> list[str]:
    """Every dashboard expression and every alert expression (threshold removed) that Prometheus
    answers with no series."""
    expressions = promql_targets(load_dashboards())
    expressions += [(f"alert {r['alert']}", without_threshold(r["expr"])) for r in alerting_rules()]
    assert len(expressions) > 40
    missing = []
    for where, expr in expressions:
        if not await query(http, base, expr):
            missing.append(f"{where}: {expr}")
    return missing
