"""The KairosDB 1.3 query model: the metric names served from the rollups, a parsed query,
the choice of rollup table, and the shape of answers. Pure code; kairosparse.py turns query
bodies into this model, aggregators.py and groupby.py hold the semantics, query.py feeds them
stored datapoints.

Metric names served from the rollups (tags in brackets):

* ``headwater.events.count``   [source, type, event, resolution]  events per window
* ``headwater.users.distinct`` [source, type, event, resolution]  distinct userId/anonymousId,
  HLL sketches unioned across the series and partitions that fall into one group
* ``headwater.property.sum``   [source, type, event, property, resolution]  sum of a numeric property

``event`` is the track event name or the page/screen name ("" for other types).
``resolution`` picks the table (1m, 1h, 1d); without it the service picks the coarsest one
whose windows fit the query start and every sampling period boundary of the first range
aggregator. Any other name is a series stored through POST /api/v1/datapoints.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from services.metrics.aggregators import Aggregator
from services.metrics.errors import QueryError
from services.metrics.groupby import PointGrouper, TagGroupBy
from services.metrics.periods import FIXED_MS, UTC, to_local
from services.metrics.rollup import RESOLUTIONS

COUNT_METRIC = "headwater.events.count"
USERS_METRIC = "headwater.users.distinct"
SUM_METRIC = "headwater.property.sum"
ROLLUP_METRICS = (COUNT_METRIC, USERS_METRIC, SUM_METRIC)

# Times are Cassandra bigints.
MAX_TIME_MS = 2**63 - 1


@dataclass(frozen=True)
class MetricQuery:
    name: str
    tags: dict[str, tuple[str, ...]]
    aggregators: tuple[Aggregator, ...] = ()
    tag_group: TagGroupBy | None = None
    groupers: tuple[PointGrouper, ...] = ()
    limit: int | None = None
    order: str = "asc"
    exclude_tags: bool = False
    alias: str | None = None

    @property
    def group_by(self) -> tuple[str, ...]:
        return self.tag_group.tags if self.tag_group else ()


@dataclass(frozen=True)
class Query:
    start_ms: int
    end_ms: int
    metrics: tuple[MetricQuery, ...]
    time_zone: ZoneInfo = field(default=UTC)


def pick_resolution(metric: MetricQuery, start_ms: int, now_ms: int, retention_s: dict[str, int]) -> str:
    """The rollup table a query reads: the resolution tag, else the coarsest whose windows fit
    the query start and the first range aggregator's period boundaries, within retention."""
    asked = metric.tags.get("resolution")
    if asked is not None:
        if len(asked) != 1 or asked[0] not in RESOLUTIONS:
            raise QueryError(f"the resolution tag takes one of {', '.join(RESOLUTIONS)}")
        return asked[0]
    agg = next((a for a in metric.aggregators if a.is_range and a.sampling_given), None)

    def fits(res: str) -> bool:
        size = RESOLUTIONS[res]
        if start_ms % size:
            return False
        if agg is None:
            return True
        unit, value = agg.sampling.unit, agg.sampling.value
        origin = unit.align(start_ms) if agg.align_sampling else start_ms
        if unit.name in FIXED_MS and unit.name not in ("days", "weeks"):
            step = FIXED_MS[unit.name] * value
        elif unit.tz.key == "UTC":
            step = 86_400_000
        else:
            # Local days start on whole hours in most zones, on half hours in some.
            offset = to_local(origin, unit.tz) - to_local(origin, UTC)
            step = 3_600_000 if offset % dt.timedelta(hours=1) == dt.timedelta(0) else 60_000
        return origin % size == 0 and step % size == 0

    finest_first = list(RESOLUTIONS)
    held = [r for r in finest_first if start_ms >= now_ms - retention_s[r] * 1000]
    fitting = [r for r in held if fits(r)]
    if fitting:
        return fitting[-1]
    return held[0] if held else finest_first[-1]


# --- answers -----------------------------------------------------------------------------------


def result(
    metric: MetricQuery, group_by: list[dict[str, Any]], tags: dict[str, set[str]], values: list[list[Any]]
) -> dict[str, Any]:
    """One entry of a KairosDB "results" list."""
    out: dict[str, Any] = {"name": metric.name}
    if metric.alias is not None:
        out["alias"] = metric.alias
    if group_by:
        out["group_by"] = group_by
    if not metric.exclude_tags:
        out["tags"] = {k: sorted(v) for k, v in sorted(tags.items())}
    out["values"] = values
    return out


def matches(tags: dict[str, str], wanted: dict[str, tuple[str, ...]]) -> bool:
    return all(tags.get(k) in values for k, values in wanted.items())


def tag_matcher(wanted: dict[str, tuple[str, ...]], parse: Callable[[str], dict[str, str]]) -> Callable[[str], bool]:
    """A filter over stored tag texts that parses each distinct text once."""
    seen: dict[str, bool] = {}

    def keep(text: str) -> bool:
        hit = seen.get(text)
        if hit is None:
            hit = seen[text] = matches(parse(text), wanted)
        return hit

    return keep
