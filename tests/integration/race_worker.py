"""The real race (docs/guarantee.md): OS processes call `handler.app.handle` concurrently against a
DynamoDB endpoint (dynalite; or moto, to show why not moto), a counting Cube HTTP endpoint and a
file-backed SQS stand-in for the refresh queue. With `verify`, every refresh is verified: the Cube
endpoint answers `get` polls with job states (built, failed, forgotten, stuck; one key of one
tenant never builds), the verify and retrigger messages go through the same queue, delivered by
concurrent invocations, and a mutation counts as covered only by a build that ended `done`, or by a
dead letter for its key. Under load (docs/load-aware.md) the Cube endpoint has a real build queue
(`concurrency` workers, FIFO: jobs are `scheduled`, then `processing`, then done; a job posted while a
job of its key is queued is not queued again, as in Cube), every process shares one build budget
through the table's slots, a covering build must have *started* after the mutation, and one more
process is killed with SIGKILL while it holds budget. Used by tests/integration/test_race.py;
runnable by hand to compare backends:

    PYTHONPATH=src:. .venv/bin/python -m tests.integration.race_worker --backend dynalite
    PYTHONPATH=src:. .venv/bin/python -m tests.integration.race_worker --backend moto
"""

from __future__ import annotations

import argparse
import calendar
import fcntl
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TABLE = "race-debounce"
PARTITIONED = "Orders.monthly"
ROUTES: dict[str, list[Any]] = {
    "User": ["Users"],
    "Group": ["Groups", "Users.byGroup"],
    # Partition-precise: one key per month an Order's hint names (months 1-3 of 2026), or the whole
    # target for an Order without a hint (docs/guarantee.md, "Partition keys").
    "Order": [{"target": PARTITIONED, "partitionBy": "timeHints.placedAt", "granularity": "month"}],
}
MONTHS = (0, 1, 2, 3)  # 0: no hint


def month_label(month: int) -> str:
    last = calendar.monthrange(2026, month)[1]
    return f"2026-{month:02d}-01..2026-{month:02d}-{last}"


def selector_keys(selector: dict[str, Any]) -> list[str]:
    """What Cube builds for a selector, as refresh-key names: a target, or `target#month range` for
    each of the race's months a `dateRange` covers."""
    names = [*selector.get("cubes", []), *selector.get("preAggregations", [])]
    date_range = selector.get("dateRange")
    if date_range is None:
        return names
    labels = [
        month_label(m)
        for m in MONTHS[1:]
        if date_range[0][:10] <= month_label(m)[:10] and month_label(m)[-10:] <= date_range[1][:10]
    ]
    return [f"{name}#{label}" for name in names for label in labels]


def mutation_keys(entity: str, month: int) -> list[str]:
    if entity == "Order" and month:
        return [f"{PARTITIONED}#{month_label(month)}"]
    return [r if isinstance(r, str) else r["target"] for r in ROUTES[entity]]


TENANTS = ("t1", "t2", "t3")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                return True
        except OSError:
            time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------- servers
def dynalite_cli(workdir: Path) -> Path:
    """cube/node_modules/dynalite (installed by the devstack) or `npm install dynalite@4.0.0`."""
    cli = ROOT / "cube" / "node_modules" / "dynalite" / "cli.js"
    if cli.is_file():
        return cli
    npm = shutil.which("npm")
    if not npm:
        raise RuntimeError("npm is not on PATH: cannot install dynalite")
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "dynalite@4.0.0"],
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return workdir / "node_modules" / "dynalite" / "cli.js"


def start_dynalite(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    node = shutil.which("node")
    if not node:
        raise RuntimeError("node is not on PATH: cannot start dynalite")
    cli = dynalite_cli(workdir)
    port = free_port()
    log = (workdir / "dynalite.log").open("wb")
    proc = subprocess.Popen([node, str(cli), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    if not wait_port(port, 30):
        proc.kill()
        raise RuntimeError(f"dynalite did not listen on {port}: {(workdir / 'dynalite.log').read_text()[-2000:]}")
    return proc, f"http://127.0.0.1:{port}"


def start_moto(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    moto = Path(sys.executable).parent / "moto_server"
    port = free_port()
    log = (workdir / "moto.log").open("wb")
    proc = subprocess.Popen([str(moto), "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    if not wait_port(port, 30):
        proc.kill()
        raise RuntimeError("moto_server did not start")
    return proc, f"http://127.0.0.1:{port}"


def create_table(endpoint: str) -> None:
    import boto3  # noqa: PLC0415

    ddb = boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    from devstack.template import debounce_table_spec  # noqa: PLC0415

    spec = debounce_table_spec(ROOT / "template.yaml")  # the key schema and the `waiting` index
    ddb.create_table(
        TableName=TABLE,
        KeySchema=spec.key_schema,
        AttributeDefinitions=spec.attribute_definitions,
        GlobalSecondaryIndexes=spec.global_secondary_indexes,
        BillingMode="PAY_PER_REQUEST",
    )
    ddb.get_waiter("table_exists").wait(TableName=TABLE, WaiterConfig={"Delay": 1})


# Job outcomes when verification is on: most builds end done after 50-400 ms; some fail in the
# database, are forgotten (a Cube restart) or never finish (stuck: the build deadline fails them).
# Every n-th job (in the order Cube receives them) ends so: about 8 % forgotten, 6 % stuck, 12 % failed;
# a fixed pattern rather than a draw, so that a short run has some of each.
OUTCOMES = ((12, 6, "not_found"), (16, 9, "stuck"), (8, 3, "failure: relation does not exist"))
BROKEN = ("t3", "Groups")  # every build of this key fails: its mutations end in a dead letter


# Cube drops a job this long after it was posted (an hour in Cube, compressed): a stuck build ends
# `missing_partition` then.
DROP_MS = 6_000


@dataclass
class Job:
    tenant: str
    key: str
    arrived: int
    build_ms: int
    outcome: str
    queued: bool = True  # False: a job of the same key was in the queue, Cube did not queue this one
    start: int | None = None
    end: int | None = None

    def finish(self) -> int:
        assert self.start is not None
        return self.arrived + DROP_MS if self.outcome == "stuck" else self.start + self.build_ms

    def in_queue(self) -> bool:
        return self.queued and self.end is None

    def status(self) -> str:
        if not self.queued or (self.end is not None and self.outcome == "stuck"):
            return "missing_partition"
        if self.end is None:
            return "scheduled" if self.start is None else "processing"
        return self.outcome


@dataclass
class CountingCube:
    """POST /cubejs-api/v1/pre-aggregations/jobs: records (tenant, targets, arrival ms) of the builds
    it queues and answers 200. Answers 400 to a share `refuse_preaggs` of the pre-aggregation
    selectors (as for a renamed pre-aggregation): those queue nothing and are only counted. With
    `outcomes`, each queued job gets an outcome (OUTCOMES) that `get` polls report."""

    refuse_preaggs: float = 0.0
    outcomes: bool = False
    concurrency: int = 1_000  # build workers: few, and jobs wait `scheduled`
    build_ms: tuple[int, int] = (50, 400)
    posts: list[tuple[str, list[str], int]] = field(default_factory=list)
    jobs: dict[str, Job] = field(default_factory=dict)
    waiting: list[Job] = field(default_factory=list)
    running: list[Job] = field(default_factory=list)
    clock: int = 0
    gets: int = 0
    refused: int = 0
    duplicate_posts: int = 0  # posts of a key while a job of it was queued, short of its build deadline
    statuses_seen: dict[str, int] = field(default_factory=dict)  # what `get` answered, by status
    max_in_queue: int = 0  # jobs waiting or building at a POST, not counting builds past the deadline
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def advance(self, until: int) -> None:
        """Run the build queue up to `until` (under the lock): workers take waiting jobs in order."""
        while True:
            for job in [j for j in self.waiting if j.arrived + DROP_MS <= self.clock]:
                self.waiting.remove(job)
                job.end = job.arrived + DROP_MS
                job.outcome = "stuck"  # dropped before it ran
            if len(self.running) < self.concurrency and self.waiting:
                job = self.waiting.pop(0)
                job.start = max(job.arrived, self.clock)
                self.running.append(job)
                continue
            if self.running:
                nxt = min(self.running, key=Job.finish)
                if nxt.finish() <= until:
                    self.clock = max(self.clock, nxt.finish())
                    self.running.remove(nxt)
                    nxt.end = nxt.finish()
                    continue
            break
        self.clock = max(self.clock, until)

    def _outcome(self, tenant: str, key: str) -> str:
        if not self.outcomes:
            return "done"
        if (tenant, key) == BROKEN:
            return "failure: permission denied for table groups"
        number = len(self.jobs) + 1
        return next((outcome for every, at, outcome in OUTCOMES if number % every == at), "done")

    def _get(self, tokens: list[str]) -> dict[str, Any]:
        with self.lock:
            self.advance(now_ms())
            self.gets += 1
            known = {t: (self.jobs[t], self.jobs[t].status()) for t in tokens if t in self.jobs}
            for _, status in known.values():
                name = status.split(":")[0]
                self.statuses_seen[name] = self.statuses_seen.get(name, 0) + 1
        return {
            token: {
                "status": status,
                "table": f"pre_aggregations.{job.key.lower()}",
                "selector": {"contexts": [{"securityContext": {"tenantId": job.tenant}}], "timezones": ["UTC"]},
            }
            for token, (job, status) in known.items()
            if status != "not_found"  # a forgotten token: Cube leaves it out, the client reads not_found
        }

    def start(self) -> str:
        cube = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = now_ms()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if body.get("action") == "get":
                    self._answer(200, cube._get(list(body.get("tokens", []))))
                    return
                selector = body.get("selector", {})
                tenant = selector["contexts"][0]["securityContext"]["tenantId"]
                targets = selector_keys(selector)
                tokens: list[str] = []
                with cube.lock:
                    cube.advance(arrived)
                    refuse = "preAggregations" in selector and cube.rng.random() < cube.refuse_preaggs
                    if refuse:
                        cube.refused += 1
                    else:
                        cube.posts.append((tenant, targets, arrived))
                        for key in targets:
                            token = f"job-{uuid.uuid4().hex[:12]}"
                            build_ms = cube.rng.randint(*cube.build_ms)
                            job = Job(tenant, key, arrived, build_ms, cube._outcome(tenant, key))
                            queued = [j for j in [*cube.waiting, *cube.running] if (j.tenant, j.key) == (tenant, key)]
                            if queued:
                                job.queued = False  # Cube does not queue a forced build whose query is queued
                                # the function gives up on a build at its deadline: a re-post after that is
                                # the re-trigger of a stuck build, not a duplicate
                                if any((j.start or arrived) > arrived - BUILD_TIMEOUT_MS for j in queued):
                                    cube.duplicate_posts += 1
                            else:
                                cube.waiting.append(job)
                            cube.jobs[token] = job
                            tokens.append(token)
                        # Jobs of ours in the queue, leaving out builds past the build deadline: the
                        # function gave up on them (and freed their budget) while Cube still runs them.
                        counted = [
                            j
                            for j in [*cube.waiting, *cube.running]
                            if (j.start or arrived) > arrived - BUILD_TIMEOUT_MS
                        ]
                        cube.max_in_queue = max(cube.max_in_queue, len(counted))
                if refuse:
                    # A refusal a retry can get past (not the "doesn't match" 400, which the client
                    # reads as "no partition in this range": nothing to build).
                    self._answer(400, {"error": "the race's Cube refused this selector"})
                else:
                    self._answer(200, tokens)

            def _answer(self, status: int, answer: Any) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/cubejs-api"

    def built(self) -> list[tuple[str, str, int]]:
        """(tenant, key, build start) of every job that ended done: it read the source when it started."""
        with self.lock:
            self.advance(now_ms())
            return [(j.tenant, j.key, j.start or 0) for j in self.jobs.values() if j.status() == "done"]

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()


# ----------------------------------------------------------------------------- the function under test
class FileScheduler:
    """SQS stand-in: trailing, verify and retrigger messages appended to a JSON-lines file (flock),
    with their due time, read by the driver; dead letters go to `<file>.dead` with the time sent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def schedule(self, message: Any, *, now: int) -> None:
        from handler.domain.decode import trailing_body  # noqa: PLC0415

        self._append(self.path, trailing_body(message))

    def send(self, message: Any, *, due_at: int, now: int) -> None:
        self._append(self.path, {**message.as_body(), "dueAt": due_at})

    def dead_letter(self, message: Any) -> None:
        self._append(self.path + ".dead", {**message.as_body(), "sentAt": now_ms()})

    @staticmethod
    def _append(path: str, body: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps(body) + "\n")
            fcntl.flock(fh, fcntl.LOCK_UN)


# Verification's delays compressed (the real ones: polls from 2 s, re-triggers 2 s to 120 s, a
# 30 min build deadline) so that a failed build's 5 re-triggers play out within seconds.
POLL_DELAYS_MS = (300, 600, 1_200)
RETRIGGER_DELAYS_MS = (300, 500, 700, 900, 1_100)
BUILD_TIMEOUT_MS = 2_500
# Load-aware refresh's delays compressed the same way: a lease (and the in-flight gate) lapses 4 s after
# its last renewal (5 min deployed), a deferred key comes back after 0.3-2 s, a gated trailing refresh
# looks again after 0.3-1.2 s, a build waiting longer than DROP_MS is stuck.
LEASE_MS = 8_000
KILLED_TOKEN_PREFIX = "killed"


def build(
    endpoint: str,
    cube_url: str,
    queue_file: str,
    window_ms: int,
    *,
    verify: bool = False,
    budget: int = 0,
    token_prefix: str = "",
) -> Any:
    """The production wiring with the SQS adapter swapped for the file stand-in."""
    from preagg_cli.local import LOCAL_DEFAULTS  # noqa: PLC0415

    for name, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "POWERTOOLS_LOG_LEVEL": "ERROR"}
    )
    import boto3  # noqa: PLC0415

    from handler.adapters.cube import CubeJobsClient  # noqa: PLC0415
    from handler.adapters.dynamodb import DynamoDBDebounceStore  # noqa: PLC0415
    from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
    from handler.domain.debounce import Debouncer  # noqa: PLC0415
    from handler.domain.routing import EntityCubeMap  # noqa: PLC0415
    from handler.domain.service import RefreshService  # noqa: PLC0415
    from handler.wiring import SystemClock  # noqa: PLC0415

    client = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")
    clock = SystemClock()
    store = DynamoDBDebounceStore(client, TABLE)
    debouncer = Debouncer(store, FileScheduler(queue_file), clock, window_ms)
    cube = CubeJobsClient(cube_url, lambda: "race-secret-race-secret-race-secret-32b", timeout_ms=5_000, retries=1)
    telemetry = CountingTelemetry()
    verifier = None
    from handler.domain import admission as admission_module  # noqa: PLC0415
    from handler.domain import debounce as debounce_module  # noqa: PLC0415

    admission_module.DEFER_MIN_MS, admission_module.DEFER_MAX_MS = 300, 2_000
    debounce_module.GATE_RECHECK_MIN_MS, debounce_module.GATE_RECHECK_MAX_MS = 300, 1_200
    admission = admission_module.Admission(
        store,
        clock,
        telemetry,
        budget,
        lease_ms=LEASE_MS,
        new_token=(lambda: f"{token_prefix}{_token()}") if token_prefix else _token,
    )
    if verify:
        from handler.domain import verify as verification  # noqa: PLC0415

        verification.POLL_DELAYS_MS = POLL_DELAYS_MS
        verification.RETRIGGER_DELAYS_MS = RETRIGGER_DELAYS_MS
        queue = FileScheduler(queue_file)
        verifier = verification.BuildVerifier(
            store,
            cube,
            queue,
            telemetry,
            clock,
            BUILD_TIMEOUT_MS,
            admission=admission,
            queued_bound_ms=DROP_MS + 1_000,
            lease_ms=LEASE_MS,
        )
    return RefreshService(
        EntityCubeMap(ROUTES), debouncer, cube, telemetry, clock, ("UTC",), verifier=verifier, admission=admission
    )


def _token() -> str:
    return uuid.uuid4().hex


# Each process keeps going past the duration until it has this many accepted mutations (a loaded
# machine runs the race longer instead of running a smaller one), up to HARD_LIMIT_S.
MIN_ACCEPTED_PER_PROCESS = 15
HARD_LIMIT_S = 90.0


@dataclass(frozen=True)
class WorkerArgs:
    index: int
    endpoint: str
    cube_url: str
    queue_file: str
    window_ms: int
    duration_s: float
    seed: int
    verify: bool
    budget: int = 0
    ack_file: str = ""  # every accepted mutation is also appended here (a killed process returns nothing)
    killable: bool = False  # holds each budget slot it takes a moment longer: killed while it does


def worker(args: WorkerArgs) -> tuple[list[tuple[str, str, int, int, int]], int]:
    """One process: mutations at random times on overlapping keys; retries failed records."""
    from handler import app  # noqa: PLC0415
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    prefix = KILLED_TOKEN_PREFIX if args.killable else ""
    service = build(
        args.endpoint,
        args.cube_url,
        args.queue_file,
        args.window_ms,
        verify=args.verify,
        budget=args.budget,
        token_prefix=prefix,
    )
    if args.killable:
        store = service.admission.store
        take = store.take_slot

        def take_and_hold(*a: Any, **kw: Any) -> bool:
            taken: bool = take(*a, **kw)
            if taken:
                time.sleep(0.3)  # between taking budget and posting: where SIGKILL leaks it
            return taken

        store.take_slot = take_and_hold
    rng = random.Random(args.seed * 1000 + args.index)
    accepted: list[tuple[str, str, int, int, int]] = []
    began = time.monotonic()
    end, hard_end = began + args.duration_s, began + max(args.duration_s, HARD_LIMIT_S)
    while time.monotonic() < hard_end and (time.monotonic() < end or len(accepted) < MIN_ACCEPTED_PER_PROCESS):
        time.sleep(rng.uniform(0, 0.06))
        tenant, entity = rng.choice(TENANTS), rng.choice(list(ROUTES))
        month = rng.choice(MONTHS) if entity == "Order" else 0
        received = now_ms()
        value: dict[str, Any] = {
            "eventType": "UPDATED",
            "entityType": entity,
            "entityId": f"e{args.index}",
            "tenantId": tenant,
            "timestamp": received,
        }
        if month:
            placed = f"2026-{month:02d}-{rng.randint(1, 28):02d}T12:00:00Z"
            value["timeHints"] = {"placedAt": {"old": placed, "new": placed}}
        event = build_msk_event([value])
        for _ in range(20):
            response = app.handle(event, service=service)
            if not response["batchItemFailures"]:
                accepted.append((tenant, entity, month, received, now_ms()))
                if args.ack_file:
                    FileScheduler._append(args.ack_file, {"accepted": accepted[-1]})
                break
            time.sleep(0.05)
    return accepted, service.telemetry.counts.get("KeysDeferred", 0)


# ----------------------------------------------------------------------------- the race
@dataclass
class RaceResult:
    processes: int
    mutations: int
    refreshes: int
    max_per_key_per_window: int
    uncovered: int
    trailing_delivered: int
    duration_s: float
    worst_staleness_ms: int
    details: list[str]
    refused: int = 0
    partition_refreshes: int = 0
    delivered_by_kind: dict[str, int] = field(default_factory=dict)
    jobs_by_outcome: dict[str, int] = field(default_factory=dict)
    gets: int = 0
    dead_letters: int = 0
    covered_by_dead_letter: int = 0
    budget: int = 0
    concurrency: int = 0
    max_jobs_in_queue: int = 0
    duplicate_posts: int = 0
    killed: int = 0
    killed_mutations: int = 0
    leaked_slots_at_kill: int = 0
    slots_held_after_drain: int = 0
    deferred: int = 0
    ride_alongs: int = 0
    statuses_seen: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        text = (
            f"processes={self.processes} mutations={self.mutations} refreshes={self.refreshes} "
            f"max_refreshes_per_key_per_window={self.max_per_key_per_window} uncovered={self.uncovered} "
            f"trailing_delivered={self.trailing_delivered} refused_preagg_selectors={self.refused} "
            f"partition_key_refreshes={self.partition_refreshes} "
            f"worst_staleness_ms={self.worst_staleness_ms} "
            f"duration_s={self.duration_s:.1f}"
        )
        if self.jobs_by_outcome:
            text += (
                f" delivered={self.delivered_by_kind} jobs={self.jobs_by_outcome} cube_gets={self.gets}"
                f" dead_letters={self.dead_letters} covered_by_dead_letter={self.covered_by_dead_letter}"
            )
        if self.concurrency < 100:
            text += (
                f" budget={self.budget} cube_concurrency={self.concurrency} max_jobs_in_queue={self.max_jobs_in_queue}"
                f" duplicate_posts={self.duplicate_posts} keys_deferred={self.deferred}"
                f" ride_alongs={self.ride_alongs} polls_saw={self.statuses_seen}"
                f" killed={self.killed} killed_mutations={self.killed_mutations}"
                f" slots_leaked_by_the_kill={self.leaked_slots_at_kill}"
                f" slots_held_after_drain={self.slots_held_after_drain}"
            )
        return text


def drive_queue(service: Any, queue_file: str, stop: threading.Event, kinds: dict[str, int]) -> int:
    """Deliver due queue messages back through `handle` as SQS events (batches of up to 10, up to 4
    invocations at once, as the SQS event source mapping scales out) until stopped and drained.
    A message an invocation reports failed comes back 500 ms later. Counts deliveries by kind."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from handler import app  # noqa: PLC0415

    def invoke(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        records = [{"eventSource": "aws:sqs", "messageId": str(i), "body": json.dumps(m)} for i, m in enumerate(batch)]
        response = app.handle({"Records": records}, service=service)
        failed = {int(f["itemIdentifier"]) for f in response["batchItemFailures"]}
        return [m for i, m in enumerate(batch) if i in failed]

    offset = 0
    pending: list[dict[str, Any]] = []
    delivered = 0
    idle_since = None
    with ThreadPoolExecutor(4) as pool:
        while True:
            with open(queue_file, encoding="utf-8") as fh:
                fh.seek(offset)
                data = fh.read()
            complete = data[: data.rfind("\n") + 1]
            offset += len(complete.encode())
            pending += [json.loads(line) for line in complete.splitlines() if line.strip()]
            now = now_ms()
            due = [m for m in pending if m["dueAt"] <= now]
            pending = [m for m in pending if m["dueAt"] > now]
            if due:
                idle_since = None
                for message in due:
                    kind = message.get("kind", "trailing")
                    kinds[kind] = kinds.get(kind, 0) + 1
                batches = [due[i : i + 10] for i in range(0, len(due), 10)]
                for failed in pool.map(invoke, batches):
                    pending += [dict(m, dueAt=now + 500) for m in failed]
                delivered += len(due)
            elif stop.is_set() and not pending:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 0.5:
                    return delivered
            time.sleep(0.02)


def run_race(
    endpoint: str,
    *,
    processes: int = 8,
    window_ms: int = 1_500,
    duration_s: float = 5.0,
    seed: int = 1,
    refuse_preaggs: float = 0.0,
    verify: bool = False,
    budget: int = 0,
    concurrency: int = 1_000,
    kill: bool = False,
) -> RaceResult:
    """`kill`: one more process runs beside the others and is killed with SIGKILL halfway through,
    most likely while it holds budget slots it took (it holds each one 0.3 s before posting)."""
    began = time.monotonic()
    create_table(endpoint)
    # With few build workers the builds take longer (0.2-1.2 s), so that jobs wait in Cube's queue.
    cube = CountingCube(
        refuse_preaggs,
        outcomes=verify,
        concurrency=concurrency,
        build_ms=(200, 1_200) if concurrency < 100 else (50, 400),
    )
    cube_url = cube.start()
    queue_dir = tempfile.mkdtemp(prefix="race-queue-")
    queue_file = os.path.join(queue_dir, "trailing.jsonl")
    ack_file = os.path.join(queue_dir, "killed-acks.jsonl")
    Path(queue_file).touch()
    try:
        driver_service = build(endpoint, cube_url, queue_file, window_ms, verify=verify, budget=budget)
        stop = threading.Event()
        delivered: list[int] = []
        kinds: dict[str, int] = {}
        driver = threading.Thread(target=lambda: delivered.append(drive_queue(driver_service, queue_file, stop, kinds)))
        driver.start()
        ctx = multiprocessing.get_context("spawn")
        common = {"endpoint": endpoint, "cube_url": cube_url, "queue_file": queue_file, "window_ms": window_ms}
        victim, leaked = None, 0
        if kill:
            victim = ctx.Process(
                target=worker,
                args=(
                    WorkerArgs(
                        processes,
                        **common,
                        duration_s=duration_s * 4,
                        seed=seed,
                        verify=verify,
                        budget=budget,
                        ack_file=ack_file,
                        killable=True,
                    ),
                ),
            )
            victim.start()
        with ctx.Pool(processes) as pool:
            jobs = [
                WorkerArgs(i, **common, duration_s=duration_s, seed=seed, verify=verify, budget=budget)
                for i in range(processes)
            ]
            pending = pool.map_async(worker, jobs)
            if victim is not None:
                leaked = kill_while_holding_budget(victim, driver_service, budget, ack_file, timeout_s=duration_s * 6)
            parts = pending.get()
        accepted = [m for part, _ in parts for m in part]
        killed_accepted = (
            [tuple(json.loads(line)["accepted"]) for line in Path(ack_file).read_text().splitlines()]
            if kill and Path(ack_file).exists()
            else []
        )
        stop.set()
        driver.join(timeout=window_ms / 1000 * 4 + 60)
        assert not driver.is_alive(), "trailing refreshes did not drain"
        dead_file = Path(queue_file + ".dead")
        dead = [json.loads(line) for line in dead_file.read_text().splitlines()] if dead_file.exists() else []
        covering = cube.built() if verify else [(t, k, at) for t, keys, at in cube.posts for k in keys]
        result = evaluate(
            [*accepted, *killed_accepted],  # type: ignore[list-item]
            cube.posts,
            covering,
            dead,
            processes,
            window_ms,
            delivered[0],
            time.monotonic() - began,
        )
        result.refused = cube.refused
        result.delivered_by_kind = kinds
        if verify:
            with cube.lock:
                cube.advance(now_ms())
                for job in cube.jobs.values():
                    status = job.status().split(":")[0]
                    result.jobs_by_outcome[status] = result.jobs_by_outcome.get(status, 0) + 1
            result.gets = cube.gets
        result.budget, result.concurrency = budget, concurrency
        result.max_jobs_in_queue, result.duplicate_posts = cube.max_in_queue, cube.duplicate_posts
        result.killed, result.killed_mutations, result.leaked_slots_at_kill = int(kill), len(killed_accepted), leaked
        result.slots_held_after_drain = len(held_slots(driver_service, budget))
        result.deferred = sum(n for _, n in parts) + driver_service.telemetry.counts.get("KeysDeferred", 0)
        result.statuses_seen = dict(cube.statuses_seen)
        result.ride_alongs = driver_service.telemetry.counts.get("RideAlongs", 0)
        return result
    finally:
        cube.stop()
        shutil.rmtree(queue_dir, ignore_errors=True)


def kill_while_holding_budget(victim: Any, service: Any, budget: int, ack_file: str, *, timeout_s: float) -> int:
    """SIGKILL the victim once it has had mutations accepted and holds a budget slot (it holds each
    one 0.3 s before posting); no clean-up of any kind. Returns the slots it held at the kill."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        acked = Path(ack_file).exists() and len(Path(ack_file).read_text().splitlines()) >= 3
        if acked and held_slots(service, budget, prefix=KILLED_TOKEN_PREFIX):
            break
        time.sleep(0.01)
    os.kill(victim.pid or 0, signal.SIGKILL)
    victim.join()
    return len(held_slots(service, budget, prefix=KILLED_TOKEN_PREFIX))


def held_slots(service: Any, budget: int, *, prefix: str = "") -> list[Any]:
    """Budget slots held by a lease that has not lapsed (whose token starts with `prefix`)."""
    if not budget:
        return []
    now = now_ms()
    slots = service.admission.store.budget_slots(service.admission.scope, budget)
    return [slot for slot in slots if not slot.free(now) and (slot.lease or "").startswith(prefix)]


def evaluate(
    accepted: list[tuple[str, str, int, int, int]],
    posts: list[tuple[str, list[str], int]],
    covering: list[tuple[str, str, int]],
    dead: list[dict[str, Any]],
    processes: int,
    window_ms: int,
    delivered: int,
    duration: float,
) -> RaceResult:
    """`posts`: every job request Cube queued (for the refreshes-per-window bound). `covering`:
    (tenant, key, POST arrival) of the builds that cover a mutation: every queued one, or with
    verification only those that ended done. `dead`: dead-lettered retrigger bodies with `sentAt`."""
    starts: dict[tuple[str, str], list[int]] = {}
    for tenant, targets, at in posts:
        for target in targets:
            starts.setdefault((tenant, target), []).append(at)
    details: list[str] = []
    max_per_window = 0
    for key, times in starts.items():
        times.sort()
        for i, x in enumerate(times):
            n = sum(1 for y in times[i:] if y < x + window_ms)
            if n > max_per_window:
                max_per_window = n
            if n > 2:
                details.append(f"{n} refreshes of {key} within {window_ms} ms from {x}")
    built: dict[tuple[str, str], list[int]] = {}
    for tenant, key, at in covering:
        built.setdefault((tenant, key), []).append(at)
    letters: dict[tuple[str, str], list[int]] = {}
    for body in dead:
        for target in body["targets"]:
            key = target["target"] + (f"#{target['partition']}" if target.get("partition") else "")
            letters.setdefault((body["tenantId"], key), []).append(int(body["sentAt"]))
    uncovered = by_letter = 0
    worst = 0
    for tenant, entity, month, received, _acked in accepted:
        for key in mutation_keys(entity, month):
            target = key.split("#", 1)[0]
            cube = target.split(".", 1)[0]
            wider = {target, cube} - {key}
            times = built.get((tenant, key), []) + [t for w in wider for t in built.get((tenant, w), [])]
            after = [t for t in times if t > received]
            if after:
                worst = max(worst, min(after) - received)
            elif any(t > received for w in {key, *wider} for t in letters.get((tenant, w), [])):
                by_letter += 1
            else:
                uncovered += 1
                details.append(f"uncovered: {tenant}#{key} received at {received}")
    result = RaceResult(
        processes, len(accepted), len(posts), max_per_window, uncovered, delivered, duration, worst, details
    )
    result.partition_refreshes = sum(len(times) for (_, key), times in starts.items() if "#" in key)
    result.dead_letters = len(dead)
    result.covered_by_dead_letter = by_letter
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["dynalite", "moto"], default="dynalite")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--window-ms", type=int, default=1_500)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--refuse-preaggs", type=float, default=0.0, help="share of pre-aggregation selectors refused")
    parser.add_argument("--verify", action="store_true", help="verify every refresh (builds fail, vanish, hang)")
    parser.add_argument("--budget", type=int, default=0, help="shared build budget in jobs (0: none)")
    parser.add_argument("--concurrency", type=int, default=1_000, help="the Cube endpoint's build workers")
    parser.add_argument("--kill", action="store_true", help="SIGKILL one more process halfway, while it holds budget")
    args = parser.parse_args()
    for run in range(args.runs):
        workdir = Path(tempfile.mkdtemp(prefix=f"race-{args.backend}-"))
        proc, endpoint = (start_dynalite if args.backend == "dynalite" else start_moto)(workdir)
        try:
            result = run_race(
                endpoint,
                processes=args.processes,
                window_ms=args.window_ms,
                duration_s=args.duration,
                seed=run + 1,
                refuse_preaggs=args.refuse_preaggs,
                verify=args.verify,
                budget=args.budget,
                concurrency=args.concurrency,
                kill=args.kill,
            )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"[race:{args.backend} run {run + 1}] {result.line()}")
        for line in result.details[:10]:
            print("   ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
