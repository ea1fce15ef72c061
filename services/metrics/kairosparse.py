"""Parsing and validation of KairosDB 1.3 query bodies (/api/v1/datapoints/query) into
kairos.Query: times, tags, aggregators and group_by specs. Pure code.

Parsing follows KairosDB's: units in any case, an aggregator or grouper property KairosDB
does not know is an error, and so is a missing required one (div's divisor, percentile's
percentile, filter's filter_op, sma's size, save_as's metric_name).
"""

from __future__ import annotations

import math
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.metrics.aggregators import AGGREGATORS, DISTINCT, RANGE_AGGREGATORS, Aggregator, Sampling
from services.metrics.errors import QueryError
from services.metrics.groupby import BinGroupBy, PointGrouper, TagGroupBy, TimeGroupBy, ValueGroupBy
from services.metrics.kairos import MAX_TIME_MS, ROLLUP_METRICS, USERS_METRIC, MetricQuery, Query
from services.metrics.periods import UNITS, UTC, Unit

_RANGE_PROPS = {"sampling", "align_sampling", "align_start_time", "align_end_time", "time_zone", "trim"}
_PROPS: dict[str, set[str]] = {
    **{name: _RANGE_PROPS for name in (*RANGE_AGGREGATORS, DISTINCT)},
    "dev": _RANGE_PROPS | {"return_type", "dev_count"},
    "percentile": _RANGE_PROPS | {"percentile"},
    "diff": set(),
    "div": {"divisor"},
    "filter": {"filter_op", "threshold"},
    "rate": {"sampling", "unit", "time_zone"},
    "sampler": {"unit", "time_zone"},
    "save_as": {"metric_name", "tags", "ttl", "add_saved_from"},
    "scale": {"factor"},
    "sma": {"size"},
    "trim": {"trim"},
}


# --- small parsers -----------------------------------------------------------------------------


def _whole(value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, str) and value.strip().isdecimal():
        # isdecimal, not isdigit: "²" is a digit that int() refuses.
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise QueryError(f"{where} must be a whole number of at least {minimum}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise QueryError(f"{where} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QueryError(f"{where} must be a number")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise QueryError(f"{where} must be true or false")
    return value


def _unit(value: Any, where: str) -> str:
    unit = value.lower() if isinstance(value, str) else value
    if unit not in UNITS:
        raise QueryError(f"{where} must be one of {', '.join(UNITS)} (any case)")
    return str(unit)


# Durations are counted in 32 bits, as KairosDB's relative times are: periods stay in bigint.
MAX_DURATION = 2**31 - 1


def _duration(value: Any, where: str) -> tuple[int, str]:
    """A KairosDB {value, unit} as (value, unit name)."""
    if not isinstance(value, dict):
        raise QueryError(f"{where} must be an object with value and unit")
    amount = _whole(value.get("value"), f"{where}.value")
    if amount > MAX_DURATION:
        raise QueryError(f"{where}.value must be at most {MAX_DURATION}")
    return amount, _unit(value.get("unit"), f"{where}.unit")


def time_zone(value: Any, where: str = "time_zone") -> ZoneInfo:
    if not isinstance(value, str) or not value:
        raise QueryError(f"{where} must be a time zone name such as UTC or Europe/Paris")
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise QueryError(f"{where}: {value!r} is not a time zone") from None


def _absolute(value: Any, where: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_TIME_MS
    ):
        raise QueryError(f"{where} must be a time in milliseconds since the epoch")
    return int(value)


def _relative(value: Any, where: str, now_ms: int) -> int:
    amount, unit = _duration(value, where)
    try:
        # Months and years step on the calendar (UTC), as KairosDB's relative times do.
        return Unit(unit).add(now_ms, -amount)
    except (OverflowError, ValueError):
        raise QueryError(f"{where} reaches before the year 1") from None


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
        if items:  # KairosDB ignores a tag with no values
            out[str(name)] = tuple(items)
    return out


# --- aggregators -------------------------------------------------------------------------------


def _choice(value: Any, where: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in options:
        raise QueryError(f"{where} must be one of {', '.join(options)}")
    return value.lower()


def _options(name: str, spec: dict[str, Any], where: str, tz: ZoneInfo) -> dict[str, Any]:  # noqa: C901 - a table: one branch per KairosDB aggregator
    """The aggregator's own properties, validated as KairosDB validates them."""
    out: dict[str, Any] = {}
    if name == "dev":
        out["return_type"] = _choice(
            spec.get("return_type", "value"), f"{where}.return_type", ("value", "pos_sd", "neg_sd")
        )
        out["dev_count"] = _whole(spec.get("dev_count", 1), f"{where}.dev_count", 0)
    elif name == "percentile":
        if "percentile" not in spec:
            raise QueryError(f"{where}.percentile may not be zero")
        out["percentile"] = _number(spec["percentile"], f"{where}.percentile")
        if not 0 < out["percentile"] <= 1:
            raise QueryError(f"{where}.percentile must be greater than 0 and at most 1")
    elif name == "div":
        out["divisor"] = _number(spec.get("divisor", 0), f"{where}.divisor")
        if out["divisor"] == 0:
            raise QueryError(f"{where}.divisor may not be zero")
    elif name == "scale":
        out["factor"] = _number(spec.get("factor", 0), f"{where}.factor")
    elif name == "filter":
        out["filter_op"] = _choice(
            spec.get("filter_op"), f"{where}.filter_op", ("lte", "lt", "gte", "gt", "equal", "ne")
        )
        threshold = spec.get("threshold", 0.0)
        out["threshold"] = threshold if isinstance(threshold, str) else _number(threshold, f"{where}.threshold")
    elif name == "sma":
        out["size"] = _whole(spec.get("size"), f"{where}.size")
    elif name == "trim":
        if spec.get("trim") is not None:
            out["trim"] = _choice(spec["trim"], f"{where}.trim", ("first", "last", "both"))
    elif name in ("rate", "sampler"):
        zone = time_zone(spec["time_zone"], f"{where}.time_zone") if "time_zone" in spec else tz
        value, unit = 1, "milliseconds"
        if name == "rate" and spec.get("sampling") is not None:
            value, unit = _duration(spec["sampling"], f"{where}.sampling")
        if spec.get("unit") is not None:
            value, unit = 1, _unit(spec["unit"], f"{where}.unit")
        out["sampling"] = Sampling(value, Unit(unit, zone))
    elif name == "save_as":
        metric_name = spec.get("metric_name")
        if not isinstance(metric_name, str) or not metric_name.strip():
            raise QueryError(f"{where}.metric_name may not be empty")
        if metric_name in ROLLUP_METRICS:
            raise QueryError(f"{where}.metric_name: {metric_name} is written by the service itself")
        tags = spec.get("tags") or {}
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in tags.items()
        ):
            raise QueryError(f"{where}.tags must be an object of non-empty strings")
        out.update(
            metric_name=metric_name,
            tags=tags,
            ttl=_whole(spec.get("ttl", 0), f"{where}.ttl", 0),
            add_saved_from=_flag(spec.get("add_saved_from", True), f"{where}.add_saved_from"),
        )
    return out


def parse_aggregator(spec: Any, where: str, tz: ZoneInfo) -> Aggregator:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise QueryError(f"{where} must have a name")
    # Names are case-sensitive in KairosDB ("SUM" is refused); units are not.
    name = spec["name"]
    if name not in AGGREGATORS:
        raise QueryError(
            f"{where}: {spec['name']!r} is an invalid aggregator name; use one of {', '.join(AGGREGATORS)}"
        )
    unknown = sorted(set(spec) - {"name"} - _PROPS[name])
    if unknown:
        raise QueryError(
            f"{where}: property {unknown[0]!r} was specified for aggregator {name!r}, which has no such property"
        )
    options = _options(name, spec, where, tz)
    if name not in RANGE_AGGREGATORS and name != DISTINCT:
        return Aggregator(name, options=options)
    zone = time_zone(spec["time_zone"], f"{where}.time_zone") if "time_zone" in spec else tz
    sampling = Sampling(1, Unit("milliseconds", zone))
    if spec.get("sampling") is not None:
        value, unit = _duration(spec["sampling"], f"{where}.sampling")
        sampling = Sampling(value, Unit(unit, zone))
    flags = {
        flag: _flag(spec[flag], f"{where}.{flag}")
        for flag in ("align_sampling", "align_start_time", "align_end_time", "trim")
        if spec.get(flag) is not None
    }
    return Aggregator(name, sampling, spec.get("sampling") is not None, options=options, **flags)


# --- group_by ----------------------------------------------------------------------------------


def _grouper(spec: Any, where: str) -> TagGroupBy | PointGrouper:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise QueryError(f"{where} must have a name")
    name = spec["name"]
    known = {"tag": {"tags"}, "time": {"range_size", "group_count"}, "value": {"range_size"}, "bin": {"bins"}}
    if name not in known:
        raise QueryError(f"{where}: {spec['name']!r} is an invalid group_by name; use tag, time, value or bin")
    unknown = sorted(set(spec) - {"name"} - known[name])
    if unknown:
        raise QueryError(
            f"{where}: property {unknown[0]!r} was specified for group_by {name!r}, which has no such property"
        )
    if name == "tag":
        tags = spec.get("tags")
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
            raise QueryError(f"{where}.tags may not be empty: a list of tag names")
        return TagGroupBy(tuple(dict.fromkeys(tags)))
    if name == "time":
        if spec.get("range_size") is None:
            raise QueryError(f"{where}.range_size may not be null")
        value, unit = _duration(spec["range_size"], f"{where}.range_size")
        if spec.get("group_count") is None:
            raise QueryError(f"{where}.group_count must be greater than or equal to 1")
        return TimeGroupBy(value, unit, _whole(spec["group_count"], f"{where}.group_count"))
    if name == "value":
        return ValueGroupBy(_whole(spec.get("range_size"), f"{where}.range_size"))
    bins = spec.get("bins")
    if not isinstance(bins, list) or not bins:
        raise QueryError(f"{where}.bins may not be empty: a list of numbers")
    return BinGroupBy(tuple(_number(b, f"{where}.bins[]") for b in bins))


# --- the query ---------------------------------------------------------------------------------


def _metric(spec: Any, where: str, tz: ZoneInfo) -> MetricQuery:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise QueryError(f"{where}.name may not be empty")
    groupers = spec.get("group_by") or []
    if not isinstance(groupers, list):
        raise QueryError(f"{where}.group_by must be a list")
    parsed = [_grouper(g, f"{where}.group_by[{j}]") for j, g in enumerate(groupers)]
    # KairosDB groups by the first tag grouper only.
    tag_group = next((g for g in parsed if isinstance(g, TagGroupBy)), None)
    others = tuple(g for g in parsed if not isinstance(g, TagGroupBy))
    aggregators = spec.get("aggregators") or []
    if not isinstance(aggregators, list):
        raise QueryError(f"{where}.aggregators must be a list")
    aggs = tuple(parse_aggregator(a, f"{where}.aggregators[{j}]", tz) for j, a in enumerate(aggregators))
    for j, agg in enumerate(aggs):
        if agg.name == DISTINCT and (j != 0 or spec["name"] != USERS_METRIC):
            raise QueryError(f"{where}.aggregators[{j}]: 'distinct' must come first and only on {USERS_METRIC}")
    if aggs and aggs[0].name == DISTINCT and any(not isinstance(g, TimeGroupBy) for g in others):
        raise QueryError(
            f"{where}: group_by value or bin cannot split sketches; put an aggregator other than 'distinct' first"
        )
    limit = spec.get("limit")
    if limit is not None:
        limit = _whole(limit, f"{where}.limit", 0) or None
    order = spec.get("order", "asc")
    if not isinstance(order, str) or order.lower() not in ("asc", "desc"):
        raise QueryError(f"{where}.order must be asc or desc")
    alias = spec.get("alias")
    if alias is not None and not isinstance(alias, str):
        raise QueryError(f"{where}.alias must be a string")
    if spec.get("plugins"):
        raise QueryError(f"{where}.plugins: query plugins are not supported")
    return MetricQuery(
        spec["name"],
        _tags(spec.get("tags"), f"{where}.tags"),
        aggs,
        tag_group,
        others,
        limit,
        order.lower(),
        _flag(spec.get("exclude_tags", False), f"{where}.exclude_tags"),
        alias,
    )


def parse_query(body: Any, now_ms: int) -> Query:
    """Validate a /api/v1/datapoints/query body; QueryError lists what is wrong."""
    if not isinstance(body, dict):
        raise QueryError("the query must be a JSON object")
    if body.get("start_absolute") is not None:
        start = _absolute(body["start_absolute"], "start_absolute")
    elif body.get("start_relative") is not None:
        start = _relative(body["start_relative"], "start_relative", now_ms)
    else:
        raise QueryError("start_time: relative or absolute time must be set")
    if body.get("end_absolute") is not None:
        end = _absolute(body["end_absolute"], "end_absolute")
    elif body.get("end_relative") is not None:
        end = _relative(body["end_relative"], "end_relative", now_ms)
    else:
        end = now_ms
    if start < 0:
        raise QueryError("the start time may not be before the epoch (1970-01-01)")
    if end < start:
        raise QueryError("end_time must be greater than the start time")
    tz = time_zone(body["time_zone"]) if body.get("time_zone") is not None else UTC
    if body.get("plugins"):
        raise QueryError("plugins: query plugins are not supported")
    metrics = body.get("metrics")
    if not isinstance(metrics, list):
        raise QueryError("metric[] must have a size of at least 1")
    # An empty list is a query with no answers ({"queries": []}), as KairosDB has it.
    parsed = tuple(_metric(m, f"query.metric[{i}]", tz) for i, m in enumerate(metrics))
    return Query(start, end, parsed, tz)
