"""KairosDB 1.3 group_by: tag, time, value and bin. Pure code.

As in KairosDB: series are first grouped by their tags (the first ``tag`` grouper; groups
sorted by the concatenated tag names and values), each tag group's points are then split by
the time, value and bin groupers in the order given (groups in the order their first point
comes), and every result lists its group_by entries: the time/value/bin ones first, then
the tag one, then ``{"name": "type", "type": "number"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.metrics.aggregators import Point
from services.metrics.periods import UTC, Unit, to_local

# A value the value and bin groupers cannot place (not a number).
NO_GROUP = -1


def json_number(value: float) -> int | float:
    """KairosDB writes doubles without a trailing '.0'."""
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _jdiv(a: float, b: float) -> int:
    """Java's integer division (towards zero)."""
    q = abs(int(a)) // abs(int(b))
    return q if (a >= 0) == (b > 0) else -q


@dataclass(frozen=True)
class TagGroupBy:
    tags: tuple[str, ...]


@dataclass(frozen=True)
class TimeGroupBy:
    value: int
    unit: str
    group_count: int

    def group_id(self, start_ms: int, point: Point) -> int:
        if self.unit == "months":
            a, b = to_local(start_ms, UTC), to_local(point[0], UTC)
            months = (b.year - a.year) * 12 + b.month - a.month
            return months % self.group_count
        # KairosDB takes a year as 52 weeks here.
        size = {"years": 52 * 7 * 86_400_000}.get(self.unit) or Unit(self.unit).length(0, 1)
        return _jdiv(point[0] - start_ms, size * self.value) % self.group_count

    def json(self, group_id: int) -> dict[str, Any]:
        return {
            "name": "time",
            "range_size": {"value": self.value, "unit": self.unit.upper()},
            "group_count": self.group_count,
            "group": {"group_number": group_id},
        }


@dataclass(frozen=True)
class ValueGroupBy:
    range_size: int

    def group_id(self, start_ms: int, point: Point) -> int:
        value = point[1]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return NO_GROUP
        return _jdiv(int(value), self.range_size)

    def json(self, group_id: int) -> dict[str, Any]:
        return {"name": "value", "range_size": self.range_size, "group": {"group_number": group_id}}


@dataclass(frozen=True)
class BinGroupBy:
    bins: tuple[float, ...]

    def group_id(self, start_ms: int, point: Point) -> int:
        value = point[1]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return NO_GROUP
        if value < self.bins[0]:
            return 0
        for i in range(len(self.bins) - 1):
            if self.bins[i] <= value < self.bins[i + 1]:
                return i + 1
        return len(self.bins)

    def json(self, group_id: int) -> dict[str, Any]:
        return {"name": "bin", "bins": [json_number(b) for b in self.bins], "group": {"bin_number": group_id}}


PointGrouper = TimeGroupBy | ValueGroupBy | BinGroupBy
GroupBy = TagGroupBy | PointGrouper


def tag_entry(group_by: TagGroupBy, group: dict[str, str]) -> dict[str, Any]:
    return {"name": "tag", "tags": list(group_by.tags), "group": group}


TYPE_ENTRY: dict[str, Any] = {"name": "type", "type": "number"}


def split(
    groupers: list[PointGrouper], start_ms: int, points: list[Point]
) -> list[tuple[list[dict[str, Any]], list[Point]]]:
    """A tag group's points split by the time/value/bin groupers: (group_by entries, points)."""
    if not groupers:
        return [([], points)]
    out: dict[tuple[int, ...], list[Point]] = {}
    for point in points:
        key = tuple(g.group_id(start_ms, point) for g in groupers)
        out.setdefault(key, []).append(point)
    return [([g.json(i) for g, i in zip(groupers, key, strict=True)], pts) for key, pts in out.items()]
