"""Partition-precise and field-level refreshes against the real local Cube (PostgreSQL, Cube 1.7.43).

tenant-h has 30 months of seeded users, so `Users.dailyStatusCounts` (monthly partitions) has about
31 partitions for it. Each test sends mutations through `handler.app.handle` with the richer
ENTITY_CUBE_MAP and checks from outside, in PostgreSQL, which partition tables Cube rebuilt: the new
table names (their suffix is the build time), and that every other partition kept its tables."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from devstack import Stack
from devstack.cubeapi import CubeApi, RollupTable

from .conftest import msk

pytestmark = pytest.mark.integration

TENANT = "tenant-h"
DAILY = "Users.dailyStatusCounts"
DAILY_TABLE = "users_daily_status_counts"
PRECISE_MAP = {
    "User": [
        {"target": "Users.main", "fields": ["status"]},
        {
            "target": DAILY,
            "partitionBy": "timeHints.createdAt",
            "granularity": "month",
            "fields": ["status", "createdAt"],
        },
    ]
}
EVENTS = Path(__file__).resolve().parents[2] / "events"


def month_start(months_ago: int) -> date:
    today = datetime.now(UTC).date()
    index = today.year * 12 + today.month - 1 - months_ago
    return date(index // 12, index % 12 + 1, 1)


def mid_month(months_ago: int) -> datetime:
    """Noon UTC on the 15th: the same month in UTC and in New York."""
    return datetime.combine(month_start(months_ago) + timedelta(days=14), datetime.min.time().replace(hour=12))


def label(day: date) -> str:
    return day.strftime("%Y%m%d")


def event(event_type: str, *, old: datetime | None = None, new: datetime | None = None, **extra: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "eventType": event_type,
        "entityType": "User",
        "entityId": f"h-{uuid.uuid4().hex[:8]}",
        "tenantId": TENANT,
        "timestamp": int(datetime.now(UTC).timestamp() * 1000),
        **extra,
    }
    hint = {k: v.replace(tzinfo=UTC).isoformat() for k, v in (("old", old), ("new", new)) if v is not None}
    if hint:
        value["timeHints"] = {"createdAt": hint}
    return value


class HistoryRows:
    """Users of tenant-h at chosen times (deleted again after the test)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ids: list[str] = []

    def add(self, created_at: datetime, status: str = "active") -> str:
        user_id = f"it-h-{uuid.uuid4().hex[:10]}"
        self.stack.psql(
            "INSERT INTO users (id, tenant_id, status, created_at) "
            f"VALUES ('{user_id}', '{TENANT}', '{status}', '{created_at.isoformat(sep=' ')}')"
        )
        self.ids.append(user_id)
        return user_id

    def move(self, user_id: str, created_at: datetime) -> None:
        self.stack.psql(f"UPDATE users SET created_at = '{created_at.isoformat(sep=' ')}' WHERE id = '{user_id}'")

    def in_month(self, start: date) -> int:
        end = month_start_after(start)
        rows = self.stack.psql(
            f"SELECT count(*) FROM users WHERE tenant_id = '{TENANT}' "
            f"AND created_at >= '{start.isoformat()}' AND created_at < '{end.isoformat()}'"
        )
        return int(rows[0][0])


def month_start_after(start: date) -> date:
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


@pytest.fixture
def history(stack: Stack) -> Any:
    rows = HistoryRows(stack)
    yield rows
    if rows.ids:
        stack.psql("DELETE FROM users WHERE id IN ({})".format(", ".join(f"'{i}'" for i in rows.ids)))


@pytest.fixture
def precise(make_function) -> Any:
    """The function with the richer map; tenant-h's debounce items (whole and partition keys) forgotten."""

    def make(**overrides: str) -> Any:
        fn = make_function(ENTITY_CUBE_MAP=json.dumps(PRECISE_MAP), **overrides)
        for key, _ in fn.store.scan(TENANT):
            fn.store.delete(key)
        return fn

    return make


def settled(cube_api: CubeApi) -> dict[str, set[RollupTable]]:
    """tenant-h's partition tables once no build is landing any more (two reads 1 s apart agree):
    a build queued before the test (the session's warm-up) must not count as the test's."""
    last = cube_api.partition_tables(TENANT, DAILY_TABLE)
    for _ in range(10):
        time.sleep(1.0)
        now = cube_api.partition_tables(TENANT, DAILY_TABLE)
        if now == last:
            return now
        last = now
    return last


def new_tables(cube_api: CubeApi, before: dict[str, set[RollupTable]]) -> dict[str, set[RollupTable]]:
    """Tables that appeared since `before`, by partition (Cube may also drop superseded versions:
    a table that went away is not a rebuild)."""
    after = cube_api.partition_tables(TENANT, DAILY_TABLE)
    return {p: tables - before.get(p, set()) for p, tables in after.items() if tables - before.get(p, set())}


def assert_untouched(cube_api: CubeApi, before: dict[str, set[RollupTable]], rebuilt: set[str]) -> None:
    """No partition outside `rebuilt` got a new table: their tables keep their names and build times."""
    assert len(before) >= 24, f"tenant-h should have >= 24 monthly partitions, has {len(before)}"
    changed = sorted(set(new_tables(cube_api, before)) - rebuilt)
    assert changed == [], f"partitions rebuilt although no mutation touched them: {changed}"
    after = cube_api.partition_tables(TENANT, DAILY_TABLE)
    assert all(after.get(p) for p in before), "every partition still has its tables"


def run(fn: Any, cube_api: CubeApi, *values: dict[str, Any]) -> dict[str, str]:
    """Handle the mutations, wait for every job Cube queued; returns token -> table."""
    posts = fn.posts
    assert fn.handle(msk(*values)) == {"batchItemFailures": []}
    tokens = [t for k in fn.service.last.keys for t in k.job_tokens]
    if fn.posts == posts:
        return {}
    jobs = cube_api.wait_for_jobs(TENANT, sorted(set(tokens)))
    assert set(jobs.statuses.values()) == {"done"}, jobs.statuses
    return jobs.tables


def test_mutation_in_one_month_rebuilds_exactly_that_partition_per_time_zone_with_the_new_row(
    precise, cube_api: CubeApi, history: HistoryRows
) -> None:
    fn = precise(CUBE_TIMEZONES="UTC,America/New_York")
    when = mid_month(14)
    before = settled(cube_api)
    # Count what the month's current tables hold now: Cube drops superseded tables after a rebuild.
    latest = {t.content: t for t in sorted(before[label(month_start(14))], key=lambda t: t.built_at_s)}
    stale = {content: cube_api.rollup_count(TENANT, t.name) for content, t in latest.items()}
    history.add(when)

    tables = run(fn, cube_api, event("ENTITY_CREATED", new=when))

    start = month_start(14)
    month = label(start)
    last_day = month_start_after(start) - timedelta(days=1)
    refreshed = sorted(k.key.pk for k in fn.service.last.by_status("refreshed"))
    assert refreshed == [f"{TENANT}#{DAILY}#{start}..{last_day}", f"{TENANT}#Users.main"]
    daily_jobs = sorted(t for t in tables.values() if DAILY_TABLE in t)
    assert len(daily_jobs) == 2, f"one partition x two time zones, got {daily_jobs}"
    assert all(f".{DAILY_TABLE}{month}_" in t for t in daily_jobs), daily_jobs
    built = new_tables(cube_api, before)
    assert set(built) == {month} and len(built[month]) == 2, {p: sorted(t.name for t in ts) for p, ts in built.items()}
    assert_untouched(cube_api, before, {month})
    # The rebuilt UTC partition holds the new row; the UTC table it replaces did not.
    jobs = cube_api.job_statuses(TENANT, list(tables))
    [utc] = [j["table"] for j in jobs.values() if DAILY_TABLE in j["table"] and j["selector"]["timezones"] == ["UTC"]]
    rebuilt = RollupTable.parse(utc.rsplit(".", 1)[-1])
    assert rebuilt is not None
    expected = history.in_month(start)
    assert cube_api.rollup_count(TENANT, rebuilt.name) == expected
    assert stale[rebuilt.content] == expected - 1


def test_row_moved_between_months_rebuilds_both_partitions_and_nothing_else(
    precise, cube_api: CubeApi, history: HistoryRows
) -> None:
    fn = precise()
    old, new = mid_month(20), mid_month(7)
    user = history.add(old)
    run(fn, cube_api, event("ENTITY_CREATED", new=old))
    before = settled(cube_api)
    fn = precise()  # a fresh window: the move is a leading refresh again
    history.move(user, new)

    tables = run(fn, cube_api, event("ENTITY_UPDATED", old=old, new=new, changedFields=["createdAt"]))

    months = {label(month_start(20)), label(month_start(7))}
    assert all("users_main" not in t for t in tables.values()), "Users.main does not read createdAt"
    built = new_tables(cube_api, before)
    assert set(built) == months, built
    assert_untouched(cube_api, before, months)
    for ago in (20, 7):
        [table] = built[label(month_start(ago))]
        assert cube_api.rollup_count(TENANT, table.name) == history.in_month(month_start(ago))


def test_update_of_a_field_no_target_reads_posts_nothing(precise, cube_api: CubeApi) -> None:
    fn = precise()
    before = cube_api.tables(TENANT)

    tables = run(fn, cube_api, event("ENTITY_UPDATED", old=mid_month(3), new=mid_month(3), changedFields=["email"]))

    assert tables == {} and fn.posts == 0
    assert fn.service.last.keys == []
    assert fn.telemetry.counts.get("SkippedByFields") == 2
    assert cube_api.tables(TENANT) == before


def test_mutation_dated_before_the_build_range_is_nothing_to_build_not_a_dead_letter(
    precise, cube_api: CubeApi
) -> None:
    # Cube answers 400 "doesn't match any of the pre-aggregations" to a date range it has no
    # partition in. Such a record used to fail and be retried until it was dead-lettered.
    fn = precise()
    before = settled(cube_api)
    long_ago = datetime(2010, 3, 14, 12)

    tables = run(fn, cube_api, event("ENTITY_UPDATED", old=long_ago, new=long_ago, changedFields=["status"]))

    old_key = f"{TENANT}#{DAILY}#2010-03-01..2010-03-31"
    outcomes = {k.key.pk: (k.status, k.detail) for k in fn.service.last.keys}
    assert outcomes[old_key] == ("refreshed", "leading, nothing to build"), outcomes
    assert fn.telemetry.counts.get("NothingToBuild") == 1
    [state] = [s for k, s in fn.store.scan(TENANT) if k.pk == old_key]
    assert state.build_status == "nothing_to_build"
    assert all(DAILY_TABLE not in t for t in tables.values()), "no partition was built for 2010"
    assert_untouched(cube_api, before, set())


def test_mutation_without_hints_rebuilds_the_whole_target(precise, cube_api: CubeApi) -> None:
    fn = precise()
    before = settled(cube_api)

    tables = run(fn, cube_api, event("ENTITY_UPDATED", changedFields=["status"]))

    assert sorted(k.key.pk for k in fn.service.last.keys) == [f"{TENANT}#{DAILY}", f"{TENANT}#Users.main"]
    assert fn.telemetry.counts.get("WholeTargetFallbacks") == 1
    assert len([t for t in tables.values() if DAILY_TABLE in t]) == len(before)
    assert set(new_tables(cube_api, before)) == set(before), "every partition rebuilt"


def test_precise_sample_event_with_the_richer_map_builds_only_the_hinted_partitions(precise, cube_api: CubeApi) -> None:
    fn = precise()
    fn.reset("tenant-1", "Users.main", DAILY)
    before = settled(cube_api)
    event = json.loads((EVENTS / "precise-refresh.json").read_text())

    assert fn.handle(event) == {"batchItemFailures": []}

    for call in fn.service.recorder.calls:
        jobs = cube_api.wait_for_jobs(call.tenant_id, call.tokens)
        assert set(jobs.statuses.values()) == {"done"}, (call.tenant_id, jobs.statuses)
    hinted = {"20250101", "20250301", "20250601", "20261101"}
    built = new_tables(cube_api, before)
    assert set(built) == hinted & set(before), built
    assert_untouched(cube_api, before, hinted)
