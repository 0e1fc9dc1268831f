"""Freshness end to end (issue 8, "Measure"): this worker against Cube's own refresh worker, one run.

Both sides run on the local stack (PostgreSQL + the real Cube 1.7.43; dynalite and moto for this
worker), on the same model and data, replaying the same mutation schedule one after the other:

1. **this worker**: each mutation inserts a `users` row into PostgreSQL, then goes as an MSK-shaped
   batch (one per 250 ms tick, what arrived in it) through `handler.app.handle` with the real
   adapters and `CUBE_PREAGG_DEBOUNCE_MS=2000`; a second thread delivers the refresh queue's
   trailing / verify / retrigger messages the way the SQS event source mapping does
   (`devstack.observe.deliver_queue_messages`). FreshnessLag per mutation = when this worker's
   verification saw `done` a build that started after the row was committed, minus the commit time.
2. **Cube's refresh worker**: the stack's Cube is stopped and a second Cube process is started with
   `CUBEJS_REFRESH_WORKER=true`, scheduled refresh on for every pre-aggregation, every constant
   refresh key served as `{every: '10 second'}` (`CUBE_MODEL_REFRESH_EVERY`, cube/cube.js) and the
   bench tenants as its refresh contexts. The same inserts are replayed; nothing else talks to Cube.

On both sides an observer polls PostgreSQL every `--observe-s` for new `users_main` rollup tables of
each tenant and reads their `sum(users__count)`: a mutation is served once a rollup table exists whose
count reaches the tenant's row count right after the mutation's insert (rows are only added, so that
table was built from a snapshot holding the row). PostgreSQL logs every statement
(`log_statement=all`, switched on for the run and reset after); the Cube-issued statements of each
phase are counted by kind (the observer's and the inserts' psql statements are left out).

    PYTHONPATH=src:. .venv/bin/python bench/bench_freshness.py [--mutations 200] [--arrival-s 120]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TENANTS = ("tenant-1", "tenant-2", "tenant-3", "tenant-a")
TENANT_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
W_MS = 2_000
TICK_S = 0.25  # MSK batching: what arrived in a tick goes in one batch
PREFIX = "bench-fresh-"
EVERY = "10 second"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def utc(epoch_s: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(epoch_s))


# ----------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Arrival:
    offset_s: float
    tenant: str


def schedule(mutations: int, arrival_s: float, seed: int) -> list[Arrival]:
    """Bursts of 1-6 mutations of one tenant (a user editing several records), bursts arriving as a
    Poisson process over `arrival_s`, tenants weighted 40/30/20/10 %; mutations of a burst 0-400 ms
    apart."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    mean_burst = 3.5
    rate = mutations / mean_burst / arrival_s
    t = 0.0
    while len(out) < mutations:
        t += rng.expovariate(rate)
        tenant = rng.choices(TENANTS, TENANT_WEIGHTS)[0]
        at = t
        for _ in range(rng.randint(1, 6)):
            if len(out) == mutations:
                break
            out.append(Arrival(min(at, arrival_s), tenant))
            at += rng.uniform(0, 0.4)
    return sorted(out, key=lambda a: a.offset_s)


@dataclass
class Mutation:
    tenant: str
    row_id: str
    committed_ms: int = 0
    count_after: int = 0  # the tenant's row count right after this insert


# ----------------------------------------------------------------------------- observing PostgreSQL


@dataclass
class Observer:
    """Polls PostgreSQL for new `users_main` rollup tables and the count each one holds."""

    stack: Any
    interval_s: float
    seen: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))  # tenant -> (ms, n)
    known: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def tick(self) -> None:
        from devstack import StackError  # noqa: PLC0415

        rows = self.stack.psql(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname LIKE 'pre_aggregations_%' "
            "AND tablename LIKE 'users_main%'"
        )
        seen_ms = now_ms()
        for schema, table in rows:
            name = f"{schema}.{table}"
            if name in self.known:
                continue
            self.known.add(name)
            try:
                count = int(self.stack.psql(f'SELECT coalesce(sum(users__count), 0) FROM "{schema}"."{table}"')[0][0])
            except StackError:
                continue  # dropped (an older version) before we read it
            tenant = str(schema).removeprefix("pre_aggregations_").replace("_", "-")
            self.seen[tenant].append((seen_ms, count))

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            self.tick()
            self.stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    def served_ms(self, m: Mutation) -> int | None:
        times = [ms for ms, n in self.seen[m.tenant] if n >= m.count_after and ms >= m.committed_ms]
        return min(times) if times else None


# ----------------------------------------------------------------------------- PostgreSQL statements

_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+ \[\d+\] app=(?P<app>\S*) LOG:  (?:statement|execute [^:]*): "
)


def classify(sql: str) -> str:
    s = " ".join(sql.split()).upper()
    if "REFRESH_KEY" in s or s.startswith("SELECT 0") or "NOW() + INTERVAL" in s:
        return "refresh-key"
    if s.startswith("CREATE TABLE") or s.startswith("INSERT INTO PRE_AGGREGATIONS"):
        return "build"
    if s.startswith(("SET ", "BEGIN", "COMMIT", "ROLLBACK")):
        return "session"
    if s.startswith(("DROP TABLE", "CREATE SCHEMA")):
        return "drop/schema"
    if "INFORMATION_SCHEMA" in s or "PG_" in s:
        return "catalog"
    if "MIN(" in s or "MAX(" in s:
        return "range"
    return "other"


def count_statements(log: Path, start: int, end: int) -> tuple[Counter[str], Counter[str]]:
    """Statements logged between byte offsets, Cube's by kind; the others (psql) by app."""
    with log.open("rb") as handle:
        handle.seek(start)
        text = handle.read(end - start).decode(errors="replace")
    kinds: Counter[str] = Counter()
    apps: Counter[str] = Counter()
    current: list[str] | None = None
    app = ""
    lines = [*text.splitlines(), "2000-01-01 00:00:00.000 UTC [0] app= LOG:  end"]
    for line in lines:
        match = _LOG_LINE.match(line)
        if match or not line.startswith(("\t", " ")):
            if current is not None:
                if app == "psql":
                    apps["psql"] += 1
                else:
                    kinds[classify("\n".join(current))] += 1
            current = None
            if match:
                app = match["app"]
                current = [line[match.end() :]]
        elif current is not None:
            current.append(line)
    return kinds, apps


# ----------------------------------------------------------------------------- the phases


@dataclass
class Phase:
    name: str
    mutations: list[Mutation]
    seconds: float = 0.0
    lag_ms: list[int] = field(default_factory=list)  # this worker: seen done - committed
    served_ms: list[int] = field(default_factory=list)  # rollup table with the row seen - committed
    unserved: int = 0
    statements: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    window: str = ""  # the log's byte range and the UTC times the statements were counted over


def insert(stack: Any, batch: list[Mutation], counts: dict[str, int]) -> None:
    values = ", ".join(f"('{m.row_id}', '{m.tenant}', 'active', now()::timestamp)" for m in batch)
    stack.psql(f"INSERT INTO users (id, tenant_id, status, created_at) VALUES {values}")
    committed = now_ms()
    for m in batch:
        counts[m.tenant] += 1
        m.committed_ms = committed
        m.count_after = counts[m.tenant]


def source_counts(stack: Any) -> dict[str, int]:
    rows = stack.psql("SELECT tenant_id, count(*) FROM users GROUP BY tenant_id")
    return {str(t): int(n or 0) for t, n in rows}


def replay(
    stack: Any, arrivals: list[Arrival], on_batch: Any, observer: Observer, *, settle: Any, max_tail_s: float
) -> tuple[list[Mutation], float]:
    """Insert the schedule's rows at their times (one insert per tick), calling `on_batch` with each
    tick's mutations; then wait until `settle()` or `max_tail_s`. Returns the mutations and the seconds."""
    counts = defaultdict(int, source_counts(stack))
    mutations = [Mutation(a.tenant, f"{PREFIX}{uuid.uuid4().hex[:12]}") for a in arrivals]
    began = time.monotonic()
    i = 0
    while i < len(arrivals):
        elapsed = time.monotonic() - began
        batch = []
        while i < len(arrivals) and arrivals[i].offset_s <= elapsed:
            batch.append(mutations[i])
            i += 1
        if batch:
            insert(stack, batch, counts)
            on_batch(batch)
        time.sleep(max(0.0, TICK_S - (time.monotonic() - began - elapsed)))
    tail_end = time.monotonic() + max_tail_s
    while time.monotonic() < tail_end and not settle(mutations):
        time.sleep(0.5)
    return mutations, time.monotonic() - began


def phase_worker(stack: Any, env: Any, arrivals: list[Arrival], args: argparse.Namespace) -> Phase:
    """This worker: MSK batches through handler.app.handle, queue messages delivered by a thread."""
    from devstack.cubeapi import Spacer  # noqa: PLC0415
    from devstack.observe import build_observed_service, deliver_queue_messages  # noqa: PLC0415
    from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
    from handler.app import handle  # noqa: PLC0415
    from handler.settings import load_settings  # noqa: PLC0415
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    settings = load_settings(CUBE_PREAGG_DEBOUNCE_MS=str(W_MS))
    telemetry = CountingTelemetry()
    spacer = Spacer()
    msk_service = build_observed_service(settings, telemetry, spacer)
    sqs_service = build_observed_service(settings, telemetry, spacer)
    done: dict[str, list[tuple[int, int]]] = defaultdict(list)  # tenant -> (started_at, seen_at)
    requests: Counter[str] = Counter()
    lock = threading.Lock()

    def on_request(request: Any) -> None:
        try:
            action = json.loads(request.content or b"{}").get("action", "?")
        except ValueError:
            action = "?"
        with lock:
            requests[action] += 1

    for service in (msk_service, sqs_service):
        service.recorder.inner._http.event_hooks["request"].append(on_request)
        store = service.verifier.store
        original = store.record_build

        def record_build(key: Any, record: Any, _original: Any = original) -> bool:
            won = bool(_original(key, record))
            if won and record.status == "done" and key.target == "Users":
                with lock:
                    done[key.tenant_id].append((record.started_at, record.seen_at))
            return won

        store.record_build = record_build

    for tenant in TENANTS:  # forget earlier runs' debounce state of these keys
        for target in ("Users", "Tenants", "Groups"):
            from handler.domain.model import RefreshKey  # noqa: PLC0415

            msk_service.debouncer.store.delete(RefreshKey(tenant, target))

    delivered: Counter[str] = Counter()
    stop = threading.Event()
    since = now_ms()

    def pump() -> None:
        def sqs_handle(event: dict[str, Any]) -> dict[str, Any]:
            return handle(event, None, service=sqs_service, settings=settings)

        while not stop.is_set():
            try:
                bodies = deliver_queue_messages(env, sqs_handle, None, wait_s=1, since_ms=since)
            except Exception as error:
                delivered["pump errors"] += 1
                print(f"bench: delivering queue messages failed: {error!r}", file=sys.stderr)
                continue
            for body in bodies:
                delivered[str(body.get("kind"))] += 1

    offset = [int(time.time() * 1000) % 10**9]

    def on_batch(batch: list[Mutation]) -> None:
        values = [
            {
                "eventType": "ENTITY_UPDATED",
                "entityType": "User",
                "entityId": m.row_id,
                "tenantId": m.tenant,
                "timestamp": m.committed_ms,
            }
            for m in batch
        ]
        event = build_msk_event(values, start_offset=offset[0], timestamp_ms=batch[0].committed_ms)
        offset[0] += len(values)
        response = handle(event, None, service=msk_service, settings=settings)
        if response != {"batchItemFailures": []}:
            print(f"bench: MSK batch reported failures: {response}", file=sys.stderr)

    def seen_done(m: Mutation) -> int | None:
        times = [seen for started, seen in done[m.tenant] if started >= m.committed_ms]
        return min(times) if times else None

    observer = Observer(stack, args.observe_s)

    def settle(mutations: list[Mutation]) -> bool:
        return all(seen_done(m) is not None and observer.served_ms(m) is not None for m in mutations)

    log = stack.logs / "postgres.log"
    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=observer.run, daemon=True)]
    start = log.stat().st_size
    for thread in threads:
        thread.start()
    mutations, seconds = replay(stack, arrivals, on_batch, observer, settle=settle, max_tail_s=args.max_tail_s)
    stop.set()
    observer.stop.set()
    for thread in threads:
        thread.join(timeout=30)
    time.sleep(0.5)  # let PostgreSQL flush its log
    phase = Phase("this worker", mutations, seconds)
    phase.statements, _ = count_statements(log, start, end := log.stat().st_size)
    phase.window = f"postgres.log bytes {start}-{end}, {utc(time.time() - seconds)} to {utc(time.time())}"
    for m in mutations:
        seen = seen_done(m)
        if seen is not None:
            phase.lag_ms.append(seen - m.committed_ms)
        served = observer.served_ms(m)
        if served is None:
            phase.unserved += 1
        else:
            phase.served_ms.append(served - m.committed_ms)
    builds = sum(len(v) for v in done.values())
    calls = [c for service in (msk_service, sqs_service) for c in service.recorder.calls]
    phase.extra = {
        "posts": requests["post"],
        "gets": requests["get"],
        "other requests": sum(v for k, v in requests.items() if k not in {"post", "get"}),
        "accepted POSTs without job tokens": sum(1 for c in calls if not c.tokens),
        "job tokens per accepted POST": sorted(len(c.tokens) for c in calls),
        "delivered": dict(delivered),
        "builds done (Users keys)": builds,
        "FreshnessLag emitted": list(telemetry.timings.get("FreshnessLag", [])),
        "counts": dict(telemetry.counts),
    }
    return phase


def phase_cube_worker(stack: Any, arrivals: list[Arrival], args: argparse.Namespace) -> Phase:
    """Cube's refresh worker: a second Cube process, scheduled refresh on, every refresh key `every`."""
    from devstack import _proc  # noqa: PLC0415

    stack.stop_service("cube")
    port = _proc.free_port()
    argv, cwd, env = stack._launch("cube", port)
    env.pop("CUBEJS_REFRESH_WORKER", None)
    env.update(
        {
            "PORT": str(port),
            "CUBEJS_REFRESH_WORKER": "true",
            "CUBEJS_SCHEDULED_REFRESH_DEFAULT": "true",
            "CUBE_MODEL_REFRESH_EVERY": EVERY,
            "CUBE_REFRESH_TENANTS": ",".join(TENANTS),
            "CUBE_REFRESH_TIMER_S": str(args.cube_timer_s),
        }
    )
    log_path = stack.logs / "bench-refresh-worker-cube.log"
    pid = _proc.spawn(argv, cwd=cwd, env=env, log=log_path)
    try:
        deadline = time.monotonic() + 120
        while _proc.http_status(f"http://127.0.0.1:{port}/readyz") != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the refresh-worker Cube did not start; see {log_path}")
            time.sleep(0.5)
        # Its first ticks build every pre-aggregation of the new model version: wait them out.
        time.sleep(max(2 * args.cube_timer_s, 20))
        observer = Observer(stack, args.observe_s)
        observer.tick()  # the tables that exist already are not new
        observer.seen.clear()
        log = stack.logs / "postgres.log"
        start = log.stat().st_size
        thread = threading.Thread(target=observer.run, daemon=True)
        thread.start()

        def settle(mutations: list[Mutation]) -> bool:
            return all(observer.served_ms(m) is not None for m in mutations)

        mutations, seconds = replay(
            stack, arrivals, lambda _b: None, observer, settle=settle, max_tail_s=args.max_tail_s
        )
        observer.stop.set()
        thread.join(timeout=30)
        time.sleep(0.5)
        phase = Phase("Cube refresh worker", mutations, seconds)
        phase.statements, _ = count_statements(log, start, end := log.stat().st_size)
        phase.window = f"postgres.log bytes {start}-{end}, {utc(time.time() - seconds)} to {utc(time.time())}"
        for m in mutations:
            served = observer.served_ms(m)
            if served is None:
                phase.unserved += 1
            else:
                phase.served_ms.append(served - m.committed_ms)
        errors = sum(1 for line in log_path.read_text(errors="replace").splitlines() if "Error" in line)
        phase.extra = {"cube log lines with 'Error'": errors}
        return phase
    finally:
        _proc.terminate(pid)


def restart_cube(stack: Any, attempts: int = 5) -> None:
    """Start the stack's Cube again (its port may be held a moment longer; one start was seen to die
    at once and succeed the next time)."""
    from devstack import StackError  # noqa: PLC0415

    for attempt in range(1, attempts + 1):
        try:
            stack.start_service("cube")
            return
        except StackError as error:
            if attempt == attempts:
                raise
            print(f"bench: restarting the stack's Cube failed ({str(error).splitlines()[0]}); again", file=sys.stderr)
            time.sleep(2)


# ----------------------------------------------------------------------------- the table


def pct(values: list[int], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return f"{ordered[index] / 1000:.1f}"


def per_min(n: int, seconds: float) -> str:
    return f"{n} ({n * 60 / seconds:.0f}/min)" if seconds else str(n)


def table(ours: Phase, cube: Phase, args: argparse.Namespace) -> list[str]:
    n = len(ours.mutations)
    lines = [
        f"{n} mutations over {args.arrival_s:.0f} s (bursts of 1-6 per tenant, tenants "
        f"{'/'.join(TENANTS)} at 40/30/20/10 %), W = {W_MS / 1000:g} s; Cube refresh worker: "
        f"refresh_key every {EVERY}, scheduled refresh timer {args.cube_timer_s} s; observer every {args.observe_s} s",
        "| figure | this worker | Cube refresh worker | target |",
        "|---|---|---|---|",
    ]
    bound = f"<= W + eps + build ({W_MS / 1000:g} + 5 + build s)"
    lines.append(
        f"| FreshnessLag p50 / p99 / max s (seen done by verification; {len(ours.lag_ms)}/{n} mutations) | "
        f"{pct(ours.lag_ms, 0.5)} / {pct(ours.lag_ms, 0.99)} / {pct(ours.lag_ms, 1.0)} | "
        f"n/a (no verification) | {bound} |"
    )
    lines.append(
        "| staleness p50 / p99 / max s (rollup table holding the row seen in PostgreSQL) | "
        f"{pct(ours.served_ms, 0.5)} / {pct(ours.served_ms, 0.99)} / {pct(ours.served_ms, 1.0)} | "
        f"{pct(cube.served_ms, 0.5)} / {pct(cube.served_ms, 0.99)} / {pct(cube.served_ms, 1.0)} | lower is better |"
    )
    lines.append(f"| mutations never served within the run | {ours.unserved} | {cube.unserved} | 0 |")
    lines.append(f"| phase length s (arrivals + tail until served) | {ours.seconds:.0f} | {cube.seconds:.0f} | |")
    kinds = sorted(set(ours.statements) | set(cube.statements))
    for kind in ("refresh-key", "build", *[k for k in kinds if k not in {"refresh-key", "build"}]):
        lines.append(
            f"| PostgreSQL statements from Cube: {kind} | {per_min(ours.statements[kind], ours.seconds)} | "
            f"{per_min(cube.statements[kind], cube.seconds)} | |"
        )
    total_o, total_c = sum(ours.statements.values()), sum(cube.statements.values())
    lines.append(
        f"| PostgreSQL statements from Cube: total | {per_min(total_o, ours.seconds)} | "
        f"{per_min(total_c, cube.seconds)} | |"
    )
    posts, gets = ours.extra["posts"], ours.extra["gets"]
    polls = ours.extra["delivered"].get("verify", 0)
    lines.append(
        f"| Cube requests: job POSTs / verification GETs / verify messages delivered | {posts} / {gets} / {polls} | "
        "- | GETs <= verify messages (batched per tenant) |"
    )
    if posts:
        lines.append(
            f"| Cube requests per refresh (POST + GETs) / POST | {(posts + gets) / posts:.2f} | - | "
            f"<= 1 + polls per refresh = {1 + polls / posts:.2f} |"
        )
    return lines


def report(ours: Phase, cube: Phase, args: argparse.Namespace) -> None:
    print("\n".join(table(ours, cube, args)))
    print(
        f"this worker: verify/trailing/retrigger messages delivered {ours.extra['delivered']}; "
        f"Users builds seen done {ours.extra['builds done (Users keys)']}; counts {ours.extra['counts']}"
    )
    emitted = ours.extra["FreshnessLag emitted"]
    if emitted:
        print(
            f"this worker: FreshnessLag as emitted (per build, oldest mutation covered): n={len(emitted)} "
            f"p50 {statistics.median(emitted) / 1000:.1f} s, max {max(emitted) / 1000:.1f} s"
        )
    print(f"Cube refresh worker: {cube.extra}")
    print(f"statements counted: this worker {ours.window}; Cube refresh worker {cube.window}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=200)
    parser.add_argument("--arrival-s", type=float, default=120.0)
    parser.add_argument("--max-tail-s", type=float, default=90.0)
    parser.add_argument("--observe-s", type=float, default=0.5)
    parser.add_argument("--cube-timer-s", type=int, default=10, help="Cube's scheduled refresh timer (its default: 30)")
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    try:
        import handler  # noqa: F401, PLC0415
    except ImportError:
        sys.exit("bench_freshness: run with PYTHONPATH=src:. (the handler package comes from src/)")

    from devstack import Stack  # noqa: PLC0415
    from devstack.cubeapi import CubeApi, Spacer  # noqa: PLC0415

    began = time.monotonic()
    stack = Stack()
    down = [
        name
        for name, status in stack.status().items()
        if not status.up and name in {"postgres", "moto", "dynalite", "cube"}
    ]
    env = stack.start()
    for name, value in env.as_environ().items():
        if name not in {"CUBE_API_SECRET", "PG_DSN"}:
            os.environ[name] = value
    os.environ.update({"POWERTOOLS_LOG_LEVEL": "ERROR", "POWERTOOLS_METRICS_DISABLED": "true"})
    esm_up = stack.status()["esm"].up
    if esm_up:  # it would take the refresh queue's messages
        stack.stop_service("esm")
    load = os.getloadavg()
    print(f"bench_freshness: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {load[0]:.1f}")
    print(f"PostgreSQL log: {stack.logs / 'postgres.log'}", flush=True)
    arrivals = schedule(args.mutations, args.arrival_s, args.seed)
    cube_api = CubeApi(stack, env)
    for tenant in TENANTS:  # every tenant's rollups exist before the run (first builds race in Cube)
        cube_api.build(tenant, ["Users", "Tenants", "Groups"], spacer=Spacer())
    stack.psql("ALTER SYSTEM SET log_statement = 'all'")
    stack.psql("ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a '")
    stack.psql("SELECT pg_reload_conf()")
    try:
        print("phase 1: this worker ...", flush=True)
        ours = phase_worker(stack, env, arrivals, args)
        print("phase 2: Cube's refresh worker ...", flush=True)
        cube = phase_cube_worker(stack, arrivals, args)
        report(ours, cube, args)
    finally:
        stack.psql("ALTER SYSTEM RESET log_statement")
        stack.psql("ALTER SYSTEM RESET log_line_prefix")
        stack.psql("SELECT pg_reload_conf()")
        stack.psql(f"DELETE FROM users WHERE id LIKE '{PREFIX}%'")
        if not stack.status()["cube"].up:
            restart_cube(stack)
        if esm_up:
            stack.start_service("esm")
        if down:
            stack.stop()
    print(f"run time {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
