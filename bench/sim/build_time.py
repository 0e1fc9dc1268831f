"""Build time per partition on the local stack (PostgreSQL + the real Cube 1.7.43): the default of the
scale simulation's `build_s` (bench/sim/scenarios/*.yaml). Part of the benchmarks, not of CI.

    PYTHONPATH=src:. .venv/bin/python -m bench.sim.build_time [--runs 5]

Each run asks the stack's Cube, through the jobs API, to rebuild every monthly partition of tenant-h's
`Users.dailyStatusCounts` (31 partitions, one time zone) and polls until all are `done`. Two figures:
- **queue slot time per partition**: wall time from the POST to the last `done` x Cube's queue
  concurrency for PostgreSQL (2, `PostgresDriver.getDefaultConcurrency`) / partitions. This is how
  long one build holds one of Cube's build slots (its SQL and Cube's own work around it), the quantity
  the simulation's queue needs;
- **CREATE TABLE time**: the PostgreSQL duration of each partition's `CREATE TABLE ... AS SELECT`
  (`log_min_duration_statement=0` for the run), the warehouse part alone.
The seeded partitions are tiny (20 rows a month): these are the floor of a build's cost, not a real
warehouse's. Runs are spaced 1.1 s apart (two builds of one partition within a second collide)."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

TENANT = "tenant-h"
PREAGG = "Users.dailyStatusCounts"
CONCURRENCY = 2  # Cube's default queue concurrency for PostgreSQL
_DURATION = re.compile(r"LOG:  duration: (?P<ms>[\d.]+) ms  (?:statement|execute [^:]*): (?P<sql>.*)")


def create_table_ms(log: Path, start: int) -> list[float]:
    with log.open("rb") as handle:
        handle.seek(start)
        text = handle.read().decode(errors="replace")
    return [
        float(m["ms"])
        for m in map(_DURATION.search, text.splitlines())
        if m and m["sql"].upper().startswith("CREATE TABLE") and "users_daily_status_counts" in m["sql"]
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)

    from devstack import Stack  # noqa: PLC0415
    from devstack.cubeapi import CubeApi, Spacer  # noqa: PLC0415

    stack = Stack()
    was_up = stack.status()["postgres"].up
    env = stack.start()
    api = CubeApi(stack, env)
    print(f"build_time: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}")
    api.build(TENANT, ["Users"], spacer=Spacer())  # the schema and every table exist before timing
    log = stack.logs / "postgres.log"
    stack.psql("ALTER SYSTEM SET log_min_duration_statement = 0")
    stack.psql("SELECT pg_reload_conf()")
    slots: list[float] = []
    creates: list[float] = []
    try:
        for run in range(args.runs):
            time.sleep(1.1)
            start = log.stat().st_size
            selector = {
                "contexts": [{"securityContext": {"tenantId": TENANT}}],
                "timezones": ["UTC"],
                "preAggregations": [PREAGG],
            }
            began = time.monotonic()
            tokens = api.jobs(TENANT, {"action": "post", "selector": selector})
            result = api.wait_for_jobs(TENANT, tokens, interval_s=0.05)
            wall = time.monotonic() - began
            time.sleep(0.5)  # PostgreSQL writes its log
            ms = create_table_ms(log, start)
            slot = wall * CONCURRENCY / len(tokens)
            slots.append(slot)
            creates.extend(ms)
            print(
                f"run {run + 1}: {len(tokens)} partitions done in {wall:.2f} s (polled {result.seconds:.2f} s): "
                f"{slot:.3f} s of a build slot per partition; CREATE TABLE median {statistics.median(ms):.1f} ms "
                f"({len(ms)} statements)",
                flush=True,
            )
    finally:
        stack.psql("ALTER SYSTEM RESET log_min_duration_statement")
        stack.psql("SELECT pg_reload_conf()")
        if not was_up:
            stack.stop()
    print(
        f"\nqueue slot time per partition: median {statistics.median(slots):.3f} s, min {min(slots):.3f}, "
        f"max {max(slots):.3f} ({args.runs} runs of 31 partitions, concurrency {CONCURRENCY})\n"
        f"CREATE TABLE per partition: median {statistics.median(creates):.1f} ms, "
        f"p90 {statistics.quantiles(creates, n=10)[-1]:.1f} ms ({len(creates)} statements)\n"
        f"load average {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
