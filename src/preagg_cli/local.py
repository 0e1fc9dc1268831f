"""Local tools without Docker: build MSK events from mutation JSON lines, and invoke the handler.

python -m preagg_cli.local make-event -o events/local/mine.json < mutations.jsonl  # git-ignored
python -m preagg_cli.local invoke events/user-updated.json            # in-memory stand-ins
python -m preagg_cli.local invoke events/user-updated.json --stack    # the local stack (devstack)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import re
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

TOPIC = "core.entities.lifecycle.mutated"
CLUSTER_ARN = "arn:aws:kafka:eu-west-1:123456789012:cluster/core-events/a1b2c3d4-0000-0000-0000-000000000000-1"

# Embedded defaults for a run with in-memory stand-ins: nothing here reaches a real service.
LOCAL_DEFAULTS = {
    "CUBE_API_URL": "http://127.0.0.1:4000/cubejs-api",
    "CUBE_API_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:local-cube-secret",
    "DEBOUNCE_TABLE_NAME": "preagg-refresh-debounce",
    "REFRESH_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/preagg-refresh-trailing",
    "BUILD_DEAD_LETTER_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/preagg-refresh-trailing-dlq",
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
    strings (the record's `value` field as it is: base64, or not, to build bad records) or None (a
    tombstone). Records are spread over partitions by tenant, as a producer keyed by tenant would."""
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


class InputError(ValueError):
    """Bad input to a local tool: one line that names the problem and the fix."""


def read_lines(stream: TextIO, source: str = "stdin") -> list[Any]:
    """JSON lines: an object is a mutation; a JSON string is a raw record value; null a tombstone."""
    values = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{source} line {number}: not JSON ({exc.msg}); one JSON object per line") from None
    return values


def read_lines_from(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return read_lines(fh, path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


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


def event_kind(event: Any) -> str:
    """`msk`, `sqs` or `operation`: what this function receives; InputError naming what it is otherwise."""
    if isinstance(event, dict):
        if event.get("eventSource") in ("aws:kafka", "SelfManagedKafka", "aws:SelfManagedKafka"):
            return "msk"
        if "operation" in event:
            return "operation"
        records = event.get("Records")
        if isinstance(records, list) and records and isinstance(records[0], dict):
            source = records[0].get("eventSource") or records[0].get("EventSource")
            if source == "aws:sqs":
                return "sqs"
            if source:
                raise InputError(
                    f"this is an event from {source}, which does not invoke this function: it takes MSK batches, "
                    "SQS trailing refreshes and operations; build an MSK event with `make-event`"
                )
        if "httpMethod" in event or "requestContext" in event or "routeKey" in event:
            raise InputError(
                "this is an API Gateway event, which does not invoke this function: it takes MSK batches, "
                "SQS trailing refreshes and operations; build an MSK event with `make-event`"
            )
    described = "an empty object" if event == {} else f"a JSON {type(event).__name__} of another kind"
    raise InputError(
        f"this is {described}, not an event this function takes (an MSK batch, SQS trailing refreshes or an "
        "operation): see events/ for samples, or build an MSK event with `make-event`"
    )


def _load_event(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            event = json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; the sample events are in events/ (`ls events`)") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InputError(f"{path}: not JSON ({exc}); an event file holds one JSON object") from None
    event_kind(event)
    return dict(event)


def restamp(event: dict[str, Any], now: int) -> int:
    """The sample events carry fixed timestamps (2026-11-29): give each well-formed mutation the
    current time, so the freshness lag the function measures counts from now, not from that day. Bad
    records are left as they are. Returns how many were restamped."""
    changed = 0
    for records in (event.get("records") or {}).values():
        for record in records if isinstance(records, list) else []:
            try:
                value = json.loads(base64.b64decode(record.get("value") or "", validate=True))
            except (ValueError, AttributeError):
                continue
            if isinstance(value, dict) and _is_time(value.get("timestamp")):
                value["timestamp"] = now
                record["value"] = base64.b64encode(json.dumps(value).encode()).decode()
                changed += 1
    return changed


def _is_time(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _stack_environ() -> dict[str, str]:
    """The local stack's environment; InputError when it is not running."""
    from devstack import SERVICES, Stack, StackError  # noqa: PLC0415 (dev-only, not in the Lambda package)

    stack = Stack()
    try:
        environ = stack.env().as_environ()
    except StackError:
        raise InputError("the local stack is not running: start it with `make stack-start`") from None
    down = [name for name, status in stack.status().items() if name in SERVICES and not status.up]
    if down:
        raise InputError(f"the local stack is not running ({', '.join(down)} down): start it with `make stack-start`")
    # The function's settings are the ones the stack recorded (what its event sources run with).
    from devstack import function  # noqa: PLC0415

    function.apply(stack.state, os.environ)
    # The function reads its secret from Secrets Manager; the raw value stays out of its env.
    return {k: v for k, v in environ.items() if k not in {"CUBE_API_SECRET", "PG_DSN"}}


def _when(epoch_ms: int | None) -> str:
    if not epoch_ms:
        return "-"
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return f"{moment:%H:%M:%S}Z (in {max(0.0, (epoch_ms - time.time() * 1000) / 1000):.1f} s)"


def _describe_sqs(event: dict[str, Any], response: dict[str, Any], out: TextIO) -> None:
    from handler.domain.decode import decode_trailing_message  # noqa: PLC0415

    failed = {f.get("itemIdentifier") for f in response.get("batchItemFailures") or [] if isinstance(f, dict)}
    for record in event.get("Records", []):
        ident = record.get("messageId")
        try:
            decode_trailing_message(record.get("body", ""))
        except ValueError as exc:
            what = (
                "reported as failed: SQS delivers it again, then moves it to the DLQ"
                if ident in failed
                else "acknowledged"
            )
            print(f"  message {ident}: skipped, {exc} ({what})", file=out)


def _describe(outcomes: list[Any], out: TextIO) -> None:
    keys = [key for outcome in outcomes for key in outcome.keys]
    if not keys:
        return
    print(f"\nDecisions per key ({len(keys)}):", file=out)
    for key in keys:
        detail = re.sub(r"(?<!\d)\d{13}(?!\d)", lambda m: _when(int(m.group(0))), key.detail or "")
        if key.status == "skipped":
            detail = (
                f"{detail or 'nothing to do'}: a trailing refresh fires only for a key whose debounce item holds "
                "its token (none here: it already ran, a newer one replaced it, or this store never saw the key)"
            )
        jobs = f"; the tenant's {len(key.job_tokens)} Cube job(s): {key.job_tokens[0]}, ..." if key.job_tokens else ""
        print(f"  {key.key.pk:<28} {key.status:<11} {detail}{jobs}".rstrip(), file=out)


@contextlib.contextmanager
def _function_logs(handler: logging.Handler) -> Iterator[io.StringIO]:
    """The function's JSON logs would come before the human output: keep them, to print after it."""
    logs = io.StringIO()
    if not isinstance(handler, logging.StreamHandler):
        yield logs
        return
    stream = handler.stream
    handler.stream = logs  # not setStream: it flushes the old stream, which may be closed by now
    try:
        yield logs
    finally:
        handler.stream = stream


def invoke(path: str, *, use_stack: bool, out: TextIO) -> int:
    """Run the handler on an event file. InputError (exit 2) for a bad file, event or setting, or a
    stopped stack."""
    event = _load_event(path)
    kind = event_kind(event)
    restamped = restamp(event, int(time.time() * 1000)) if kind == "msk" else 0
    if use_stack:
        os.environ.update(_stack_environ())
    for name, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(name, value)

    from handler.settings import ConfigurationError  # noqa: PLC0415

    try:
        from handler import app  # noqa: PLC0415 (settings are read at import: env first)
    except ConfigurationError as exc:
        raise InputError(
            f"{exc}: fix or unset the variable (the defaults are in the README's configuration table)"
        ) from None
    from devstack.observe import ObservedService, build_observed_service  # noqa: PLC0415
    from handler.adapters.memory import (  # noqa: PLC0415
        CountingTelemetry,
        InMemoryDebounceStore,
        RecordingCube,
        RecordingScheduler,
    )
    from handler.domain.debounce import Debouncer  # noqa: PLC0415
    from handler.observability import logger  # noqa: PLC0415
    from handler.wiring import SystemClock  # noqa: PLC0415

    settings = app.SETTINGS
    cube = RecordingCube()
    scheduler = RecordingScheduler()
    service: ObservedService
    if use_stack:
        service = build_observed_service(settings, CountingTelemetry())
    else:
        clock = SystemClock()
        debouncer = Debouncer(InMemoryDebounceStore(), scheduler, clock, settings.debounce_ms)
        service = ObservedService(
            settings.entity_cube_map, debouncer, cube, CountingTelemetry(), clock, settings.cube_timezones
        )
        service.outcomes = []
    with _function_logs(logger.registered_handler) as logs:
        try:
            response = app.handle(event, _Context(), service=service)  # type: ignore[arg-type]
        except Exception as exc:
            where = "; is the local stack up? `make stack-status`" if use_stack else ""
            raise InputError(f"the handler failed: {type(exc).__name__}: {exc}{where}") from None
    if restamped:
        print(f"(the timestamps of {restamped} mutation(s) set to now: the sample files carry fixed ones)", file=out)
    print("Lambda response:", file=out)
    print(json.dumps(response, indent=2), file=out)
    if kind == "sqs":
        _describe_sqs(event, response, out)
    _describe(service.outcomes, out)
    if not use_stack and kind != "operation":
        print(f"\nWhat it asked of Cube ({len(cube.requests)} POST /v1/pre-aggregations/jobs, not sent):", file=out)
        for tenant, selectors in cube.requests:
            for selector in selectors:
                print(f"  {tenant}: {json.dumps(selector, separators=(',', ':'))}", file=out)
        print(f"Trailing refreshes scheduled: {len(scheduler.messages)}", file=out)
    lines = [line for line in logs.getvalue().splitlines() if line.strip()]
    if lines:
        print(f"\nFunction log ({len(lines)} line(s)):", file=out)
        for line in lines:
            print(f"  {line}", file=out)
    return 0


def _write_atomically(path: str, text: str) -> None:
    """Write `path` only once the whole text exists: a failed run leaves nothing behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preagg_cli.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-event", allow_abbrev=False, help="build an MSK event from mutation JSON lines on stdin")
    make.add_argument("--partitions", type=int, default=2)
    make.add_argument("--topic", default=TOPIC)
    make.add_argument("--start-offset", type=int, default=100)
    make.add_argument(
        "-o", "--output", metavar="FILE", help="write the event here (only if it succeeds); default stdout"
    )
    run = sub.add_parser("invoke", allow_abbrev=False, help="run the handler on an event file")
    run.add_argument("event")
    run.add_argument("--stack", action="store_true", help="use the local stack started by `make stack-start`")
    args = parser.parse_args(argv)
    try:
        if args.command == "make-event":
            values = read_lines(sys.stdin)
            if not values:
                raise InputError(
                    "no mutations on stdin: pipe JSON lines in, e.g. `make-event -o FILE < mutations.jsonl`"
                )
            # A JSON string line is the raw record value (base64'd as Lambda delivers it): `"%%% not json"`
            # makes a `not_json` record, as `preagg-refresh produce --file` publishes it.
            raw = [base64.b64encode(v.encode()).decode() if isinstance(v, str) else v for v in values]
            event = build_msk_event(raw, partitions=args.partitions, topic=args.topic, start_offset=args.start_offset)
            text = json.dumps(event, indent=2) + "\n"
            if args.output:
                _write_atomically(args.output, text)
                print(f"wrote {args.output}: {len(values)} record(s)", file=sys.stderr)
            else:
                sys.stdout.write(text)
            return 0
        return invoke(args.event, use_stack=args.stack, out=sys.stdout)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
