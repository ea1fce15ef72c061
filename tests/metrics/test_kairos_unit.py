"""The KairosDB query language, aggregators, group_by and the HTTP surface's guards, without
servers. Expected answers are worked out by hand from KairosDB 1.3.2's aggregator, grouper
and parser sources (the comments say which rule each one checks)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gzip
import io
import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from services.metrics import aggregators as aggs
from services.metrics import api as api_module
from services.metrics import groupby, kairos, kairosparse
from services.metrics.api import QUERY_SERVICE, ROUTES, add_kairos_routes
from services.metrics.errors import QueryError
from services.metrics.external import ExternalPoint
from services.metrics.metrics import make_metrics
from services.metrics.periods import Unit
from services.metrics.query import QueryService, Series, TagGroup, tag_groups
from services.metrics.settings import Settings
from services.metrics.writes import MAX_BODY_BYTES, BodyTooLarge, WriteLimits, gunzip, parse_datapoints

T0 = 1_795_525_200_000  # 2026-11-24 13:00 UTC
MIN = 60_000
HOUR = 3_600_000
MIDNIGHT = T0 - 13 * HOUR
FAR = 2**62


def body(**metric: object) -> dict[str, object]:
    return {"start_absolute": T0, "end_absolute": T0 + HOUR, "metrics": [{"name": "m", **metric}]}


def agg(spec: dict[str, Any], tz: str | None = None) -> aggs.Aggregator:
    query = {**body(aggregators=[spec]), **({"time_zone": tz} if tz else {})}
    return kairosparse.parse_query(query, T0).metrics[0].aggregators[0]


def run(
    spec: dict[str, Any], points: list[aggs.Point], start: int = T0, end: int = T0 + HOUR, tz: str | None = None
) -> list[aggs.Point]:
    return aggs.aggregate(agg(spec, tz), points, aggs.Window(start, end), FAR)


def sampled(name: str, value: int, unit: str, **flags: object) -> dict[str, Any]:
    return {"name": name, "sampling": {"value": value, "unit": unit}, **flags}


POINTS = [(T0 + 30_000, 1), (T0 + 90_000, 2), (T0 + 150_000, 3), (T0 + 610_000, 4)]


# --- parsing -----------------------------------------------------------------------------------


def test_parse_query_defaults_units_in_any_case_and_relative_times() -> None:
    q = kairosparse.parse_query(
        {
            "start_relative": {"value": "2", "unit": "HOURS"},
            "end_relative": {"value": 1, "unit": "Minutes"},
            "metrics": [{"name": "m"}],
        },
        now_ms=T0,
    )
    assert (q.start_ms, q.end_ms) == (T0 - 2 * HOUR, T0 - MIN)
    # Months step on the calendar: 2026-11-24 13:00 minus one month is 2026-10-24 13:00.
    q = kairosparse.parse_query({"start_relative": {"value": 1, "unit": "MONTHS"}, "metrics": [{"name": "m"}]}, T0)
    assert q.start_ms == T0 - 31 * 86_400_000
    m = kairosparse.parse_query(
        body(
            tags={"a": "x", "b": ["y", "z"]},
            group_by=[{"name": "tag", "tags": ["a"]}],
            aggregators=[sampled("sum", 5, "MINUTES")],
        ),
        T0,
    ).metrics[0]
    assert m.tags == {"a": ("x",), "b": ("y", "z")} and m.group_by == ("a",)
    (a,) = m.aggregators
    assert (a.name, a.sampling.value, a.sampling.unit.name, a.align_sampling) == ("sum", 5, "minutes", True)
    # An empty metrics list answers {"queries": []}, as KairosDB does.
    assert kairosparse.parse_query({"start_absolute": 1, "metrics": []}, T0).metrics == ()
    # No sampling: KairosDB's default of 1 millisecond.
    assert (agg({"name": "avg"}).sampling.value, agg({"name": "avg"}).sampling.unit.name) == (1, "milliseconds")


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"start_absolute": -1, "metrics": [{"name": "m"}]},
        {"start_absolute": True, "metrics": [{"name": "m"}]},
        body(aggregators=[sampled("sum", 0, "minutes")]),
        body(aggregators=[{"name": "sum", "align_sampling": "yes"}]),
        body(tags={"a": 1}),
        body(limit=-1),
        body(order="up"),
        body(exclude_tags="no"),
        body(aggregators=[{"name": "distinct"}]),  # only on headwater.users.distinct
        # Before the epoch, out of Cassandra's bigint, not a finite number.
        {"start_relative": {"value": 10**15, "unit": "years"}, "metrics": [{"name": "m"}]},
        {"start_relative": {"value": 60, "unit": "years"}, "metrics": [{"name": "m"}]},
        {"start_absolute": 0, "end_absolute": 2**63, "metrics": [{"name": "m"}]},
        {"start_absolute": float("inf"), "metrics": [{"name": "m"}]},
        {"start_absolute": float("nan"), "metrics": [{"name": "m"}]},
        {"start_relative": {"value": "\u00b2", "unit": "hours"}, "metrics": [{"name": "m"}]},
        body(aggregators=[sampled("sum", "\u00b2", "minutes")]),  # type: ignore[arg-type]
        body(group_by=5),
        body(group_by={"name": "tag", "tags": ["a"]}),
        # KairosDB's parser: unknown names and properties, missing required properties.
        {**body(), "time_zone": "Mars/Olympus"},
        body(aggregators=[{"name": "percentile"}]),
        body(aggregators=[{"name": "percentile", "percentile": 1.5}]),
        body(aggregators=[{"name": "div"}]),
        body(aggregators=[{"name": "div", "divisor": 0}]),
        body(aggregators=[{"name": "sma"}]),
        body(aggregators=[{"name": "filter", "threshold": 1}]),
        body(aggregators=[{"name": "sum", "samplng": {"value": 1, "unit": "hours"}}]),
        body(aggregators=[{"name": "nope"}]),
        body(aggregators=[{"name": ""}]),
        body(aggregators=[{"name": "save_as"}]),
        body(aggregators=[{"name": "save_as", "metric_name": kairos.COUNT_METRIC}]),
        body(aggregators=[{"name": "trim", "trim": "middle"}]),
        body(aggregators=[{"name": "rate", "unit": "fortnights"}]),
        body(group_by=[{"name": "time", "range_size": {"value": 1, "unit": "hours"}}]),
        body(group_by=[{"name": "time", "group_count": 2}]),
        body(group_by=[{"name": "value"}]),
        body(group_by=[{"name": "bin", "bins": []}]),
        body(group_by=[{"name": "tag", "tags": []}]),
        body(group_by=[{"name": "colour"}]),
        body(group_by=[{}]),
        body(plugins=[{"name": "x"}]),
        # Names are case-sensitive in KairosDB (units are not).
        body(aggregators=[sampled("SUM", 1, "hours")]),
        body(group_by=[{"name": "TAG", "tags": ["a"]}]),
    ],
)
def test_parse_query_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(QueryError) as info:
        kairosparse.parse_query(bad, T0)
    assert info.value.errors and all(info.value.errors)


# --- range aggregators -------------------------------------------------------------------------


def test_default_sampling_keeps_every_point_and_combines_equal_times() -> None:
    points = [(T0 + 1, 1), (T0 + 1, 2), (T0 + 5, 3)]
    assert run({"name": "sum"}, points) == [(T0 + 1, 3.0), (T0 + 5, 3.0)]
    assert run({"name": "count"}, points) == [(T0 + 1, 2), (T0 + 5, 1)]
    assert run({"name": "sum"}, [(1, 0.1), (2, 0.2)], 0, 10) == [(1, 0.1), (2, 0.2)]


def test_periods_count_from_the_query_start_without_align_sampling() -> None:
    start = T0 + 20_000
    spec = sampled("sum", 5, "minutes", align_sampling=False)
    # [T0+20s, T0+5m20s) holds 1, 2, 3; [T0+5m20s, T0+10m20s) holds 4; each stamped at its first point.
    assert run(spec, POINTS, start) == [(T0 + 30_000, 6.0), (T0 + 610_000, 4.0)]
    assert run({**spec, "align_start_time": True}, POINTS, start) == [(start, 6.0), (start + 5 * MIN, 4.0)]
    assert run({**spec, "align_end_time": True}, POINTS, start) == [(start + 5 * MIN, 6.0), (start + 10 * MIN, 4.0)]


def test_align_sampling_is_on_by_default_and_starts_at_midnight() -> None:
    # Minutes align to the start of the query's day (KairosDB's alignRangeBoundary), then step
    # 7 minutes: 13:00 is 780 minutes in, so the periods around it start at 12:57 and 13:04.
    spec = sampled("sum", 7, "minutes")
    assert run(spec, POINTS) == [(T0 + 30_000, 6.0), (T0 + 610_000, 4.0)]
    assert run({**spec, "align_start_time": True}, POINTS) == [(T0 - 3 * MIN, 6.0), (T0 + 4 * MIN, 4.0)]
    assert run({**spec, "align_sampling": False, "align_start_time": True}, POINTS) == [(T0, 6.0), (T0 + 7 * MIN, 4.0)]
    assert Unit("hours").align(T0 + 20_000) == MIDNIGHT
    assert Unit("milliseconds").align(T0 + 20_123) == T0 + 20_000


def test_each_range_aggregator() -> None:
    spec = {"sampling": {"value": 10, "unit": "minutes"}, "align_start_time": True}
    whole = [(T0, v) for v in (2, 4, 4, 4, 5, 5, 7, 9)]
    points = [(T0 + i * 1000, v) for i, (_, v) in enumerate(whole)]
    answers = {
        name: run({"name": name, **spec}, points) for name in ("avg", "count", "min", "max", "sum", "first", "last")
    }
    assert answers == {
        "avg": [(T0, 5.0)],
        "count": [(T0, 8)],
        "min": [(T0, 2.0)],
        "max": [(T0, 9.0)],
        "sum": [(T0, 40.0)],
        "first": [(T0, 2)],
        "last": [(T0, 9)],
    }
    # Sample standard deviation: 32 / 7 around a mean of 5.
    std = math.sqrt(32 / 7)
    (dev,) = run({"name": "dev", **spec}, points)
    assert dev[1] == pytest.approx(std)
    (pos,) = run({"name": "dev", "return_type": "pos_sd", "dev_count": 2, **spec}, points)
    assert pos[1] == pytest.approx(5 + 2 * std)
    assert run({"name": "dev", **spec}, points[:1]) == [(T0, 0.0)]
    # percentile: position p * (n + 1) among the sorted values, interpolated.
    tens = [(T0 + i, i) for i in range(1, 11)]
    assert [run({"name": "percentile", "percentile": p, **spec}, tens)[0][1] for p in (0.5, 0.95, 0.05)] == [5.5, 10, 1]


def test_first_and_last_keep_their_point_times_unless_aligned() -> None:
    spec = sampled("last", 5, "minutes", align_sampling=False)
    pts = [(T0 + 30_000, 1), (T0 + 90_000, 2)]
    assert run(spec, pts) == [(T0 + 90_000, 2)]
    assert run({**spec, "align_start_time": True}, pts) == [(T0, 2)]
    assert run({**spec, "name": "first"}, pts) == [(T0 + 30_000, 1)]


def test_least_squares_answers_the_line_at_the_first_and_last_point() -> None:
    line = [(0, 1), (1000, 3), (2000, 5), (3000, 7)]
    spec = sampled("least_squares", 1, "hours")
    assert run(spec, line, 0, HOUR) == [(0, pytest.approx(1)), (3000, pytest.approx(7))]
    assert run(spec, line[:2], 0, HOUR) == line[:2]  # two points or fewer come back as they are


def test_least_squares_rounds_as_kairosdb_does() -> None:
    # KairosDB 1.3.2's answer for these six points (Commons Math's SimpleRegression loses the
    # same bits on millisecond timestamps), taken from a side-by-side run.
    t, t2 = 1_795_000_013_123, 1_795_000_434_123
    points = [(t, 1), (t, 1), (t, 100), (t2, 2), (t2, 3.5), (t2, 200)]
    assert run(sampled("least_squares", 20, "minutes"), points, t, t + HOUR) == [
        (t, 33.99999997019768),
        (t2, 68.49999997019768),
    ]
    # Points of one time only: no line; KairosDB fails the query, this a 400 when answering.
    assert all(math.isnan(v) for _, v in run({"name": "least_squares"}, points[:3], t, t + HOUR))


def test_tag_filters_without_values_are_ignored_and_missing_group_tags_are_empty() -> None:
    m = kairosparse.parse_query(body(tags={"host": [], "dc": "east"}), T0).metrics[0]
    assert m.tags == {"dc": ("east",)}
    m = kairosparse.parse_query(body(group_by=[{"name": "tag", "tags": ["host", "nope"]}]), T0).metrics[0]
    (group,) = tag_groups(m, [Series({"host": "a"})])
    assert group.group == {"host": "a", "nope": ""}


def test_points_of_one_time_merge_in_value_order() -> None:
    """KairosDB merges a group's series ordered by time, then value (descending for desc)."""
    service = QueryService(
        SimpleNamespace(),  # type: ignore[arg-type]
        SimpleNamespace(),  # type: ignore[arg-type]
        Settings(),
        make_metrics(CollectorRegistry()),
    )
    group = TagGroup({}, series=[Series({"h": "a"}, {1: [7], 2: [1]}), Series({"h": "b"}, {1: [3.5], 2: [9]})])
    asc = kairosparse.parse_query(body(), T0).metrics[0]
    desc = kairosparse.parse_query(body(order="desc"), T0).metrics[0]
    assert service._group_points(asc, group, False) == [(1, 3.5), (1, 7), (2, 1), (2, 9)]
    assert service._group_points(desc, group, False) == [(2, 9), (2, 1), (1, 7), (1, 3.5)]


def test_gaps_marks_every_empty_period_up_to_the_query_end() -> None:
    spec = sampled("gaps", 1, "minutes", align_sampling=False)
    out = run(spec, [(T0, 1), (T0 + 2 * MIN, 2)], T0, T0 + 5 * MIN)
    assert out == [
        (T0, 1),
        (T0 + MIN, None),
        (T0 + 2 * MIN, 2),
        (T0 + 3 * MIN, None),
        (T0 + 4 * MIN, None),
        (T0 + 5 * MIN, None),
    ]
    with pytest.raises(QueryError):
        aggs.aggregate(agg(sampled("gaps", 1, "milliseconds")), [], aggs.Window(0, 10**9, max_points=1000), FAR)


def test_a_descending_query_puts_later_points_into_the_first_period() -> None:
    # KairosDB's range iterator takes points while they are before the period's end.
    desc = [(T0 + 2 * MIN, 3), (T0 + MIN, 2), (T0, 1)]
    assert run(sampled("sum", 1, "minutes"), desc) == [(T0 + 2 * MIN, 6.0)]


async def test_calendar_units_far_in_the_future_are_a_400_not_a_crash() -> None:
    with pytest.raises(OverflowError):
        run(sampled("sum", 1, "months"), [(2**62, 1)], 2**62 - 1000, 2**62 + 1000)

    async def read(*_: object, **__: object) -> list[ExternalPoint]:
        return [ExternalPoint(2**62, '{"h":"a"}', 1.0, True)]

    service = QueryService(
        SimpleNamespace(),  # type: ignore[arg-type]
        SimpleNamespace(read=read),  # type: ignore[arg-type]
        Settings(),
        make_metrics(CollectorRegistry()),
    )
    with pytest.raises(QueryError) as info:
        await service.run(
            {
                "start_absolute": 2**62 - 1000,
                "end_absolute": 2**62 + 1000,
                "metrics": [{"name": "far", "aggregators": [sampled("sum", 1, "months")]}],
            },
            T0,
        )
    assert "calendar" in info.value.errors[0]


def test_calendar_months_and_time_zones() -> None:
    def ms(year: int, month: int, day: int, hour: int = 0, tz: dt.tzinfo = dt.UTC) -> int:
        return int(dt.datetime(year, month, day, hour, tzinfo=tz).timestamp() * 1000)

    jan = ms(2025, 1, 1)
    points = [(ms(2025, 1, 31, 12), 1), (ms(2025, 2, 15), 2), (ms(2025, 2, 28, 23), 3), (ms(2025, 3, 1), 4)]
    assert run(sampled("sum", 1, "months", align_start_time=True), points, jan, ms(2025, 4, 1)) == [
        (jan, 1.0),
        (ms(2025, 2, 1), 5.0),
        (ms(2025, 3, 1), 4.0),
    ]
    # Days in Europe/Paris: periods start at local midnight (23:00 UTC in winter).
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    day_points = [(ms(2025, 1, 1, 22), 1), (ms(2025, 1, 1, 23), 2)]
    assert run(
        sampled("sum", 1, "days", align_start_time=True), day_points, ms(2025, 1, 1), ms(2025, 1, 3), tz="Europe/Paris"
    ) == [(ms(2025, 1, 1, tz=paris), 1.0), (ms(2025, 1, 2, tz=paris), 2.0)]
    assert Unit("months").add(ms(2025, 1, 31), 1) == ms(2025, 2, 28)
    assert Unit("months").between(ms(2025, 1, 31), ms(2025, 2, 28)) == 1
    assert Unit("years").between(ms(2024, 2, 29), ms(2025, 2, 28)) == 1


# --- the other aggregators and chains ----------------------------------------------------------


def test_diff_rate_sampler_div_scale_filter_sma_trim() -> None:
    pts = [(1000, 1), (2000, 3), (3000, 5)]
    assert run({"name": "diff"}, pts) == [(2000, 2.0), (3000, 2.0)]
    assert run({"name": "rate", "unit": "SECONDS"}, [(0, 0), (1000, 5), (3000, 9)]) == [(1000, 5.0), (3000, 2.0)]
    assert run({"name": "rate", "sampling": {"value": 2, "unit": "seconds"}}, [(0, 0), (1000, 5)]) == [(1000, 10.0)]
    assert run({"name": "rate"}, [(0, 0), (1000, 5)]) == [(1000, 0.005)]  # per millisecond by default
    assert run({"name": "sampler", "unit": "seconds"}, [(0, 0), (1000, 5), (3000, 9)]) == [(1000, 5.0), (3000, 4.5)]
    with pytest.raises(QueryError):
        run({"name": "rate", "unit": "seconds"}, [(0, 1), (0, 2)])
    assert run({"name": "div", "divisor": 2}, pts) == [(1000, 0.5), (2000, 1.5), (3000, 2.5)]
    assert run({"name": "scale", "factor": 3}, pts) == [(1000, 3.0), (2000, 9.0), (3000, 15.0)]
    # filter drops the points the comparison holds for.
    assert run({"name": "filter", "filter_op": "LT", "threshold": 3}, pts) == [(2000, 3), (3000, 5)]
    assert run({"name": "filter", "filter_op": "ne", "threshold": 3}, pts) == [(2000, 3)]
    assert run({"name": "sma", "size": 2}, pts) == [(2000, 2.0), (3000, 4.0)]
    assert run({"name": "sma", "size": 5}, pts) == []
    assert [run({"name": "trim", "trim": t}, pts) for t in ("first", "last", "both")] == [pts[1:], pts[:-1], pts[1:2]]
    assert run({"name": "trim"}, pts) == pts  # no trim property: nothing trimmed


def test_aggregators_chain_in_order() -> None:
    query = kairosparse.parse_query(
        body(aggregators=[sampled("sum", 1, "minutes"), {"name": "diff"}, {"name": "scale", "factor": 10}]), T0
    )
    points: list[aggs.Point] = [(T0 + 1, 1), (T0 + 2, 1), (T0 + MIN + 5, 5), (T0 + 2 * MIN, 4)]
    for a in query.metrics[0].aggregators:
        points = aggs.aggregate(a, points, aggs.Window(T0, T0 + HOUR), FAR)
    assert points == [(T0 + MIN + 5, 30.0), (T0 + 2 * MIN, -10.0)]


# --- group_by ----------------------------------------------------------------------------------

KAIROS_START = 1375202962764  # KairosDB's own group_by test data: ten points 2 ms apart, values 1..10
KAIROS_POINTS = [(KAIROS_START + 2 * i, i + 1) for i in range(10)]


def test_time_value_and_bin_groups_with_their_entries() -> None:
    m = kairosparse.parse_query(
        {
            "start_absolute": KAIROS_START,
            "end_absolute": KAIROS_START + 18,
            "metrics": [
                {
                    "name": "m",
                    "group_by": [
                        {"name": "time", "group_count": "2", "range_size": {"value": "2", "unit": "milliseconds"}}
                    ],
                }
            ],
        },
        T0,
    ).metrics[0]
    groups = groupby.split(list(m.groupers), KAIROS_START, KAIROS_POINTS)
    assert [(e, [v for _, v in pts]) for e, pts in groups] == [
        (
            [
                {
                    "name": "time",
                    "range_size": {"value": 2, "unit": "MILLISECONDS"},
                    "group_count": 2,
                    "group": {"group_number": 0},
                }
            ],
            [1, 3, 5, 7, 9],
        ),
        (
            [
                {
                    "name": "time",
                    "range_size": {"value": 2, "unit": "MILLISECONDS"},
                    "group_count": 2,
                    "group": {"group_number": 1},
                }
            ],
            [2, 4, 6, 8, 10],
        ),
    ]
    by_value = groupby.split([groupby.ValueGroupBy(5)], KAIROS_START, KAIROS_POINTS)
    assert [(e[0]["group"]["group_number"], [v for _, v in p]) for e, p in by_value] == [
        (0, [1, 2, 3, 4]),
        (1, [5, 6, 7, 8, 9]),
        (2, [10]),
    ]
    assert by_value[0][0] == [{"name": "value", "range_size": 5, "group": {"group_number": 0}}]
    by_bin = groupby.split([groupby.BinGroupBy((2.0, 5.5))], KAIROS_START, KAIROS_POINTS)
    assert [(e[0]["group"]["bin_number"], len(p)) for e, p in by_bin] == [(0, 1), (1, 4), (2, 5)]
    assert by_bin[0][0][0]["bins"] == [2, 5.5]
    # Java's integer division: -7 / 5 is -1.
    assert groupby.ValueGroupBy(5).group_id(0, (0, -7.9)) == -1
    assert groupby.TimeGroupBy(1, "months", 12).group_id(0, (40 * 86_400_000, 1)) == 1


def test_resolution_choice_needs_whole_windows() -> None:
    retention = {"1m": 7 * 86_400, "1h": 90 * 86_400, "1d": 730 * 86_400}

    def pick(start: int, **metric: object) -> str:
        return kairos.pick_resolution(kairosparse.parse_query(body(**metric), T0).metrics[0], start, T0, retention)

    assert pick(T0 - HOUR, aggregators=[sampled("sum", 2, "hours")]) == "1h"
    assert pick(T0 - HOUR, aggregators=[sampled("sum", 90, "seconds")]) == "1m"
    assert pick(T0 - HOUR - 1000, aggregators=[sampled("sum", 2, "hours")]) == "1m"  # start inside a minute
    assert pick(MIDNIGHT, aggregators=[sampled("sum", 1, "days")]) == "1d"
    # Periods from a query start at 13:00 without alignment: hours, not days.
    assert pick(T0 - 86_400_000, aggregators=[sampled("sum", 1, "days", align_sampling=False)]) == "1h"
    assert pick(T0 - 30 * 86_400_000) == "1h"  # past the minutes' retention
    assert pick(T0, tags={"resolution": "1d"}) == "1d"


# --- the write format --------------------------------------------------------------------------


def test_write_format_validation() -> None:
    rows = parse_datapoints(
        [
            {"name": "a", "tags": {"h": "x"}, "datapoints": [[1, 2], [2, 2.5]], "ttl": 60},
            {"name": "b", "tags": {"h": "y"}, "timestamp": 3, "value": 1, "ttl": 0},
        ]
    )
    assert rows == [
        ("a", 1, '{"h":"x"}', 2.0, True, 60),
        ("a", 2, '{"h":"x"}', 2.5, False, 60),
        ("b", 3, '{"h":"y"}', 1.0, True, None),
    ]
    with pytest.raises(QueryError) as info:
        parse_datapoints(
            [
                {"name": "a", "tags": {}, "datapoints": [[1, 2]]},
                {"name": "headwater.events.count", "tags": {"h": "x"}, "datapoints": [[1, 2]]},
                {"name": "c", "tags": {"h": "x"}, "datapoints": [[1, "v"], [-5, 1]]},
            ]
        )
    assert len(info.value.errors) == 4
    # As KairosDB: a metric without points stores nothing, a TTL of 0 or below is none, a
    # timestamp may come as a string of digits.
    assert parse_datapoints(
        [{"name": "a", "tags": {"h": "x"}}, {"name": "a", "tags": {"h": "x"}, "ttl": -1, "datapoints": [["7", 1]]}]
    ) == [("a", 7, '{"h":"x"}', 1.0, True, None)]


def test_write_format_keeps_to_cassandra_limits_and_the_caps() -> None:
    ok = parse_datapoints([{"name": "a", "tags": {"h": "x"}, "datapoints": [[2**63 - 1, 1]], "ttl": 630_720_000}])
    assert ok == [("a", 2**63 - 1, '{"h":"x"}', 1.0, True, 630_720_000)]
    limits = WriteLimits(points=3, metrics=2, tags=2)
    for bad in (
        [{"name": "a", "tags": {"h": "x"}, "datapoints": [[2**63, 1]]}],
        [{"name": "a", "tags": {"h": "x"}, "datapoints": [[1, 1]], "ttl": 630_720_001}],
        [{"name": "a", "tags": {"h": "x"}, "datapoints": [[i, 1] for i in range(4)]}],
        [{"name": n, "tags": {"h": "x"}, "datapoints": [[1, 1]]} for n in "abc"],
        [{"name": "a", "tags": {"h": "x", "i": "y", "j": "z"}, "datapoints": [[1, 1]]}],
        [{"name": "a", "type": "string", "tags": {"h": "x"}, "datapoints": [[1, 1]]}],
    ):
        with pytest.raises(QueryError) as info:
            parse_datapoints(bad, limits)
        assert info.value.errors


# --- HTTP guards on routes whose store must not be reached --------------------------------------


async def _ready() -> tuple[bool, str]:
    return True, "ok"


@pytest.fixture
async def bare_api() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The KairosDB routes on a store that must not be reached (bodies refused before any write)."""
    async with _bare(Settings()) as client:
        yield client


class _bare:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> TestClient[web.Request, web.Application]:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        service = QueryService(
            SimpleNamespace(),  # type: ignore[arg-type]
            SimpleNamespace(),  # type: ignore[arg-type]
            self.settings,
            make_metrics(CollectorRegistry()),
        )
        add_kairos_routes(app, service, SimpleNamespace(ready=_ready))  # type: ignore[arg-type]
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        return self.client

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()


async def test_a_gzip_bomb_is_refused_without_inflating_it(bare_api: TestClient[web.Request, web.Application]) -> None:
    bomb = gzip.compress(b" " * (MAX_BODY_BYTES + 1))
    assert len(bomb) < 100_000
    resp = await bare_api.post("/api/v1/datapoints", data=bomb, headers={"Content-Type": "application/gzip"})
    assert resp.status == 413, await resp.text()
    assert (await resp.json())["errors"]
    with pytest.raises(BodyTooLarge):
        gunzip(gzip.compress(b"12345678"), limit=7)
    assert gunzip(gzip.compress(b"[1,") + gzip.compress(b"2]"), limit=5) == b"[1,2]"
    resp = await bare_api.post("/api/v1/datapoints", data=io.BytesIO(b" " * (MAX_BODY_BYTES + 1)))
    assert resp.status == 413 and (await resp.json())["errors"]


@pytest.mark.parametrize("data", [b"\x1f\x8b\x08\x00garbage-not-deflate", gzip.compress(b"[1, 2]")[:-6], b"plain text"])
async def test_a_corrupt_gzip_body_is_a_kairosdb_400(
    bare_api: TestClient[web.Request, web.Application], data: bytes
) -> None:
    resp = await bare_api.post("/api/v1/datapoints", data=data, headers={"Content-Type": "application/gzip"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["errors"]


async def test_bad_bodies_are_kairosdb_400s(bare_api: TestClient[web.Request, web.Application]) -> None:
    bodies = [
        {"start_relative": {"value": 10**15, "unit": "years"}, "metrics": [{"name": "m"}]},
        {"start_relative": {"value": "\u00b2", "unit": "hours"}, "metrics": [{"name": "m"}]},
        {"start_absolute": 1, "metrics": 5},
    ]
    for path, bads in (
        ("/api/v1/datapoints/query", [*bodies, body(group_by=5)]),
        ("/api/v1/datapoints/query/tags", bodies),
        ("/api/v1/datapoints/delete", [*bodies, body(name=kairos.COUNT_METRIC)]),
    ):
        for bad in bads:
            resp = await bare_api.post(path, data=orjson.dumps(bad))
            assert resp.status == 400, (path, bad, await resp.text())
            assert (await resp.json())["errors"]
    resp = await bare_api.get("/api/v1/datapoints/query", params={"query": "{nope"})
    assert resp.status == 400 and (await resp.json())["errors"]
    # Rollup series are derived: they cannot be deleted.
    resp = await bare_api.delete(f"/api/v1/metric/{kairos.USERS_METRIC}")
    assert resp.status == 400 and "derived" in (await resp.json())["errors"][0]
    resp = await bare_api.get("/api/v1/no/such/route")
    assert resp.status == 404 and (await resp.json())["errors"]


async def test_a_write_with_one_bad_point_writes_nothing(bare_api: TestClient[web.Request, web.Application]) -> None:
    # bare_api's store has no write method: reaching it would be a 500.
    for bad in (
        {"name": "a", "tags": {"h": "x"}, "datapoints": [[2**63, 1]]},
        {"name": "a", "tags": {"h": "x"}, "datapoints": [[1, 1]], "ttl": 630_720_001},
    ):
        good = {"name": "a", "tags": {"h": "y"}, "datapoints": [[T0, 1]]}
        resp = await bare_api.post("/api/v1/datapoints", data=orjson.dumps([good, bad]))
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["errors"]


async def test_health_status_is_a_list_of_strings(bare_api: TestClient[web.Request, web.Application]) -> None:
    resp = await bare_api.get("/api/v1/health/status")
    assert await resp.json() == ["JVM-Thread-Deadlock: OK", "Datastore-Query: OK"]
    assert (await bare_api.get("/api/v1/health/check")).status == 204
    assert (await (await bare_api.get("/api/v1/version")).json())["version"].startswith("KairosDB 1.3")


async def test_every_endpoint_answers_a_preflight() -> None:
    settings = Settings(
        api_cors_origins=("https://grafana.example",), api_user=SecretStr("u"), api_password=SecretStr("p")
    )
    async with _bare(settings) as c:
        for path, methods in ROUTES.items():
            url = path.replace("{name}", "legacy.cpu")
            for method in methods:
                resp = await c.options(
                    url,
                    headers={
                        "Origin": "https://grafana.example",
                        "Access-Control-Request-Method": method,
                        "Access-Control-Request-Headers": "authorization,content-type",
                    },
                )
                assert resp.status == 200, (url, method)
                assert resp.headers["Access-Control-Allow-Origin"] == "https://grafana.example"
                assert method in resp.headers["Access-Control-Allow-Methods"]
                assert resp.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
                assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        resp = await c.options(
            "/api/v1/datapoints/query",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert resp.status == 403 and (await resp.json())["errors"]
        resp = await c.get("/api/v1/version", headers={"Origin": "https://evil.example"})
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    async with _bare(Settings()) as c:  # KairosDB's default: any origin
        resp = await c.get("/api/v1/version", headers={"Origin": "https://any.example"})
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_basic_auth_guards_writes_always_and_reads_when_asked(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "s3cret-Pa55"
    bad_write = orjson.dumps([{"name": "a", "tags": {}, "datapoints": [[1, 1]]}])
    async with _bare(Settings(api_user=SecretStr("grafana"), api_password=SecretStr(secret))) as c:
        for headers in ({}, _basic("grafana", "wrong"), _basic("other", secret), {"Authorization": "Basic !!"}):
            for resp in (
                await c.post("/api/v1/datapoints", data=bad_write, headers=headers),
                await c.post("/api/v1/datapoints/delete", data=b"{}", headers=headers),
                await c.delete("/api/v1/metric/x", headers=headers),
            ):
                assert resp.status == 401, await resp.text()
                assert resp.headers["WWW-Authenticate"].startswith("Basic")
                assert secret not in await resp.text()
        # The right credentials get past the guard (to the validation, which refuses the body).
        resp = await c.post("/api/v1/datapoints", data=bad_write, headers=_basic("grafana", secret))
        assert resp.status == 400
        assert (await c.get("/api/v1/version")).status == 200  # reads open by default
        # save_as writes: it needs the write credentials even on an open read.
        resp = await c.post(
            "/api/v1/datapoints/query",
            data=orjson.dumps(body(aggregators=[{"name": "save_as", "metric_name": "copy"}])),
        )
        assert resp.status == 401
    async with _bare(Settings(api_user=SecretStr("grafana"), api_password=SecretStr(secret), api_auth_reads=True)) as c:
        resp = await c.get("/api/v1/version", headers={"Origin": "https://grafana.example"})
        # A browser must see the 401 itself, not a CORS failure.
        assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "*"
        assert (await c.get("/api/v1/version", headers=_basic("grafana", secret))).status == 200
        assert (await c.options("/api/v1/version")).status == 200  # preflights carry no credentials
    assert secret not in caplog.text
    logged = capsys.readouterr()
    assert "request refused" in logged.out + logged.err + caplog.text
    assert secret not in logged.out + logged.err
    assert base64.b64encode(f"grafana:{secret}".encode()).decode() not in logged.out + logged.err + caplog.text
    assert secret not in repr(Settings(api_user=SecretStr("grafana"), api_password=SecretStr(secret)))


def test_compose_turns_auth_on_for_the_api_and_grafana() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2] / "compose"
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    env = services["metrics"]["environment"]
    assert env["HEADWATER_METRICS_HTTP_HOST"] == "0.0.0.0"  # inside its container
    assert env["HEADWATER_METRICS_API_AUTH_READS"] == "true"
    # The password comes from the operator's environment; compose refuses to start without it.
    assert env["HEADWATER_METRICS_API_PASSWORD"].startswith("${METRICS_API_PASSWORD:?")
    assert services["grafana"]["environment"]["METRICS_API_PASSWORD"] == env["HEADWATER_METRICS_API_PASSWORD"]
    (kairos_source,) = [
        s
        for s in yaml.safe_load((root / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())[
            "datasources"
        ]
        if s["type"] == "grafana-kairosdb-datasource"
    ]
    assert kairos_source["basicAuth"] is True
    assert kairos_source["secureJsonData"]["basicAuthPassword"] == "${METRICS_API_PASSWORD}"


async def test_sketch_reads_get_an_eighth_of_the_row_budget() -> None:
    limits: list[int] = []

    class Store:
        async def all_series(self) -> list[tuple[str, str, str, frozenset[str]]]:
            return [("web", "track", "x", frozenset())]

        async def read_windows(
            self, res: str, source: str, start: int, end: int, limit: int, event: str | None = None
        ) -> list[Any]:
            limits.append(limit)
            return []

    service = QueryService(
        Store(),  # type: ignore[arg-type]
        SimpleNamespace(),  # type: ignore[arg-type]
        Settings(query_max_rows=80_000),
        make_metrics(CollectorRegistry()),
    )
    for name in (kairos.COUNT_METRIC, kairos.USERS_METRIC):
        await service.run(
            {
                "start_absolute": T0,
                "end_absolute": T0 + HOUR,
                "metrics": [{"name": name, "tags": {"resolution": "1m"}}],
            },
            T0 + HOUR,
        )
    assert limits == [80_000, 10_000]


async def test_a_trickled_large_body_gives_up_its_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_module, "LARGE_BODY_READ_S", 0.3)

    async def trickle() -> AsyncIterator[bytes]:
        yield b"[" + b" " * 1000
        await asyncio.sleep(2)
        yield b"]"

    async with _bare(Settings()) as c:
        resp = await c.post("/api/v1/datapoints", data=trickle())
        assert resp.status == 408 and (await resp.json())["errors"]
        # While another large body has the turn, the next one is told to come back.
        service = c.app[QUERY_SERVICE]
        async with service.large_bodies:
            resp = await c.post("/api/v1/datapoints", data=io.BytesIO(b"[" + b" " * 300_000 + b"]"))
        assert resp.status == 503 and resp.headers["Retry-After"]
        resp = await c.post("/api/v1/datapoints", data=io.BytesIO(b"[" + b" " * 300_000 + b"]"))
        assert resp.status == 204  # an empty list: nothing to store
