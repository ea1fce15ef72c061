"""The KairosDB query language subset the service answers: parsing, validation,
grouping and aggregators. Pure code; api.py feeds it stored datapoints.

Metric names served from the rollups (tags in brackets):

* ``headwater.events.count``   [source, type, event, resolution]  events per window
* ``headwater.users.distinct`` [source, type, event, resolution]  distinct userId/anonymousId,
  HLL sketches unioned across the series and partitions that fall into one group
* ``headwater.property.sum``   [source, type, event, property, resolution]  sum of a numeric property

``event`` is the track event name or the page/screen name ("" for other types).
``resolution`` picks the table (1m, 1h, 1d); without it the service picks the
coarsest one that divides the first aggregator's sampling and still covers the
range. Any other name is a series stored through POST /api/v1/datapoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.metrics.errors import QueryError
from services.metrics.rollup import RESOLUTIONS

COUNT_METRIC = "headwater.events.count"
USERS_METRIC = "headwater.users.distinct"
SUM_METRIC = "headwater.property.sum"
ROLLUP_METRICS = (COUNT_METRIC, USERS_METRIC, SUM_METRIC)

UNIT_MS: dict[str, int] = {
    "milliseconds": 1, "seconds": 1000, "minutes": 60_000, "hours": 3_600_000, "days": 86_400_000,
    "weeks": 7 * 86_400_000,
    # KairosDB steps months and years on the calendar; here they are fixed lengths (30 and 365 days).
    "months": 30 * 86_400_000, "years": 365 * 86_400_000,
}
AGGREGATORS = ("sum", "count", "avg", "min", "max", "first", "last")
# Times are Cassandra bigints.
MAX_TIME_MS = 2**63 - 1
# Headwater extension for headwater.users.distinct: union the sketches of each sampling period.
DISTINCT = "distinct"


@dataclass(frozen=True)
class Aggregator:
    name: str
    sampling_ms: int | None = None
    unit_ms: int = 1
    align_sampling: bool = False
    align_start_time: bool = False
    align_end_time: bool = False


@dataclass(frozen=True)
class MetricQuery:
    name: str
    tags: dict[str, tuple[str, ...]]
    group_by: tuple[str, ...]
    aggregators: tuple[Aggregator, ...]
    limit: int | None = None
    order: str = "asc"


@dataclass(frozen=True)
class Query:
    start_ms: int
    end_ms: int
    metrics: tuple[MetricQuery, ...]


def _duration(value: Any, where: str) -> tuple[int, int]:
    """A KairosDB {value, unit} as (ms, unit ms)."""
    if not isinstance(value, dict):
        raise QueryError(f"{where} must be an object with value and unit")
    unit = value.get("unit")
    amount = value.get("value")
    if isinstance(unit, str):
        unit = unit.lower()
    if unit not in UNIT_MS:
        raise QueryError(f"{where}.unit must be one of {', '.join(UNIT_MS)}")
    if isinstance(amount, str) and amount.strip().isdecimal():
        # isdecimal, not isdigit: "²" is a digit that int() refuses.
        try:
            amount = int(amount)
        except ValueError:
            raise QueryError(f"{where}.value must be a whole number of at least 1") from None
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
        raise QueryError(f"{where}.value must be a whole number of at least 1")
    return amount * UNIT_MS[unit], UNIT_MS[unit]


def _absolute(value: Any, where: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not 0 <= value <= MAX_TIME_MS):
        raise QueryError(f"{where} must be a time in milliseconds since the epoch")
    return int(value)


def _tags(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise QueryError(f"{where} must be an object of tag name to values")
    out: dict[str, tuple[str, ...]] = {}
    for name, values in value.items():
        items = [values] if isinstance(values, str) else values
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise QueryError(f"{where}.{name} must be a string or a list of strings")
        out[str(name)] = tuple(items)
    return out


def _aggregator(value: Any, where: str) -> Aggregator:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise QueryError(f"{where}.name must be set")
    name = value["name"].lower()
    if name not in (*AGGREGATORS, DISTINCT):
        raise QueryError(f"{where}.name {value['name']!r} is not supported; use one of "
                         f"{', '.join((*AGGREGATORS, DISTINCT))}")
    sampling_ms: int | None = None
    unit_ms = 1
    if value.get("sampling") is not None:
        sampling_ms, unit_ms = _duration(value["sampling"], f"{where}.sampling")
    flags = {}
    for flag in ("align_sampling", "align_start_time", "align_end_time"):
        flag_value = value.get(flag, False)
        if not isinstance(flag_value, bool):
            raise QueryError(f"{where}.{flag} must be true or false")
        flags[flag] = flag_value
    return Aggregator(name, sampling_ms, unit_ms, **flags)


def parse_query(body: Any, now_ms: int) -> Query:
    """Validate a /api/v1/datapoints/query body; QueryError lists what is wrong."""
    if not isinstance(body, dict):
        raise QueryError("the query must be a JSON object")
    if body.get("start_absolute") is not None:
        start = _absolute(body["start_absolute"], "start_absolute")
    elif body.get("start_relative") is not None:
        start = now_ms - _duration(body["start_relative"], "start_relative")[0]
    else:
        raise QueryError("start_absolute or start_relative is required")
    if body.get("end_absolute") is not None:
        end = _absolute(body["end_absolute"], "end_absolute")
    elif body.get("end_relative") is not None:
        end = now_ms - _duration(body["end_relative"], "end_relative")[0]
    else:
        end = now_ms
    if start < 0:
        raise QueryError("the start time may not be before the epoch (1970-01-01)")
    if end < start:
        raise QueryError("the end time must be after the start time")
    metrics = body.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        raise QueryError("metrics must be a non-empty list")
    parsed = []
    for i, metric in enumerate(metrics):
        where = f"metrics[{i}]"
        if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
            raise QueryError(f"{where}.name may not be empty")
        group_by: list[str] = []
        groupers = metric.get("group_by") or []
        if not isinstance(groupers, list):
            raise QueryError(f"{where}.group_by must be a list")
        for j, group in enumerate(groupers):
            if not isinstance(group, dict) or group.get("name") != "tag":
                raise QueryError(f"{where}.group_by[{j}]: only the 'tag' grouper is supported")
            tags = group.get("tags")
            if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
                raise QueryError(f"{where}.group_by[{j}].tags must be a non-empty list of tag names")
            group_by.extend(t for t in tags if t not in group_by)
        aggregators = metric.get("aggregators") or []
        if not isinstance(aggregators, list):
            raise QueryError(f"{where}.aggregators must be a list")
        aggs = tuple(_aggregator(a, f"{where}.aggregators[{j}]") for j, a in enumerate(aggregators))
        for j, agg in enumerate(aggs):
            if agg.name == DISTINCT and (j != 0 or metric["name"] != USERS_METRIC):
                raise QueryError(f"{where}.aggregators[{j}]: 'distinct' must come first and only on "
                                 f"{USERS_METRIC}")
        limit = metric.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise QueryError(f"{where}.limit must be a whole number")
        order = metric.get("order", "asc")
        if order not in ("asc", "desc"):
            raise QueryError(f"{where}.order must be asc or desc")
        parsed.append(MetricQuery(metric["name"], _tags(metric.get("tags"), f"{where}.tags"),
                                  tuple(group_by), aggs, limit, order))
    return Query(start, end, tuple(parsed))


def pick_resolution(metric: MetricQuery, start_ms: int, now_ms: int, retention_s: dict[str, int]) -> str:
    """The rollup table a query reads: the resolution tag, else the coarsest that fits."""
    asked = metric.tags.get("resolution")
    if asked is not None:
        if len(asked) != 1 or asked[0] not in RESOLUTIONS:
            raise QueryError(f"the resolution tag takes one of {', '.join(RESOLUTIONS)}")
        return asked[0]
    sampling = next((a.sampling_ms for a in metric.aggregators if a.sampling_ms), None)
    finest_first = list(RESOLUTIONS)
    if sampling is not None:
        fitting = [r for r in finest_first if sampling % RESOLUTIONS[r] == 0] or finest_first[:1]
        candidates = fitting[::-1] + [r for r in finest_first if r not in fitting]
    else:
        candidates = finest_first
    for res in candidates:
        if start_ms >= now_ms - retention_s[res] * 1000:
            return res
    return finest_first[-1]


# --- grouping and aggregation -----------------------------------------------------------------

Point = tuple[int, Any]


@dataclass
class Group:
    """One result: the tag values seen in it and its datapoints."""

    group: dict[str, str]
    tags: dict[str, set[str]] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)

    def add_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.tags.setdefault(k, set()).add(v)


def matches(tags: dict[str, str], wanted: dict[str, tuple[str, ...]]) -> bool:
    return all(tags.get(k) in values for k, values in wanted.items())


def group_series(metric: MetricQuery, series: Sequence[tuple[dict[str, str], Point]]) -> list[Group]:
    """Split filtered (tags, point) pairs into KairosDB tag groups."""
    groups: dict[tuple[str, ...], Group] = {}
    for tags, point in series:
        key = tuple(tags.get(t, "") for t in metric.group_by)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group({t: tags[t] for t in metric.group_by if t in tags})
        group.add_tags(tags)
        group.points.append(point)
    return [groups[k] for k in sorted(groups)]


def merge_same_time(points: list[Point], combine: Callable[[list[Any]], Any]) -> list[Point]:
    """One point per timestamp (rollup rows of several partitions and series in one group)."""
    by_ts: dict[int, list[Any]] = {}
    for ts, value in points:
        by_ts.setdefault(ts, []).append(value)
    return [(ts, combine(values)) for ts, values in sorted(by_ts.items())]


def _bucket_ts(agg: Aggregator, origin: int, size: int, index: int, first_ts: int) -> int:
    if agg.align_end_time:
        return origin + (index + 1) * size
    if agg.align_start_time or agg.align_sampling:
        return origin + index * size
    return first_ts


def buckets(agg: Aggregator, points: list[Point], start_ms: int, end_ms: int) -> list[tuple[int, list[Any]]]:
    """Cut time-ordered points into the aggregator's sampling periods."""
    if agg.sampling_ms is None:
        size, origin = end_ms - start_ms + 1, start_ms
    else:
        size = agg.sampling_ms
        # align_sampling: periods start on multiples of the sampling length (UTC), so
        # "5 minutes" gives :00, :05, ... whatever the query start is.
        origin = start_ms - start_ms % size if agg.align_sampling else start_ms
    out: list[tuple[int, list[Any]]] = []
    current = None
    for ts, value in points:
        index = (ts - origin) // size
        if current != index:
            current = index
            out.append((_bucket_ts(agg, origin, size, index, ts), []))
        out[-1][1].append(value)
    return out


def _avg(values: list[float]) -> float:
    return math.fsum(values) / len(values)


_FUNCTIONS: dict[str, Callable[[list[Any]], Any]] = {
    "sum": lambda vs: sum(vs) if all(isinstance(v, int) for v in vs) else math.fsum(vs),
    "count": len,
    "avg": _avg,
    "min": min,
    "max": max,
    "first": lambda vs: vs[0],
    "last": lambda vs: vs[-1],
}


def aggregate(agg: Aggregator, points: list[Point], start_ms: int, end_ms: int) -> list[Point]:
    """Apply one numeric aggregator (not 'distinct', which api.py runs on sketches)."""
    fn = _FUNCTIONS[agg.name]
    return [(ts, fn(values)) for ts, values in buckets(agg, points, start_ms, end_ms)]


def result(metric: MetricQuery, group: Group, points: list[Point]) -> dict[str, Any]:
    """One entry of a KairosDB "results" list."""
    if metric.order == "desc":
        points = points[::-1]
    if metric.limit:
        points = points[:metric.limit]
    group_by: list[dict[str, Any]] = []
    if metric.group_by:
        group_by.append({"name": "tag", "tags": list(metric.group_by), "group": group.group})
    group_by.append({"name": "type", "type": "number"})
    return {"name": metric.name, "group_by": group_by,
            "tags": {k: sorted(v) for k, v in sorted(group.tags.items())},
            "values": [[ts, v] for ts, v in points]}


def empty_result(metric: MetricQuery) -> dict[str, Any]:
    return {"name": metric.name, "tags": {}, "values": []}
