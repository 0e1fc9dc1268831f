"""Operator CLI `preagg-refresh`: refresh now, debounce stats, clear debounce state, replay failed records.

Targets: `--stack NAME` (a deployed stack, found through its CloudFormation outputs; operations run in
the function through lambda:InvokeFunction) or `--local` (the local stack of `make stack-start`,
operations run in this process against it; the default when `.stack/env.json` exists).
Exit codes: 0 success, 1 an operation or record failed, 2 usage or configuration error.
See docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from handler.domain.routing import EntityCubeMap
from preagg_cli import replay

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient
    from mypy_boto3_s3 import S3Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ENV_FILE = Path(".stack") / "env.json"
STACK_OUTPUTS = ("FunctionName", "DebounceTableName", "TrailingQueueUrl", "DeadLetterBucketName")


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


def find_env_file(start: Path | None = None) -> Path | None:
    """`.stack/env.json` in the working directory or one of its parents."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
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
    os.environ.update({str(k): str(v) for k, v in env.items()})
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
            handler.setStream(sys.stderr)  # the function's logs must not mix with the CLI's stdout
        try:
            return app.handle(payload)
        except Exception as exc:
            raise OperationFailed(
                f"{type(exc).__name__}: {exc}. Is the local stack up? `python -m devstack status`"
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

    return Target(f"local stack ({env_file})", invoke, routes, s3)


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
    moment = datetime.fromisoformat(iso)
    seconds = int((moment - now).total_seconds())
    relative = f"in {seconds}s" if seconds >= 0 else f"{-seconds}s ago"
    if abs(seconds) >= 3600:
        relative = f"in {seconds // 3600}h" if seconds >= 0 else f"{-seconds // 3600}h ago"
    return f"{moment.strftime('%Y-%m-%d %H:%M:%S')}Z ({relative})"


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _hint_for(detail: str) -> str:
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


def print_refresh(result: Mapping[str, Any], out: TextIO) -> None:
    print(f"tenant {result.get('tenantId')}{' (forced)' if result.get('force') else ''}:", file=out)
    for key in result.get("keys", []):
        status, detail = key["status"], _epochs_to_iso(key.get("detail") or "")
        if status == "refreshed":
            line = f"refreshed ({detail}), {len(key.get('jobs', []))} Cube job(s) queued"
        elif status == "debounced":
            line = f"debounced: refreshed within the window; {detail or 'trailing refresh pending'}"
            line += " (use --force to refresh now)"
        else:
            line = f"{status}: {detail}\n      what to check: {_hint_for(detail)}"
        print(f"  {key['target']:<32} {line}", file=out)


def print_stats(result: Mapping[str, Any], out: TextIO, now: datetime) -> None:
    keys = result.get("keys", [])
    window = result.get("windowMs", 0)
    if not keys:
        print(f"no debounce state (window {window} ms)", file=out)
        return
    rows = [["TENANT", "TARGET", "LAST REFRESH", "WINDOW ENDS", "TRAILING", "PENDING SINCE", "EXPIRES"]]
    for key in keys:
        trailing = key.get("trailingRefresh")
        pending = f"{trailing['state']}, due {_when(trailing.get('dueAt'), now)}" if trailing else "-"
        last = _when(key.get("lastRefreshStartedAt"), now)
        rows.append(
            [
                key["tenantId"],
                key["target"],
                last,
                _when(key.get("windowEndsAt"), now),
                pending,
                _when(trailing.get("pendingSince"), now) if trailing else "-",
                _when(key.get("expiresAt"), now),
            ]
        )
    _table(rows, out)
    print(f"{len(keys)} key(s), window {window} ms", file=out)


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
    result = _run(target, payload, args, out, lambda r: print_refresh(r, out))
    return EXIT_OK if result.get("ok") else EXIT_FAILED


def cmd_stats(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    payload: dict[str, Any] = {"operation": "stats"}
    if args.tenant:
        payload["tenantId"] = args.tenant
    if args.cube:
        payload["cubes"] = args.cube
    _run(target, payload, args, out, lambda r: print_stats(r, out, datetime.now(tz=UTC)))
    return EXIT_OK


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


def _read_replay_input(args: argparse.Namespace, target: Target) -> list[replay.KafkaRecord]:
    if args.file:
        return replay.read_file(args.file)
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    uri = args.s3
    if uri == "dlq":
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
        prog="preagg-refresh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    refresh = sub.add_parser("refresh", parents=[common], help="refresh a tenant's cubes now")
    refresh.add_argument("--tenant", required=True)
    what = refresh.add_mutually_exclusive_group(required=True)
    what.add_argument("--entity-type", help="refresh the cubes this entity type maps to")
    what.add_argument("--cube", action="append", help="cube name or Cube.preAggregation id (repeatable)")
    refresh.add_argument("--force", action="store_true", help="refresh even within the debounce window")

    stats = sub.add_parser("stats", parents=[common], help="show debounce state per tenant and cube")
    stats.add_argument("--tenant")
    stats.add_argument("--cube", action="append", help="only this cube or pre-aggregation id (repeatable)")

    clear = sub.add_parser("clear", parents=[common], help="delete debounce state of a tenant (or some cubes)")
    clear.add_argument("--tenant", required=True)
    clear.add_argument("--cube", action="append", help="only this cube or pre-aggregation id (repeatable)")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    rep = sub.add_parser("replay", parents=[common], help="replay failed records through the pipeline")
    source = rep.add_mutually_exclusive_group(required=True)
    source.add_argument("--s3", metavar="s3://BUCKET/PREFIX", help="on-failure objects (`dlq`: the stack's bucket)")
    source.add_argument("--file", metavar="DUMP", help="JSON or JSON lines: DLT records, on-failure records, events")
    rep.add_argument("--dry-run", action="store_true", help="show what would be replayed; send nothing")
    rep.add_argument("--skip-invalid", action="store_true", help="invalid records do not make the exit code 1")
    rep.add_argument("--batch-size", type=int, default=replay.BATCH_RECORDS, help=argparse.SUPPRESS)
    return parser


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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.command == "replay" and not 1 <= args.batch_size <= replay.BATCH_RECORDS:
        print(f"error: --batch-size must be 1..{replay.BATCH_RECORDS}", file=err)
        return EXIT_USAGE
    try:
        resolved = target or resolve_target(args)
        if args.command == "refresh":
            return cmd_refresh(args, resolved, out)
        if args.command == "stats":
            return cmd_stats(args, resolved, out)
        if args.command == "clear":
            return cmd_clear(args, resolved, out, inp, err)
        return cmd_replay(args, resolved, out)
    except UsageError as exc:
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
