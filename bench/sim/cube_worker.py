"""Cube's own refresh worker as a model: which queries each scheduler tick sends to the warehouse and
which partitions it rebuilds, for `every`, `sql`, `FILTER_PARAMS` and `incremental` refresh keys.

The rules are read from Cube 1.7.43's sources (`RefreshScheduler`, `QueryCache.cacheRefreshKeyResult`,
`PreAggregationLoadCache.keyQueryResult`, `PreAggregationPartitionRangeLoader`, `BaseQuery.
preAggregationInvalidateKeyQueries` / `refreshKeyRenewalThresholdForInterval`) and checked against the
real worker on the local stack by `bench/sim/cube_worker_check.py`:

1. **A refresh-key query runs once per identity and renewal.** Results are cached by SQL text and
   parameters (one orchestrator per deployment: Cube's default `contextToOrchestratorId`), and a cached
   result is re-read at a tick only when it is older than its renewal threshold. Identities:
   - `every` key: the SQL is `FLOOR((<tz offset> + epoch) / <interval>)`: one identity per time zone
     offset, shared by every tenant and pre-aggregation. Threshold: interval / 10, 1 s to 300 s.
   - `sql` key (here with `every`, whose interval is then the threshold): one per tenant and distinct
     SQL (the tenant filter makes it a parameter), shared by the pre-aggregations, partitions and time
     zones that use the same SQL.
   - `FILTER_PARAMS` key: the partition's range is a parameter: one per tenant x time zone x partition.
   - `incremental` + `update_window`: `CASE WHEN NOW() < <partition end> + window THEN FLOOR(...)`
     with the range as a parameter and no tenant in it: one per time zone x partition, shared by the
     tenants; a partition past its window is re-read once a day.
   - Cubes without a refresh key of their own get Cube's default (`every: 10 seconds`, threshold
     10 s), warmed at every tick per time zone (`refreshCubesRefreshKey`).
2. **A table is rebuilt when no version built with the current key value exists.** Partitioned
   rollups have one table per partition and time zone; a rollup without a time dimension has one table
   for every time zone (an `every` key, whose value differs per offset, rebuilds it once per zone).
3. **Partition-range queries** (`min` of the time dimension, and the `build_range_end` SQL) are cached
   for a day, renewed when the key value of the first (resp. last) partition changed.

`TickModel` plays these rules tick by tick (the agreement check feeds it the real worker's tick times
and the rows inserted); `worker_hourly` applies the same rules in expectation to a whole population
(the scale simulation)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("every", "sql", "filter", "incremental")
DEFAULT_KEY_EVERY_S = 10  # a cube without refreshKey: `every: 10 seconds`, renewal threshold 10 s
DAY_S = 86_400
RANGE_RENEWAL_S = DAY_S  # partition-range queries without a key change
# Cube stamps a cached result when its query completes, not when the tick asked for it: with many keys
# queued behind Cube's 2 PostgreSQL slots that was up to about a second after the tick here. A key read
# at a tick exactly one threshold after the last is then still fresh.
STAMP_DELAY_S = 1.0
OUTSIDE_WINDOW_RENEWAL_S = DAY_S  # an incremental key past its update window


def every_threshold(every_s: float) -> float:
    """Renewal threshold of an `every` key without SQL: a tenth of the interval, 1 s to 300 s."""
    return float(min(max(round(every_s / 10), 1), 300))


def renewal_period(threshold_s: float, timer_s: float) -> float:
    """Seconds between two reads of a cached key at ticks `timer_s` apart: it is re-read at the first
    tick at which it is older than the threshold (strictly), counted from when it was stamped."""
    return timer_s * (math.floor((threshold_s + STAMP_DELAY_S) / timer_s) + 1)


@dataclass(frozen=True)
class Rollup:
    """One pre-aggregation: its cube, the source table a `sql` key reads, whether it is partitioned
    (one table per partition and time zone) or has no time dimension (one table for all zones)."""

    cube: str
    table: str
    partitioned: bool


@dataclass(frozen=True)
class WorkerSetup:
    kind: str  # every | sql | filter | incremental
    every_s: float
    timer_s: float
    tz_offsets: tuple[int, ...]  # seconds east of UTC of each configured time zone
    rollups: tuple[Rollup, ...]
    update_window_s: float = 7 * DAY_S

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"refresh key kind must be one of {KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class Partition:
    """One partition of a partitioned rollup in one time zone: [start, end) in epoch seconds (UTC)."""

    start: float
    end: float


@dataclass
class _Entry:
    at: float
    value: object
    renewal: object = None


@dataclass
class TickModel:
    """Cube's scheduler, tick by tick. `partitions[tenant][tz index]` lists a tenant's partitions of
    the partitioned rollups; `rows[(tenant, table)]` the (insert time, row time) of rows inserted
    (a `sql` key reads `MAX(created_at)`: it changes when a newer row is inserted)."""

    setup: WorkerSetup
    partitions: Mapping[str, Sequence[Sequence[Partition]]]
    rows: Mapping[tuple[str, str], Sequence[tuple[float, float]]] = field(default_factory=dict)
    cache: dict[tuple[object, ...], _Entry] = field(default_factory=dict)
    built: dict[tuple[object, ...], set[object]] = field(default_factory=dict)

    # -- key values -------------------------------------------------------------------------
    def _rows_before(self, tenant: str, table: str, t: float, part: Partition | None = None) -> int:
        rows = self.rows.get((tenant, table), ())
        return sum(1 for at, row_t in rows if at <= t and (part is None or part.start <= row_t < part.end))

    def _key(
        self, rollup: Rollup, tenant: str, z: int, part: Partition | None, t: float
    ) -> tuple[tuple[object, ...], float, object]:
        """(identity, renewal threshold, value at t) of the key guarding one table."""
        s = self.setup
        off = s.tz_offsets[z]
        if s.kind == "every" or (s.kind == "incremental" and not rollup.partitioned):
            return ("every", s.every_s, off), every_threshold(s.every_s), math.floor((t + off) / s.every_s)
        if s.kind == "incremental":
            assert part is not None
            if t < part.end + s.update_window_s:
                return ("inc", off, part.start), every_threshold(s.every_s), math.floor((t + off) / s.every_s)
            return ("inc", off, part.start), OUTSIDE_WINDOW_RENEWAL_S, None
        if s.kind == "filter" and rollup.partitioned:
            assert part is not None
            return ("filter", tenant, part.start, part.end), s.every_s, self._rows_before(tenant, rollup.table, t, part)
        return ("sql", tenant, rollup.table), s.every_s, self._rows_before(tenant, rollup.table, t)

    def _invalidate_identity(self, rollup: Rollup, tenant: str, z: int) -> tuple[object, ...]:
        """The rollup's key query before the partition range is filled in (keys the build-range-end cache)."""
        s = self.setup
        off = s.tz_offsets[z]
        if s.kind == "every":
            return ("every", s.every_s, off)
        if s.kind == "incremental":
            return ("incq", off)
        if s.kind == "filter":
            return ("filterq", tenant, rollup.table)
        return ("sql", tenant, rollup.table)

    def _read(
        self, counts: Counter[str], what: str, ident: tuple[object, ...], threshold: float, t: float, value: object
    ) -> object:
        entry = self.cache.get(ident)
        if entry is None or t - entry.at > threshold:
            # The default key's SQL is an `every: 10 second` key's: counted apart whoever reads it.
            counts["default-key" if ident[:2] == ("every", float(DEFAULT_KEY_EVERY_S)) else what] += 1
            self.cache[ident] = entry = _Entry(t + STAMP_DELAY_S, value)
        return entry.value

    def _range(self, counts: Counter[str], ident: tuple[object, ...], renewal: object, t: float) -> None:
        entry = self.cache.get(ident)
        if entry is None or entry.renewal != renewal or t - entry.at > RANGE_RENEWAL_S:
            counts["range"] += 1
            self.cache[ident] = _Entry(t, None, renewal)

    # -- one tenant's run in one tick ------------------------------------------------------------
    def tick(self, t: float, tenant: str) -> Counter[str]:
        s = self.setup
        counts: Counter[str] = Counter()
        default_every = ("every", float(DEFAULT_KEY_EVERY_S))
        for off in sorted(set(s.tz_offsets)):  # refreshCubesRefreshKey: cubes without their own key
            self._read(
                counts,
                "default-key",
                (*default_every, off),
                DEFAULT_KEY_EVERY_S,
                t,
                math.floor((t + off) / DEFAULT_KEY_EVERY_S),
            )
        for r, rollup in enumerate(s.rollups):
            for z in range(len(s.tz_offsets)):
                if not rollup.partitioned:
                    ident, thr, value = self._key(rollup, tenant, z, None, t)
                    self._build(counts, (tenant, r), self._read(counts, "key", ident, thr, t, value))
                    continue
                parts = self.partitions[tenant][z]
                values = []
                for part in parts:
                    ident, thr, value = self._key(rollup, tenant, z, part, t)
                    values.append(self._read(counts, "key", ident, thr, t, value))
                self._range(counts, ("start", tenant, r, z), values[0], t)
                self._range(counts, ("end", *self._invalidate_identity(rollup, tenant, z)), values[-1], t)
                for part, value in zip(parts, values, strict=True):
                    self._build(counts, (tenant, r, z, part.start), value)
        return counts

    def _build(self, counts: Counter[str], table: tuple[object, ...], value: object) -> None:
        versions = self.built.setdefault(table, set())
        if value not in versions:
            versions.add(value)
            counts["build"] += 1


def play(model: TickModel, ticks: Iterable[tuple[float, str]], since: float) -> Counter[str]:
    """Every tick (time, tenant) in order; the counts of those at or after `since`."""
    total: Counter[str] = Counter()
    for t, tenant in ticks:
        counts = model.tick(t, tenant)
        if t >= since:
            total.update(counts)
    return total


def naive_counts(
    setup: WorkerSetup,
    partitions: Mapping[str, Sequence[Sequence[Partition]]],
    rows: Mapping[tuple[str, str], Sequence[tuple[float, float]]],
    ticks: Sequence[tuple[float, str]],
    since: float,
) -> Counter[str]:
    """The model docs/scale.md used before its calibration (issue 17, items 1-2), kept as the
    deliberately wrong model: every interval each partition x tenant x time zone has its key checked,
    and every partition of a tenant's rollups is rebuilt when the tenant had a mutation since the last
    check (with `incremental`, only the partitions in the update window are checked and rebuilt)."""
    total: Counter[str] = Counter()
    last: dict[str, float] = {}
    for t, tenant in ticks:
        previous = last.get(tenant)
        if previous is not None and t - previous < setup.every_s:
            continue
        last[tenant] = t
        if t < since:
            continue
        changed = previous is not None and any(
            previous < at <= t for (owner, _), inserted in rows.items() if owner == tenant for at, _ in inserted
        )
        for rollup in setup.rollups:
            for z in range(len(setup.tz_offsets)):
                if rollup.partitioned:
                    parts = partitions[tenant][z]
                    if setup.kind == "incremental":
                        parts = [p for p in parts if t < p.end + setup.update_window_s]
                    n = len(parts)
                else:
                    n = 1
                total["key"] += n
                if changed:
                    total["build"] += n
    return total


# --------------------------------------------------------------------------- a whole population


@dataclass(frozen=True)
class Population:
    """What the hourly model needs about a deployment: per tenant its mutation rate per rollup table
    (per second), the partitions of each partitioned rollup, the share of mutations that touch the
    newest partition, and the time zones."""

    key_rates: np.ndarray  # mutations per second per (tenant, cube)
    cubes: int  # entity types = cubes per tenant
    unpartitioned: int  # rollups without a time dimension, per cube
    partitioned: int  # partitioned rollups per cube
    partitions: int  # partitions of each partitioned rollup
    timezones: int
    newest_share: float = 0.8  # share of mutations whose row lies in the newest partition
    partitions_in_window: int = 1  # incremental: partitions inside the update window


@dataclass(frozen=True)
class WorkerHour:
    """Expected warehouse work of the refresh worker in one hour."""

    key_queries: float
    range_queries: float
    builds: float
    detect_period_s: float  # how often a change is looked for (freshness: uniform over it)
    never_share: float = 0.0  # share of mutations no rebuild ever covers (incremental: older rows)


def worker_hourly(pop: Population, kind: str, every_s: float, timer_s: float, factor: float = 1.0) -> WorkerHour:
    """The tick rules of `TickModel`, in expectation per hour, for rates multiplied by `factor`."""
    tenants = pop.key_rates.size
    z = pop.timezones
    per_cube_tables_part = pop.partitioned * pop.partitions * z
    default_reads = z * 3600 / renewal_period(DEFAULT_KEY_EVERY_S, timer_s)
    if kind in ("every", "incremental"):
        period = renewal_period(every_threshold(every_s), timer_s)
        changes = 3600 / max(every_s, period)  # the value moves every interval; seen at the next read
        reads = z * 3600 / period
        # An `every: 10 second` key is the default key's identity: read at its own (shorter) threshold.
        shared = every_s == DEFAULT_KEY_EVERY_S
        key_base = reads if shared else default_reads + reads
        unpart_builds = tenants * pop.cubes * pop.unpartitioned * z * changes
        if kind == "every":
            return WorkerHour(
                key_queries=key_base,
                range_queries=(tenants * pop.cubes * pop.partitioned * z + z) * changes if pop.partitioned else 0.0,
                builds=unpart_builds + tenants * pop.cubes * per_cube_tables_part * changes,
                detect_period_s=max(every_s, period),
            )
        window = pop.partitions_in_window
        inc_reads = z * window * reads
        return WorkerHour(
            key_queries=key_base + inc_reads,
            range_queries=z * changes if pop.partitioned else 0.0,
            builds=unpart_builds + tenants * pop.cubes * pop.partitioned * window * z * changes,
            detect_period_s=max(every_s, period),
            never_share=1 - pop.newest_share if window < pop.partitions else 0.0,
        )
    period = renewal_period(every_s, timer_s)
    reads = 3600 / period
    rates = pop.key_rates * factor
    p_change = float(np.sum(-np.expm1(-rates * period)))  # (tenant, cube) keys that moved, per read
    if kind == "sql":
        return WorkerHour(
            key_queries=default_reads + tenants * pop.cubes * reads,
            range_queries=p_change * reads * (pop.partitioned * z + 1) if pop.partitioned else 0.0,
            builds=p_change * reads * (pop.unpartitioned + per_cube_tables_part),
            detect_period_s=period,
        )
    # FILTER_PARAMS: one key per partition and zone; only the partitions whose rows changed rebuild.
    newest = float(np.sum(-np.expm1(-rates * pop.newest_share * period)))
    older = float(np.sum(-np.expm1(-rates * (1 - pop.newest_share) / max(1, pop.partitions - 1) * period)))
    touched = newest + older * max(0, pop.partitions - 1)
    return WorkerHour(
        key_queries=default_reads
        + tenants * pop.cubes * (pop.partitioned * pop.partitions * z + (1 if pop.unpartitioned else 0)) * reads,
        range_queries=newest * reads * (1 if pop.partitioned else 0),
        builds=(p_change * pop.unpartitioned + touched * pop.partitioned * z) * reads,
        detect_period_s=period,
    )
