"""`python -m devstack start|stop|status|env|psql`.

Exit codes: 0 done; 1 a service could not be started or reached (`status`: only some services are
up); 2 a setting or argument the function would refuse (one line naming it)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from devstack import function
from devstack.stack import ALL_SERVICES, Stack, StackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start every service not running; wait until all answer")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait in all (default 180)")
    start.add_argument("--service", choices=ALL_SERVICES, help="start only this service")
    start.add_argument(
        "--no-event-sources", action="store_true", help="without the local Kafka endpoint and event source mappings"
    )
    start.add_argument(
        "--precise",
        action=argparse.BooleanOptionalAction,
        help=f"the function routes with {function.PRECISE_MAP} (partition-precise and field-level targets); "
        "--no-precise: the default map again",
    )
    stop = commands.add_parser("stop", help="stop the services by PID")
    stop.add_argument("--purge", action="store_true", help="then delete .stack/ (cluster, secret, ports)")
    stop.add_argument("--service", choices=ALL_SERVICES, help="stop only this service")
    status = commands.add_parser(
        "status", help="each service up/down with its URL, and the function's settings; exit 1 if only some are up"
    )
    status.add_argument("--json", action="store_true")
    env = commands.add_parser("env", help="print the environment for the Lambda code (`eval $(... env)`)")
    env.add_argument("--json", action="store_true")
    psql = commands.add_parser("psql", help="run SQL against the stack's PostgreSQL")
    psql.add_argument("sql")
    args = parser.parse_args(argv)

    stack = Stack()
    try:
        if args.command == "start":
            # The function's settings: the recorded ones, with what this environment gives.
            recorded = function.recorded_environ(stack.state)
            settings = function.from_environ(os.environ, stack.root, recorded=recorded, precise=args.precise)
            began = time.monotonic()
            if args.service:
                stack.start_service(args.service, timeout=args.timeout, settings=settings)
            else:
                stack.start(timeout=args.timeout, event_sources=not args.no_event_sources, settings=settings)
            print(f"devstack: ready in {time.monotonic() - began:.1f} s; env in {stack.state / 'env.sh'}")
            statuses = stack.status()
            for line in statuses.values():
                print(line.line())
            print(f"function  {stack.function_settings().get('summary', '')}")
            if not args.service and statuses["esm"].up:
                print(
                    "next: `source .venv/bin/activate`, then `preagg-refresh produce --tenant tenant-1 --entity-type "
                    "User` and watch `tail -f .stack/logs/esm.log` (docs/walkthrough.md)"
                )
        elif args.command == "stop":
            _stop(stack, args.service, args.purge)
        elif args.command == "status":
            return _status(stack, args.json)
        elif args.command == "env":
            environ = stack.env().as_environ()
            if args.json:
                print(json.dumps(environ, indent=2))
            else:
                for key, value in environ.items():
                    print(f"export {key}={shlex.quote(value)}")
        elif args.command == "psql":
            for row in stack.psql(args.sql):
                print("|".join("NULL" if value is None else value for value in row))
    except function.SettingsError as error:
        print(f"devstack: {error}", file=sys.stderr)
        return 2
    except StackError as error:
        print(f"devstack: {error}", file=sys.stderr)
        return 1
    return 0


def _stop(stack: Stack, service: str | None, purge: bool) -> None:
    if service:
        was_up = stack.status()[service].pid is not None
        stack.stop_service(service)
        print(f"devstack: stopped {service}" if was_up else f"devstack: {service} was not running")
        return
    stopped = stack.stop(purge=purge)
    print(f"devstack: stopped {', '.join(stopped)}" if stopped else "devstack: nothing was running")
    if purge:
        print(f"devstack: deleted {stack.state} (cluster, secret, ports, logs)")


def _status(stack: Stack, as_json: bool) -> int:
    """Exit 0 when every service is up, or none is (a message says how to start it); 1 when only some
    are, naming them and the fix: a stopped stack is not an error, a half-running one is."""
    statuses = stack.status()
    settings = stack.function_settings()
    if as_json:
        print(json.dumps({"services": {name: vars(s) for name, s in statuses.items()}, "function": settings}, indent=2))
        return 0
    down = [name for name in ALL_SERVICES if not statuses[name].up]
    if len(down) == len(ALL_SERVICES):
        print("devstack: the local stack is not running; start it with `make stack-start`")
        return 0
    for line in statuses.values():
        print(line.line())
    print(f"function  {settings.get('summary') or '(settings not recorded: restart with `make stack-start`)'}")
    if down:
        print(f"devstack: {', '.join(down)} down; `make stack-start` starts what is missing")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
