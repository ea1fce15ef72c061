"""The KairosDB-compatible API on data stored in the real Cassandra."""

from __future__ import annotations

import gzip
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.common.cassandra import CassandraClient
from services.metrics.app import build_app
from services.metrics.settings import Settings
from tests.metrics.conftest import MakeSettings
from tests.metrics.helpers import checkpoints, end_offsets, enriched, poll, produce

ApiClient = TestClient[web.Request, web.Application]

HOUR = 3_600_000
MIN = 60_000


@pytest.fixture
async def loaded(
    metrics_settings: MakeSettings, cassandra: CassandraClient, kafka_bootstrap: str
) -> tuple[Settings, int]:
    """Known events two hours back: minute 0..3 of one hour, two sources, two partitions."""
    settings = await metrics_settings(partitions=2, allowed_lateness_s=10 * 86_400, max_event_age_s=10 * 86_400)
    base = (int(time.time() * 1000) // HOUR - 2) * HOUR
    docs = []
    for minute in range(4):
        for i in range(minute + 1):  # minute m has m+1 "Signed Up" events on web, users u0..u{m}
            docs.append(
                enriched(
                    "web", "track", "Signed Up", f"u{i}", base + minute * MIN + i, base + 3 * HOUR, {"revenue": 2.5}
                )
            )
        docs.append(
            enriched(
                "srv",
                "track",
                "Order Completed",
                "u0",
                base + minute * MIN,
                base + 3 * HOUR,
                {"revenue": 10, "quantity": 2},
            )
        )
    docs.append(enriched("web", "page", "Home", "a9", base + 5 * MIN, base + 3 * HOUR))
    sent = await produce(
        kafka_bootstrap, settings.enriched_topic, [(i % 2, orjson.dumps(d)) for i, d in enumerate(docs)]
    )
    app = await build_app(settings)
    async with TestClient(TestServer(app)):
        want = end_offsets(sent)

        async def caught_up() -> bool:
            got = await checkpoints(
                cassandra, settings.cassandra_keyspace, settings.consumer_group, settings.enriched_topic
            )
            return all(got.get(p, 0) >= o for p, o in want.items())

        await poll(caught_up, 60, "the rollups")
    return settings, base


@pytest.fixture
async def api(loaded: tuple[Settings, int]) -> Any:
    settings, _ = loaded
    app = await build_app(settings, consume=False)
    async with TestClient(TestServer(app)) as client:
        yield client


async def query(api: ApiClient, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    resp = await api.post("/api/v1/datapoints/query", data=orjson.dumps(body))
    assert resp.status == status, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def test_counts_per_minute_merge_partitions_and_filter_tags(api: ApiClient, loaded: tuple[Settings, int]) -> None:
    _, base = loaded
    answer = await query(
        api,
        {
            "start_absolute": base,
            "end_absolute": base + HOUR - 1,
            "metrics": [
                {
                    "name": "headwater.events.count",
                    "tags": {"source": ["web"], "event": "Signed Up", "resolution": ["1m"]},
                }
            ],
        },
    )
    (q,) = answer["queries"]
    (result,) = q["results"]
    assert result["values"] == [[base + m * MIN, m + 1] for m in range(4)]
    assert result["tags"] == {"event": ["Signed Up"], "resolution": ["1m"], "source": ["web"], "type": ["track"]}
    # sample_size counts stored rows: minutes 1-3 have a row on each partition, merged into one point.
    assert q["sample_size"] == 7


async def test_group_by_and_aggregators(api: ApiClient, loaded: tuple[Settings, int]) -> None:
    _, base = loaded
    body = {
        "start_absolute": base,
        "end_absolute": base + HOUR - 1,
        "metrics": [
            {
                "name": "headwater.events.count",
                "tags": {"resolution": "1m"},
                "group_by": [{"name": "tag", "tags": ["source"]}],
                "aggregators": [{"name": "sum", "sampling": {"value": 1, "unit": "hours"}, "align_sampling": True}],
            }
        ],
    }
    results = (await query(api, body))["queries"][0]["results"]
    by_source = {r["group_by"][0]["group"]["source"]: r["values"] for r in results}
    assert by_source == {"srv": [[base, 4]], "web": [[base, 1 + 2 + 3 + 4 + 1]]}
    assert results[0]["group_by"][-1] == {"name": "type", "type": "number"}

    for name, want in [("avg", 2.5), ("min", 1), ("max", 4), ("count", 4), ("first", 1), ("last", 4)]:
        body = {
            "start_absolute": base,
            "end_absolute": base + HOUR - 1,
            "metrics": [
                {
                    "name": "headwater.events.count",
                    "tags": {"resolution": "1m", "source": "web", "event": "Signed Up"},
                    "aggregators": [
                        {
                            "name": name,
                            "sampling": {"value": 10, "unit": "minutes"},
                            "align_sampling": True,
                            "align_start_time": True,
                        }
                    ],
                }
            ],
        }
        values = (await query(api, body))["queries"][0]["results"][0]["values"]
        assert values == [[base, want]], name


async def test_distinct_users_union_and_sums(api: ApiClient, loaded: tuple[Settings, int]) -> None:
    _, base = loaded
    window = {"start_absolute": base, "end_absolute": base + HOUR - 1}
    # Per minute: m+1 users; over the hour table: u0..u3 on web plus a9 = 5.
    per_minute = await query(
        api,
        {
            **window,
            "metrics": [
                {
                    "name": "headwater.users.distinct",
                    "tags": {"source": "web", "resolution": "1m", "event": "Signed Up"},
                }
            ],
        },
    )
    assert per_minute["queries"][0]["results"][0]["values"] == [[base + m * MIN, m + 1] for m in range(4)]
    hour = await query(
        api,
        {**window, "metrics": [{"name": "headwater.users.distinct", "tags": {"source": "web", "resolution": "1h"}}]},
    )
    assert hour["queries"][0]["results"][0]["values"] == [[base, 5]]
    # 'distinct' unions the minute sketches of a period instead of adding estimates.
    union = await query(
        api,
        {
            **window,
            "metrics": [
                {
                    "name": "headwater.users.distinct",
                    "tags": {"source": "web", "resolution": "1m"},
                    "aggregators": [
                        {"name": "distinct", "sampling": {"value": 1, "unit": "hours"}, "align_sampling": True}
                    ],
                }
            ],
        },
    )
    assert union["queries"][0]["results"][0]["values"] == [[base, 5]]

    sums = await query(
        api,
        {
            **window,
            "metrics": [
                {
                    "name": "headwater.property.sum",
                    "tags": {"resolution": "1h"},
                    "group_by": [{"name": "tag", "tags": ["source", "property"]}],
                }
            ],
        },
    )
    got = {
        (r["group_by"][0]["group"]["source"], r["group_by"][0]["group"]["property"]): r["values"]
        for r in sums["queries"][0]["results"]
    }
    assert got == {
        ("web", "revenue"): [[base, 2.5 * 10]],
        ("srv", "revenue"): [[base, 40.0]],
        ("srv", "quantity"): [[base, 8.0]],
    }


async def test_relative_times_and_automatic_resolution(api: ApiClient, loaded: tuple[Settings, int]) -> None:
    # A start inside a minute: only the 1m windows start in the range, whatever the sampling.
    answer = await query(
        api,
        {
            "start_relative": {"value": 1, "unit": "days"},
            "metrics": [
                {
                    "name": "headwater.events.count",
                    "tags": {"source": "srv"},
                    "aggregators": [{"name": "sum", "sampling": {"value": 1, "unit": "days"}}],
                }
            ],
        },
    )
    (result,) = answer["queries"][0]["results"]
    assert result["tags"]["resolution"] == ["1m"]
    assert sum(v for _, v in result["values"]) == 4
    # A start on a UTC midnight with daily periods (aligned to midnight by default): the 1d table.
    _, base = loaded
    midnight = base - base % 86_400_000
    answer = await query(
        api,
        {
            "start_absolute": midnight,
            "metrics": [
                {
                    "name": "headwater.events.count",
                    "tags": {"source": "srv"},
                    "aggregators": [{"name": "sum", "sampling": {"value": 1, "unit": "DAYS"}}],
                }
            ],
        },
    )
    (result,) = answer["queries"][0]["results"]
    assert result["tags"]["resolution"] == ["1d"]
    assert result["values"] == [[midnight, 4]]


async def test_bad_queries_get_kairosdb_errors(api: ApiClient) -> None:
    bad: list[dict[str, Any]] = [
        {"metrics": [{"name": "headwater.events.count"}]},
        {"start_relative": {"value": 1, "unit": "fortnights"}, "metrics": [{"name": "x"}]},
        {"start_absolute": 1, "metrics": {}},
        {"start_absolute": 1, "metrics": [{"name": ""}]},
        {"start_absolute": 1, "metrics": [{"name": "x", "aggregators": [{"name": "percentile"}]}]},
        {"start_absolute": 1, "metrics": [{"name": "x", "group_by": [{"name": "time"}]}]},
        {"start_absolute": 10, "end_absolute": 5, "metrics": [{"name": "x"}]},
        {"start_absolute": 1, "metrics": [{"name": "headwater.events.count", "tags": {"resolution": "5m"}}]},
    ]
    for body in bad:
        answer = await query(api, body, status=400)
        assert isinstance(answer["errors"], list) and answer["errors"][0], body
    resp = await api.post("/api/v1/datapoints/query", data=b"{not json")
    assert resp.status == 400
    assert "errors" in await resp.json()


async def test_write_api_metricnames_health_and_version(api: ApiClient) -> None:
    now = int(time.time() * 1000)
    body = [
        {"name": "legacy.cpu", "tags": {"host": "a"}, "datapoints": [[now - 2000, 1], [now - 1000, 3]]},
        {"name": "legacy.cpu", "tags": {"host": "b"}, "timestamp": now - 1500, "value": 2.5},
    ]
    resp = await api.post(
        "/api/v1/datapoints", data=gzip.compress(orjson.dumps(body)), headers={"Content-Type": "application/gzip"}
    )
    assert resp.status == 204, await resp.text()
    answer = await query(
        api,
        {
            "start_relative": {"value": 1, "unit": "hours"},
            "metrics": [
                {"name": "legacy.cpu", "group_by": [{"name": "tag", "tags": ["host"]}]},
                {"name": "legacy.cpu", "aggregators": [{"name": "max"}]},
                {
                    "name": "legacy.cpu",
                    "aggregators": [
                        {"name": "max", "sampling": {"value": 1, "unit": "HOURS"}, "align_sampling": False}
                    ],
                },
            ],
        },
    )
    grouped, every, maxed = answer["queries"]
    assert {r["group_by"][0]["group"]["host"]: r["values"] for r in grouped["results"]} == {
        "a": [[now - 2000, 1], [now - 1000, 3]],
        "b": [[now - 1500, 2.5]],
    }
    # KairosDB's default sampling is 1 ms: without a sampling every point stays.
    assert every["results"][0]["values"] == [[now - 2000, 1], [now - 1500, 2.5], [now - 1000, 3]]
    # One period from the query start, stamped at its first point.
    assert maxed["results"][0]["values"] == [[now - 2000, 3]]
    assert maxed["sample_size"] == 3

    resp = await api.post(
        "/api/v1/datapoints", data=orjson.dumps([{"name": "x", "tags": {}, "datapoints": [[1, "a"]]}])
    )
    assert resp.status == 400
    assert (await resp.json())["errors"]
    resp = await api.post(
        "/api/v1/datapoints", data=orjson.dumps({"name": "x", "tags": {"h": "a"}, "datapoints": [[1, "text"]]})
    )
    assert resp.status == 400

    names = (await (await api.get("/api/v1/metricnames")).json())["results"]
    assert {"headwater.events.count", "headwater.users.distinct", "headwater.property.sum", "legacy.cpu"} <= set(names)
    assert (await (await api.get("/api/v1/metricnames?prefix=legacy")).json())["results"] == ["legacy.cpu"]
    assert (await api.get("/api/v1/health/check")).status == 204
    assert await (await api.get("/api/v1/health/status")).json() == ["JVM-Thread-Deadlock: OK", "Datastore-Query: OK"]
    assert (await (await api.get("/api/v1/version")).json())["version"].startswith("KairosDB 1.3")
    assert (await api.get("/readyz")).status == 200
    assert b"headwater_metrics_queries_total" in await (await api.get("/metrics")).read()


async def test_empty_answer_has_kairosdb_shape(api: ApiClient) -> None:
    # KairosDB 1.3.2 leaves groups without points out of a query's results.
    answer = await query(
        api, {"start_relative": {"value": 1, "unit": "minutes"}, "metrics": [{"name": "nothing.here"}]}
    )
    assert answer == {"queries": [{"sample_size": 0, "results": []}]}


async def test_more_aggregators_and_groupers_on_rollup_series(api: ApiClient, loaded: tuple[Settings, int]) -> None:
    """Signed Up on web counts 1, 2, 3, 4 in minutes 0-3 (one row in minute 0, two in the others)."""
    _, base = loaded
    window = {"start_absolute": base, "end_absolute": base + HOUR - 1}
    series = {"name": "headwater.events.count", "tags": {"source": "web", "event": "Signed Up", "resolution": "1m"}}

    async def values(**extra: Any) -> list[list[Any]]:
        answer = await query(api, {**window, "metrics": [{**series, **extra}]})
        return [r["values"] for r in answer["queries"][0]["results"]]

    hour = {"sampling": {"value": 1, "unit": "hours"}}
    assert await values(aggregators=[{"name": "diff"}]) == [[[base + m * MIN, 1] for m in (1, 2, 3)]]
    assert await values(aggregators=[{"name": "rate", "unit": "minutes"}]) == [[[base + m * MIN, 1] for m in (1, 2, 3)]]
    assert await values(aggregators=[{"name": "percentile", "percentile": 0.5, **hour}]) == [[[base, 2.5]]]
    (dev,) = await values(aggregators=[{"name": "dev", **hour}])
    assert dev[0][1] == pytest.approx((5 / 3) ** 0.5)
    assert await values(aggregators=[{"name": "sma", "size": 2}, {"name": "scale", "factor": 2}]) == [
        [[base + MIN, 3], [base + 2 * MIN, 5], [base + 3 * MIN, 7]]
    ]
    assert await values(group_by=[{"name": "value", "range_size": 2}]) == [
        [[base, 1]],
        [[base + MIN, 2], [base + 2 * MIN, 3]],
        [[base + 3 * MIN, 4]],
    ]
    assert await values(
        group_by=[{"name": "time", "range_size": {"value": 1, "unit": "minutes"}, "group_count": 2}]
    ) == [[[base, 1], [base + 2 * MIN, 3]], [[base + MIN, 2], [base + 3 * MIN, 4]]]
    gaps = await query(
        api,
        {
            "start_absolute": base,
            "end_absolute": base + 5 * MIN,
            "metrics": [{**series, "aggregators": [{"name": "gaps", "sampling": {"value": 1, "unit": "minutes"}}]}],
        },
    )
    assert gaps["queries"][0]["results"][0]["values"] == [[base + m * MIN, m + 1] for m in range(4)] + [
        [base + 4 * MIN, None],
        [base + 5 * MIN, None],
    ]
    # limit: the first two windows; sample_size counts their stored rows (1 + 2).
    limited = await query(api, {**window, "metrics": [{**series, "limit": 2}]})
    assert limited["queries"][0]["sample_size"] == 3
    assert limited["queries"][0]["results"][0]["values"] == [[base, 1], [base + MIN, 2]]
