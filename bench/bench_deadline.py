"""The function's deadline with build verification on: how long a batch takes against the time
Lambda says is left, on the production wiring.

The service is the one `handler.app` builds at its first invocation (`handler.wiring.build_service`
from the environment's settings): the DynamoDB store, the SQS trailing scheduler and build queue,
Secrets Manager for the Cube secret, the httpx Cube client and the verifier, with its thread pool.
AWS is moto, in the process (`mock_aws`: moto is slower than the real services; the point is that a
run ends within its remaining time whatever the backend's speed). Cube is a stub HTTP server in a
child process that answers the jobs API like Cube (`post`: job tokens; `get`: each job's status and
security context) after `--cube-latency-ms`.

Scenarios, each in a fresh child process (the settings are read at import):
- an MSK batch of `--tenants` records of as many tenants, `--remaining-s` left: Cube up, then Cube
  down (nothing listens on its port: every request fails after its retries);
- one SQS batch holding one verify message of `--verify-targets` keys of one tenant (as an older
  release could write, or a forger), `--verify-remaining-s` left (the template's default function
  timeout is 120 s): every build failed (the worst case: a read, a record and a re-trigger per key),
  then every build done.

With `--baseline-src DIR` every scenario also runs on another tree's `src` (for example main's:
`git archive main src | tar -x -C /tmp/main`), printed beside this tree's figures.

Run from the repository root:

    PYTHONPATH=src:. .venv/bin/python bench/bench_deadline.py [--baseline-src /tmp/main/src]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

T0_MS = 1_795_953_600_000
SECRET = "bench-cube-secret-that-is-32-bytes-long"
TOKENS_PER_POST = 3
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the stub Cube
def serve_cube(port: int, latency_ms: int) -> None:
    """Cube's jobs API, enough of it: `post` answers TOKENS_PER_POST tokens; `get` answers every
    token with the status last set through `/bench/status` and the asking tenant's context (taken
    from the JWT, not verified). `/bench/stats` counts requests."""
    state: dict[str, Any] = {"status": "done", "posts": 0, "gets": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, body: Any, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            with lock:
                self._answer({"posts": state["posts"], "gets": state["gets"]})

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if self.path == "/bench/status":
                with lock:
                    state["status"] = request["status"]
                self._answer({})
                return
            time.sleep(latency_ms / 1000)
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            payload = token.split(".")[1] if token.count(".") == 2 else ""
            tenant = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)) or b"{}").get("tenantId")
            if request.get("action") == "get":
                with lock:
                    state["gets"] += 1
                    status = state["status"]
                context = {"contexts": [{"securityContext": {"tenantId": tenant}}]}
                self._answer({t: {"status": status, "table": "t", "selector": context} for t in request["tokens"]})
                return
            with lock:
                state["posts"] += 1
                number = state["posts"]
            self._answer([f"{number:024x}{i:08x}" for i in range(TOKENS_PER_POST)])

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cube_call(port: int, path: str, body: Any = None) -> Any:
    import urllib.request  # noqa: PLC0415

    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", data=data, timeout=5) as response:
        return json.loads(response.read())


# --------------------------------------------------------------------------- one scenario (child)
class _Context:
    def __init__(self, remaining_ms: int) -> None:
        self._end = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self._end - time.monotonic()) * 1000)


@contextlib.contextmanager
def _aws(cube_url: str) -> Iterator[dict[str, Any]]:
    """moto with the table, the queues and the secret, and the environment the settings read."""
    from preagg_cli.local import LOCAL_DEFAULTS  # noqa: PLC0415

    for name, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "POWERTOOLS_LOG_LEVEL": "CRITICAL",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_METRICS_DISABLED": "true",
        }
    )
    import boto3  # noqa: PLC0415
    from moto import mock_aws  # noqa: PLC0415

    with mock_aws():
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        ddb.create_table(
            TableName="bench-debounce",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        sqs = boto3.client("sqs", region_name="us-east-1")
        queue = sqs.create_queue(QueueName="bench-refresh")["QueueUrl"]
        dlq = sqs.create_queue(QueueName="bench-refresh-dlq")["QueueUrl"]
        secret = boto3.client("secretsmanager", region_name="us-east-1").create_secret(
            Name="bench-cube-secret", SecretString=SECRET
        )["ARN"]
        os.environ.update(
            {
                "DEBOUNCE_TABLE_NAME": "bench-debounce",
                "REFRESH_QUEUE_URL": queue,
                "BUILD_DEAD_LETTER_QUEUE_URL": dlq,
                "CUBE_API_SECRET_ARN": secret,
                "CUBE_API_URL": cube_url,
            }
        )
        yield {"ddb": ddb, "sqs": sqs, "queue": queue, "dlq": dlq}


def _messages(sqs: Any, url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes.get(n, 0)) for n in names)


def run_msk(tenants: int, remaining_ms: int, cube_url: str) -> dict[str, Any]:
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    values = [
        {
            "eventType": "ENTITY_UPDATED",
            "entityType": "User",
            "entityId": f"u{i}",
            "tenantId": f"t{i}",
            "timestamp": T0_MS,
        }
        for i in range(tenants)
    ]
    event = build_msk_event(values, partitions=3)
    with _aws(cube_url) as aws:
        from handler import app  # noqa: PLC0415 (settings are read at import: the environment first)

        started = time.monotonic()
        response = app.handle(event, _Context(remaining_ms))  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        pages = aws["ddb"].get_paginator("scan").paginate(TableName="bench-debounce")
        standing = sum(1 for page in pages for item in page["Items"] if "claimToken" in item)
        reported = len(response["batchItemFailures"])
        return {
            "took_s": elapsed,
            "refreshed": tenants - reported,
            "reported": reported,
            "verify_msgs": _messages(aws["sqs"], aws["queue"]),
            "claims_left": standing - (tenants - reported),
        }


def run_verify(targets: int, remaining_ms: int, cube_url: str) -> dict[str, Any]:
    """One verify message of `targets` keys of one tenant, delivered as the SQS event source does."""
    with _aws(cube_url) as aws:
        from handler import app  # noqa: PLC0415

        now = int(time.time() * 1000)
        keys = [
            f"t0#Users.daily#{2000 + i // 12:04d}-{i % 12 + 1:02d}-01..{2000 + i // 12:04d}-{i % 12 + 1:02d}-28"
            for i in range(targets)
        ]
        for pk in keys:  # each key's item, as its refresh's claim left it
            aws["ddb"].put_item(
                TableName="bench-debounce",
                Item={"pk": {"S": pk}, "startedAt": {"N": str(now - 5_000)}, "claimToken": {"S": "c"}},
            )
        body = {
            "kind": "verify",
            "tenantId": "t0",
            "deadlineAt": now + 1_800_000,
            "poll": 0,
            "targets": [
                {
                    "target": "Users.daily",
                    "partition": pk.rsplit("#", 1)[1],
                    "tokens": [f"{i:032x}"],
                    "startedAt": now - 5_000,
                    "oldestAt": now - 6_000,
                }
                for i, pk in enumerate(keys)
            ],
        }
        event = {"Records": [{"eventSource": "aws:sqs", "messageId": "m-0", "body": json.dumps(body)}]}
        started = time.monotonic()
        response = app.handle(event, _Context(remaining_ms))  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        settled = 0
        for page in aws["ddb"].get_paginator("scan").paginate(TableName="bench-debounce"):
            settled += sum(1 for item in page["Items"] if "buildStatus" in item)
        return {
            "took_s": elapsed,
            "settled": settled,
            "reported": len(response["batchItemFailures"]),
            "queued": _messages(aws["sqs"], aws["queue"]),
        }


# --------------------------------------------------------------------------- the parent
SCENARIOS = {
    "msk-up": "{tenants:,} tenants, Cube up",
    "msk-down": "{tenants:,} tenants, Cube down",
    "verify-failed": "1 verify msg, {targets:,} keys, builds failed",
    "verify-done": "1 verify msg, {targets:,} keys, builds done",
}


def _child(scenario: str, src: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    up = f"http://127.0.0.1:{port}/cubejs-api"
    down = f"http://127.0.0.1:{_free_port()}/cubejs-api"  # nothing listens there
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}")
    command = [sys.executable, __file__, "--child", scenario, "--cube-url", down if scenario == "msk-down" else up]
    command += ["--tenants", str(args.tenants), "--remaining-s", str(args.remaining_s)]
    command += ["--verify-targets", str(args.verify_targets), "--verify-remaining-s", str(args.verify_remaining_s)]
    if scenario.startswith("verify"):
        _cube_call(port, "/bench/status", {"status": "done" if scenario == "verify-done" else "failure: boom"})
    before = _cube_call(port, "/bench/stats")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{scenario} on {src} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    after = _cube_call(port, "/bench/stats")
    result["cube_requests"] = after["posts"] + after["gets"] - before["posts"] - before["gets"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--remaining-s", type=float, default=60.0)
    parser.add_argument("--verify-targets", type=int, default=1_000)
    parser.add_argument("--verify-remaining-s", type=float, default=120.0)
    parser.add_argument("--cube-latency-ms", type=int, default=20)
    parser.add_argument("--baseline-src", help="another tree's src directory, measured beside this one")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cube-url", help=argparse.SUPPRESS)
    parser.add_argument("--serve-cube", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_cube:
        serve_cube(args.serve_cube, args.cube_latency_ms)
        return 0
    if args.child:
        if args.child.startswith("msk"):
            result = run_msk(args.tenants, int(args.remaining_s * 1000), args.cube_url)
        else:
            result = run_verify(args.verify_targets, int(args.verify_remaining_s * 1000), args.cube_url)
        print(json.dumps(result))
        return 0
    try:
        import handler  # noqa: F401, PLC0415
    except ImportError:
        print("run from the repository root with PYTHONPATH=src:.", file=sys.stderr)
        return 2
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-cube", str(port), "--cube-latency-ms", str(args.cube_latency_ms)]
    )
    try:
        for _ in range(50):
            with contextlib.suppress(OSError):
                _cube_call(port, "/bench/stats")
                break
            time.sleep(0.1)
        _report(args, port)
    finally:
        server.terminate()
        server.wait()
    return 0


def _report(args: argparse.Namespace, port: int) -> None:
    trees = [("this tree", str(ROOT / "src"))] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    load = os.getloadavg()
    print(
        f"bench_deadline {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: production wiring (handler.wiring.build_service, "
        f"verification on), AWS on moto in-process, stub Cube {args.cube_latency_ms} ms per request; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    for name, src in trees:
        print(f"  {name}: {src}")
    print(
        f"{'scenario':<44}{'code':<11}{'left s':>7}{'took s':>8}{'refreshed':>10}{'reported':>9}"
        f"{'verify msgs':>12}{'claims left':>12}{'Cube reqs':>10}"
    )
    for scenario in args.scenarios.split(","):
        label = SCENARIOS[scenario].format(tenants=args.tenants, targets=args.verify_targets)
        left = args.remaining_s if scenario.startswith("msk") else args.verify_remaining_s
        for name, src in trees:
            r = _child(scenario, src, args, port)
            if scenario.startswith("msk"):
                cells = (r["refreshed"], r["reported"], r["verify_msgs"], r["claims_left"])
            else:  # keys settled, messages reported, messages queued (re-triggers, continuations)
                cells = (f"{r['settled']} set.", r["reported"], f"{r['queued']} queued", "")
            print(
                f"{label:<44}{name:<11}{left:>7.0f}{r['took_s']:>8.1f}{cells[0]!s:>10}{cells[1]!s:>9}"
                f"{cells[2]!s:>12}{cells[3]!s:>12}{r['cube_requests']:>10}",
                flush=True,
            )
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
