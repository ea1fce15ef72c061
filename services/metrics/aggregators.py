"""KairosDB 1.3 aggregators over one group's data points. Pure code.

Points are ``(time ms, value)`` in the group's order (ascending unless the query asked for
``desc``). Semantics follow KairosDB 1.3.2 (worked out from its source; the tests write the
expected answers down):

* Range aggregators (sum, count, avg, min, max, first, last, dev, percentile, least_squares,
  gaps, and Headwater's distinct) cut the points into sampling periods counted from the query
  start; ``align_sampling`` (on by default, as in KairosDB) first moves that start back to
  the year, month, Monday, day (for days, hours, minutes and seconds) or second (for
  milliseconds) it falls in, in the query's time zone. The default sampling is 1
  millisecond, so an aggregator without sampling combines only points of the same time.
* A period's value is stamped with the time of its first point, or the period's start
  (``align_start_time``) or end (``align_end_time``); ``last`` keeps its own point's time
  unless aligned; least_squares answers the fitted line at the first and last point.
* A period takes points while they are before its end: in a descending query KairosDB puts
  every later point into the first period, and so does this code.
* diff, rate and sampler answer one point fewer than they get, at the later point's time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.metrics.errors import QueryError
from services.metrics.periods import UTC, Unit

Point = tuple[int, Any]

RANGE_AGGREGATORS = ("avg", "count", "dev", "first", "gaps", "last", "least_squares", "max", "min", "percentile", "sum")
# Headwater extension for headwater.users.distinct: union the sketches of each sampling period.
DISTINCT = "distinct"
OTHER_AGGREGATORS = ("diff", "div", "filter", "rate", "sampler", "save_as", "scale", "sma", "trim")
AGGREGATORS = (*RANGE_AGGREGATORS, DISTINCT, *OTHER_AGGREGATORS)


@dataclass(frozen=True)
class Sampling:
    value: int = 1
    unit: Unit = field(default_factory=lambda: Unit("milliseconds", UTC))

    def json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit.name}


@dataclass(frozen=True)
class Aggregator:
    """One parsed aggregator: its name, sampling and flags, and its own options."""

    name: str
    sampling: Sampling = field(default_factory=Sampling)
    sampling_given: bool = False
    align_sampling: bool = True
    align_start_time: bool = False
    align_end_time: bool = False
    trim: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_range(self) -> bool:
        return self.name in RANGE_AGGREGATORS or self.name == DISTINCT


@dataclass(frozen=True)
class Window:
    """The query's time range as aggregators see it."""

    start_ms: int
    end_ms: int
    # Most points an aggregator may produce (gaps marks every empty period).
    max_points: int = 1_000_000


def _num(value: Any) -> float:
    return float(value)


def _numbers(points: Sequence[Point]) -> list[Point]:
    return [p for p in points if isinstance(p[1], int | float) and not isinstance(p[1], bool)]


# --- range aggregators -------------------------------------------------------------------------


def _range_origin(agg: Aggregator, window: Window) -> int:
    unit = agg.sampling.unit
    return unit.align(window.start_ms) if agg.align_sampling else window.start_ms


def _bounds(agg: Aggregator, origin: int, ms: int) -> tuple[int, int]:
    """The sampling period holding ``ms``: [start, end)."""
    unit, size = agg.sampling.unit, agg.sampling.value
    whole = unit.between(origin, ms) if ms >= origin else -unit.between(ms, origin)
    n = int(whole / size)  # Java's division: towards zero
    return unit.add(origin, n * size), unit.add(origin, (n + 1) * size)


def periods(agg: Aggregator, points: Sequence[Point], window: Window) -> Iterator[tuple[int, int, int, list[Point]]]:
    """(period start, period end, time to stamp, points) for each period that has points."""
    origin = _range_origin(agg, window)
    i = 0
    while i < len(points):
        first_ts = points[i][0]
        start, end = _bounds(agg, origin, first_ts)
        chunk = []
        while i < len(points) and points[i][0] < end:
            chunk.append(points[i])
            i += 1
        stamp = start if agg.align_start_time else end if agg.align_end_time else first_ts
        yield start, end, stamp, chunk


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return 0.0
    pos = q * (len(values) + 1)
    if pos < 1:
        return values[0]
    if pos >= len(values):
        return values[-1]
    lower, upper = values[int(pos) - 1], values[int(pos)]
    return lower + (pos - math.floor(pos)) * (upper - lower)


def _dev(agg: Aggregator, values: list[float]) -> float:
    count = 0
    average = power_avg = 0.0
    for v in values:
        count += 1
        average += (v - average) / count
        power_avg += (v * v - power_avg) / count
    # KairosDB answers 0 where the variance is 0/0 or (by rounding) below 0.
    variance = (power_avg * count - count * average * average) / (count - 1) if count > 1 else 0.0
    std = math.sqrt(variance) if variance > 0 else 0.0
    kind = agg.options.get("return_type", "value")
    if kind == "pos_sd":
        return average + std * float(agg.options.get("dev_count", 1))
    if kind == "neg_sd":
        return average - std * float(agg.options.get("dev_count", 1))
    return std


def _least_squares(chunk: list[Point]) -> list[Point]:
    """The fitted line at the first and last point, computed as Apache Commons Math's
    SimpleRegression (with intercept) does, so the answers match KairosDB's to the last bit:
    its intercept loses precision on millisecond timestamps, and so does this one."""
    if len(chunk) <= 2:
        return list(chunk)
    n = 0
    x_bar = y_bar = sum_xx = sum_xy = sum_x = sum_y = 0.0
    for t, v in chunk:
        x, y = float(t), _num(v)
        if n == 0:
            x_bar, y_bar = x, y
        else:
            fact1 = 1.0 + n
            fact2 = n / (1.0 + n)
            dx, dy = x - x_bar, y - y_bar
            sum_xx += dx * dx * fact2
            sum_xy += dx * dy * fact2
            x_bar += dx / fact1
            y_bar += dy / fact1
        sum_x += x
        sum_y += y
        n += 1
    slope = sum_xy / sum_xx if abs(sum_xx) >= 10 * 5e-324 else math.nan
    intercept = (sum_y - slope * sum_x) / n
    first, last = chunk[0][0], chunk[-1][0]
    return [(first, intercept + slope * first), (last, intercept + slope * last)]


def _reduce(agg: Aggregator, stamp: int, chunk: list[Point]) -> list[Point]:
    name = agg.name
    if name == "count":
        return [(stamp, len(chunk))]
    if name == "first":
        return [(stamp, chunk[0][1])]
    if name == "last":
        aligned = agg.align_start_time or agg.align_end_time
        return [(stamp if aligned else chunk[-1][0], chunk[-1][1])]
    numbers = _numbers(chunk)
    if name == "least_squares":
        return _least_squares(numbers)
    values = [_num(v) for _, v in numbers]
    if not values:
        return []
    if name == "sum":
        return [(stamp, math.fsum(values))]
    if name == "avg":
        return [(stamp, math.fsum(values) / len(values))]
    if name == "min":
        return [(stamp, min(values))]
    if name == "max":
        return [(stamp, max(values))]
    if name == "dev":
        return [(stamp, _dev(agg, values))]
    if name == "percentile":
        return [(stamp, _percentile(values, agg.options["percentile"]))]
    raise AssertionError(name)


def _gaps(agg: Aggregator, points: Sequence[Point], window: Window, now_ms: int) -> list[Point]:
    """Every point, and a null at the start of each empty period up to the query end."""
    origin = _range_origin(agg, window)
    end_ms = min(window.end_ms, now_ms)
    next_start = origin if agg.trim else window.start_ms
    started = False
    out: list[Point] = []
    i = 0
    while i < len(points) or (not agg.trim and next_start <= end_ms):
        at = next_start
        if agg.trim and not started:
            started, at = True, points[i][0]
        start, end = _bounds(agg, origin, at)
        next_start = end
        taken = 0
        while i < len(points) and points[i][0] < end:
            out.append(points[i])
            i += 1
            taken += 1
        if not taken:
            out.append((start, None))
        if len(out) > window.max_points:
            raise QueryError(
                f"gaps would answer more than {window.max_points} points; use a longer sampling or a shorter range"
            )
    return out


def range_aggregate(
    agg: Aggregator,
    points: Sequence[Point],
    window: Window,
    now_ms: int,
    union: Callable[[list[Any]], Any] | None = None,
) -> list[Point]:
    """Apply one range aggregator (``union`` combines the sketches of a period for distinct)."""
    if agg.name == "gaps":
        return _gaps(agg, points, window, now_ms)
    out: list[Point] = []
    for _, _, stamp, chunk in periods(agg, points, window):
        if agg.name == DISTINCT:
            if union is None:
                raise QueryError("'distinct' applies to headwater.users.distinct only")
            out.append((stamp, union([v for _, v in chunk])))
        else:
            out.extend(_reduce(agg, stamp, chunk))
    return out


# --- the other aggregators ---------------------------------------------------------------------


def _pairs(points: Sequence[Point], name: str) -> Iterator[tuple[Point, Point]]:
    for a, b in itertools.pairwise(points):
        if a[0] == b[0] and name in ("rate", "sampler"):
            raise QueryError(
                f"The {name} aggregator cannot compute rate for data points with the same "
                f"time stamp.  You must precede {name} with another aggregator."
            )
        yield a, b


_FILTERS: dict[str, Callable[[float, float], bool]] = {
    "lte": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
    "gte": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
    "equal": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
}


def _filter(agg: Aggregator, points: Sequence[Point]) -> list[Point]:
    """Drop the points the comparison holds for (and those it cannot compare)."""
    op = _FILTERS[agg.options["filter_op"]]
    threshold = agg.options.get("threshold", 0.0)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        return []
    return [p for p in _numbers(points) if not op(_num(p[1]), float(threshold))]


def _sma(size: int, points: Sequence[Point]) -> list[Point]:
    numbers = _numbers(points)
    out: list[Point] = []
    for i in range(size - 1, len(numbers)):
        window = numbers[i - size + 1 : i + 1]
        out.append((numbers[i][0], math.fsum(_num(v) for _, v in window) / len(window)))
    return out


def _trim(how: str | None, points: Sequence[Point]) -> list[Point]:
    out = list(points)
    if how in ("first", "both"):
        out = out[1:]
    if how in ("last", "both"):
        out = out[:-1]
    return out


def aggregate(
    agg: Aggregator,
    points: Sequence[Point],
    window: Window,
    now_ms: int,
    union: Callable[[list[Any]], Any] | None = None,
) -> list[Point]:
    """Apply one aggregator of the chain (save_as passes points through; the caller stores them)."""
    if agg.is_range:
        return range_aggregate(agg, points, window, now_ms, union)
    name, options = agg.name, agg.options
    if name == "diff":
        return [(b[0], _num(b[1]) - _num(a[1])) for a, b in _pairs(_numbers(points), name)]
    if name in ("rate", "sampler"):
        sampling: Sampling = options["sampling"]
        out = []
        for (t0, x0), (t1, x1) in _pairs(_numbers(points), name):
            per = sampling.unit.length(t0, sampling.value)
            delta = _num(x1) - _num(x0) if name == "rate" else _num(x1)
            out.append((t1, delta / (t1 - t0) * per))
        return out
    if name == "div":
        return [(t, _num(v) / options["divisor"]) for t, v in _numbers(points)]
    if name == "scale":
        return [(t, _num(v) * options["factor"]) for t, v in _numbers(points)]
    if name == "filter":
        return _filter(agg, points)
    if name == "sma":
        return _sma(options["size"], points)
    if name == "trim":
        return _trim(options.get("trim"), points)
    if name == "save_as":
        return list(points)
    raise AssertionError(name)
