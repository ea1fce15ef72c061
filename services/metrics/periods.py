"""Time units as KairosDB steps them: milliseconds to hours as fixed lengths, days and weeks
on the local clock of a time zone, months and years on its calendar (day of month clamped,
31 January + 1 month = 28/29 February). Pure code over epoch milliseconds.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

UNITS = ("milliseconds", "seconds", "minutes", "hours", "days", "weeks", "months", "years")
FIXED_MS = {
    "milliseconds": 1,
    "seconds": 1000,
    "minutes": 60_000,
    "hours": 3_600_000,
    "days": 86_400_000,
    "weeks": 7 * 86_400_000,
}
UTC = ZoneInfo("UTC")
_MS = dt.timedelta(milliseconds=1)


def to_local(ms: int, tz: ZoneInfo) -> dt.datetime:
    """The wall-clock time (naive) of an instant in ``tz``."""
    aware = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + ms * _MS
    return aware.astimezone(tz).replace(tzinfo=None)


def from_local(local: dt.datetime, tz: ZoneInfo) -> int:
    """The instant of a wall-clock time in ``tz`` (the earlier one when the clock repeats)."""
    aware = local.replace(tzinfo=tz)
    return (aware - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // _MS


def _add_months(local: dt.datetime, months: int) -> dt.datetime:
    index = local.year * 12 + local.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    if not 1 <= year <= 9999:
        raise OverflowError("year out of range")
    last = (dt.date(year + (month == 12), month % 12 + 1, 1) - dt.timedelta(days=1)).day
    return local.replace(year=year, month=month, day=min(local.day, last))


@dataclass(frozen=True)
class Unit:
    """One KairosDB time unit in one time zone."""

    name: str
    tz: ZoneInfo = UTC

    def add(self, ms: int, n: int) -> int:
        """``ms`` moved by ``n`` units."""
        if self.name in ("milliseconds", "seconds", "minutes", "hours"):
            return ms + n * FIXED_MS[self.name]
        local = to_local(ms, self.tz)
        if self.name in ("days", "weeks"):
            return from_local(local + dt.timedelta(days=n * (7 if self.name == "weeks" else 1)), self.tz)
        return from_local(_add_months(local, n * (12 if self.name == "years" else 1)), self.tz)

    def between(self, start: int, ms: int) -> int:
        """Whole units from ``start`` to ``ms`` (``ms`` >= ``start``)."""
        if self.name in ("milliseconds", "seconds", "minutes", "hours"):
            return (ms - start) // FIXED_MS[self.name]
        a, b = to_local(start, self.tz), to_local(ms, self.tz)
        if self.name in ("days", "weeks"):
            return ((b - a) // _MS) // FIXED_MS[self.name]
        months = (b.year - a.year) * 12 + b.month - a.month
        if months > 0 and _add_months(a, months) > b:
            months -= 1
        return months // 12 if self.name == "years" else months

    def align(self, ms: int) -> int:
        """KairosDB's align_sampling start: the year, month, week (Monday) or day it falls in for
        those units, the day for hours, minutes and seconds, the second for milliseconds."""
        local = to_local(ms, self.tz)
        if self.name == "milliseconds":
            local = local.replace(microsecond=0)
        elif self.name == "years":
            local = dt.datetime(local.year, 1, 1)
        elif self.name == "months":
            local = dt.datetime(local.year, local.month, 1)
        elif self.name == "weeks":
            local = dt.datetime.combine(local.date() - dt.timedelta(days=local.weekday()), dt.time())
        else:
            local = dt.datetime.combine(local.date(), dt.time())
        return from_local(local, self.tz)

    def length(self, ms: int, n: int = 1) -> int:
        """How many milliseconds ``n`` units starting at ``ms`` last."""
        return self.add(ms, n) - ms
