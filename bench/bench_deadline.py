"""How long one MSK batch of 10,000 distinct tenants takes against the function's remaining time,
on the production wiring (DynamoDB store, thread pool of IO_THREADS) over moto's in-process
DynamoDB, with an in-memory Cube and trailing scheduler.

Run from the repository root (the benchmark does not touch sys.path; `src` comes from PYTHONPATH):

    PYTHONPATH=src .venv/bin/python bench/bench_deadline.py [--tenants 10000] [--remaining-s 60]

Three runs in the same process, each on a fresh table: the batch with `--remaining-s` left (as
`lambda_handler` would see it, minus the handler's reserve) with Cube accepting, the same with Cube
failing every request (every claim must then be released), and the baseline: the same batch with
unlimited time, i.e. what the whole batch costs on this backend. moto is slower than DynamoDB; the
point is that the first run ends within its remaining time whatever the backend's speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

T0_MS = 1_795_953_600_000
TABLE = "bench-debounce"


def _configure_env() -> None:
    from preagg_cli.local import LOCAL_DEFAULTS  # noqa: PLC0415 (env must precede handler.app)

    for name, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ.update(
        {
            "POWERTOOLS_LOG_LEVEL": "ERROR",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_METRICS_DISABLED": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )


class _Context:
    def __init__(self, remaining_ms: int) -> None:
        self._end = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self._end - time.monotonic()) * 1000)


def _run(tenants: int, remaining_ms: int, *, cube_down: bool = False) -> dict[str, Any]:
    import boto3  # noqa: PLC0415
    from moto import mock_aws  # noqa: PLC0415

    from handler import app  # noqa: PLC0415
    from handler.adapters.dynamodb import DynamoDBDebounceStore  # noqa: PLC0415
    from handler.adapters.memory import CountingTelemetry, RecordingCube, RecordingScheduler  # noqa: PLC0415
    from handler.domain.debounce import Debouncer  # noqa: PLC0415
    from handler.domain.errors import CubeUnreachable  # noqa: PLC0415
    from handler.domain.routing import EntityCubeMap  # noqa: PLC0415
    from handler.domain.service import RefreshService  # noqa: PLC0415
    from handler.wiring import IO_THREADS, SystemClock, ThreadMap  # noqa: PLC0415
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    event = build_msk_event(
        [
            {"eventType": "updated", "entityType": "User", "entityId": f"u{i}", "tenantId": f"t{i}", "timestamp": T0_MS}
            for i in range(tenants)
        ],
        partitions=3,
    )
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        client.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        clock, cube, telemetry = SystemClock(), RecordingCube(), CountingTelemetry()
        if cube_down:  # every request fails: every claim must be released
            cube.failures.extend(CubeUnreachable("down") for _ in range(tenants))
        store = DynamoDBDebounceStore(client, TABLE)
        debouncer = Debouncer(store, RecordingScheduler(), clock, 30_000)
        service = RefreshService(
            EntityCubeMap(), debouncer, cube, telemetry, clock, ("UTC",), map_io=ThreadMap(IO_THREADS)
        )
        started = time.monotonic()
        response = app.handle(event, _Context(remaining_ms), service=service)  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        pages = client.get_paginator("scan").paginate(TableName=TABLE)
        claimed = sum(1 for page in pages for item in page["Items"] if "claimToken" in item)
    return {
        "elapsed_s": elapsed,
        "reported": len(response["batchItemFailures"]),
        "refreshed": telemetry.counts.get("RefreshesTriggered", 0),
        "cube_posts": len(cube.requests),
        "released": telemetry.counts.get("ClaimsReleased", 0),
        "claims_left_unreleased": claimed - telemetry.counts.get("RefreshesTriggered", 0),
    }


def main() -> int:
    try:
        import handler  # noqa: F401, PLC0415
    except ImportError:
        print("run from the repository root with PYTHONPATH=src", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--remaining-s", type=float, default=60.0)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    _configure_env()
    load = os.getloadavg()
    print(
        f"bench_deadline {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {args.tenants} distinct tenants, "
        f"moto in-process, load average {load[0]:.1f}"
    )
    remaining = int(args.remaining_s * 1000)
    runs = [("bounded, Cube up", remaining, False), ("bounded, Cube down", remaining, True)]
    if not args.skip_baseline:
        runs.append(("baseline (unlimited time)", 3_600_000, False))
    print(
        f"{'run':<28}{'remaining s':>12}{'took s':>9}{'refreshed':>11}{'reported':>10}{'Cube POSTs':>12}"
        f"{'released':>10}{'claims left':>13}"
    )
    for name, left, down in runs:
        r = _run(args.tenants, left, cube_down=down)
        print(
            f"{name:<28}{left / 1000:>12.0f}{r['elapsed_s']:>9.1f}{r['refreshed']:>11}{r['reported']:>10}"
            f"{r['cube_posts']:>12}{r['released']:>10}{r['claims_left_unreleased']:>13}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
