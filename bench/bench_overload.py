"""Overload on the real Cube (issue 16, "Show it: Real Cube"): more change than Cube can build, per behaviour.

On the local stack (PostgreSQL + the real Cube 1.7.43, dynalite, moto), a burst of mutations over many
tenants is replayed once per *behaviour* (a version of the function's code plus settings), on the same
stack, data and schedule, against a Cube whose build queue is constrained and whose builds are slow:

- **Cube**: a fresh Cube process per behaviour (an empty build queue, no job left from the previous
  run) with `CUBE_BUILD_CONCURRENCY` (the pre-aggregation queue's concurrency, default 2: Cube's own
  default for PostgreSQL) and `CUBE_MODEL_BUILD_SLEEP_S` (every `Users` rollup build waits that long in
  PostgreSQL: a slow warehouse). Both are read by cube/cube.js only when set; the stack's own Cube and
  the product's model are untouched.
- **Tenants**: `--tenants` tenants `bench-ovl-NNN` are created in PostgreSQL for the run (3 users each,
  all dated in the current month, so a `Users` refresh is 2 jobs: `main` and one monthly partition of
  `dailyStatusCounts`) and removed at the end, with their pre-aggregation schemas.
- **Schedule**: `--mutations` `User` mutations over `--arrival-s` seconds, in bursts of 1-6 per tenant
  (Poisson arrivals, tenant weights 1/sqrt(rank)); each inserts its row into PostgreSQL (its time is the
  commit) and goes, with the others of its 250 ms tick, as one MSK batch to the function.
- **The function**: bench/overload_driver.py, a child process running `handler.app.handle` of the
  behaviour's code (`PYTHONPATH` at that code's `src/`) with the real adapters, a fresh DynamoDB table
  and fresh SQS queues, and `--pumps` SQS pollers standing in for the SQS event source mapping.

What is measured, from outside the function (ground truth), per behaviour:
- builds requested: every request to Cube passes through a counting proxy (job POSTs, job tokens
  returned, verification GETs);
- Cube's queue depth: Cube's own queue (`POST /cubejs-system/v1/pre-aggregations/queue`, enabled on the
  bench Cube by a system secret) sampled every `--sample-s`: `scheduled` (toProcess) and `processing`
  (active) builds; and the builds PostgreSQL is running (`pg_stat_activity`), which must stay within the
  concurrency;
- freshness per mutation: the rollup tables of the bench tenants are watched in PostgreSQL every
  `--observe-s`; a mutation is served once a `users_main` table and a table of its month's
  `users_daily_status_counts` partition both hold its row (a table whose `sum(users__count)` reaches the
  tenant's row count right after the insert: rows are only added, so such a table was built from a
  snapshot taken after the commit). FreshnessLag = first seen minus commit;
- dead letters: the messages on the run's dead-letter queue, read at the end;
- uncovered mutations: not served by the end of the run, and no dead letter naming the tenant's `Users`
  key sent after the mutation;
- re-triggers and failures: the function's own counts (telemetry) and the re-trigger messages delivered.

Where the lag goes, per behaviour (printed below the table): each served mutation's FreshnessLag cut at
the build that served it: before its POST (window, gate, budget), in Cube's queue, building (PostgreSQL's
`CREATE TABLE`, listed every `--build-watch-s`), until seen; the function's poll lag (told `done` minus
the table seen); and the capacity bound: the FreshnessLag of the same commits under a scheduler with no
overhead (no window, no poll, Cube never idle, oldest mutation first) at the build rate Cube showed, and
the floor no scheduler can beat, however clairvoyant (`lag_floor`: the builds the commits need within a
lag X against what the slots can run).
`--trace DIR` keeps each behaviour's raw record, and the function's decisions per key (`NAME.outcomes.jsonl`:
deferred, rescheduled, refreshed... with their times); `--from-trace DIR/*.json` prints that part again.

A phase ends when every mutation is served, Cube's queue is empty and the refresh queue holds no
message (two samples in a row), or `--max-tail-s` after the last arrival. `--cube-restart-s` restarts
the bench Cube mid-run (its queued builds and job tokens are lost); `BENCH_FAULT` (see
overload_driver.py) breaks the function on purpose, to check that the benchmark can fail.

    PYTHONPATH=src:. .venv/bin/python bench/bench_overload.py                    # today's code (src/)
    PYTHONPATH=src:. .venv/bin/python bench/bench_overload.py \\
        --behaviour today=<commit before the feature> --behaviour new=src        # before / after
    ... --behaviour new=src+CUBE_PREAGG_SOMETHING=value                          # settings per behaviour
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TENANT_PREFIX = "bench-ovl-"
ROW_PREFIX = "bench-ovl-row-"
SCHEMA_PREFIX = "pre_aggregations_bench_ovl_"
TABLE_NAME = "preagg-refresh-debounce-bench-ovl"
QUEUE_NAME = "preagg-refresh-bench-ovl"
DLQ_NAME = "preagg-refresh-bench-ovl-dlq"
TICK_S = 0.25  # MSK batching: what arrived in a tick goes in one batch
SEED_USERS = 3  # users per bench tenant before the run
ROLLUPS = ("users_main", "users_daily_status_counts")  # what a `Users` refresh builds


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ----------------------------------------------------------------------------- pure helpers (unit-tested)


@dataclass(frozen=True)
class Arrival:
    offset_s: float
    tenant: str


def tenant_names(count: int) -> list[str]:
    return [f"{TENANT_PREFIX}{i:03d}" for i in range(count)]


def schedule(tenants: Sequence[str], mutations: int, arrival_s: float, seed: int) -> list[Arrival]:
    """Bursts of 1-6 mutations of one tenant (0-400 ms apart), bursts arriving as a Poisson process over
    `arrival_s`, tenant i weighted 1/sqrt(i+1) (a few busy tenants, a long tail). Deterministic per seed."""
    rng = random.Random(seed)
    weights = [1 / math.sqrt(i + 1) for i in range(len(tenants))]
    rate = mutations / 3.5 / arrival_s  # 3.5: the mean burst size
    out: list[Arrival] = []
    t = 0.0
    while len(out) < mutations:
        t += rng.expovariate(rate)
        start = t if t <= arrival_s else rng.uniform(0, arrival_s)  # the last few: anywhere in the window
        tenant = rng.choices(tenants, weights)[0]
        at = start
        for _ in range(rng.randint(1, 6)):
            if len(out) == mutations:
                break
            out.append(Arrival(round(min(at, arrival_s), 3), tenant))
            at += rng.uniform(0, 0.4)
    return sorted(out, key=lambda a: (a.offset_s, a.tenant))


def due_batches(
    offsets_s: Sequence[float], tick_s: float, clock: Any = time.monotonic, sleep: Any = time.sleep
) -> Iterator[range]:
    """Replays a sorted schedule in real time: once per tick, the indices of the arrivals that became due
    since the last tick (ticks with none are skipped); the time spent by the caller counts."""
    began = clock()
    i = 0
    while i < len(offsets_s):
        elapsed = clock() - began
        j = i
        while j < len(offsets_s) and offsets_s[j] <= elapsed:
            j += 1
        if j > i:
            yield range(i, j)
            i = j
        if i < len(offsets_s):
            sleep(max(0.0, tick_s - (clock() - began - elapsed)))


@dataclass(frozen=True)
class Behaviour:
    """One version of the function to run: `code` is `src` (this checkout), a directory holding
    `src/handler`, or a git commit-ish; `env` are settings for it (and `BENCH_FAULT` for the driver)."""

    name: str
    code: str
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Behaviour:
        """`name=code[+VAR=value...]`, e.g. `today=69807be`, `new=src+CUBE_PREAGG_DEBOUNCE_MS=30000`."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"behaviour {spec!r}: expected name=code[+VAR=value...]")
        code, *settings = rest.split("+")
        env = []
        for item in settings:
            var, sep, value = item.partition("=")
            if not sep or not var or not var.replace("_", "").isalnum() or not var[0].isalpha():
                raise ValueError(f"behaviour {spec!r}: {item!r} is not VAR=value")
            env.append((var, value))
        if not code:
            raise ValueError(f"behaviour {spec!r}: no code (src, a directory or a git commit)")
        return cls(name, code, tuple(env))

    @property
    def settings(self) -> dict[str, str]:
        return dict(self.env)


@dataclass
class Mutation:
    tenant: str
    row_id: str
    committed_ms: int = 0
    count_after: int = 0  # the tenant's row count right after this mutation's insert


@dataclass(frozen=True)
class SeenTable:
    """A rollup table of a bench tenant, as the observer first saw it."""

    tenant: str
    rollup: str  # one of ROLLUPS
    partition: str  # "20261201" for a partition, "" for users_main
    seen_ms: int
    count: int  # sum(users__count): the tenant's rows the table holds
    name: str = ""  # schema.table


@dataclass(frozen=True)
class DeadLetter:
    tenant: str
    targets: tuple[str, ...]
    sent_ms: int
    kind: str  # retrigger (a build that failed after its re-triggers) | trailing (redriven) | ...


def served_at(m: Mutation, seen: Iterable[SeenTable], month: str) -> int | None:
    """When every rollup of the mutation's key was first seen holding its row: the latest of, per rollup
    (users_main, and the partition of `month` of users_daily_status_counts), the first table seen with
    at least `count_after` rows. None if some rollup never held it."""
    firsts: dict[str, int] = {}
    for table in seen:
        if table.tenant != m.tenant or table.count < m.count_after:
            continue
        if table.rollup == "users_daily_status_counts" and table.partition != month:
            continue
        if table.rollup in ROLLUPS and table.seen_ms < firsts.get(table.rollup, 2**63):
            firsts[table.rollup] = table.seen_ms
    if set(firsts) != set(ROLLUPS):
        return None
    return max(firsts.values())


@dataclass
class Coverage:
    lags_ms: list[int | None]  # per mutation: served minus committed, None = never served
    dead_lettered: int  # not served, but a dead letter names its key (sent after the mutation)
    uncovered: list[Mutation]


def coverage(
    mutations: Sequence[Mutation], seen: Sequence[SeenTable], letters: Sequence[DeadLetter], month: str
) -> Coverage:
    """Per mutation: served (its lag), or accounted for by a dead letter of its tenant's `Users` key sent
    after it, or uncovered."""
    by_tenant: dict[str, list[SeenTable]] = defaultdict(list)
    for table in seen:
        by_tenant[table.tenant].append(table)
    lags: list[int | None] = []
    dead = 0
    uncovered = []
    for m in mutations:
        at = served_at(m, by_tenant[m.tenant], month)
        lags.append(None if at is None else at - m.committed_ms)
        if at is not None:
            continue
        if any(d.tenant == m.tenant and "Users" in d.targets and d.sent_ms >= m.committed_ms for d in letters):
            dead += 1
        else:
            uncovered.append(m)
    return Coverage(lags, dead, uncovered)


def percentile(values: Sequence[int | None], q: float) -> int | None:
    """Nearest-rank percentile; None (never served) ranks above every number. None if it falls on one."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values, key=lambda v: (v is None, v or 0))
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def seconds(value: int | None, *, never: str = "never") -> str:
    return never if value is None else f"{value / 1000:.1f}"


def queue_counts(items: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(scheduled, processing) in Cube's queue listing: `toProcess` items waiting, `active` ones running."""
    scheduled = processing = 0
    for item in items:
        status = item.get("status") or []
        if "active" in status:
            processing += 1
        elif "toProcess" in status:
            scheduled += 1
    return scheduled, processing


# ----------------------------------------------------------------------------- Cube, proxied and sampled


class CubeProxy:
    """Forwards the function's requests to the bench Cube and counts them: the ground truth of what the
    function asked of Cube, whatever version of it runs."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.posts: list[tuple[int, str, int, int]] = []  # (ms, tenant, http status, job tokens)
        self.gets: list[tuple[int, int]] = []  # (ms, tokens asked)
        self.tokens: dict[str, tuple[int, str]] = {}  # job token -> (POST answered ms, tenant)
        self.jobs: dict[str, dict[str, Any]] = {}  # job token -> table, first ms seen per status
        self.other = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                proxy.forward(self, "POST")

            def do_GET(self) -> None:
                proxy.forward(self, "GET")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/cubejs-api"

    def forward(self, request: BaseHTTPRequestHandler, method: str) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else None
        headers = {k: v for k, v in request.headers.items() if k.lower() in {"authorization", "content-type"}}
        upstream = urllib.request.Request(self.upstream + request.path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(upstream, timeout=120) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        except OSError as error:
            status, payload = 502, json.dumps({"error": f"bench proxy: {error!r}"}).encode()
        self.count(body, status, payload)
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def count(self, body: bytes | None, status: int, payload: bytes) -> None:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = {}
        action = data.get("action") if isinstance(data, dict) else None
        ms = now_ms()
        with self.lock:
            if action == "post":
                try:
                    tokens = json.loads(payload) if status == 200 else []
                except ValueError:
                    tokens = []
                contexts = (data.get("selector") or {}).get("contexts") or [{}]
                tenant = str((contexts[0].get("securityContext") or {}).get("tenantId", "?"))
                self.posts.append((ms, tenant, status, len(tokens) if isinstance(tokens, list) else 0))
                for token in tokens if isinstance(tokens, list) else []:
                    self.tokens.setdefault(str(token), (ms, tenant))
            elif action == "get":
                self.gets.append((ms, len(data.get("tokens") or [])))
                self.record_jobs(ms, payload if status == 200 else b"{}")
            else:
                self.other += 1

    def record_jobs(self, ms: int, payload: bytes) -> None:
        """The first time the function was told each status of each job (its poll lag), and the job's table."""
        try:
            answer = json.loads(payload)
        except ValueError:
            return
        if not isinstance(answer, dict):
            return
        for token, job in answer.items():
            if not isinstance(job, dict):
                continue
            entry = self.jobs.setdefault(str(token), {"table": "", "seen": {}})
            entry["table"] = entry["table"] or str(job.get("table") or "")
            entry["seen"].setdefault(str(job.get("status", ""))[:40], ms)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BuildWatcher:
    """The builds PostgreSQL runs (`CREATE TABLE` in pg_stat_activity), every `interval_s`: per table, when
    its statement started (`query_start`, PostgreSQL's clock, the same machine's) and when it was last seen
    running. A build shorter than the interval may be missed; its start is then unknown."""

    def __init__(self, stack: Any, interval_s: float) -> None:
        self.stack = stack
        self.interval_s = interval_s
        self.builds: dict[str, list[int]] = {}  # schema.table -> [started ms, last seen running ms]
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def tick(self) -> None:
        rows = self.stack.psql(
            "SELECT (extract(epoch FROM query_start) * 1000)::bigint, "
            "substring(query from '(?i)create\\s+table\\s+([^\\s(]+)') FROM pg_stat_activity "
            "WHERE state = 'active' AND query ~* '^[[:space:]]*create[[:space:]]+table'"
        )
        ms = now_ms()
        for started, table in rows:
            if started is None or not table:
                continue
            name = table.replace('"', "")
            self.builds.setdefault(name, [int(started), ms])[1] = ms

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                self.tick()
            except Exception:
                self.errors += 1
            self.stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))


@dataclass
class Sample:
    ms: int
    scheduled: int
    processing: int
    pg_building: int  # CREATE TABLE statements PostgreSQL is running
    sqs_due: int  # refresh queue messages due and not yet received (the pollers' backlog)
    sqs_pending: int  # all messages on the refresh queue: due, in flight and delayed


class Sampler:
    """Cube's build queue, PostgreSQL's running builds and the refresh queue, every `interval_s`."""

    def __init__(self, stack: Any, cube_url: str, system_token: str, sqs: Any, queue_url: str, interval_s: float):
        self.stack = stack
        self.cube_url = cube_url.rstrip("/")
        self.token = system_token
        self.sqs = sqs
        self.queue_url = queue_url
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def queue(self) -> tuple[int, int]:
        request = urllib.request.Request(
            f"{self.cube_url}/cubejs-system/v1/pre-aggregations/queue",
            data=b"{}",
            headers={"Authorization": self.token, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        return queue_counts(answer.get("result", []) if isinstance(answer, dict) else [])

    def tick(self) -> None:
        try:
            scheduled, processing = self.queue()
            building = int(
                self.stack.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query ~* '^[[:space:]]*create[[:space:]]+table'"
                )[0][0]
                or 0
            )
            attrs = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["All"])["Attributes"]
        except Exception as error:
            self.errors[repr(error)[:160]] += 1
            return
        due = int(attrs.get("ApproximateNumberOfMessages", 0))
        pending = due + int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
        pending += int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))
        self.samples.append(Sample(now_ms(), scheduled, processing, building, due, pending))

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            self.tick()
            self.stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))


class Observer:
    """Polls PostgreSQL for new rollup tables of the bench tenants and the rows each one holds."""

    def __init__(self, stack: Any, interval_s: float) -> None:
        self.stack = stack
        self.interval_s = interval_s
        self.known: set[str] = set()
        self.seen: list[SeenTable] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def tables(self) -> list[tuple[str, str]]:
        rows = self.stack.psql(
            f"SELECT schemaname, tablename FROM pg_tables WHERE schemaname LIKE '{SCHEMA_PREFIX}%' "
            "AND (tablename LIKE 'users_main%' OR tablename LIKE 'users_daily_status_counts%')"
        )
        return [(str(s), str(t)) for s, t in rows]

    def tick(self) -> None:
        from devstack import StackError  # noqa: PLC0415
        from devstack.cubeapi import RollupTable  # noqa: PLC0415

        fresh = [(s, t) for s, t in self.tables() if f"{s}.{t}" not in self.known]
        seen_ms = now_ms()
        if not fresh:
            return
        counts: dict[str, int] = {}
        union = " UNION ALL ".join(
            f'SELECT \'{s}.{t}\', coalesce(sum(users__count), 0) FROM "{s}"."{t}"' for s, t in fresh
        )
        try:
            counts = {str(name): int(n or 0) for name, n in self.stack.psql(union)}
        except StackError:  # one of them was dropped (an older version) meanwhile: one by one
            for s, t in fresh:
                with contextlib.suppress(StackError):
                    counts[f"{s}.{t}"] = int(
                        self.stack.psql(f'SELECT coalesce(sum(users__count), 0) FROM "{s}"."{t}"')[0][0] or 0
                    )
        with self.lock:
            for s, t in fresh:
                self.known.add(f"{s}.{t}")
                table = RollupTable.parse(t)
                if table is None or f"{s}.{t}" not in counts:
                    continue
                rollup = "users_main" if table.preagg == "users_main" else table.preagg
                tenant = TENANT_PREFIX + s.removeprefix(SCHEMA_PREFIX)
                self.seen.append(SeenTable(tenant, rollup, table.partition, seen_ms, counts[f"{s}.{t}"], f"{s}.{t}"))

    def baseline(self) -> None:
        """Tables that exist already are not new."""
        self.known.update(f"{s}.{t}" for s, t in self.tables())

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                self.tick()
            except Exception as error:
                print(f"bench: observer: {error!r}", file=sys.stderr)
            self.stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    def snapshot(self) -> list[SeenTable]:
        with self.lock:
            return list(self.seen)


# ----------------------------------------------------------------------------- the stack side


@dataclass
class Bench:
    stack: Any
    env: Any  # StackEnv
    args: argparse.Namespace
    tenants: list[str]
    month: str = ""  # the partition all bench rows fall in, e.g. 20261201
    created_at: str = ""
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-overload-")))

    def aws(self, service: str) -> Any:
        import boto3  # noqa: PLC0415

        endpoint = {"dynamodb": self.env.aws_endpoint_url_dynamodb, "sqs": self.env.aws_endpoint_url_sqs}[service]
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=endpoint,
            region_name=self.env.aws_default_region,
            aws_access_key_id=self.env.aws_access_key_id,
            aws_secret_access_key=self.env.aws_secret_access_key,
        )

    # -- data ---------------------------------------------------------------------------------
    def clean_data(self) -> None:
        self.stack.psql(f"DELETE FROM users WHERE tenant_id LIKE '{TENANT_PREFIX}%'")
        self.stack.psql(f"DELETE FROM tenants WHERE id LIKE '{TENANT_PREFIX}%'")
        schemas = self.stack.psql(f"SELECT nspname FROM pg_namespace WHERE nspname LIKE '{SCHEMA_PREFIX}%'")
        for (schema,) in schemas:
            self.stack.psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    def seed_data(self) -> None:
        """The bench tenants, SEED_USERS users each, all dated a minute ago (one monthly partition), and
        their pre-aggregation schemas (Cube's first build into a new schema can race: hazard d)."""
        self.clean_data()
        self.created_at = str(
            self.stack.psql("SELECT date_trunc('second', now()::timestamp - interval '1 minute')")[0][0]
        )
        self.month = self.created_at[:7].replace("-", "") + "01"
        values = ", ".join(f"('{t}', 'Bench {t}', '{self.created_at}')" for t in self.tenants)
        self.stack.psql(f"INSERT INTO tenants (id, name, created_at) VALUES {values}")
        users = ", ".join(
            f"('{t}-seed-{i}', '{t}', 'active', '{self.created_at}')" for t in self.tenants for i in range(SEED_USERS)
        )
        self.stack.psql(f"INSERT INTO users (id, tenant_id, status, created_at) VALUES {users}")
        for t in self.tenants:
            self.stack.psql(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA_PREFIX}{t.removeprefix(TENANT_PREFIX)}"')

    def insert(self, batch: list[Mutation], counts: dict[str, int]) -> None:
        values = ", ".join(f"('{m.row_id}', '{m.tenant}', 'active', '{self.created_at}')" for m in batch)
        self.stack.psql(f"INSERT INTO users (id, tenant_id, status, created_at) VALUES {values}")
        committed = now_ms()
        for m in batch:
            counts[m.tenant] += 1
            m.committed_ms = committed
            m.count_after = counts[m.tenant]

    # -- AWS resources, fresh per behaviour -----------------------------------------------------
    def fresh_resources(self) -> tuple[str, str]:
        """A new debounce table and refresh queue + DLQ, set as template.yaml sets them; (queue, DLQ) URLs."""
        from devstack.stack import create_debounce_table, create_refresh_queues  # noqa: PLC0415

        self.remove_resources()
        create_debounce_table(self.aws("dynamodb"), ROOT / "template.yaml", TABLE_NAME)
        return create_refresh_queues(self.aws("sqs"), ROOT / "template.yaml", QUEUE_NAME, DLQ_NAME)

    def remove_resources(self) -> None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        ddb, sqs = self.aws("dynamodb"), self.aws("sqs")
        with contextlib.suppress(ClientError):  # not there
            ddb.delete_table(TableName=TABLE_NAME)
        for name in (QUEUE_NAME, DLQ_NAME):
            with contextlib.suppress(ClientError):
                sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])

    def dead_letters(self, dlq: str) -> list[DeadLetter]:
        sqs = self.aws("sqs")
        letters: list[DeadLetter] = []
        while True:
            answer = sqs.receive_message(
                QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=600, AttributeNames=["All"]
            )
            messages = answer.get("Messages", [])
            if not messages:
                return letters
            for message in messages:
                try:
                    body = json.loads(message.get("Body", "{}"))
                except ValueError:
                    body = {}
                body = body if isinstance(body, dict) else {}
                targets = body.get("targets") if isinstance(body.get("targets"), list) else []
                names = tuple(str(t.get("target")) for t in targets if isinstance(t, dict))
                if not names and body.get("target"):
                    names = (str(body["target"]),)  # a trailing message: one key
                sent = int(message.get("Attributes", {}).get("SentTimestamp", 0))
                letters.append(DeadLetter(str(body.get("tenantId", "?")), names, sent, str(body.get("kind", "?"))))

    # -- the function under test ------------------------------------------------------------------
    def code_dir(self, behaviour: Behaviour) -> Path:
        """The `src` directory holding the behaviour's `handler` package."""
        if behaviour.code == "src":
            return ROOT / "src"
        path = Path(behaviour.code)
        if (path / "src" / "handler").is_dir():
            return path.resolve() / "src"
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{behaviour.code}^{{commit}}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if commit.returncode != 0:
            sys.exit(
                f"bench_overload: behaviour {behaviour.name}: {behaviour.code!r} is not src, a directory or a commit"
            )
        target = self.temp / f"code-{behaviour.name}"
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit.stdout.strip(), "src"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        return target / "src"

    def driver(
        self, behaviour: Behaviour, code: Path, proxy_url: str, queue: str, dlq: str, out: Path
    ) -> subprocess.Popen[str]:
        from devstack.template import event_sources  # noqa: PLC0415

        env = {k: v for k, v in os.environ.items() if not k.startswith(("CUBE_", "ENTITY_", "PYTHONPATH"))}
        env.update({k: v for k, v in self.env.as_environ().items() if k not in {"CUBE_API_SECRET", "PG_DSN"}})
        env.update(
            {
                # the code under test first; the harness's repository after it (devstack.esm's SQS event)
                "PYTHONPATH": os.pathsep.join([str(code), str(ROOT)]),
                "CUBE_API_URL": proxy_url,
                "DEBOUNCE_TABLE_NAME": TABLE_NAME,
                "REFRESH_QUEUE_URL": queue,
                "BUILD_DEAD_LETTER_QUEUE_URL": dlq,
                "CUBE_PREAGG_DEBOUNCE_MS": str(self.args.debounce_ms),
                "CUBE_PREAGG_BUILD_TIMEOUT_MS": str(int(self.args.build_timeout_s * 1000)),
                "POWERTOOLS_LOG_LEVEL": "ERROR",
                "POWERTOOLS_METRICS_DISABLED": "true",
                "POWERTOOLS_TRACE_DISABLED": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        settings = behaviour.settings
        fault = settings.pop("BENCH_FAULT", "")
        env.update(settings)
        batch = min(10, event_sources(ROOT / "template.yaml").sqs_batch_size)
        argv = [sys.executable, str(ROOT / "bench" / "overload_driver.py"), "--out", str(out)]
        argv += ["--pumps", str(self.args.pumps), "--sqs-batch", str(batch), "--fault", fault]
        if self.args.trace:
            self.args.trace.mkdir(parents=True, exist_ok=True)
            argv += ["--outcomes", str(self.args.trace.resolve() / f"{behaviour.name}.outcomes.jsonl")]
        log = (self.stack.logs / f"bench-overload-driver-{behaviour.name}.log").open("w")
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT
        )


class BenchCube:
    """A fresh Cube process with the constrained queue and slow builds, on a port of its own; `restart`
    starts another process on the same port (Cube keeps its queue and job tokens in memory: they are lost,
    as in a crash or a deploy)."""

    def __init__(self, bench: Bench, name: str) -> None:
        from devstack import _proc  # noqa: PLC0415
        from devstack.stack import sign_hs256  # noqa: PLC0415

        self.bench = bench
        self.port = _proc.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = bench.stack.logs / f"bench-overload-cube-{name}.log"
        system_secret = secrets.token_hex(16)
        self.system_token = sign_hs256({"tenantId": bench.tenants[0], "exp": int(time.time()) + 7200}, system_secret)
        argv, cwd, env = bench.stack._launch("cube", self.port)
        env.update(
            {
                "PORT": str(self.port),
                "CUBE_BUILD_CONCURRENCY": str(bench.args.cube_concurrency),
                "CUBE_MODEL_BUILD_SLEEP_S": str(bench.args.build_sleep_s),
                "CUBEJS_PLAYGROUND_AUTH_SECRET": system_secret,
            }
        )
        self.launch = (argv, cwd, env)
        self.pid: int | None = None
        self.restarts: list[int] = []  # when (epoch ms)

    def start(self) -> None:
        from devstack import _proc  # noqa: PLC0415

        argv, cwd, env = self.launch
        self.pid = _proc.spawn(argv, cwd=cwd, env=env, log=self.log)
        deadline = time.monotonic() + 120
        while _proc.http_status(f"{self.url}/readyz") != 200:
            if _proc.exit_code(self.pid) is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bench Cube did not start; see {self.log}")
            time.sleep(0.3)
        # Compile every tenant's model now (contextToAppId: one per tenant), not during the phase.
        for tenant in self.bench.tenants:
            status = _proc.http_status(
                f"{self.url}/cubejs-api/v1/meta",
                headers={"Authorization": self.bench.stack.cube_token({"tenantId": tenant})},
                timeout=60,
            )
            if status != 200:
                raise RuntimeError(f"the bench Cube answered /v1/meta for {tenant} with {status}; see {self.log}")

    def stop(self) -> None:
        from devstack import _proc  # noqa: PLC0415

        if self.pid is not None:
            _proc.terminate(self.pid)
            self.pid = None

    def restart(self) -> None:
        self.stop()
        self.restarts.append(now_ms())
        for attempt in range(5):  # the port may be held a moment longer
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == 4:
                    raise
                self.stop()
                time.sleep(1)


# ----------------------------------------------------------------------------- one behaviour


@dataclass
class Phase:
    behaviour: Behaviour
    handler_file: str = ""
    load: tuple[float, float] = (0.0, 0.0)  # load average (1 min) at the start and at the end
    mutations: list[Mutation] = field(default_factory=list)
    seen: list[SeenTable] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    posts: list[tuple[int, str, int, int]] = field(default_factory=list)
    gets: list[tuple[int, int]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    driver: dict[str, Any] = field(default_factory=dict)
    began_ms: int = 0
    arrivals_end_ms: int = 0
    end_ms: int = 0
    ended: str = ""
    sampler_errors: int = 0
    cube_restarts: list[int] = field(default_factory=list)  # ms after the first arrival
    coverage: Coverage | None = None
    tokens: dict[str, tuple[int, str]] = field(default_factory=dict)  # job token -> (POST ms, tenant)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # job token -> table, first ms per status
    builds: dict[str, list[int]] = field(default_factory=dict)  # schema.table -> [started, last seen running]


def run_phase(bench: Bench, behaviour: Behaviour, arrivals: list[Arrival]) -> Phase:
    args = bench.args
    phase = Phase(behaviour, load=(os.getloadavg()[0], 0.0))
    code = bench.code_dir(behaviour)
    queue, dlq = bench.fresh_resources()
    out = bench.temp / f"driver-{behaviour.name}.json"
    cube = BenchCube(bench, behaviour.name)
    cube.start()
    try:
        proxy = CubeProxy(cube.url)
        proxy.start()
        observer = Observer(bench.stack, args.observe_s)
        observer.baseline()
        sampler = Sampler(bench.stack, cube.url, cube.system_token, bench.aws("sqs"), queue, args.sample_s)
        watcher = BuildWatcher(bench.stack, args.build_watch_s)
        driver = bench.driver(behaviour, code, proxy.url, queue, dlq, out)
        restart = threading.Timer(args.cube_restart_s or 0, cube.restart)
        try:
            assert driver.stdin is not None and driver.stdout is not None
            ready = json.loads(driver.stdout.readline() or "{}")
            if not ready.get("ready"):
                raise RuntimeError(
                    f"the driver did not start; see {bench.stack.logs}/bench-overload-driver-{behaviour.name}.log"
                )
            phase.handler_file = str(ready["handler_file"])
            if not phase.handler_file.startswith(str(code.resolve())):
                raise RuntimeError(f"the driver imported {phase.handler_file}, not the code under test in {code}")
            observer.thread.start()
            sampler.thread.start()
            watcher.thread.start()
            counts = defaultdict(int, {t: SEED_USERS for t in bench.tenants})
            mutations = [Mutation(a.tenant, f"{ROW_PREFIX}{behaviour.name}-{i:05d}") for i, a in enumerate(arrivals)]
            phase.began_ms = now_ms()
            if args.cube_restart_s is not None:
                restart.start()
            offset = 0
            for due in due_batches([a.offset_s for a in arrivals], TICK_S):
                batch = [mutations[i] for i in due]
                bench.insert(batch, counts)
                line = {
                    "offset": offset,
                    "batch": [{"id": m.row_id, "tenant": m.tenant, "ms": m.committed_ms} for m in batch],
                }
                driver.stdin.write(json.dumps(line) + "\n")
                driver.stdin.flush()
                offset += len(batch)
            phase.arrivals_end_ms = now_ms()
            phase.ended = f"max tail ({args.max_tail_s:.0f} s) reached"
            tail_end = time.monotonic() + args.max_tail_s
            while time.monotonic() < tail_end:
                time.sleep(args.sample_s)
                if settled(mutations, observer.snapshot(), sampler.samples, bench.month):
                    phase.ended = "settled: every mutation served, Cube's queue and the refresh queue empty"
                    break
            phase.end_ms = now_ms()
            driver.stdin.write(json.dumps({"end": True}) + "\n")
            driver.stdin.flush()
            driver.wait(timeout=120)
            phase.driver = json.loads(out.read_text()) if out.exists() else {"errors": {"no results file": 1}}
        finally:
            restart.cancel()
            if driver.poll() is None:
                driver.kill()
                driver.wait()
            sampler.stop.set()
            observer.stop.set()
            watcher.stop.set()
            for thread in (sampler.thread, observer.thread, watcher.thread):
                if thread.is_alive():
                    thread.join(timeout=30)
            proxy.stop()
        observer.tick()  # what was built by the end
    finally:
        cube.stop()
    phase.cube_restarts = [ms - phase.began_ms for ms in cube.restarts]
    phase.mutations = mutations
    phase.seen = observer.snapshot()
    phase.samples = list(sampler.samples)
    phase.sampler_errors = sum(sampler.errors.values())
    phase.posts, phase.gets = list(proxy.posts), list(proxy.gets)
    phase.tokens, phase.jobs, phase.builds = dict(proxy.tokens), dict(proxy.jobs), dict(watcher.builds)
    phase.letters = bench.dead_letters(dlq)
    phase.coverage = coverage(mutations, phase.seen, phase.letters, bench.month)
    phase.load = (phase.load[0], os.getloadavg()[0])
    bench.stack.psql(f"DELETE FROM users WHERE id LIKE '{ROW_PREFIX}%'")  # the next behaviour starts on the same data
    return phase


def settled(mutations: Sequence[Mutation], seen: Sequence[SeenTable], samples: Sequence[Sample], month: str) -> bool:
    if len(samples) < 2 or any(s.scheduled or s.processing or s.sqs_pending for s in samples[-2:]):
        return False
    return not coverage(mutations, seen, [], month).uncovered


# ----------------------------------------------------------------------------- the table


def lag_cells(lags: Sequence[int | None]) -> str:
    return " / ".join(seconds(percentile(lags, q), never="never") for q in (0.5, 0.99, 1.0))


def timeline(phase: Phase, every_s: float = 15.0) -> str:
    """Cube's queue depth (scheduled + processing), the most sampled in each `every_s` from the first
    arrival on: `0-15s:12 15-30s:40 ...`."""
    buckets: dict[int, int] = {}
    for s in phase.samples:
        bucket = int(max(0, s.ms - phase.began_ms) / 1000 // every_s)
        buckets[bucket] = max(buckets.get(bucket, 0), s.scheduled + s.processing)
    return " ".join(f"{b * every_s:.0f}-{(b + 1) * every_s:.0f}s:{d}" for b, d in sorted(buckets.items()))


TARGETS = {
    "job tokens": "<= what the budget allows (new)",
    "queue depth": "<= budget (new)",
    "lag": "p99 >= 3x better than today's",
    "ratio": ">= 3x (new)",
    "dead letters": "0 for merely slow builds (new)",
    "uncovered": "0",
    "pollers": "small: the pollers kept up",
    "harness errors": "0 / 0 / 0",
}


def _count(p: Phase, name: str) -> int:
    """A telemetry count of the function, all dimensions summed."""
    return sum(v for k, v in p.driver.get("counts", {}).items() if k == name or k.startswith(name + "["))


def _by_class(p: Phase, name: str) -> str:
    found = {
        k[len(name) + 1 : -1].split("=", 1)[-1]: v
        for k, v in p.driver.get("counts", {}).items()
        if k.startswith(name + "[")
    }
    return ", ".join(f"{k} {v}" for k, v in sorted(found.items())) or "0"


def figures(p: Phase, first_p99: int | None) -> list[tuple[str, str, str]]:
    """(figure, value, target key) of one behaviour, in table order."""
    assert p.coverage is not None
    accepted = [x for x in p.posts if x[2] == 200]
    during = sum(1 for x in accepted if x[0] <= p.arrivals_end_ms)
    depth = max((s.scheduled + s.processing for s in p.samples), default=0)
    scheduled = max((s.scheduled for s in p.samples), default=0)
    p99 = percentile(p.coverage.lags_ms, 0.99)
    build_letters = sum(1 for d in p.letters if d.kind == "retrigger")
    errors = sum(p.driver.get("errors", {}).values())
    late = p.driver.get("late_ms") or [0]
    return [
        ("code (handler package run)", p.behaviour.code, ""),
        ("settings beyond the bench's", " ".join(f"{k}={v}" for k, v in p.behaviour.env) or "-", ""),
        ("load average (1 min) at start / end", f"{p.load[0]:.1f} / {p.load[1]:.1f}", ""),
        ("phase length s (arrivals + tail)", f"{(p.end_ms - p.began_ms) / 1000:.0f}", ""),
        ("phase ended", p.ended.split(":")[0], ""),
        (
            "job POSTs accepted (during arrivals) / refused",
            f"{len(accepted)} ({during}) / {len(p.posts) - len(accepted)}",
            "",
        ),
        ("builds requested: job tokens", str(sum(x[3] for x in accepted)), "job tokens"),
        ("verification GETs (tokens asked)", f"{len(p.gets)} ({sum(x[1] for x in p.gets)})", ""),
        ("Cube's queue depth max, scheduled + processing (max scheduled)", f"{depth} ({scheduled})", "queue depth"),
        (
            "builds PostgreSQL ran at once, max (pg_stat_activity)",
            str(max((s.pg_building for s in p.samples), default=0)),
            "",
        ),
        ("rollup tables built (per second while Cube's queue was busy)", f"{len(p.seen)} ({throughput(p):.2f})", ""),
        (
            f"FreshnessLag p50 / p99 / max s ({len(p.mutations)} mutations; rollup holding the row seen)",
            lag_cells(p.coverage.lags_ms),
            "lag",
        ),
        ("p99: the first behaviour's / this one's", _ratio(first_p99, p99), "ratio"),
        (
            "FreshnessLag the function emitted: n, p50 / max s",
            _emitted(p.driver.get("freshness_lag_emitted_ms", [])),
            "",
        ),
        (
            "re-triggers: BuildsRetriggered / retrigger messages delivered",
            f"{_count(p, 'BuildsRetriggered')} / {p.driver.get('delivered', {}).get('retrigger', 0)}",
            "",
        ),
        ("builds the function counted failed, by class", _by_class(p, "BuildsFailed"), ""),
        (
            "dead letters on the DLQ: builds / trailing (BuildsDeadLettered)",
            f"{build_letters} / {len(p.letters) - build_letters} ({_count(p, 'BuildsDeadLettered')})",
            "dead letters",
        ),
        ("mutations not served whose key was dead-lettered", str(p.coverage.dead_lettered), ""),
        ("uncovered mutations (ground truth)", uncovered_cell(p), "uncovered"),
        (
            "harness: refresh-queue messages due and not polled, max / trailing delivered late p99 s",
            f"{max((s.sqs_due for s in p.samples), default=0)} / {seconds(percentile(late, 0.99))}",
            "pollers",
        ),
        (
            "harness: driver errors / MSK records reported failed / sampler errors",
            f"{errors} / {p.driver.get('msk_batch_item_failures', 0)} / {p.sampler_errors}",
            "harness errors",
        ),
    ]


def uncovered_cell(p: Phase) -> str:
    """Uncovered mutations; a phase cut at the max tail may still have re-triggers under way for them."""
    assert p.coverage is not None
    n = len(p.coverage.uncovered)
    return f"{n} (at the max tail: re-triggers may be under way)" if n and not p.ended.startswith("settled") else str(n)


def throughput(p: Phase) -> float:
    """Rollup tables built per second of the time Cube's queue held a job (sampled)."""
    busy_ms = sum(b.ms - a.ms for a, b in itertools.pairwise(p.samples) if a.scheduled + a.processing)
    return len(p.seen) / (busy_ms / 1000) if busy_ms else 0.0


def _ratio(base: int | None, value: int | None) -> str:
    if base is None or value is None or value <= 0:
        return "-"
    return f"{base / value:.2f}x"


def _emitted(values: Sequence[float]) -> str:
    if not values:
        return "0"
    ordered = sorted(values)
    return f"{len(ordered)}, {ordered[len(ordered) // 2] / 1000:.1f} / {ordered[-1] / 1000:.1f}"


def report(phases: Sequence[Phase], args: argparse.Namespace, tenants: int, arrivals: int, month: str) -> None:
    print(
        f"\n{arrivals} User mutations of {tenants} tenants over {args.arrival_s:.0f} s (seed {args.seed}); "
        f"Cube build concurrency {args.cube_concurrency}, {args.build_sleep_s:g} s per rollup build (+ Cube's own "
        f"work); CUBE_PREAGG_DEBOUNCE_MS={args.debounce_ms}, CUBE_PREAGG_BUILD_TIMEOUT_MS="
        f"{int(args.build_timeout_s * 1000)}; observer every {args.observe_s:g} s, sampler every {args.sample_s:g} s"
        + (f"; Cube restarted {args.cube_restart_s:g} s after the first arrival" if args.cube_restart_s else "")
    )
    first = phases[0].coverage
    first_p99 = percentile(first.lags_ms, 0.99) if first else None
    columns = [figures(p, first_p99) for p in phases]
    print("| figure | " + " | ".join(p.behaviour.name for p in phases) + " | target (issue 16) |")
    print("|---|" + "---|" * len(phases) + "---|")
    for i, (figure, _, target) in enumerate(columns[0]):
        print(f"| {figure} | " + " | ".join(c[i][1] for c in columns) + f" | {TARGETS.get(target, '')} |")
    for p in phases:
        name = p.behaviour.name
        print(f"{name}: Cube's queue depth over time: {timeline(p)}")
        print(f"{name}: {p.ended}; handler from {p.handler_file}")
        if p.cube_restarts:
            print(f"{name}: Cube restarted at " + ", ".join(f"+{ms / 1000:.0f} s" for ms in p.cube_restarts))
        print(f"{name}: messages delivered {p.driver.get('delivered', {})}")
        print(f"{name}: function counts {p.driver.get('counts', {})}")
        if p.driver.get("errors"):
            print(f"{name}: driver errors {p.driver['errors']}")
        if p.coverage and p.coverage.uncovered:
            by_tenant = Counter(m.tenant for m in p.coverage.uncovered)
            print(f"{name}: uncovered by tenant {dict(by_tenant.most_common(10))}")
    for p in phases:
        for line in where_lag_goes(p, month, args.cube_concurrency):
            print(line)


# ----------------------------------------------------------------------------- where the lag goes


@dataclass(frozen=True)
class LagParts:
    """One served mutation's FreshnessLag cut at the build that served it (the later of its two rollups):
    before that build's POST (window, gate, budget), in Cube's queue, building, until the observer saw
    the table. A mutation that rode along (the POST before its commit) has `before_post` 0."""

    lag_ms: int
    before_post_ms: int
    queued_ms: int
    build_ms: int
    observed_ms: int
    rode_along: bool
    poll_lag_ms: int | None  # the function told `done` minus the table seen (None: not polled done)


def _enqueued_ms(name: str) -> int | None:
    from devstack.cubeapi import RollupTable  # noqa: PLC0415

    table = RollupTable.parse(name.split(".", 1)[-1])
    return None if table is None else table.built_at_s * 1000


def lag_parts(p: Phase, month: str) -> list[LagParts]:
    """Per served mutation, where its lag went. The covering build is the first table of each rollup seen
    holding the row; its POST is the job whose answer named that table, else the tenant's last accepted
    POST in the table's second (Cube names a table after the second its job was queued); its start and
    end are PostgreSQL's `CREATE TABLE` (BuildWatcher), else the table's first sighting."""
    by_table_token = {job["table"]: token for token, job in p.jobs.items() if job.get("table")}
    posts_by_tenant: dict[str, list[int]] = defaultdict(list)
    for ms, tenant, status, tokens in p.posts:
        if status == 200 and tokens:
            posts_by_tenant[tenant].append(ms)
    by_tenant: dict[str, list[SeenTable]] = defaultdict(list)
    for table in p.seen:
        by_tenant[table.tenant].append(table)
    out = []
    for m in p.mutations:
        firsts: dict[str, SeenTable] = {}
        for t in by_tenant[m.tenant]:
            if t.count < m.count_after or (t.rollup == "users_daily_status_counts" and t.partition != month):
                continue
            if t.rollup not in firsts or t.seen_ms < firsts[t.rollup].seen_ms:
                firsts[t.rollup] = t
        if set(firsts) != set(ROLLUPS):
            continue
        table = max(firsts.values(), key=lambda t: t.seen_ms)
        token = by_table_token.get(table.name) or by_table_token.get(table.name.split(".", 1)[-1])
        enqueued = _enqueued_ms(table.name)
        if token and token in p.tokens:
            post = p.tokens[token][0]
        else:
            candidates = [ms for ms in posts_by_tenant[m.tenant] if enqueued is None or ms // 1000 <= enqueued // 1000]
            post = max(candidates, default=enqueued or m.committed_ms)
        build = p.builds.get(table.name)
        start, end = (build[0], build[1]) if build else (table.seen_ms, table.seen_ms)
        start = max(start, post)  # clocks: PostgreSQL's query_start and ours, same machine
        ready = max(post, m.committed_ms)
        done_told = (p.jobs.get(token or "", {}).get("seen") or {}).get("done")
        out.append(
            LagParts(
                lag_ms=table.seen_ms - m.committed_ms,
                before_post_ms=ready - m.committed_ms,
                queued_ms=max(0, start - ready),
                build_ms=max(0, min(end, table.seen_ms) - max(start, ready)),
                observed_ms=max(0, table.seen_ms - max(end, start, ready)),
                rode_along=post < m.committed_ms,
                poll_lag_ms=None if done_told is None else done_told - table.seen_ms,
            )
        )
    return out


def oracle_lags(
    commits: Sequence[tuple[int, str]], build_ms: float, concurrency: int, rollups: int = len(ROLLUPS)
) -> list[int]:
    """The capacity bound: FreshnessLag per mutation under a scheduler with no overhead at all: no window,
    no poll, no budget, Cube never idle while a mutation waits; each free build slot takes the rollup (of
    a tenant) with the oldest mutation not yet in a started build (oldest first: it minimizes the worst
    wait), never two builds of one rollup at once; a build takes `build_ms` and covers every mutation
    committed before it starts. `commits`: (ms, tenant). A mutation is served when every rollup was."""
    import heapq  # noqa: PLC0415

    order = sorted(range(len(commits)), key=lambda i: commits[i][0])
    pending: dict[tuple[str, int], list[int]] = defaultdict(list)  # (tenant, rollup) -> waiting mutations
    served = [0] * len(commits)
    busy: set[tuple[str, int]] = set()
    slots = [(float(commits[order[0]][0]) if order else 0.0, k) for k in range(concurrency)]
    heapq.heapify(slots)
    running: list[tuple[float, tuple[str, int], list[int]]] = []
    nxt = 0
    while nxt < len(order) or any(pending.values()) or running:
        free_at, slot = heapq.heappop(slots)
        while running and running[0][0] <= free_at:  # builds that ended: their rollup is free again
            end, key, covered = heapq.heappop(running)
            busy.discard(key)
            for i in covered:
                served[i] = max(served[i], int(end))
        while nxt < len(order) and commits[order[nxt]][0] <= free_at:
            i = order[nxt]
            for r in range(rollups):
                pending[(commits[i][1], r)].append(i)
            nxt += 1
        ready = [(commits[v[0]][0], k) for k, v in pending.items() if v and k not in busy]
        if not ready:  # wait for the next commit or the next build end
            nexts = [float(commits[order[nxt]][0])] if nxt < len(order) else []
            nexts += [running[0][0]] if running else []
            if not nexts:
                break
            heapq.heappush(slots, (max(free_at, min(nexts)), slot))
            continue
        _, key = min(ready)
        covered, pending[key] = pending[key], []
        busy.add(key)
        heapq.heappush(running, (free_at + build_ms, key, covered))
        heapq.heappush(slots, (free_at + build_ms, slot))
    return [served[i] - commits[i][0] for i in range(len(commits))]


def lag_floor(
    commits: Sequence[tuple[int, str]], build_ms: float, concurrency: int, exempt: int = 0, rollups: int = len(ROLLUPS)
) -> int:
    """A lower bound no scheduler beats, however clairvoyant: the smallest lag X (to 250 ms) such that all
    but `exempt` mutations can be served within X. Serving a mutation committed at t within X needs a build
    of each rollup of its tenant starting in [t, t + X - build]; for the mutations committed in [s, u], the
    fewest such builds is a greedy cover per tenant, and all of them run in [s, u + X] on `concurrency`
    slots. X is infeasible if, for some s <= u, those builds exceed what the slots can run by more than
    `rollups * exempt` (leaving a mutation out saves at most one build per rollup)."""
    times = sorted(commits)
    if not times:
        return 0

    def feasible(x: float) -> bool:
        width = x - build_ms
        for i, (start, _) in enumerate(times):
            if i and times[i - 1][0] == start:
                continue
            cover_end: dict[str, float] = {}
            need = 0
            for t, tenant in times[i:]:
                if t > cover_end.get(tenant, -1.0):
                    need += 1
                    cover_end[tenant] = t + width
                if rollups * need - concurrency * (t + x - start) / build_ms > rollups * exempt:
                    return False
        return True

    low, high = build_ms, build_ms + 4 * (times[-1][0] - times[0][0]) + 60_000.0
    while high - low > 250:
        mid = (low + high) / 2
        low, high = (low, mid) if feasible(mid) else (mid, high)
    return int(high)


def where_lag_goes(p: Phase, month: str, concurrency: int) -> list[str]:
    """Lines: the lag cut in parts (all served mutations, and the worst 1 %), Cube's use, the bound."""
    parts = lag_parts(p, month)
    if not parts:
        return [f"{p.behaviour.name}: no served mutation to decompose"]
    parts.sort(key=lambda x: x.lag_ms)

    def mean(rows: Sequence[LagParts], attr: str) -> str:
        return f"{sum(getattr(r, attr) for r in rows) / len(rows) / 1000:.1f}"

    worst = parts[max(0, math.ceil(0.99 * len(parts)) - 1) :]
    name = p.behaviour.name
    lines = []
    for label, rows in (("all served", parts), (f"worst 1 % ({len(worst)})", worst)):
        lines.append(
            f"{name}: lag parts, mean s, {label}: lag {mean(rows, 'lag_ms')} = before the POST "
            f"{mean(rows, 'before_post_ms')} + in Cube's queue {mean(rows, 'queued_ms')} + building "
            f"{mean(rows, 'build_ms')} + until seen {mean(rows, 'observed_ms')}; rode along "
            f"{sum(r.rode_along for r in rows)}"
        )
    polls = sorted(r.poll_lag_ms for r in parts if r.poll_lag_ms is not None)
    if polls:
        lines.append(
            f"{name}: the function told `done` after the table was seen (its poll lag), p50 / p90 / max s: "
            + " / ".join(f"{polls[min(len(polls) - 1, int(q * len(polls)))] / 1000:.1f}" for q in (0.5, 0.9, 1.0))
        )
    durations = sorted(b[1] - b[0] for b in p.builds.values())
    watched = [b for b in p.builds.values()]
    if durations and watched:
        first, last = min(b[0] for b in watched), max(b[1] for b in watched)
        busy = sum(b[1] - b[0] for b in watched)
        lines.append(
            f"{name}: builds PostgreSQL ran: {len(watched)} watched of {len(p.seen)} tables; build p50 "
            f"{durations[len(durations) // 2] / 1000:.2f} s; slots busy {busy / 1000:.0f} of "
            f"{concurrency * (last - first) / 1000:.0f} slot-s between the first build and the last "
            f"({busy / max(1, concurrency * (last - first)):.0%}; a build runs from its start to when it was last seen)"
        )
    rate = throughput(p)
    if rate > 0:
        build_ms = concurrency / rate * 1000
        commits = [(m.committed_ms, m.tenant) for m in p.mutations]
        bound = oracle_lags(commits, build_ms, concurrency)
        exempt = len(commits) - math.ceil(0.99 * len(commits))
        lines.append(
            f"{name}: capacity bound (no-overhead oldest-first scheduler, {build_ms / 1000:.2f} s per build = "
            f"{concurrency} slots / {rate:.2f} tables/s measured, this phase's commits): FreshnessLag p50 / p99 "
            f"/ max s {lag_cells(bound)}; no scheduler at all can do p99 under "
            f"{lag_floor(commits, build_ms, concurrency, exempt) / 1000:.1f} s or max under "
            f"{lag_floor(commits, build_ms, concurrency) / 1000:.1f} s"
        )
    return lines


def write_trace(p: Phase, directory: Path, month: str) -> Path:
    """Everything one behaviour's figures come from, as JSON, for a later look."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{p.behaviour.name}.json"
    assert p.coverage is not None
    record = {
        "behaviour": {"name": p.behaviour.name, "code": p.behaviour.code, "env": dict(p.behaviour.env)},
        "month": month,
        "began_ms": p.began_ms,
        "arrivals_end_ms": p.arrivals_end_ms,
        "end_ms": p.end_ms,
        "mutations": [
            {"tenant": m.tenant, "committed_ms": m.committed_ms, "count_after": m.count_after, "lag_ms": lag}
            for m, lag in zip(p.mutations, p.coverage.lags_ms, strict=True)
        ],
        "seen": [t.__dict__ for t in p.seen],
        "posts": p.posts,
        "gets": p.gets,
        "tokens": p.tokens,
        "jobs": p.jobs,
        "builds": p.builds,
        "samples": [s.__dict__ for s in p.samples],
        "letters": [d.__dict__ for d in p.letters],
        "driver": p.driver,
    }
    path.write_text(json.dumps(record))
    return path


def read_trace(path: Path) -> tuple[Phase, str]:
    """A behaviour written by `write_trace`, back as a Phase (its figures' inputs) and its month."""
    record = json.loads(path.read_text())
    b = record["behaviour"]
    p = Phase(Behaviour(b["name"], b["code"], tuple(b["env"].items())))
    p.began_ms, p.arrivals_end_ms, p.end_ms = record["began_ms"], record["arrivals_end_ms"], record["end_ms"]
    p.mutations = [Mutation(m["tenant"], "", m["committed_ms"], m["count_after"]) for m in record["mutations"]]
    p.seen = [SeenTable(**t) for t in record["seen"]]
    p.posts = [tuple(x) for x in record["posts"]]  # type: ignore[misc]
    p.gets = [tuple(x) for x in record["gets"]]  # type: ignore[misc]
    p.tokens = {k: (v[0], v[1]) for k, v in record["tokens"].items()}
    p.jobs, p.builds, p.driver = record["jobs"], record["builds"], record["driver"]
    p.samples = [Sample(**x) for x in record["samples"]]
    p.letters = [DeadLetter(d["tenant"], tuple(d["targets"]), d["sent_ms"], d["kind"]) for d in record["letters"]]
    p.coverage = coverage(p.mutations, p.seen, p.letters, record["month"])
    return p, record["month"]


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--behaviour",
        action="append",
        type=Behaviour.parse,
        help="name=code[+VAR=value...]; code: src, a directory with src/handler, or a git commit (default: today=src)",
    )
    parser.add_argument("--tenants", type=int, default=60)
    parser.add_argument("--mutations", type=int, default=1200)
    parser.add_argument("--arrival-s", type=float, default=150.0)
    parser.add_argument("--max-tail-s", type=float, default=240.0)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--cube-concurrency", type=int, default=2, help="Cube's build queue concurrency")
    parser.add_argument("--build-sleep-s", type=float, default=1.0, help="seconds each Users rollup build waits")
    parser.add_argument(
        "--debounce-ms", type=int, default=10_000, help="CUBE_PREAGG_DEBOUNCE_MS (the product's default: 30000)"
    )
    parser.add_argument(
        "--build-timeout-s", type=float, default=60.0, help="CUBE_PREAGG_BUILD_TIMEOUT_MS / 1000 (default: 1800)"
    )
    parser.add_argument("--observe-s", type=float, default=1.0)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--pumps", type=int, default=4, help="SQS pollers (concurrent SQS invocations)")
    parser.add_argument(
        "--build-watch-s", type=float, default=0.4, help="how often PostgreSQL's running builds are listed"
    )
    parser.add_argument("--trace", type=Path, help="write each behaviour's raw record to this directory (JSON)")
    parser.add_argument(
        "--cube-restart-s",
        type=float,
        help="restart Cube this many seconds after the first arrival: its queued builds and job tokens are lost",
    )
    parser.add_argument(
        "--from-trace",
        type=Path,
        nargs="+",
        help="no run: print where the lag went and the capacity bound from traces written by --trace",
    )
    args = parser.parse_args()
    if args.from_trace:
        for path in args.from_trace:
            phase, month = read_trace(path)
            for line in where_lag_goes(phase, month, args.cube_concurrency):
                print(line)
        return
    behaviours: list[Behaviour] = args.behaviour or [Behaviour("today", "src")]
    if len({b.name for b in behaviours}) != len(behaviours):
        sys.exit("bench_overload: behaviour names must differ")
    try:
        from devstack import Stack  # noqa: PLC0415
    except ImportError:
        sys.exit("bench_overload: run with PYTHONPATH=src:. from the repository root (make bench-overload)")

    started = time.monotonic()
    stack = Stack()
    down = [n for n, s in stack.status().items() if not s.up and n in {"postgres", "moto", "dynalite", "cube"}]
    env = stack.start()
    print(
        f"bench_overload: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        flush=True,
    )
    tenants = tenant_names(args.tenants)
    arrivals = schedule(tenants, args.mutations, args.arrival_s, args.seed)
    bench = Bench(stack, env, args, tenants)
    phases = []
    try:
        bench.seed_data()
        for behaviour in behaviours:
            print(f"behaviour {behaviour.name} ({behaviour.code}) ...", flush=True)
            phases.append(run_phase(bench, behaviour, arrivals))
            if args.trace:
                print(f"trace: {write_trace(phases[-1], args.trace, bench.month)}", flush=True)
        report(phases, args, len(tenants), len(arrivals), bench.month)
    finally:
        bench.clean_data()
        bench.remove_resources()
        shutil.rmtree(bench.temp, ignore_errors=True)
        if down:
            stack.stop()
    print(f"run time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
