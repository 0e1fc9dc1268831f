"""Operator CLI `preagg-refresh`: refresh now, debounce stats, clear debounce state, replay failed records,
and (local stack only) produce mutations to the local Kafka topic and query what Cube serves.

Targets: `--stack NAME` (a deployed stack, found through its CloudFormation outputs; operations run in
the function through lambda:InvokeFunction) or `--local` (the local stack of `make stack-start`,
operations run in this process against it; the default when `.stack/env.json` exists in the working
directory, a parent, or the checkout this CLI is installed from).
Exit codes: 0 success, 1 an operation or record failed, 2 usage or configuration error.
See docs/operations.md.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from handler.domain.routing import EntityCubeMap
from preagg_cli import replay
from preagg_cli.localstack import LocalStack, LocalStackError, quiet_kafka_logger

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient
    from mypy_boto3_s3 import S3Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ENV_FILE = Path(".stack") / "env.json"
# The checkout this CLI is installed from (`pip install -e .`, what `make venv` does).
INSTALLED_ROOT = Path(__file__).resolve().parents[2]
STACK_OUTPUTS = ("FunctionName", "DebounceTableName", "TrailingQueueUrl", "DeadLetterBucketName")
TOPIC = "core.entities.lifecycle.mutated"
DEAD_LETTER_TOPIC = f"{TOPIC}.dlt"


class UsageError(Exception):
    """Wrong arguments or configuration: exit 2; the message says what to do."""


class OperationFailed(Exception):
    """The target was reached but the operation failed: exit 1; the message says what to check."""


# -- targets -------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where operations run. `invoke` takes a direct-invoke payload or an MSK event and returns the
    function's answer; `routes` is the entity -> cube map the function uses (for replay plans)."""

    name: str
    invoke: Callable[[Mapping[str, Any]], dict[str, Any]]
    routes: Callable[[], EntityCubeMap]
    s3: Callable[[], S3Client]
    dead_letter_bucket: str | None = None
    kafka: str | None = None  # the local stack's Kafka endpoint ("" when it is not running)
    local: LocalStack | None = None  # local-stack-only features (query, lag, journal); None when deployed


def find_env_file(start: Path | None = None) -> Path | None:
    """`.stack/env.json` in the working directory or one of its parents, else in the checkout this
    CLI is installed from (`pip install -e .`, what `make venv` does): the CLI works from any folder."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents, INSTALLED_ROOT):
        candidate = directory / ENV_FILE
        if candidate.is_file():
            return candidate
    return None


def local_target(env_file: Path) -> Target:
    try:
        env = json.loads(env_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {env_file} ({exc}): restart the local stack with `make stack-start`") from None
    if not isinstance(env, dict):
        raise UsageError(f"{env_file} is not a JSON object: restart the local stack with `make stack-start`")
    log_file = env_file.parent / "logs" / "cli-function.log"
    os.environ.update({str(k): str(v) for k, v in env.items()})
    # The function's settings are the ones the local stack recorded (.stack/function.json), so a
    # refresh here debounces with the window the local event sources use; none from this shell.
    from devstack import function as function_settings  # noqa: PLC0415 - dev-only, installed with the CLI

    function_settings.apply(env_file.parent, os.environ)
    os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "preagg-refresh")
    os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")

    def invoke(payload: Mapping[str, Any]) -> dict[str, Any]:
        from handler.settings import ConfigurationError  # noqa: PLC0415

        try:
            from handler import app  # noqa: PLC0415 (settings are read at import: environment first)
        except ConfigurationError as exc:
            raise UsageError(f"{exc}: check {env_file} or restart the stack with `make stack-start`") from None
        from handler.observability import logger  # noqa: PLC0415

        handler = logger.registered_handler
        if isinstance(handler, logging.StreamHandler):
            # The function's JSON logs go to a file, not in front of the CLI's human output.
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler.setStream(log_file.open("a", encoding="utf-8"))
        try:
            return app.handle(payload)
        except Exception as exc:
            raise OperationFailed(
                f"{type(exc).__name__}: {exc}. Is the local stack up? `make stack-status` (function log: {log_file})"
            ) from exc

    def routes() -> EntityCubeMap:
        from handler.settings import ConfigurationError, load_settings  # noqa: PLC0415

        try:
            return load_settings().entity_cube_map
        except ConfigurationError as exc:
            raise UsageError(f"{exc}: check {env_file}") from None

    def s3() -> S3Client:
        import boto3  # noqa: PLC0415

        return boto3.client("s3")

    local = LocalStack(env_file.parent.parent, {str(k): str(v) for k, v in env.items()})
    return Target(
        f"local stack ({env_file})", invoke, routes, s3, kafka=str(env.get("KAFKA_BOOTSTRAP_SERVERS", "")), local=local
    )


def stack_outputs(stack: str, cfn: Any = None) -> dict[str, str]:
    """The stack's CloudFormation outputs by key; UsageError with a hint when the stack cannot be read."""
    import boto3  # noqa: PLC0415
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError  # noqa: PLC0415

    try:
        client = cfn or boto3.client("cloudformation")
        stacks = client.describe_stacks(StackName=stack)["Stacks"]
    except (NoCredentialsError, NoRegionError) as exc:
        hint = "set AWS_PROFILE (or credentials) and AWS_DEFAULT_REGION (or --region) for the stack's account"
        raise UsageError(f"{exc}: {hint}") from None
    except ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", str(exc))
        if "does not exist" in message:
            raise UsageError(
                f"stack {stack!r} not found in {client.meta.region_name}: check the name "
                "(`aws cloudformation list-stacks`) and the region (--region)"
            ) from None
        raise UsageError(f"cannot describe stack {stack!r}: {message}") from None
    except BotoCoreError as exc:
        raise UsageError(f"cannot reach CloudFormation: {exc}") from None
    outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in stacks[0].get("Outputs", [])}
    if not outputs.get("FunctionName"):
        raise UsageError(f"stack {stack!r} has no FunctionName output: is it a preagg-refresh stack, fully deployed?")
    return outputs


def lambda_invoker(client: LambdaClient, function: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    def invoke(payload: Mapping[str, Any]) -> dict[str, Any]:
        try:
            response = client.invoke(
                FunctionName=function, InvocationType="RequestResponse", Payload=json.dumps(payload).encode()
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in ("AccessDeniedException", "AccessDenied"):
                raise UsageError(f"not allowed to invoke {function}: you need lambda:InvokeFunction on it") from None
            raise OperationFailed(f"invoking {function} failed: {error.get('Message', exc)}") from None
        except BotoCoreError as exc:
            raise OperationFailed(f"invoking {function} failed: {exc}") from None
        body = response["Payload"].read()
        try:
            answer = json.loads(body) if body else {}
        except ValueError:
            answer = body.decode(errors="replace")
        if response.get("FunctionError"):
            text = body.decode(errors="replace")
            detail = answer.get("errorMessage", text) if isinstance(answer, dict) else text
            raise OperationFailed(
                f"the function failed: {detail}. See its logs: `aws logs tail /aws/lambda/{function} --since 10m`"
            )
        if not isinstance(answer, dict):
            raise OperationFailed(f"unexpected answer from {function}: {answer!r}")
        return answer

    return invoke


def stack_target(stack: str) -> Target:
    import boto3  # noqa: PLC0415

    outputs = stack_outputs(stack)
    function = outputs["FunctionName"]
    client = boto3.client("lambda")

    def routes() -> EntityCubeMap:
        """The function's ENTITY_CUBE_MAP (needs lambda:GetFunctionConfiguration), else the seed map."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            env = client.get_function_configuration(FunctionName=function).get("Environment", {})
            raw = env.get("Variables", {}).get("ENTITY_CUBE_MAP")
        except (ClientError, BotoCoreError):
            print(
                "note: cannot read the function's ENTITY_CUBE_MAP (lambda:GetFunctionConfiguration): "
                "the plan uses the default map",
                file=sys.stderr,
            )
            raw = None
        return EntityCubeMap(json.loads(raw)) if raw else EntityCubeMap()

    def s3() -> S3Client:
        return boto3.client("s3")

    return Target(
        f"stack {stack} (function {function})",
        lambda_invoker(client, function),
        routes,
        s3,
        dead_letter_bucket=outputs.get("DeadLetterBucketName"),
    )


def resolve_target(args: argparse.Namespace) -> Target:
    if args.region:
        os.environ["AWS_DEFAULT_REGION"] = args.region
    if args.stack:
        return stack_target(args.stack)
    env_file = Path(args.env_file) if args.env_file else find_env_file()
    if env_file is None or not env_file.is_file():
        raise UsageError("no local stack (.stack/env.json not found): run `make stack-start` or pass --stack NAME")
    return local_target(env_file)


# -- output --------------------------------------------------------------------------------------
class ProgressBar:
    """A bar on stderr, drawn only when stderr is a terminal (never pollutes piped output)."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        width = 30
        filled = width * done // total
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _when(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    moment = datetime.fromtimestamp(datetime.fromisoformat(iso).timestamp(), tz=UTC)
    seconds = (moment - now).total_seconds()
    if abs(seconds) < 1:
        relative = "just now"
    elif abs(seconds) >= 3600:
        relative = f"in {int(seconds // 3600)}h" if seconds > 0 else f"{int(-seconds // 3600)}h ago"
    else:
        relative = f"in {round(seconds)}s" if seconds > 0 else f"{round(-seconds)}s ago"
    return f"{moment.strftime('%Y-%m-%d %H:%M:%S')}Z ({relative})"


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


# Cube's 400 for a selector naming no cube or pre-aggregation of the tenant's data model.
NO_MATCH = "doesn't match any of the pre-aggregations"


def _hint_for(detail: str, target: str = "", known: Sequence[str] = ()) -> str:
    if detail.startswith("client") and NO_MATCH in detail:
        if not known:
            return f"no cube or pre-aggregation named {target!r} in the tenant's data model (names are case-sensitive)"
        close = difflib.get_close_matches(target, known, n=1, cutoff=0.5) or [
            k for k in known if k.lower() == target.lower()
        ]
        guess = f"did you mean {close[0]!r}? " if close else ""
        return (
            f"no cube or pre-aggregation named {target!r} (names are case-sensitive): "
            f"{guess}Cube has {', '.join(known)}"
        )
    if "pg_namespace_nspname_index" in detail:
        return (
            "Cube's first build into this tenant's schema raced another one (Cube creates the schema while "
            "building; docs/cube-jobs-api.md, hazard d): run the same command again"
        )
    if detail.startswith("client"):
        return (
            "Cube refused the request: check the cube names exist in the tenant's data model and that "
            "the secret behind CUBE_API_SECRET_ARN is Cube's CUBEJS_API_SECRET"
        )
    if detail.startswith(("server", "timeout", "connection")):
        return "Cube failed or is unreachable: check Cube is up at CUBE_API_URL (and its logs), then retry"
    return "the debounce store or queue failed: check DynamoDB/SQS access and retry"


def _epochs_to_iso(text: str) -> str:
    """`due at 1795953630000` (epoch ms, as the service words it) -> `due at 2026-11-29 12:00:30Z`."""

    def iso(match: re.Match[str]) -> str:
        moment = datetime.fromtimestamp(int(match.group(0)) / 1000, tz=UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%SZ")

    return re.sub(r"(?<!\d)\d{13}(?!\d)", iso, text)


def print_refresh(result: Mapping[str, Any], out: TextIO, known: Callable[[], Sequence[str]] = tuple) -> None:
    """`known`: the cubes and pre-aggregations Cube has (local stack), asked only for a misnamed target."""
    print(f"tenant {result.get('tenantId')}{' (forced)' if result.get('force') else ''}:", file=out)
    for key in result.get("keys", []):
        status, detail = key["status"], _epochs_to_iso(key.get("detail") or "")
        if status == "refreshed":
            line = f"refreshed ({detail}), {len(key.get('jobs', []))} Cube job(s) queued"
        elif status == "debounced":
            line = f"debounced: refreshed within the window; {detail or 'trailing refresh pending'}"
            line += " (use --force to refresh now)"
        elif status == "deferred":
            line = f"deferred: {detail}; it refreshes when Cube's build budget frees (use --force to refresh now)"
        else:
            names = known() if NO_MATCH in detail else ()
            line = f"{status}: {detail}\n      what to check: {_hint_for(detail, key['target'], names)}"
        print(f"  {key['target']:<32} {line}", file=out)


def print_stats(result: Mapping[str, Any], out: TextIO, now: datetime) -> None:
    keys = result.get("keys", [])
    window = result.get("windowMs", 0)
    if not keys:
        print(f"no debounce state (window {window} ms)", file=out)
        return
    rows = [["TENANT", "TARGET", "LAST REFRESH", "WINDOW ENDS", "TRAILING", "PENDING SINCE", "LAST BUILD", "EXPIRES"]]
    for key in keys:
        trailing = key.get("trailingRefresh")
        pending = f"{trailing['state']}, due {_when(trailing.get('dueAt'), now)}" if trailing else "-"
        last = _when(key.get("lastRefreshStartedAt"), now)
        rows.append(
            [
                key["tenantId"],
                _name(key),
                last,
                _when(key.get("windowEndsAt"), now),
                pending,
                _when(trailing.get("pendingSince"), now) if trailing else "-",
                describe_build(key.get("lastBuild"), now),
                _when(key.get("expiresAt"), now),
            ]
        )
    _table(rows, out)
    print(f"{len(keys)} key(s), window {window} ms", file=out)


def describe_build(build: Mapping[str, Any] | None, now: datetime) -> str:
    """`last built 12:00:03Z (freshness lag 4.1 s)` or `build failed: <reason> (re-trigger 2/5 due ...)`."""
    if not build:
        return "-"
    if build.get("status") == "done":
        lag = build.get("freshnessLagMs")
        lag_text = f" (freshness lag {lag / 1000:.1f} s)" if isinstance(lag, int) else ""
        return f"last built {_when(build.get('seenAt'), now)}{lag_text}"
    if build.get("status") == "nothing_to_build":
        return f"nothing to build {_when(build.get('seenAt'), now)} (no partition in range, or no such pre-aggregation)"
    failure_class, error = build.get("failureClass"), build.get("error")
    # Cube's text for a failed build already starts with its class ("failure: column ... does not exist").
    reason = (
        (error if str(error).startswith(f"{failure_class}:") else f"{failure_class}: {error}")
        if error
        else failure_class
    )
    failures, most = build.get("failures") or 0, build.get("maxRetriggers") or 0
    if build.get("status") == "dead_lettered":
        return f"build failed: {reason} (dead-lettered after {most} re-triggers)"
    due = build.get("retriggerDueAt")
    retry = f"re-trigger {failures}/{most} due {_when(due, now)}" if due else "covered by a newer refresh"
    return f"build failed: {reason} ({retry})"


def print_jobs(result: Mapping[str, Any], out: TextIO) -> None:
    keys = result.get("keys", [])
    if not keys:
        print(f"no refresh with job tokens recorded for tenant {result.get('tenantId')}", file=out)
        return
    rows = [["TARGET", "REFRESH STARTED", "JOB", "STATUS", "TABLE"]]
    for key in keys:
        for job in key.get("jobs", []):
            rows.append([_name(key), key.get("refreshStartedAt") or "-", job["token"], job["status"], job["table"]])
    _table(rows, out)


def print_plan(plan: replay.ReplayPlan, out: TextIO) -> None:
    data = plan.as_dict()
    print(
        f"{data['records']} record(s): {data['valid']} valid, {len(plan.invalid)} invalid, "
        f"{data['duplicatesDropped']} duplicate(s) dropped",
        file=out,
    )
    if data["byTenant"]:
        rows = [["TENANT", "TARGET", "RECORDS"]]
        rows += [[t, target, str(n)] for t, targets in data["byTenant"].items() for target, n in targets.items()]
        _table(rows, out)
    for entity, count in data["unmapped"].items():
        print(f"unmapped entity type {entity}: {count} record(s) (acknowledged, no refresh)", file=out)
    for bad in data["invalid"]:
        print(f"invalid {bad['partition']}@{bad['offset']}: {bad['reason']} ({bad['detail']})", file=out)


# -- commands ------------------------------------------------------------------------------------
def _operation(target: Target, payload: dict[str, Any]) -> dict[str, Any]:
    result = target.invoke(payload)
    if result.get("ok") is False and "error" in result:
        raise UsageError(f"{target.name} rejected the request: {result['error']}")
    return result


def _run(
    target: Target,
    payload: dict[str, Any],
    args: argparse.Namespace,
    out: TextIO,
    human: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Invoke one operation; print its raw result with --json, else the human form."""
    result = _operation(target, payload)
    if args.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        human(result)
    return result


def cmd_refresh(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    payload: dict[str, Any] = {"operation": "refresh", "tenantId": args.tenant, "force": args.force}
    if args.cube:
        payload["cubes"] = args.cube
    else:
        payload["entityType"] = args.entity_type
    local = target.local
    known = (lambda: local.known_targets(args.tenant)) if local is not None else tuple
    result = _run(target, payload, args, out, lambda r: print_refresh(r, out, known))
    return EXIT_OK if result.get("ok") else EXIT_FAILED


def cmd_stats(args: argparse.Namespace, target: Target, out: TextIO, err: TextIO) -> int:
    payload: dict[str, Any] = {"operation": "stats"}
    if args.tenant:
        payload["tenantId"] = args.tenant
    if args.cube:
        payload["cubes"] = args.cube
    if args.wait:
        _wait(target, args, err, lambda: _unsettled(_operation(target, payload)))
    result = _run(target, payload, args, out, lambda r: print_stats(r, out, datetime.now(tz=UTC)))
    dead = [k for k in result.get("keys", []) if (k.get("lastBuild") or {}).get("status") == "dead_lettered"]
    return EXIT_FAILED if args.wait and dead else EXIT_OK


def cmd_jobs(args: argparse.Namespace, target: Target, out: TextIO, err: TextIO) -> int:
    payload: dict[str, Any] = {"operation": "jobs", "tenantId": args.tenant}
    if args.cube:
        payload["cubes"] = args.cube
    if args.wait:
        _wait(target, args, err, lambda: _unfinished(target, payload))
    result = target.invoke(payload)
    if result.get("ok") is False:
        raise OperationFailed(f"Cube's job states could not be read: {result.get('error')}")
    if args.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        print_jobs(result, out)
    return EXIT_OK


# -- waiting (stats --wait, jobs --wait) -----------------------------------------------------------
# A job is finished when Cube reports one of these (or `failure: ...`).
FINISHED = ("done", "not_found", "missing_partition", "(another tenant's job)")


def _unsettled(result: Mapping[str, Any]) -> list[str]:
    """Why the keys of a stats result are not settled yet: a trailing refresh pending, the newest
    refresh's build not verified yet, a failed build with its re-trigger to come."""
    waiting = []
    for key in result.get("keys", []):
        name = f"{key['tenantId']}#{key['target']}" + (f"#{key['partition']}" if key.get("partition") else "")
        trailing, build = key.get("trailingRefresh"), key.get("lastBuild") or {}
        if trailing:
            waiting.append(f"{name}: trailing refresh {trailing['state']}, due {trailing.get('dueAt')}")
        elif build.get("refreshStartedAt") != key.get("lastRefreshStartedAt"):
            waiting.append(
                f"{name}: the build of the refresh started {key.get('lastRefreshStartedAt')} not verified yet"
            )
        elif build.get("status") == "failed":
            waiting.append(
                f"{name}: build failed ({build.get('failureClass')}), re-trigger due {build.get('retriggerDueAt')}"
            )
    return waiting


def _unfinished(target: Target, payload: Mapping[str, Any]) -> list[str]:
    """Jobs of each key's newest refresh Cube has not finished, or the function has not verified."""
    jobs = target.invoke(dict(payload))
    if jobs.get("ok") is False:
        raise OperationFailed(f"Cube's job states could not be read: {jobs.get('error')}")
    stats = _operation(target, {**payload, "operation": "stats"})
    verified = {_name(k): (k.get("lastBuild") or {}).get("refreshStartedAt") for k in stats.get("keys", [])}
    # A trailing refresh still to come will post newer jobs: wait for those.
    waiting = [
        f"{_name(k)}: trailing refresh {k['trailingRefresh']['state']}, due {k['trailingRefresh'].get('dueAt')}"
        for k in stats.get("keys", [])
        if k.get("trailingRefresh")
    ]
    for key in jobs.get("keys", []):
        running = [
            j for j in key.get("jobs", []) if j["status"] not in FINISHED and not j["status"].startswith("failure")
        ]
        if running:
            waiting.append(f"{_name(key)}: {len(running)} job(s) {running[0]['status']}")
        elif verified.get(_name(key)) != key.get("refreshStartedAt"):
            waiting.append(f"{_name(key)}: jobs finished, the function has not verified them yet")
    return waiting


def _name(key: Mapping[str, Any]) -> str:
    """A key's target, with its partition when it has one (`Users.dailyStatusCounts 2025-10-01..2025-10-31`)."""
    return str(key["target"]) + (f" {key['partition']}" if key.get("partition") else "")


def _wait(target: Target, args: argparse.Namespace, err: TextIO, pending: Callable[[], list[str]]) -> None:
    """Until `pending()` is empty (on the local stack: first until its event sources have handled
    every record on the topic); OperationFailed naming what is still pending after --timeout."""
    deadline = time.monotonic() + args.timeout
    if target.local is not None and target.kafka:
        try:
            target.local.wait_caught_up(args.timeout)
        except LocalStackError as exc:
            raise OperationFailed(str(exc)) from None
    said: list[str] = []
    while waiting := pending():
        if time.monotonic() > deadline:
            raise OperationFailed(f"still waiting after {args.timeout:g} s: {'; '.join(waiting)}")
        if waiting != said:
            print(f"waiting: {'; '.join(waiting)}", file=err)
            said = waiting
        time.sleep(0.5)


def cmd_clear(args: argparse.Namespace, target: Target, out: TextIO, stdin: TextIO, err: TextIO) -> int:
    scope = f"cube(s) {', '.join(args.cube)}" if args.cube else "ALL cubes"
    if not args.yes:
        if not stdin.isatty():
            raise UsageError("refusing to clear debounce state without confirmation: pass --yes")
        err.write(f"Clear debounce state of tenant {args.tenant}, {scope} on {target.name}? [y/N] ")
        err.flush()
        if stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing cleared", file=err)
            return EXIT_FAILED
    payload: dict[str, Any] = {"operation": "clear", "tenantId": args.tenant}
    if args.cube:
        payload["cubes"] = args.cube

    def human(result: dict[str, Any]) -> None:
        cleared = result.get("cleared", [])
        names = ", ".join(cleared) if cleared else "nothing to clear"
        print(f"cleared {len(cleared)} key(s) of tenant {args.tenant}: {names}", file=out)

    _run(target, payload, args, out, human)
    return EXIT_OK


def _local_kafka(target: Target) -> str:
    if target.kafka is None:
        raise UsageError(
            "the dead-letter topic of a deployed stack needs an IAM-auth Kafka client: dump it to JSON lines "
            "and pass --file dump.jsonl (docs/operations.md)"
        )
    if not target.kafka:
        raise UsageError("the local Kafka endpoint is not running: start the local stack with `make stack-start`")
    return target.kafka


def _read_replay_input(args: argparse.Namespace, target: Target) -> list[replay.KafkaRecord]:
    if args.file:
        return replay.read_file(args.file)
    if args.dlt:
        return replay.read_kafka(_local_kafka(target), DEAD_LETTER_TOPIC)
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    uri = args.s3
    if uri == "dlq":
        if target.kafka is not None:
            raise UsageError(
                f"the local stack dead-letters to the Kafka topic {DEAD_LETTER_TOPIC}, not to a bucket: "
                "use `preagg-refresh replay --dlt --dry-run`"
            )
        if not target.dead_letter_bucket:
            raise UsageError("the stack has no DeadLetterBucketName output (Kafka dead letter?): pass --file dump.json")
        uri = f"s3://{target.dead_letter_bucket}/"
    try:
        records, objects = replay.read_s3(target.s3(), uri, ProgressBar("reading S3 objects"))
    except ClientError as exc:
        raise UsageError(f"cannot read {uri}: {exc.response.get('Error', {}).get('Message', exc)}") from None
    except BotoCoreError as exc:
        raise UsageError(f"cannot read {uri}: {exc}") from None
    if objects == 0:
        raise UsageError(f"no objects under {uri}: check the bucket and prefix")
    return records


def cmd_replay(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    try:
        records = _read_replay_input(args, target)
    except replay.ReplayInputError as exc:
        raise UsageError(str(exc)) from None
    plan = replay.plan(records, target.routes())
    if args.dry_run:
        if args.json:
            print(json.dumps({"dryRun": True, **plan.as_dict()}, indent=2), file=out)
        else:
            print(f"dry run against {target.name}: nothing sent", file=out)
            print_plan(plan, out)
        return EXIT_OK
    events = replay.build_events(plan.records, batch_records=args.batch_size)
    result = replay.run(events, target.invoke, ProgressBar("replaying batches"), stop_on=(UsageError,))
    skipped = [] if args.skip_invalid else plan.invalid
    if args.json:
        print(json.dumps({**result.as_dict(), "plan": plan.as_dict()}, indent=2), file=out)
    else:
        print_plan(plan, out)
        print(f"replayed {result.records} record(s) in {result.batches} batch(es) to {target.name}", file=out)
        for failure in result.failed:
            print(f"failed again {failure.get('partition')}@{failure.get('offset')}", file=out)
        for error in result.errors:
            print(f"error: {error}", file=out)
        if result.failed:
            print("what to check: the function's logs for these records, then replay them again", file=out)
        if skipped:
            print(
                f"{len(skipped)} invalid record(s) were not sent (they cannot succeed); "
                "pass --skip-invalid to accept that",
                file=out,
            )
    return EXIT_OK if result.ok and not skipped else EXIT_FAILED


def _produce_values(args: argparse.Namespace, stdin: TextIO) -> list[tuple[bytes | None, bytes | None, list[Any]]]:
    """(key, value, headers) of each record to publish."""
    from preagg_cli import local  # noqa: PLC0415

    if args.tenant:
        mutation: dict[str, Any] = {
            "eventType": args.event_type,
            "entityType": args.entity_type,
            "entityId": args.entity_id or f"local-{uuid.uuid4().hex[:8]}",
            "tenantId": args.tenant,
            "timestamp": int(time.time() * 1000),
        }
        if args.time_hint:
            mutation["timeHints"] = _time_hints(args.time_hint, args.event_type)
        return [(args.tenant.encode(), json.dumps(mutation).encode(), [])]
    if args.file:
        try:
            lines = local.read_lines(stdin) if args.file == "-" else local.read_lines_from(args.file)
        except local.InputError as exc:
            raise UsageError(str(exc)) from None
        out: list[tuple[bytes | None, bytes | None, list[Any]]] = []
        for value in lines:
            if isinstance(value, dict):
                tenant = value.get("tenantId")
                out.append((str(tenant).encode() if tenant else None, json.dumps(value).encode(), []))
            else:  # a JSON string is the raw record value, null a tombstone (as make-event)
                out.append((None, value.encode() if isinstance(value, str) else None, []))
        return out
    try:
        records = replay.read_file(args.event)
    except replay.ReplayInputError as exc:
        raise UsageError(str(exc)) from None
    # The sample events carry fixed timestamps: freshness counts from now, as for a mutation made now.
    local.restamp({"records": {"all": records}}, int(time.time() * 1000))

    def raw(b64: Any) -> bytes | None:
        if b64 is None:
            return None
        try:
            return base64.b64decode(b64, validate=True)
        except ValueError:
            return str(b64).encode()  # not base64 in the sample: publish the text as it is

    return [
        (
            raw(r.get("key")),
            raw(r.get("value")),
            [(n, bytes(v)) for h in r.get("headers") or [] if isinstance(h, dict) for n, v in h.items()],
        )
        for r in records
    ]


def _time_hints(hints: Sequence[str], event_type: str) -> dict[str, dict[str, str]]:
    """`--time-hint createdAt=2025-10-15T12:00:00Z`: the row's unchanged value (`old` and `new`); a
    create has only `new`, a delete only `old` (README: the mutation event)."""
    out: dict[str, dict[str, str]] = {}
    for hint in hints:
        field, sep, value = hint.partition("=")
        if not (sep and field and value):
            raise UsageError(f"--time-hint {hint!r}: write FIELD=TIME, e.g. --time-hint createdAt=2025-10-15T12:00:00Z")
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"--time-hint {hint!r}: {value!r} is not an ISO-8601 time") from None
        sides = {"ENTITY_CREATED": ("new",), "ENTITY_DELETED": ("old",)}.get(event_type, ("old", "new"))
        out[field] = dict.fromkeys(sides, value)
    return out


def _warn_unmapped(values: Sequence[tuple[bytes | None, bytes | None, list[Any]]], target: Target, err: TextIO) -> None:
    """A typo in an entity type passes Kafka and the function silently (acknowledged, refreshes
    nothing): say so before producing."""
    routes = target.routes()
    unmapped = set()
    for _, value, _ in values:
        try:
            entity = json.loads(value or b"null").get("entityType")
        except (ValueError, AttributeError):
            continue
        if isinstance(entity, str) and not routes.targets_for(entity):
            unmapped.add(entity)
    for entity in sorted(unmapped):
        known = ", ".join(routes.entity_types())
        print(
            f"note: entity type {entity!r} maps to no cube (known: {known}): the function acknowledges it "
            "and refreshes nothing",
            file=err,
        )


def _report_handled(target: Target, delivered: Sequence[str], began: float, out: TextIO) -> None:
    """What the local function did with the produced records (the esm's journal)."""
    local = target.local
    if local is None:
        return
    try:
        local.wait_caught_up(30.0)
    except LocalStackError as exc:
        raise OperationFailed(str(exc)) from None
    wanted = set(delivered)
    entries = [entry for entry in local.invocations() if wanted & set(entry.get("refs") or ())]
    for entry in entries[:1] + entries[1:][-1:]:  # the first invocation, and the last retry if any
        decided = [f"{k['key']} {k['status']}" for k in entry.get("keys", [])]
        print(
            f"handled by the function ({entry.get('records')} record(s), {entry.get('failures')} failed): "
            + ("; ".join(decided + list(entry.get("notes") or ())) or "no keys"),
            file=out,
        )
    if len(entries) > 1 and entries[-1].get("failures"):
        print(
            f"reported failed in {len(entries)} invocations (the first and {len(entries) - 1} retries), then sent "
            f"to the dead-letter topic {DEAD_LETTER_TOPIC}: `preagg-refresh replay --dlt --dry-run`",
            file=out,
        )
    print(f"(the local event sources had handled them {time.monotonic() - began:.1f} s after producing)", file=out)


def cmd_produce(args: argparse.Namespace, target: Target, out: TextIO, stdin: TextIO, err: TextIO) -> int:
    bootstrap = _local_kafka(target)
    values = _produce_values(args, stdin)
    if not values:
        raise UsageError("nothing to produce: the input holds no records")
    _warn_unmapped(values, target, err)
    from confluent_kafka import KafkaException, Producer  # noqa: PLC0415 - a dev dependency

    delivered: list[str] = []
    errors: list[str] = []

    def report(error: Any, message: Any) -> None:
        if error is not None:
            errors.append(str(error))
        else:
            delivered.append(f"{message.topic()}-{message.partition()}@{message.offset()}")

    producer = Producer({"bootstrap.servers": bootstrap, "logger": quiet_kafka_logger(), "message.timeout.ms": 10000})
    began = time.monotonic()
    try:
        for key, value, headers in values:
            producer.produce(args.topic, value=value, key=key, headers=headers, on_delivery=report)
        left = producer.flush(15)
    except KafkaException as exc:
        raise OperationFailed(
            f"cannot produce to {bootstrap}: {exc}. Is the local stack up? `make stack-status`"
        ) from None
    if errors or left:
        problem = errors[0] if errors else f"{left} record(s) not delivered in 15 s"
        raise OperationFailed(f"producing to {args.topic} at {bootstrap} failed: {problem}. `make stack-status`")
    print(f"produced {len(delivered)} record(s) to {args.topic} at {bootstrap}: {', '.join(delivered)}", file=out)
    if args.wait:
        _report_handled(target, delivered, began, out)
    else:
        print("the local event source mapping delivers them to the function: tail -f .stack/logs/esm.log", file=out)
    return EXIT_OK


def cmd_query(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    if target.local is None:
        raise UsageError(
            "query reads Cube with a token signed by the local stack's secret: local stack only "
            "(deployed: use your Cube's own API or Playground)"
        )
    if args.query:
        try:
            query = json.loads(args.query)
        except ValueError as exc:
            raise UsageError(f'--query is not JSON ({exc}): e.g. --query \'{{"measures": ["Users.count"]}}\'') from None
    else:
        query = {
            "measures": args.measure or ["Users.count"],
            **({"dimensions": args.dimension} if args.dimension else {}),
        }
    try:
        answer = target.local.load(args.tenant, query)
    except LocalStackError as exc:
        raise OperationFailed(str(exc)) from None
    if args.json:
        print(json.dumps(answer, indent=2), file=out)
        return EXIT_OK
    print_served(args.tenant, answer, out, datetime.now(tz=UTC))
    return EXIT_OK


def print_served(tenant: str, answer: Mapping[str, Any], out: TextIO, now: datetime) -> None:
    """Cube's rows, then which rollup answered and when it was built."""
    rows = answer.get("data") or []
    if len(rows) == 1 and len(rows[0]) == 1:
        ((name, value),) = rows[0].items()
        print(f"{tenant}: {name} = {value}", file=out)
    elif rows:
        columns = list(rows[0])
        _table([columns, *[[str(row.get(c)) for c in columns] for row in rows]], out)
    else:
        print(f"{tenant}: no rows", file=out)
    for info in (answer.get("usedPreAggregations") or {}).values():
        if isinstance(info, dict):
            built = info.get("lastUpdatedAt")
            when = _when(datetime.fromtimestamp(built / 1000, tz=UTC).isoformat(), now) if built else "-"
            print(f"served from {info.get('preAggregationId') or info.get('targetTableName')}, built {when}", file=out)
    if not answer.get("usedPreAggregations"):
        print("served from the source tables (no rollup matched the query)", file=out)


# -- parsing -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("target (default: the local stack when .stack/env.json exists)")
    choice = where.add_mutually_exclusive_group()
    choice.add_argument("--stack", metavar="NAME", help="deployed stack: CloudFormation stack name")
    choice.add_argument("--local", action="store_true", help="the local stack started by `make stack-start`")
    where.add_argument("--env-file", metavar="PATH", help=argparse.SUPPRESS)
    where.add_argument("--region", help="AWS region of the stack (default: AWS_DEFAULT_REGION / profile)")
    common.add_argument("--json", action="store_true", help="print the raw result as JSON")

    parser = argparse.ArgumentParser(
        prog="preagg-refresh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    refresh = sub.add_parser("refresh", parents=[common], allow_abbrev=False, help="refresh a tenant's cubes now")
    refresh.add_argument("--tenant", required=True)
    what = refresh.add_mutually_exclusive_group(required=True)
    what.add_argument("--entity-type", help="refresh the cubes this entity type maps to")
    what.add_argument("--cube", action="append", help="cube name or Cube.preAggregation id (repeatable)")
    refresh.add_argument("--force", action="store_true", help="refresh even within the debounce window")

    stats = sub.add_parser(
        "stats", parents=[common], allow_abbrev=False, help="show debounce state per tenant and cube"
    )
    stats.add_argument("--tenant")
    stats.add_argument("--cube", action="append", help="only this cube or pre-aggregation id (repeatable)")
    _add_wait(
        stats, "the keys are settled: no trailing refresh or re-trigger to come, the newest refresh's build verified"
    )

    jobs = sub.add_parser(
        "jobs", parents=[common], allow_abbrev=False, help="show live Cube job states of a tenant's latest refreshes"
    )
    jobs.add_argument("--tenant", required=True)
    jobs.add_argument("--cube", action="append", help="only this cube or pre-aggregation id (repeatable)")
    _add_wait(jobs, "Cube has finished each key's newest jobs (done or failed) and the function has verified them")

    clear = sub.add_parser(
        "clear", parents=[common], allow_abbrev=False, help="delete debounce state of a tenant (or some cubes)"
    )
    clear.add_argument("--tenant", required=True)
    clear.add_argument("--cube", action="append", help="only this cube or pre-aggregation id (repeatable)")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    rep = sub.add_parser(
        "replay", parents=[common], allow_abbrev=False, help="replay failed records through the pipeline"
    )
    source = rep.add_mutually_exclusive_group(required=True)
    source.add_argument("--s3", metavar="s3://BUCKET/PREFIX", help="on-failure objects (`dlq`: the stack's bucket)")
    source.add_argument("--file", metavar="DUMP", help="JSON or JSON lines: DLT records, on-failure records, events")
    source.add_argument("--dlt", action="store_true", help=f"the local stack's dead-letter topic {DEAD_LETTER_TOPIC}")
    rep.add_argument("--dry-run", action="store_true", help="show what would be replayed; send nothing")
    rep.add_argument("--skip-invalid", action="store_true", help="invalid records do not make the exit code 1")
    rep.add_argument("--batch-size", type=int, default=replay.BATCH_RECORDS, help=argparse.SUPPRESS)

    _add_produce(sub, common)
    _add_query(sub, common)
    return parser


def _add_wait(parser: argparse.ArgumentParser, until: str) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help=f"first wait until {until} (local stack: and its event sources have caught up with the topic)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="with --wait: seconds (default 60)")


def _add_produce(sub: Any, common: argparse.ArgumentParser) -> None:
    produce = sub.add_parser(
        "produce",
        parents=[common],
        allow_abbrev=False,
        help="publish mutations to the local Kafka topic (local stack only)",
        description="Publish entity mutations to the local stack's Kafka topic, as a service's producer would. "
        "The local event source mapping delivers them to the function (watch .stack/logs/esm.log).",
    )
    given = produce.add_mutually_exclusive_group(required=True)
    given.add_argument("--tenant", help="one mutation of this tenant (with --entity-type)")
    given.add_argument("--file", metavar="JSONL", help="mutations as JSON lines ('-': stdin), as make-event reads")
    given.add_argument("--event", metavar="EVENT.json", help="the records of an MSK event file, e.g. events/*.json")
    produce.add_argument("--entity-type", default="User", help="with --tenant (default User)")
    produce.add_argument("--entity-id", help="with --tenant (default: a new id)")
    produce.add_argument(
        "--event-type",
        default="ENTITY_UPDATED",
        help="with --tenant: ENTITY_CREATED, ENTITY_UPDATED (default) or ENTITY_DELETED",
    )
    produce.add_argument(
        "--time-hint",
        action="append",
        metavar="FIELD=TIME",
        help="with --tenant: the row's time field (timeHints), e.g. createdAt=2025-10-15T12:00:00Z (repeatable)",
    )
    produce.add_argument(
        "--wait", action="store_true", help="wait until the local event sources have handled them; print the outcome"
    )
    produce.add_argument("--topic", default=TOPIC, help=argparse.SUPPRESS)


def _add_query(sub: Any, common: argparse.ArgumentParser) -> None:
    query = sub.add_parser(
        "query",
        parents=[common],
        allow_abbrev=False,
        help="what Cube serves for a tenant (local stack only)",
        description="Ask the local Cube's /v1/load for a tenant, with a token signed by the stack's secret, "
        'waiting out Cube\'s "Continue wait" answers; prints the value and the rollup that answered.',
    )
    query.add_argument("--tenant", required=True)
    query.add_argument("--measure", action="append", help="default Users.count (repeatable)")
    query.add_argument("--dimension", action="append", help="e.g. Users.status (repeatable)")
    query.add_argument("--query", metavar="JSON", help="a whole Cube query instead of --measure/--dimension")


def _unknown_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """A message for the first option the chosen command does not have (argparse would otherwise
    report it from the top-level parser, or hide it behind a missing required option)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    words = list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    sub = commands.choices.get(command) if command else None
    if sub is None:
        return None
    known = sub._option_string_actions
    takes_value = False
    for word in words[words.index(str(command)) + 1 :]:
        if takes_value:
            takes_value = False
            continue
        if not word.startswith("-") or word == "-":
            continue
        name = word.split("=", 1)[0]
        action = known.get(name)
        if action is None:
            close = difflib.get_close_matches(name, [o for o in known if o.startswith("--")], n=1, cutoff=0.6)
            guess = f"; did you mean {close[0]}?" if close else ""
            return f"preagg-refresh {command} has no option {name}{guess} (see `preagg-refresh {command} --help`)"
        takes_value = action.nargs != 0 and "=" not in word
    return None


# The local services each command needs (produce only needs the topic and the event sources that read
# it: a mutation produced while Cube is down is retried, then dead-lettered, as deployed).
CORE = ("postgres", "moto", "dynalite", "cube")


def _needs(args: argparse.Namespace) -> tuple[str, ...]:
    if args.command == "produce":
        return ("kafka", "esm")
    if args.command == "query":
        return ("cube",)
    if args.command == "replay" and args.dlt:
        return ("kafka",) if args.dry_run else (*CORE, "kafka")
    return CORE


def main(
    argv: Sequence[str] | None = None,
    *,
    target: Target | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Console script entry. `target` and the streams are injectable for tests."""
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_option(parser, words)
    if unknown:
        print(f"error: {unknown}", file=err)
        return EXIT_USAGE
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # argparse printed the usage error
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.command == "replay" and not 1 <= args.batch_size <= replay.BATCH_RECORDS:
        print(f"error: --batch-size must be 1..{replay.BATCH_RECORDS}", file=err)
        return EXIT_USAGE
    try:
        resolved = target or resolve_target(args)
        if resolved.local is not None:
            # One line and exit 2 when what the command needs is down, before any client retries.
            resolved.local.require(_needs(args))
        if args.command == "refresh":
            return cmd_refresh(args, resolved, out)
        if args.command == "stats":
            return cmd_stats(args, resolved, out, err)
        if args.command == "jobs":
            return cmd_jobs(args, resolved, out, err)
        if args.command == "clear":
            return cmd_clear(args, resolved, out, inp, err)
        if args.command == "produce":
            return cmd_produce(args, resolved, out, inp, err)
        if args.command == "query":
            return cmd_query(args, resolved, out)
        return cmd_replay(args, resolved, out)
    except (UsageError, LocalStackError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    except OperationFailed as exc:
        print(f"failed: {exc}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
