"""Which pre-aggregation partitions a row's time values fall in, as Cube lays them out.

Cube cuts a partitioned pre-aggregation into ranges of `partitionGranularity` in *local* time, once
per time zone it builds, and its jobs API selects partitions by one `dateRange` per selector, given
in local time and compared with each partition's local build range (cube-js/cube
`RefreshScheduler.postBuildJobs`, `PreAggregationPartitionRangeLoader.intersectDateRanges`). So a
partition here is a range of local calendar days, the same days in every configured time zone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

# Cube's partition granularities that are whole days. `hour` is left out on purpose: a `day` range
# selects all 24 hourly partitions of that day, which is more work but never too little.
GRANULARITIES = ("day", "week", "month", "quarter", "year")
_SEP = ".."


@dataclass(frozen=True, slots=True, order=True)
class DateRange:
    """Local calendar days `start`..`end`, both included."""

    start: date
    end: date

    @property
    def label(self) -> str:
        return f"{self.start.isoformat()}{_SEP}{self.end.isoformat()}"

    @classmethod
    def parse(cls, label: str) -> DateRange:
        """The inverse of `label`; raises ValueError on anything else."""
        first, sep, last = label.partition(_SEP)
        if not sep or len(first) != 10 or len(last) != 10:
            raise ValueError("not a date range label (YYYY-MM-DD..YYYY-MM-DD)")
        try:
            value = cls(date.fromisoformat(first), date.fromisoformat(last))
        except ValueError:
            raise ValueError("not a date range label (YYYY-MM-DD..YYYY-MM-DD)") from None
        if value.end < value.start:
            raise ValueError("date range label ends before it starts")
        return value

    def cube_date_range(self) -> list[str]:
        """Cube's `selector.dateRange`: local timestamps covering the first to the last day."""
        return [f"{self.start.isoformat()}T00:00:00.000", f"{self.end.isoformat()}T23:59:59.999"]

    def days(self) -> int:
        return (self.end - self.start).days + 1


def _start_of(day: date, granularity: str) -> date:
    if granularity == "day":
        return day
    if granularity == "week":  # Cube's weeks start on Monday (ISO)
        return day - timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    if granularity == "quarter":
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    if granularity == "year":
        return day.replace(month=1, day=1)
    raise ValueError(f"unknown granularity {granularity!r}")


def _next_start(start: date, granularity: str) -> date:
    if granularity == "day":
        return start + timedelta(days=1)
    if granularity == "week":
        return start + timedelta(days=7)
    months = {"month": 1, "quarter": 3, "year": 12}[granularity]
    index = start.year * 12 + start.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def partition_of(day: date, granularity: str) -> DateRange:
    start = _start_of(day, granularity)
    return DateRange(start, _next_start(start, granularity) - timedelta(days=1))


@cache
def zone(name: str) -> ZoneInfo:
    """Raises ZoneInfoNotFoundError (a KeyError) for an unknown IANA name."""
    return ZoneInfo(name)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def local_day(epoch_ms: int, timezone: str) -> date:
    """The local calendar day of an instant (exact integer arithmetic, no float seconds). Raises
    OverflowError for an instant the calendar cannot hold, here or in the zone (past 9999-12-31)."""
    return (_EPOCH + timedelta(milliseconds=epoch_ms)).astimezone(zone(timezone)).date()


def partitions_for(instants_ms: Iterable[int], granularity: str, timezones: Sequence[str]) -> set[DateRange]:
    """Every partition, in any of the time zones, that holds one of the instants. Raises ValueError
    when an instant or its partition lies outside the calendar (years 1 to 9999: a hint in
    microseconds, 10**20, the last day of 9999 in a zone east of UTC)."""
    try:
        return {partition_of(local_day(ms, tz), granularity) for ms in instants_ms for tz in timezones}
    except OverflowError:
        raise ValueError("an instant or its partition lies outside the calendar") from None


def merge(ranges: Iterable[DateRange]) -> list[DateRange]:
    """Sorted, with overlapping and adjacent ranges joined (one selector each)."""
    merged: list[DateRange] = []
    for item in sorted(ranges):
        if merged and (item.start - merged[-1].end).days <= 1:  # (no date arithmetic past 9999-12-31)
            last = merged[-1]
            merged[-1] = DateRange(last.start, max(last.end, item.end))
        else:
            merged.append(item)
    return merged


def cover(ranges: Iterable[DateRange]) -> DateRange:
    """One range from the first start to the last end."""
    items = list(ranges)
    return DateRange(min(r.start for r in items), max(r.end for r in items))
