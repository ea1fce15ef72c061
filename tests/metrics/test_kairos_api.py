"""The KairosDB surface on series written through the write API into the real Cassandra:
group_by, aggregators, limit and sample_size, exclude_tags, query/tags, tag names and values,
deletes, save_as, and request shapes Grafana's KairosDB data source sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.metrics import external
from services.metrics.api import QUERY_SERVICE
from services.metrics.app import build_app
from tests.metrics.conftest import MakeSettings

T0 = 1_795_525_200_000  # 2026-11-24 13:00 UTC
MIN = 60_000
HOUR = 3_600_000

# Two hosts in two data centres, a point a minute for ten minutes: host a counts 1..10,
# host b 10, 20, ..., 100.
POINTS = [
    {"name": "kx.cpu", "tags": {"host": "a", "dc": "east"}, "datapoints": [[T0 + i * MIN, i + 1] for i in range(10)]},
    {
        "name": "kx.cpu",
        "tags": {"host": "b", "dc": "west"},
        "datapoints": [[T0 + i * MIN, 10.0 * (i + 1)] for i in range(10)],
    },
    {"name": "kx.mem", "tags": {"host": "a", "dc": "east"}, "datapoints": [[T0, 5]]},
]


@pytest.fixture
async def api(metrics_settings: MakeSettings) -> AsyncIterator[Any]:
    settings = await metrics_settings(partitions=1)
    app = await build_app(settings, consume=False)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/api/v1/datapoints", data=orjson.dumps(POINTS))
        assert resp.status == 204, await resp.text()
        yield client


async def query(api: Any, metric: dict[str, Any], status: int = 200, **extra: Any) -> dict[str, Any]:
    body = {"start_absolute": T0, "end_absolute": T0 + HOUR, "metrics": [metric], **extra}
    resp = await api.post("/api/v1/datapoints/query", data=orjson.dumps(body))
    assert resp.status == status, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer["queries"][0] if status == 200 else answer


async def test_group_by_tag_and_aggregators_over_written_series(api: Any) -> None:
    q = await query(
        api,
        {
            "name": "kx.cpu",
            "group_by": [{"name": "tag", "tags": ["host"]}],
            "aggregators": [{"name": "sum", "sampling": {"value": 5, "unit": "MINUTES"}, "align_start_time": True}],
        },
    )
    assert q["sample_size"] == 20
    assert [(r["group_by"], r["tags"], r["values"]) for r in q["results"]] == [
        (
            [{"name": "tag", "tags": ["host"], "group": {"host": "a"}}, {"name": "type", "type": "number"}],
            {"dc": ["east"], "host": ["a"]},
            [[T0, 15], [T0 + 5 * MIN, 40]],
        ),
        (
            [{"name": "tag", "tags": ["host"], "group": {"host": "b"}}, {"name": "type", "type": "number"}],
            {"dc": ["west"], "host": ["b"]},
            [[T0, 150], [T0 + 5 * MIN, 400]],
        ),
    ]
    # Without a tag grouper both hosts are one group; without sampling, points of one time add up.
    q = await query(api, {"name": "kx.cpu", "aggregators": [{"name": "sum"}]})
    assert q["results"][0]["values"][:2] == [[T0, 11], [T0 + MIN, 22]]
    assert q["results"][0]["tags"] == {"dc": ["east", "west"], "host": ["a", "b"]}
    # Chained: per-minute sums, their rate per minute, then a 2-point moving average.
    q = await query(
        api,
        {
            "name": "kx.cpu",
            "tags": {"host": "a"},
            "aggregators": [
                {"name": "sum", "sampling": {"value": 1, "unit": "minutes"}},
                {"name": "rate", "unit": "minutes"},
                {"name": "sma", "size": 2},
            ],
        },
    )
    assert q["results"][0]["values"] == [[T0 + 2 * MIN + i * MIN, 1] for i in range(8)]


async def test_group_by_time_value_and_bin(api: Any) -> None:
    q = await query(
        api,
        {
            "name": "kx.cpu",
            "tags": {"host": "a"},
            "group_by": [{"name": "time", "range_size": {"value": 1, "unit": "MINUTES"}, "group_count": 2}],
        },
    )
    assert [(r["group_by"][0]["group"], [v for _, v in r["values"]]) for r in q["results"]] == [
        ({"group_number": 0}, [1, 3, 5, 7, 9]),
        ({"group_number": 1}, [2, 4, 6, 8, 10]),
    ]
    assert q["results"][0]["group_by"][0]["range_size"] == {"value": 1, "unit": "MINUTES"}
    q = await query(
        api,
        {
            "name": "kx.cpu",
            "tags": {"host": "a"},
            "group_by": [{"name": "value", "range_size": 4}, {"name": "tag", "tags": ["dc"]}],
        },
    )
    assert [
        ([e["name"] for e in r["group_by"]], r["group_by"][0]["group"]["group_number"], len(r["values"]))
        for r in q["results"]
    ] == [(["value", "tag", "type"], 0, 3), (["value", "tag", "type"], 1, 4), (["value", "tag", "type"], 2, 3)]
    q = await query(api, {"name": "kx.cpu", "group_by": [{"name": "bin", "bins": [5, 50]}]})
    assert [(r["group_by"][0]["group"]["bin_number"], len(r["values"])) for r in q["results"]] == [
        (0, 4),
        (1, 10),
        (2, 6),
    ]


async def test_limit_order_exclude_tags_and_alias(api: Any) -> None:
    # limit applies per series when reading (sample_size says so), then per group.
    q = await query(api, {"name": "kx.cpu", "limit": 3, "order": "desc", "exclude_tags": True, "alias": "c"})
    assert q["sample_size"] == 6
    (r,) = q["results"]
    assert "tags" not in r and r["alias"] == "c"
    assert [t for t, _ in r["values"]] == [T0 + 9 * MIN, T0 + 9 * MIN, T0 + 8 * MIN]


async def test_query_tags_tag_names_and_values(api: Any) -> None:
    body = {"start_absolute": T0, "metrics": [{"name": "kx.cpu", "tags": {"dc": "west"}}, {"name": "kx.none"}]}
    resp = await api.post("/api/v1/datapoints/query/tags", data=orjson.dumps(body))
    assert await resp.json() == {
        "queries": [
            {"results": [{"name": "kx.cpu", "tags": {"dc": ["west"], "host": ["b"]}, "values": []}]},
            {"results": [{"name": "kx.none", "tags": {}, "values": []}]},
        ]
    }
    names = (await (await api.get("/api/v1/tagnames")).json())["results"]
    assert names == ["dc", "host"]  # no rollup series in this keyspace: no events were rolled up
    values = (await (await api.get("/api/v1/tagvalues")).json())["results"]
    assert values == ["a", "b", "east", "west"]


async def test_deletes(api: Any) -> None:
    # Points of host b from minute 5 on.
    body = {
        "start_absolute": T0 + 5 * MIN,
        "end_absolute": T0 + HOUR,
        "metrics": [{"name": "kx.cpu", "tags": {"host": "b"}}],
    }
    resp = await api.post("/api/v1/datapoints/delete", data=orjson.dumps(body))
    assert resp.status == 204, await resp.text()
    q = await query(
        api,
        {
            "name": "kx.cpu",
            "group_by": [{"name": "tag", "tags": ["host"]}],
            "aggregators": [{"name": "count", "sampling": {"value": 1, "unit": "hours"}}],
        },
    )
    assert {r["group_by"][0]["group"]["host"]: r["values"][0][1] for r in q["results"]} == {"a": 10, "b": 5}
    # A whole range without tags: one range delete per day.
    body = {"start_absolute": T0, "end_absolute": T0 + 2 * MIN, "metrics": [{"name": "kx.cpu"}]}
    assert (await api.post("/api/v1/datapoints/delete", data=orjson.dumps(body))).status == 204
    assert (
        await query(
            api, {"name": "kx.cpu", "aggregators": [{"name": "count", "sampling": {"value": 1, "unit": "hours"}}]}
        )
    )["results"][0]["values"][0][1] == 15 - 6
    # The whole metric: points, name and tags gone.
    assert (await api.delete("/api/v1/metric/kx.cpu")).status == 204
    assert (await query(api, {"name": "kx.cpu"}))["results"] == []
    # gaps over no series at all still marks its periods, in one group without group_by (KairosDB).
    gaps = await query(
        api,
        {
            "name": "kx.cpu",
            "aggregators": [{"name": "gaps", "sampling": {"value": 20, "unit": "minutes"}, "align_sampling": False}],
        },
        end_absolute=T0 + HOUR,
    )
    assert gaps["results"] == [
        {
            "name": "kx.cpu",
            "tags": {},
            "values": [[T0, None], [T0 + 20 * MIN, None], [T0 + 40 * MIN, None], [T0 + 60 * MIN, None]],
        }
    ]
    assert "kx.cpu" not in (await (await api.get("/api/v1/metricnames")).json())["results"]
    assert (await api.delete("/api/v1/metric/headwater.events.count")).status == 400


async def test_save_as_writes_the_aggregated_series(api: Any) -> None:
    q = await query(
        api,
        {
            "name": "kx.cpu",
            "group_by": [{"name": "tag", "tags": ["host"]}],
            "aggregators": [
                {"name": "max", "sampling": {"value": 10, "unit": "minutes"}, "align_start_time": True},
                {"name": "save_as", "metric_name": "kx.cpu.max10m", "tags": {"kind": "rollup"}},
            ],
        },
    )
    assert [r["values"] for r in q["results"]] == [[[T0, 10]], [[T0, 100]]]
    saved = await query(api, {"name": "kx.cpu.max10m", "group_by": [{"name": "tag", "tags": ["host"]}]})
    assert [(r["tags"], r["values"]) for r in saved["results"]] == [
        ({"host": ["a"], "kind": ["rollup"], "saved_from": ["kx.cpu"]}, [[T0, 10]]),
        ({"host": ["b"], "kind": ["rollup"], "saved_from": ["kx.cpu"]}, [[T0, 100]]),
    ]


async def test_grafana_request_shapes(api: Any) -> None:
    """Bodies as grafana/kairosdb-datasource's query builder writes them: a relative or absolute
    range in ms, tags as lists, aggregators with sampling and align_sampling, a time_zone."""
    body = {
        "start_absolute": T0,
        "end_absolute": T0 + 10 * MIN,
        "time_zone": "Etc/UTC",
        "metrics": [
            {
                "name": "kx.cpu",
                "tags": {"host": ["a", "b"]},
                "limit": 10000,
                "group_by": [{"name": "tag", "tags": ["host"]}],
                "aggregators": [{"name": "avg", "align_sampling": True, "sampling": {"value": "2", "unit": "minutes"}}],
            }
        ],
    }
    resp = await api.post("/api/v1/datapoints/query", data=orjson.dumps(body))
    assert resp.status == 200, await resp.text()
    (q,) = (await resp.json())["queries"]
    assert [r["values"][0] for r in q["results"]] == [[T0, 1.5], [T0, 15]]
    # The tag pickers: metricnames, then query/tags over the dashboard's range.
    names = await (await api.get("/api/v1/metricnames", params={"prefix": "kx."})).json()
    assert names == {"results": ["kx.cpu", "kx.mem"]}
    tags = {"cache_time": 0, "metrics": [{"name": "kx.cpu", "tags": {}}], "start_absolute": 0}
    resp = await api.post("/api/v1/datapoints/query/tags", data=orjson.dumps(tags))
    assert (await resp.json())["queries"][0]["results"][0]["tags"] == {"dc": ["east", "west"], "host": ["a", "b"]}


async def test_a_limit_ends_the_read(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read page by page, a limited query stops once each matching series has its points."""
    monkeypatch.setattr(external, "PAGE_ROWS", 50)
    store = api.server.app[QUERY_SERVICE].external
    pages = 0
    real_pages = store._pages

    async def counted(*args: Any) -> AsyncIterator[list[Any]]:
        nonlocal pages
        async for rows in real_pages(*args):
            pages += 1
            yield rows

    monkeypatch.setattr(store, "_pages", counted)
    body = [{"name": "kx.long", "tags": {"host": h}, "datapoints": [[T0 + i, i] for i in range(2000)]} for h in "ab"]
    assert (await api.post("/api/v1/datapoints", data=orjson.dumps(body))).status == 204
    q = await query(api, {"name": "kx.long", "limit": 30})
    assert q["sample_size"] == 60 and len(q["results"][0]["values"]) == 30
    # The day index, the series index and two pages of 50 points, of the 80 the range holds.
    assert pages <= 4
    pages = 0
    q = await query(api, {"name": "kx.long", "tags": {"host": "b"}, "limit": 30, "order": "desc"})
    assert [v for _, v in q["results"][0]["values"]][:2] == [1999, 1998]
    assert pages <= 4
