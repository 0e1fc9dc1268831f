"""Partition-precise vs whole-target refreshes, both sides measured in the same run.

1. `cube` (needs the local stack: PostgreSQL + the real Cube; started if it is not running): for a
   handful of mutations of tenant-h (30 months of history, ~31 monthly partitions of
   Users.dailyStatusCounts), each dated in a different month, the real service posts to the real Cube
   and the benchmark waits until every job is done. Per mutation: Cube jobs, partitions built, and
   build wall time (handle() until every job is `done`), with a whole-target map and with the
   partition-precise map, alternating, over the configured time zones.
2. `keys` (in-memory adapters, no servers): what the finer keys cost on the AWS side for a
   10,000-record batch with realistic hints (most rows in the current month, some in the previous
   months, a few older): DynamoDB conditional writes, SQS messages and Cube requests, for a first
   batch (leading refreshes), a second batch inside the window (debounced) and the trailing
   refreshes that follow, per-partition keys vs whole-target keys.

    PYTHONPATH=src:. .venv/bin/python bench/bench_precise.py [--part cube|keys|both] [--mutations 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from datetime import UTC, date, datetime
from typing import Any

TENANT = "tenant-h"
DAILY = "Users.dailyStatusCounts"
WHOLE_MAP = {"User": [DAILY]}
PRECISE_MAP = {"User": [{"target": DAILY, "partitionBy": "timeHints.createdAt", "granularity": "month"}]}
TIMEZONES = "UTC,America/New_York"
RECORDS = 10_000
# Dense: 500 mutations per tenant per batch (most months of each tenant touched). Sparse: 5 per tenant.
TENANT_COUNTS = (20, 2_000)
T0 = datetime(2026, 11, 20, 12, tzinfo=UTC)


def months_ago(n: int, day: int = 15) -> datetime:
    today = datetime.now(UTC)
    index = today.year * 12 + today.month - 1 - n
    return datetime(index // 12, index % 12 + 1, day, 12, tzinfo=UTC)


def mutation(tenant: str, when: datetime, *, hinted: bool = True, event_type: str = "ENTITY_UPDATED") -> dict[str, Any]:
    value: dict[str, Any] = {
        "eventType": event_type,
        "entityType": "User",
        "entityId": f"u-{random.getrandbits(40):x}",
        "tenantId": tenant,
        "timestamp": int(T0.timestamp() * 1000),
    }
    if hinted:
        value["timeHints"] = {"createdAt": {"old": when.isoformat(), "new": when.isoformat()}}
    return value


# ----------------------------------------------------------------------------- 1. real Cube


def bench_cube(mutations: int) -> list[str]:
    from devstack import Stack  # noqa: PLC0415

    stack = Stack()
    down = [name for name, status in stack.status().items() if not status.up]
    env = stack.start()
    try:
        return _bench_cube(stack, env, mutations)
    finally:
        if down:
            stack.stop()


def _bench_cube(stack: Any, env: Any, mutations: int) -> list[str]:
    from devstack.cubeapi import CubeApi, RollupTable, Spacer  # noqa: PLC0415

    for name, value in env.as_environ().items():
        if name not in {"CUBE_API_SECRET", "PG_DSN"}:
            os.environ[name] = value
    os.environ.update({"POWERTOOLS_LOG_LEVEL": "ERROR", "POWERTOOLS_METRICS_DISABLED": "true"})
    from devstack.observe import build_observed_service  # noqa: PLC0415
    from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
    from handler.app import handle  # noqa: PLC0415
    from handler.settings import load_settings  # noqa: PLC0415
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    cube = CubeApi(stack, env)
    spacer = Spacer()
    cube.build(TENANT, ["Users"], spacer=spacer)
    partitions = len(cube.partition_tables(TENANT, "users_daily_status_counts"))
    zones = TIMEZONES.split(",")
    sides = {"whole-target": WHOLE_MAP, "partition-precise": PRECISE_MAP}
    figures: dict[str, dict[str, list[float]]] = {s: {"jobs": [], "partitions": [], "seconds": []} for s in sides}
    ages = [0, 1, 3, 7, 14, 25, 2, 5, 10, 20][:mutations]
    for age in ages:
        when = months_ago(age)
        for side, mapping in sides.items():
            settings = load_settings(
                ENTITY_CUBE_MAP=json.dumps(mapping), CUBE_TIMEZONES=TIMEZONES, CUBE_PREAGG_DEBOUNCE_MS="0"
            )
            service = build_observed_service(settings, CountingTelemetry(), spacer)
            spacer.wait(TENANT)
            began = time.monotonic()
            response = handle(build_msk_event([mutation(TENANT, when)]), None, service=service, settings=settings)
            tokens = sorted({t for k in service.last.keys for t in k.job_tokens})
            result = cube.wait_for_jobs(TENANT, tokens, interval_s=0.05)
            seconds = time.monotonic() - began
            assert response == {"batchItemFailures": []}, response
            parsed = [RollupTable.parse(table.rsplit(".", 1)[-1]) for table in result.tables.values()]
            built = {t.partition for t in parsed if t is not None}
            figures[side]["jobs"].append(len(tokens))
            figures[side]["partitions"].append(len(built))
            figures[side]["seconds"].append(seconds)
    lines = [
        f"cube: {len(ages)} mutations of {TENANT} dated {', '.join(months_ago(a).strftime('%Y-%m') for a in ages)}; "
        f"{partitions} monthly partitions; time zones {TIMEZONES}",
        "| per mutation | whole-target | partition-precise | ratio |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("jobs", "Cube jobs"),
        ("partitions", "distinct partitions built"),
        ("seconds", "build wall time s (median)"),
    ):
        whole = statistics.median(figures["whole-target"][name])
        precise = statistics.median(figures["partition-precise"][name])
        ratio = f"{whole / precise:.1f}x" if precise else "-"
        fmt = "{:.2f}" if name == "seconds" else "{:g}"
        lines.append(f"| {label} | {fmt.format(whole)} | {fmt.format(precise)} | {ratio} |")
    goal = 1 * len(zones)
    lines.append(
        f"goal: jobs per mutation = partitions touched x time zones = 1 x {len(zones)} = {goal}; "
        f"measured {statistics.median(figures['partition-precise']['jobs']):g}"
    )
    return lines


# ----------------------------------------------------------------------------- 2. AWS-side cost


def realistic_batch(rng: random.Random, start_offset: int, tenants: int) -> dict[str, Any]:
    """10,000 updates over `tenants` tenants: 80 % dated in the current month, 15 % in the 3 before, 5 % in
    the 24 before that; one in ten is a create."""
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    values = []
    for _ in range(RECORDS):
        roll = rng.random()
        age = 0 if roll < 0.80 else rng.randint(1, 3) if roll < 0.95 else rng.randint(4, 27)
        index = T0.year * 12 + T0.month - 1 - age
        when = datetime(index // 12, index % 12 + 1, rng.randint(1, 28), rng.randint(0, 23), tzinfo=UTC)
        create = rng.random() < 0.1
        value = mutation(
            f"tenant-{rng.randrange(tenants):04d}", when, event_type="ENTITY_CREATED" if create else "ENTITY_UPDATED"
        )
        if create:
            value["timeHints"] = {"createdAt": {"new": when.isoformat()}}
        values.append(value)
    return build_msk_event(values, start_offset=start_offset)


HISTORY_MONTHS = 28  # the batches' rows span the current month and the 27 before it


def partition_builds(requests: list[tuple[str, list[dict[str, object]]]]) -> int:
    """Monthly partitions the posted selectors ask Cube to build: the months a `dateRange` spans, or
    every month of the history for a selector without one (one time zone)."""
    total = 0
    for _, selectors in requests:
        for selector in selectors:
            date_range = selector.get("dateRange")
            if not isinstance(date_range, list):
                total += HISTORY_MONTHS
                continue
            first, last = (date.fromisoformat(str(d)[:10]) for d in date_range)
            total += (last.year - first.year) * 12 + last.month - first.month + 1
    return total


def bench_keys() -> list[str]:
    lines: list[str] = []
    for tenants in TENANT_COUNTS:
        lines += _bench_keys(tenants)
    return lines


def _bench_keys(tenants: int) -> list[str]:
    from handler.adapters.memory import CountingTelemetry, InMemoryDebounceStore, RecordingCube, RecordingScheduler  # noqa: PLC0415
    from handler.domain.debounce import Debouncer  # noqa: PLC0415
    from handler.domain.decode import decode_msk_event  # noqa: PLC0415
    from handler.domain.routing import EntityCubeMap  # noqa: PLC0415
    from handler.domain.service import RefreshService  # noqa: PLC0415

    class Clock:
        now = int(T0.timestamp() * 1000)

        def now_ms(self) -> int:
            return self.now

    rng = random.Random(9)
    batches = [
        decode_msk_event(realistic_batch(rng, 0, tenants), now_ms=int(T0.timestamp() * 1000)).mutations,
        decode_msk_event(realistic_batch(rng, RECORDS, tenants), now_ms=int(T0.timestamp() * 1000)).mutations,
    ]
    rows: dict[str, dict[str, int]] = {}
    for side, mapping in (("whole-target", WHOLE_MAP), ("partition-precise", PRECISE_MAP)):
        clock = Clock()
        store, scheduler, cube = InMemoryDebounceStore(), RecordingScheduler(), RecordingCube()
        debouncer = Debouncer(store, scheduler, clock, 30_000)
        service = RefreshService(EntityCubeMap(mapping), debouncer, cube, CountingTelemetry(), clock, ("UTC",))
        counts: dict[str, int] = {}
        for name, batch, advance in (("batch 1", batches[0], 0), ("batch 2 (in window)", batches[1], 5_000)):
            clock.now += advance
            writes, messages, posts = store.writes, len(scheduler.messages), len(cube.requests)
            outcome = service.process_mutations(batch, deadline_ms=clock.now + 60_000)
            assert not outcome.failed
            counts[f"{name}: keys"] = len(outcome.keys)
            counts[f"{name}: DynamoDB writes"] = store.writes - writes
            counts[f"{name}: SQS messages"] = len(scheduler.messages) - messages
            counts[f"{name}: Cube requests (tenants)"] = len(cube.requests) - posts
            counts[f"{name}: Cube selectors"] = sum(len(s) for _, s in cube.requests[posts:])
            counts[f"{name}: partitions to build"] = partition_builds(cube.requests[posts:])
        clock.now += 30_000
        due = scheduler.due(clock.now)
        writes, posts = store.writes, len(cube.requests)
        from handler.domain.model import RecordRef  # noqa: PLC0415

        fired = service.process_trailing(
            [(RecordRef("sqs", i), m) for i, m in enumerate(due)], deadline_ms=clock.now + 60_000
        )
        assert not fired.failed
        counts["trailing: DynamoDB writes"] = store.writes - writes
        counts["trailing: Cube selectors"] = sum(len(s) for _, s in cube.requests[posts:])
        counts["trailing: partitions to build"] = partition_builds(cube.requests[posts:])
        counts["total DynamoDB writes"] = store.writes
        counts["total SQS messages"] = len(scheduler.messages) + len(due)
        counts["total partitions to build"] = sum(v for k, v in counts.items() if k.endswith("partitions to build"))
        rows[side] = counts
    lines = [
        f"keys: 2 x {RECORDS:,} records over {tenants:,} tenants (80 % current month, 15 % 1-3 months "
        "back, 5 % 4-27 months back; 10 % creates), window 30 s, UTC",
        "| figure | whole-target (today) | partition-precise | precise / today |",
        "|---|---|---|---|",
    ]
    for name in rows["whole-target"]:
        today, precise = rows["whole-target"][name], rows["partition-precise"][name]
        lines.append(
            f"| {name} | {today:,} | {precise:,} | {precise / today:.2f}x |"
            if today
            else f"| {name} | 0 | {precise:,} | - |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cube", "keys", "both"], default="both")
    parser.add_argument("--mutations", type=int, default=6)
    args = parser.parse_args()
    print(f"bench_precise {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}")
    if args.part in {"keys", "both"}:
        print("\n".join(bench_keys()))
    if args.part in {"cube", "both"}:
        print("\n".join(bench_cube(args.mutations)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
