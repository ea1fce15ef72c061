"""Every service's real log lines in a real search engine, as Filebeat would send them.

Ingest, processor and metrics run on the real Kafka and Cassandra with traffic; the
bridge and the mirror on the Kinesis server; a second ingest with Kafka away and a
1 KiB spool answers 503s (the lines an operator looks up by a client's request_id) and
cannot dead-letter a bad pixel (a line with its source); a second metrics without
Cassandra fails to start (exceptions, from the driver's stdlib logger and the runner). Each process's stdout lines are
decoded as compose/filebeat/filebeat.yml says (ndjson, expand_keys) and bulk-indexed with
``create`` into a data stream of the index template from compose/, in the dev stack's
OpenSearch 2.19 node (``headwater stack up --opensearch``; .ci/run starts it). Then:
every line went in, none was refused; a request_id and a source find their lines; each
saved search of compose/kibana finds exactly its service's lines; the mapping has the ECS
types (tests/common/ecs.py) and no string became text or a date by guessing.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.bridge.kinesis import kinesis_client
from services.devstack import stack
from services.devstack.opensearch import OpenSearchSettings, opensearch_answers
from tests import fleet
from tests.bridge.helpers import AWS_ENV, bridge_settings
from tests.bridge.helpers import start as start_bridge
from tests.common.ecs import FIELD_TYPES, filebeat_event, load_saved_objects, load_template
from tests.helpers import eventually, free_port, unique_name

SHOP_KEY = "logs-shop-write-key"
APP_KEY = "logs-app-write-key"
SHOP_AUTH = "Basic " + base64.b64encode(f"{SHOP_KEY}:".encode()).decode()
SERVICES = ("ingest", "processor", "metrics", "bridge", "bridge-mirror")


@pytest.fixture(scope="module")
def opensearch_url() -> str:
    settings = OpenSearchSettings()
    if not opensearch_answers(settings):
        if os.environ.get("CI"):
            pytest.fail(f"no OpenSearch on {settings.url}: .ci/run starts it with `headwater stack up --opensearch`")
        pytest.skip(f"no OpenSearch on {settings.url}; start it with `headwater stack up --opensearch`")
    return settings.url


@pytest.fixture
async def search(opensearch_url: str) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await search(method, path, body)``: the node's JSON answer (ndjson when body is a str)."""
    async with aiohttp.ClientSession(base_url=opensearch_url) as http:

        async def call(method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
            kwargs: dict[str, Any] = {}
            if isinstance(body, str):
                kwargs = {"data": body.encode(), "headers": {"Content-Type": "application/x-ndjson"}}
            elif body is not None:
                kwargs = {"json": body}
            async with http.request(method, path, **kwargs) as resp:
                answer = await resp.json()
                assert resp.status in ok, (method, path, resp.status, answer)
                return answer

        yield call


def _sources(shop_stream: str, app_stream: str) -> dict[str, Any]:
    return {
        "sources": [
            {
                "id": "shop",
                "name": "Shop",
                "write_key": SHOP_KEY,
                "legacy": {"direction": "bridge", "stream": shop_stream},
            },
            {"id": "app", "name": "App", "write_key": APP_KEY, "legacy": {"direction": "mirror", "stream": app_stream}},
        ]
    }


async def _log_has(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


async def _run_the_fleet(
    kafka_bootstrap: str, cassandra_port: int, keyspace: str, bridge_keyspace: str, tmp_path: Path
) -> dict[str, Any]:
    """Run every service briefly with traffic; return the 503's request_id and the topics."""
    settings = stack.StackSettings()
    stack.up(settings, kafka=False, cassandra=False, kinesis=True)
    for name, value in AWS_ENV.items():
        os.environ.setdefault(name, value)
    streams = [unique_name("test-logs"), unique_name("test-logs")]
    async with kinesis_client(bridge_settings(aws_endpoint_url=settings.kinesis_endpoint)) as kinesis:
        for stream in streams:
            await kinesis.create_stream(StreamName=stream, ShardCount=1)
        try:
            sources = tmp_path / "sources.json"
            sources.write_text(json.dumps(_sources(*streams)))
            async with fleet.running(kafka_bootstrap, cassandra_port, keyspace, sources, tmp_path) as running:
                return await _traffic(running, settings, sources, bridge_keyspace, tmp_path)
        finally:
            for stream in streams:
                await kinesis.delete_stream(StreamName=stream)


async def _traffic(
    running: dict[str, Any], settings: stack.StackSettings, sources: Path, bridge_keyspace: str, tmp_path: Path
) -> dict[str, Any]:
    topics = running["topics"]
    bridge = bridge_settings(
        kafka_bootstrap=settings.kafka_bootstrap,
        raw_topic=topics["raw"],
        dlq_topic=topics["dlq"],
        enriched_topic=topics["enriched"],
        cassandra_port=settings.cassandra_port,
        cassandra_keyspace=bridge_keyspace,
        aws_endpoint_url=settings.kinesis_endpoint,
        sources_file=sources,
        http_port=free_port(),
        mirror_http_port=free_port(),
        mirror_group_id=unique_name("test-logs-mirror"),
        # Parity every half second against a metrics API that is not there: a warning per source.
        parity_interval_s=0.5,
        metrics_url=f"http://127.0.0.1:{free_port()}",
    )
    outage_port = free_port()
    outage = {
        "KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": outage_port,
        "SOURCES_FILE": sources,
        "SPOOL_DIR": tmp_path / "outage-spool",
        "SPOOL_MAX_BYTES": 1024,
        "SPOOL_SEGMENT_BYTES": 1024,
        "RAW_TOPIC": topics["raw"],
        "DLQ_TOPIC": topics["dlq"],
    }
    # Metrics with no Cassandra cannot start: exceptions from the driver (stdlib logging)
    # and from the runner (structlog), then it exits.
    broken = {
        **running["settings"]["metrics"],
        "HTTP_PORT": free_port(),
        "CASSANDRA_PORT": free_port(),
        "CONSUMER_GROUP": unique_name("test-logs-broken"),
    }
    procs = [
        start_bridge(bridge, "bridge", tmp_path / "bridge.log"),
        start_bridge(bridge, "mirror", tmp_path / "mirror.log"),
        fleet.start("ingest", outage, tmp_path / "ingest-outage.log"),
        fleet.start("metrics", broken, tmp_path / "metrics-no-cassandra.log"),
    ]
    try:
        await fleet.wait_ready("bridge", procs[0], bridge.http_port, tmp_path / "bridge.log")
        await fleet.wait_ready("mirror", procs[1], bridge.mirror_http_port, tmp_path / "mirror.log")
        async with aiohttp.ClientSession() as http:

            async def alive() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{outage_port}/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(alive, 60, "the ingest without Kafka to answer /healthz")
            good = f"http://127.0.0.1:{running['ports']['ingest']}"
            for i in range(5):
                async with http.post(
                    f"{good}/v1/track",
                    json={"userId": f"u{i}", "event": "Logged"},
                    headers={"Authorization": SHOP_AUTH},
                ) as resp:
                    assert resp.status == 200, await resp.text()
            refused = None
            for i in range(40):  # the 1 KiB spool takes an event or two, then 503
                request_id = unique_name(f"logs-req-{i}")
                async with http.post(
                    f"http://127.0.0.1:{outage_port}/v1/track",
                    json={"userId": "u", "event": "Spooled"},
                    headers={"X-Request-Id": request_id, "Authorization": SHOP_AUTH},
                ) as resp:
                    if resp.status == 503:
                        refused = request_id
                        break
            assert refused is not None, "the ingest without Kafka never answered 503"
            async with http.get(
                f"http://127.0.0.1:{outage_port}/v1/pixel/track", params={"writeKey": SHOP_KEY, "data": "%%%not-base64"}
            ) as resp:
                assert resp.status == 200
        await eventually(
            lambda: _log_has(tmp_path / "ingest-outage.log", "could not be dead-lettered"),
            30,
            "the bad pixel's warning",
        )
        await eventually(
            lambda: _log_has(tmp_path / "bridge.log", "parity comparison could not run"),
            30,
            "the bridge's parity warning",
        )
        await eventually(
            lambda: _log_has(tmp_path / "metrics-no-cassandra.log", "could not start"),
            60,
            "metrics without Cassandra to give up",
        )
    finally:
        fleet.stop(procs)
    return {"request_id": refused, "raw_topic": topics["raw"]}


def _lines(tmp_path: Path) -> list[tuple[Path, int, str]]:
    """(file, byte offset, line) of every stdout line of every process; each must be JSON."""
    out = []
    for path in sorted(tmp_path.glob("*.log")):
        offset = 0
        for raw in path.read_bytes().splitlines(keepends=True):
            line = raw.decode().strip()
            if line:
                out.append((path, offset, line))
            offset += len(raw)
    not_json = [f"{p.name}: {line[:200]}" for p, _, line in out if not line.startswith("{")]
    assert not_json == [], "lines Filebeat could not decode"
    return out


async def test_every_services_lines_are_found_with_ecs_types(
    kafka_bootstrap: str,
    cassandra_port: int,
    new_keyspace: Callable[[], str],
    tmp_path: Path,
    search: Callable[..., Awaitable[Any]],
) -> None:
    facts = await _run_the_fleet(kafka_bootstrap, cassandra_port, new_keyspace(), new_keyspace(), tmp_path)
    lines = _lines(tmp_path)
    decoded = [json.loads(line) for _, _, line in lines]
    per_service = Counter(d["service.name"] for d in decoded)
    assert set(per_service) == set(SERVICES), per_service

    stream = unique_name("headwater-logs-test")
    template = load_template()
    template["index_patterns"] = [stream]
    await search("PUT", f"/_index_template/{stream}", template)
    try:
        body = "".join(
            json.dumps({"create": {"_index": stream}})
            + "\n"
            + json.dumps(filebeat_event(line, path=str(path), offset=offset))
            + "\n"
            for path, offset, line in lines
        )
        answer = await search("POST", "/_bulk?refresh=true", body)
        refused = [
            (item["create"].get("error"), line[:300])
            for item, (_, _, line) in zip(answer["items"], lines, strict=True)
            if "error" in item["create"]
        ]
        assert refused == [] and not answer["errors"]
        await _check_searches(search, stream, decoded, facts)
        await _check_mapping(search, stream)
    finally:
        await search("DELETE", f"/_data_stream/{stream}", ok=(200, 404))
        await search("DELETE", f"/_index_template/{stream}", ok=(200, 404))


async def _hits(search: Callable[..., Awaitable[Any]], stream: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    answer = await search("POST", f"/{stream}/_search", {"query": query, "size": 1000, "track_total_hits": True})
    return [hit["_source"] for hit in answer["hits"]["hits"]]


async def _check_searches(
    search: Callable[..., Awaitable[Any]], stream: str, decoded: list[dict[str, Any]], facts: dict[str, Any]
) -> None:
    # A client's request_id (from a 503 answer) finds ingest's line about it.
    found = await _hits(search, stream, {"term": {"request_id": facts["request_id"]}})
    assert [(h["service"]["name"], h["message"]) for h in found] == [("ingest", "request refused")]
    # A source finds the bridge's parity warnings and ingest's bad pixel, whose own
    # request_id finds it again.
    by_source = await _hits(search, stream, {"term": {"labels.source": "shop"}})
    assert {h["service"]["name"] for h in by_source} == {"ingest", "bridge"}
    assert len(by_source) == sum(d.get("labels.source") == "shop" for d in decoded)
    pixel = next(h for h in by_source if h["service"]["name"] == "ingest")
    again = await _hits(search, stream, {"term": {"request_id": pixel["request_id"]}})
    assert [h["message"] for h in again] == [pixel["message"]]
    parity = next(h for h in by_source if h["service"]["name"] == "bridge")
    assert parity["error"]["message"]  # the bridge's error= text, in ECS's error.message
    # Exceptions, from structlog and from a library's stdlib logger, by type.
    failed = await _hits(
        search,
        stream,
        {"bool": {"filter": [{"term": {"service.name": "metrics"}}, {"match": {"message": "could not start"}}]}},
    )
    assert len(failed) == 1 and failed[0]["labels"]["service"] == "metrics"
    error = failed[0]["error"]
    assert error["stack_trace"].startswith("Traceback") and error["message"]
    assert error["stack_trace"].rstrip().splitlines()[-1].startswith(error["type"] + ": ")
    driver = await _hits(search, stream, {"term": {"error.type": "cassandra.cluster.NoHostAvailable"}})
    assert driver and {h["log"]["logger"] for h in driver} == {"cassandra.cluster"}
    assert all(h["error"]["stack_trace"].startswith("Traceback") for h in driver)
    # Kafka coordinates are numbers and keywords.
    on_raw = await _hits(
        search,
        stream,
        {
            "bool": {
                "filter": [{"term": {"kafka.topic": facts["raw_topic"]}}, {"range": {"kafka.partition": {"gte": 0}}}]
            }
        },
    )
    assert {h["service"]["name"] for h in on_raw} >= {"processor"}
    # Each saved search (compose/kibana) finds exactly its service's lines.
    for obj in load_saved_objects():
        if obj["type"] != "search":
            continue
        query = json.loads(obj["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])["query"]
        assert query["language"] == "lucene"
        answer = await search("POST", f"/{stream}/_count", {"query": {"query_string": {"query": query["query"]}}})
        service = obj["id"].removeprefix("headwater-logs-")
        if service in SERVICES:
            expected = sum(d["service.name"] == service for d in decoded)
        else:
            expected = sum(d["log.level"] in ("error", "critical") or "error.type" in d for d in decoded)
        assert answer["count"] == expected, obj["attributes"]["title"]


async def _check_mapping(search: Callable[..., Awaitable[Any]], stream: str) -> None:
    answer = await search("GET", f"/{stream}/_mapping")
    (index,) = answer.values()
    mapped = _field_types(index["mappings"]["properties"])
    wrong = {f: (mapped.get(f), kind) for f, kind in FIELD_TYPES.items() if mapped.get(f) != kind}
    assert wrong == {}
    guessed = {
        f: kind
        for f, kind in mapped.items()
        if f not in FIELD_TYPES and kind not in ("keyword", "long", "boolean", "float", "object")
    }
    assert guessed == {}, "fields the engine typed by guessing"


def _field_types(props: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for name, spec in props.items():
        if "properties" in spec:
            out.update(_field_types(spec["properties"], f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = str(spec.get("type", "object"))
    return out
