"""Local tools without Docker: build MSK events from mutation JSON lines, and invoke the handler.

python -m preagg_cli.local make-event < mutations.jsonl > events/my-event.json
python -m preagg_cli.local invoke events/user-updated.json            # in-memory stand-ins
python -m preagg_cli.local invoke events/user-updated.json --stack    # the local stack (devstack)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import zlib
from collections.abc import Iterable
from typing import Any, TextIO

TOPIC = "core.entities.lifecycle.mutated"
CLUSTER_ARN = "arn:aws:kafka:eu-west-1:123456789012:cluster/core-events/a1b2c3d4-0000-0000-0000-000000000000-1"

# Embedded defaults for a run with in-memory stand-ins: nothing here reaches a real service.
LOCAL_DEFAULTS = {
    "CUBE_API_URL": "http://127.0.0.1:4000/cubejs-api",
    "CUBE_API_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:local-cube-secret",
    "DEBOUNCE_TABLE_NAME": "preagg-refresh-debounce",
    "REFRESH_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/preagg-refresh-trailing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "POWERTOOLS_SERVICE_NAME": "preagg-refresh",
    "POWERTOOLS_METRICS_NAMESPACE": "PreaggRefresh",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_METRICS_DISABLED": "true",
    "POWERTOOLS_LOG_LEVEL": "WARNING",
}


def build_msk_event(
    values: Iterable[Any],
    *,
    partitions: int = 2,
    topic: str = TOPIC,
    start_offset: int = 100,
    timestamp_ms: int = 1_795_953_600_000,
) -> dict[str, Any]:
    """An MSK event as Lambda delivers it. `values` are mutation objects (JSON-encoded and base64'd),
    raw strings (used as the record value as they are, to build bad records) or None (a tombstone).
    Records are spread over partitions by tenant, as a producer keyed by tenant would."""
    groups: dict[str, list[dict[str, Any]]] = {}
    offsets = [start_offset] * partitions
    for index, value in enumerate(values):
        tenant = value.get("tenantId") if isinstance(value, dict) else None
        partition = zlib.crc32(str(tenant or index).encode()) % partitions
        if isinstance(value, dict):
            encoded: str | None = base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()
            key: str | None = base64.b64encode(str(tenant).encode()).decode() if tenant else None
        else:
            encoded, key = value, None
        record = {
            "topic": topic,
            "partition": partition,
            "offset": offsets[partition],
            "timestamp": timestamp_ms + index,
            "timestampType": "CREATE_TIME",
            "key": key,
            "value": encoded,
            "headers": [],
        }
        offsets[partition] += 1
        groups.setdefault(f"{topic}-{partition}", []).append(record)
    return {
        "eventSource": "aws:kafka",
        "eventSourceArn": CLUSTER_ARN,
        "bootstrapServers": "b-1.core-events.example:9098,b-2.core-events.example:9098",
        "records": dict(sorted(groups.items())),
    }


def _read_lines(stream: TextIO) -> list[Any]:
    """JSON lines: an object is a mutation; a JSON string is a raw record value; null a tombstone."""
    values = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except ValueError as exc:
            raise SystemExit(f"line {number}: not JSON ({exc})") from None
    return values


class _Context:
    """Just enough of LambdaContext for a local run."""

    function_name = "preagg-refresh-local"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:preagg-refresh-local"
    memory_limit_in_mb = 512
    aws_request_id = "local-invoke"
    log_group_name = "/aws/lambda/preagg-refresh-local"
    log_stream_name = "local"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def invoke(path: str, *, use_stack: bool, out: TextIO) -> int:
    with open(path, encoding="utf-8") as fh:
        event = json.load(fh)
    if use_stack:
        from devstack import Stack  # noqa: PLC0415 (dev-only dependency, not in the Lambda package)

        stack_env = Stack().env().as_environ()
        # The function reads its secret from Secrets Manager; the raw value stays out of its env.
        os.environ.update({k: v for k, v in stack_env.items() if k not in {"CUBE_API_SECRET", "PG_DSN"}})
    for name, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(name, value)

    from handler import app  # noqa: PLC0415 (settings are read at import: env first)
    from handler.adapters.memory import (  # noqa: PLC0415
        CountingTelemetry,
        InMemoryDebounceStore,
        RecordingCube,
        RecordingScheduler,
    )
    from handler.domain.debounce import Debouncer  # noqa: PLC0415
    from handler.domain.service import RefreshService  # noqa: PLC0415
    from handler.wiring import SystemClock  # noqa: PLC0415

    settings = app.SETTINGS
    cube = RecordingCube()
    scheduler = RecordingScheduler()
    if use_stack:
        service = None
    else:
        clock = SystemClock()
        debouncer = Debouncer(InMemoryDebounceStore(), scheduler, clock, settings.debounce_ms)
        service = RefreshService(
            settings.entity_cube_map, debouncer, cube, CountingTelemetry(), clock, settings.cube_timezones
        )
    response = app.handle(event, _Context(), service=service)  # type: ignore[arg-type]
    print("Lambda response:", file=out)
    print(json.dumps(response, indent=2), file=out)
    if not use_stack:
        print(f"\nWhat it asked of Cube ({len(cube.requests)} POST /v1/pre-aggregations/jobs, not sent):", file=out)
        for tenant, selectors in cube.requests:
            for selector in selectors:
                print(f"  {tenant}: {json.dumps(selector, separators=(',', ':'))}", file=out)
        print(f"Trailing refreshes scheduled: {len(scheduler.messages)}", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preagg_cli.local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-event", help="build an MSK event from mutation JSON lines on stdin")
    make.add_argument("--partitions", type=int, default=2)
    make.add_argument("--topic", default=TOPIC)
    make.add_argument("--start-offset", type=int, default=100)
    run = sub.add_parser("invoke", help="run the handler on an event file")
    run.add_argument("event")
    run.add_argument("--stack", action="store_true", help="use the local stack started by `make stack-start`")
    args = parser.parse_args(argv)
    if args.command == "make-event":
        event = build_msk_event(
            _read_lines(sys.stdin), partitions=args.partitions, topic=args.topic, start_offset=args.start_offset
        )
        json.dump(event, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    return invoke(args.event, use_stack=args.stack, out=sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
