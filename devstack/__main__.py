"""`python -m devstack start|stop|status|env|psql`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from devstack.stack import SERVICES, Stack, StackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start every service not running; wait until all answer")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait in all (default 180)")
    start.add_argument("--service", choices=SERVICES, help="start only this service")
    stop = commands.add_parser("stop", help="stop the services by PID")
    stop.add_argument("--purge", action="store_true", help="then delete .stack/ (cluster, secret, ports)")
    stop.add_argument("--service", choices=SERVICES, help="stop only this service")
    status = commands.add_parser("status", help="each service up/down with its URL; exit 1 if one is down")
    status.add_argument("--json", action="store_true")
    env = commands.add_parser("env", help="print the environment for the Lambda code (`eval $(... env)`)")
    env.add_argument("--json", action="store_true")
    psql = commands.add_parser("psql", help="run SQL against the stack's PostgreSQL")
    psql.add_argument("sql")
    args = parser.parse_args(argv)

    stack = Stack()
    try:
        if args.command == "start":
            began = time.monotonic()
            if args.service:
                stack.start_service(args.service, timeout=args.timeout)
            else:
                stack.start(timeout=args.timeout)
            print(f"devstack: ready in {time.monotonic() - began:.1f} s; env in {stack.state / 'env.sh'}")
            for line in stack.status().values():
                print(line.line())
        elif args.command == "stop":
            if args.service:
                stack.stop_service(args.service)
            else:
                stack.stop(purge=args.purge)
        elif args.command == "status":
            statuses = stack.status()
            if args.json:
                print(json.dumps({name: vars(s) for name, s in statuses.items()}, indent=2))
            else:
                for line in statuses.values():
                    print(line.line())
            return 0 if all(s.up for s in statuses.values()) else 1
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
    except StackError as error:
        print(f"devstack: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
