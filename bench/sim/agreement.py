"""Agreement check: the simulation's smallest scenario, played live on the local stack, against what the
simulation predicts for the very same schedule. Part of the benchmarks (`make bench-sim`), not of CI.

    PYTHONPATH=src:. .venv/bin/python -m bench.sim.agreement [--event-sources] [--model-window-s S] [--seconds 45]

1. The simulator's workload generator makes a schedule of MSK batches: 3 tenants (tenant-1..3 of
   cube/seed.sql) x 3 entity types, Zipf-skewed, 2 partitions (1 through the event sources), a 1 s
   batching window, W = 3 s, Cube's PostgreSQL queue concurrency (2).
2. The stack is started and every (tenant, cube) built once; the jobs each build queued are the layout
   of the model's Cube (`LocalLayout`: Users 5 or so, Tenants 1, Groups 1).
3. Simulated: the schedule goes through `engine.play_slice` (the real domain code on the in-memory
   store, a simulated clock, modelled SQS delays) with one record per key and batch, and the same
   function settings as the live run (W, a build budget of BUDGET jobs).
4. Measured, handler driven: the same schedule is played in real time through `handler.app.handle`
   with the service `handler.wiring.build_service` builds against the local stack (dynalite, moto SQS,
   the real Cube over PostgreSQL), every record sent (the handler coalesces them); trailing refreshes
   are received from the stack's SQS queue and handed to the handler as SQS events (what the event
   source mapping does). DynamoDB and SQS calls are counted at the boto3 clients, Cube job POSTs and
   the jobs they queued at the Cube client.
   `--event-sources`: the records are produced to the local Kafka topic at their times, and the stack's
   event source mappings (devstack/esm.py) invoke the function; counted from the mappings' journal
   (invocations, SQS messages delivered, each invocation's DynamoDB writes, SQS sends and Cube jobs)
   and Cube's log (requests to the jobs endpoint: POSTs and verification's polls).
5. Each count must agree within max(2, 10 %). The same comparison is made with deliberately wrong
   models (`wrong_models`): each must disagree, or the check could not tell it from the right one.
Exit status 0 only if the right model agrees and every wrong one does not. `--model-window-s` replaces
the model's W (to watch the check fail)."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.sim.engine import Layout, Meter, SliceSetup, play_slice, sim_settings
from bench.sim.workload import FLAT, Plan, Scenario, slice_batches, tenant_rates

TOLERANCE = 0.10
# The build budget (jobs in Cube at once, docs/load-aware.md) of the live run and of the model: the
# largest allowed, so that admission takes and frees its slots (counted) but never defers. With the
# default (4 x Cube's PostgreSQL concurrency 2 = 8 jobs) this schedule keeps the budget saturated
# (three tenants' Users refreshes of 5 jobs each), and there which key waits depends on the order of
# deliveries a few milliseconds apart: one run's counts cannot judge a model (docs/scale.md).
BUDGET = 100  # handler.domain.admission.MAX_BUDGET
MIN_SLACK = 2
NOT_FOR_THE_FUNCTION = {"CUBE_API_SECRET", "PG_DSN"}
COMPARED = ("cube_posts", "cube_jobs", "ddb_writes", "sqs_sends")
# Through the event sources, Cube's log counts POSTs and verification's polls together; the mappings'
# journal gives the invocations, the SQS messages delivered and each invocation's calls.
ES_COMPARED = ("cube_requests", "cube_jobs", "ddb_writes", "sqs_sends", "sqs_received", "msk_invocations")


def scenario(window_s: float) -> Scenario:
    # About 70 mutations in 45 s over 9 keys: enough to be debounced, trailing and leading alike.
    return Scenario(
        name="agreement",
        tenants=3,
        mutations_per_tenant_day=45_000,
        entity_types=3,
        profile=FLAT,
        window_s=window_s,
        partitions=2,
        batch_window_s=1.0,
        cube_concurrency=2,  # Cube's queue concurrency for PostgreSQL (PostgresDriver.getDefaultConcurrency)
        seed=11,
    )


def tenant_name(i: int) -> str:
    return f"tenant-{i + 1}"


def make_schedule(sc: Scenario, seconds: int) -> tuple[list[Any], float, float]:
    plan = Plan(np.arange(sc.tenants), np.ones(sc.tenants), seconds, 0, 0.0, 0.0)
    batches, start, end = slice_batches(sc, tenant_rates(sc), plan, 12, np.random.default_rng(sc.seed))
    return batches, start, end


@dataclass(frozen=True)
class LocalLayout(Layout):
    """What the local Cube holds for each tenant: the jobs one whole-cube refresh queues, per cube, as
    counted from the stack's first builds (Users: `main` plus one job per monthly partition of
    `dailyStatusCounts`, how many depends on the date; Tenants and Groups: `main`). The scenario's
    uniform layout (12 partitions per cube) would give the build budget 12 jobs a refresh, not 1-6."""

    jobs: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, jobs: Mapping[str, int]) -> LocalLayout:
        return cls(tuple(jobs), 0, 0, 1, ("UTC",), tuple(jobs.items()))

    def builds(self, body: Mapping[str, object]) -> int:
        if body.get("preAggregations"):
            raise ValueError("the agreement check runs whole-cube routes (make stack-start PRECISE=0)")
        per_cube = dict(self.jobs)
        names = body.get("cubes") or []
        assert isinstance(names, list)
        return sum(per_cube[str(name)] for name in names)


def function_settings(sc: Scenario, budget: int = BUDGET) -> dict[str, str]:
    """The function's settings in the live run (environment variables), the model's in `simulate`."""
    return {"CUBE_PREAGG_DEBOUNCE_MS": str(int(sc.window_s * 1000)), "CUBE_PREAGG_BUILD_BUDGET": str(budget)}


@dataclass(frozen=True)
class Model:
    """What the simulation assumes about the function: its window and its build budget."""

    name: str
    window_s: float
    budget: int = BUDGET


def wrong_models(window_s: float) -> list[Model]:
    """Deliberately wrong models: each must disagree with the live run, or the check could not tell it
    from the right one. W / 3 is no longer among them: since load-aware refresh a key's next refresh
    waits for its build to be verified (2 s after the POST), so a 1 s window changes few counts."""
    return [
        Model(f"W = {3 * window_s:g} s (3 x the live W)", 3 * window_s),
        Model("no build budget (the model before load-aware refresh)", window_s, budget=0),
    ]


def simulate(
    sc: Scenario, batches: list[Any], start: float, end: float, layout: Layout | None = None, *, budget: int = BUDGET
) -> dict[str, float]:
    meter = Meter({tenant_name(i): 1.0 for i in range(sc.tenants)})
    settings = sim_settings(sc).model_copy(update={"build_budget": budget})
    setup = SliceSetup(
        sc,
        meter,
        dict.fromkeys(range(sc.tenants), 1.0),
        1.0,
        np.random.default_rng(0),
        tenant_name,
        settings=settings,
        layout=layout,
    )
    play_slice(setup, batches, start - 1, end + 3_600, 12)
    return dict(meter.counts)


@dataclass
class Measured:
    counts: Counter[str]
    lock: threading.Lock

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n


@dataclass
class LiveStack:
    """The local stack, started, with every tenant's pre-aggregations built once."""

    stack: Any
    env: Any
    cubes: tuple[str, ...]
    jobs: dict[str, int]  # jobs one refresh of each cube queues (the same for tenant-1..3)


@contextmanager
def local_stack(sc: Scenario) -> Iterator[LiveStack]:
    """Start what is not running (stopped again on exit), point the function's settings at the stack,
    build every (tenant, cube) once and count the jobs each build queued: the layout the model needs."""
    from devstack import Stack  # noqa: PLC0415
    from devstack.cubeapi import CubeApi, Spacer  # noqa: PLC0415
    from devstack.stack import SERVICES  # noqa: PLC0415

    stack = Stack()
    before = stack.status()
    # The local event sources stay off: the handler-driven check delivers MSK batches and SQS messages itself.
    down = [name for name in SERVICES if not before[name].up]
    print(f"local stack: {'starting ' + ', '.join(down) if down else 'already running'}")
    stack.start()
    try:
        env = stack.env()
        for name, value in env.as_environ().items():
            if name not in NOT_FOR_THE_FUNCTION:
                os.environ[name] = value
        os.environ.update(function_settings(sc))
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
        os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
        os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
        cubes = ("Users", "Tenants", "Groups")[: sc.entity_types]
        api = CubeApi(stack, env)
        spacer = Spacer()
        seen: dict[str, set[int]] = {cube: set() for cube in cubes}
        for i in range(sc.tenants):  # first builds into a tenant schema can race in Cube: do them first
            for cube in cubes:
                seen[cube].add(len(api.build(tenant_name(i), (cube,), spacer=spacer).statuses))
        if any(len(counts) != 1 for counts in seen.values()):
            raise SystemExit(f"agreement: tenants' builds queue different job counts {seen}: reseed the stack")
        yield LiveStack(stack, env, cubes, {cube: counts.pop() for cube, counts in seen.items()})
    finally:
        if len(down) == len(SERVICES):
            stack.stop()
        else:
            for name in down:
                stack.stop_service(name)


def measure(
    live: LiveStack, sc: Scenario, batches: list[Any], start: float, end: float, *, event_sources: bool = False
) -> dict[str, float]:
    if event_sources:
        return _play_through_event_sources(live.stack, sc, batches, start, live.cubes)
    return _play_live(sc, batches, start, end, live.env, live.cubes)


def _play_live(
    sc: Scenario, batches: list[Any], start: float, end: float, env: Any, cubes: tuple[str, ...]
) -> dict[str, float]:
    import boto3  # noqa: PLC0415

    from devstack.observe import as_sqs_event  # noqa: PLC0415
    from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
    from handler.app import handle  # noqa: PLC0415 (reads settings from the environment at import)
    from handler.domain.model import RefreshKey  # noqa: PLC0415
    from handler.settings import load_settings  # noqa: PLC0415
    from handler.wiring import build_service  # noqa: PLC0415
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    measured = Measured(Counter(), threading.Lock())
    settings = load_settings()

    def observed_service() -> Any:
        svc = build_service(settings, CountingTelemetry())
        for op in ("UpdateItem", "PutItem", "DeleteItem"):
            svc.debouncer.store.client.meta.events.register(
                f"before-call.dynamodb.{op}", lambda **_: measured.add("ddb_writes")
            )
        svc.debouncer.store.client.meta.events.register(
            "before-call.dynamodb.GetItem", lambda **_: measured.add("ddb_reads")
        )
        svc.debouncer.scheduler.client.meta.events.register(
            "before-call.sqs.SendMessage", lambda **_: measured.add("sqs_sends")
        )
        inner = svc.cube

        class CountingCube:
            """Counts job requests (one POST per selector, retries aside) and the tokens Cube returned."""

            def trigger(self, tenant_id: str, selectors: Any, *, deadline_ms: int) -> Any:
                measured.add("cube_posts", len(selectors))
                answers = inner.trigger(tenant_id, selectors, deadline_ms=deadline_ms)
                measured.add("cube_jobs", sum(len(a) for a in answers if isinstance(a, list)))
                return answers

        svc.cube = CountingCube()
        return svc

    msk_service = observed_service()
    sqs_service = observed_service()
    store = msk_service.debouncer.store
    for i in range(sc.tenants):  # earlier runs share the dynalite table: start every key clean
        for cube in cubes:
            store.delete(RefreshKey(tenant_name(i), cube))
    sqs = boto3.client(
        "sqs",
        endpoint_url=env.aws_endpoint_url_sqs,
        region_name=env.aws_default_region,
        aws_access_key_id=env.aws_access_key_id,
        aws_secret_access_key=env.aws_secret_access_key,
    )
    sqs.purge_queue(QueueUrl=env.refresh_queue_url)
    measured.counts.clear()
    stop = threading.Event()
    errors: list[str] = []

    def deliver_trailing() -> None:
        """What the SQS event source mapping does: receive, invoke, delete what did not fail."""
        while not stop.is_set():
            answer = sqs.receive_message(
                QueueUrl=env.refresh_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=30
            )
            messages = answer.get("Messages", [])
            if not messages:
                continue
            measured.add("sqs_received", len(messages))
            response = handle(as_sqs_event(messages, env), None, service=sqs_service, settings=settings)
            failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
            if failed:
                errors.append(f"trailing refresh failed: {sorted(failed)}")
            for m in messages:
                if m["MessageId"] not in failed:
                    sqs.delete_message(QueueUrl=env.refresh_queue_url, ReceiptHandle=m["ReceiptHandle"])

    poller = threading.Thread(target=deliver_trailing, daemon=True)
    poller.start()
    origin = start - 1
    t0 = time.time() + 1.0
    groups: dict[tuple[float, int], list[Any]] = {}
    for kb in batches:
        groups.setdefault((kb.flush_s, kb.partition), []).append(kb)
    offset = 1_000
    targets = {0: "User", 1: "Tenant", 2: "Group"}
    for (flush_s, _partition), members in sorted(groups.items()):
        due = t0 + (flush_s - origin)
        time.sleep(max(0.0, due - time.time()))
        values = []
        for kb in members:
            first_ms = int((t0 + kb.oldest_s - origin) * 1000)
            last_ms = max(first_ms, int(due * 1000) - 1)
            for j in range(kb.count):  # every record: the handler coalesces them itself
                values.append(
                    {
                        "eventType": "ENTITY_UPDATED",
                        "entityType": targets[kb.etype],
                        "entityId": f"e-{offset}-{j}",
                        "tenantId": tenant_name(kb.tenant),
                        "timestamp": first_ms + (last_ms - first_ms) * j // max(1, kb.count - 1),
                    }
                )
        measured.add("records", len(values))
        event = build_msk_event(values, partitions=1, start_offset=offset, timestamp_ms=int(time.time() * 1000))
        offset += len(values)
        response = handle(event, None, service=msk_service, settings=settings)
        if response["batchItemFailures"]:
            errors.append(f"MSK batch failed: {json.dumps(response['batchItemFailures'])[:200]}")
    # Drain: wait for the last trailing refreshes (due one window after the last claims).
    quiet_since = None
    deadline = time.time() + sc.window_s + 60
    while time.time() < deadline:
        attrs = sqs.get_queue_attributes(QueueUrl=env.refresh_queue_url, AttributeNames=["All"])["Attributes"]
        pending = sum(
            int(attrs.get(a, 0))
            for a in (
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            )
        )
        if pending == 0:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since > 3:
                break
        else:
            quiet_since = None
        time.sleep(0.5)
    stop.set()
    poller.join(timeout=5)
    if errors:
        print("errors during the live run:", *errors[:10], sep="\n  ")
    return dict(measured.counts)


def _play_through_event_sources(
    stack: Any, sc: Scenario, batches: list[Any], start: float, cubes: tuple[str, ...]
) -> dict[str, float]:
    """The same mutations produced to the local Kafka topic at their times; the stack's own event source
    mappings (devstack/esm.py: Kafka batching, SQS delivery) invoke the function in their process. Counted
    from outside: requests to Cube's jobs endpoint in its own log (POSTs and verification's polls),
    invocations and SQS messages in the mappings' journal. DynamoDB writes are not visible from here."""
    from confluent_kafka import Producer  # noqa: PLC0415 - dev dependency

    from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
    from handler.domain.model import RefreshKey  # noqa: PLC0415
    from handler.settings import load_settings  # noqa: PLC0415
    from handler.wiring import build_service  # noqa: PLC0415

    before = stack.status()
    stack.stop_service("esm")
    stack.stop_service("kafka")  # a fresh topic and consumer group
    previous = stack.function_settings().get("environ", {})
    stack.start_service("kafka")
    # The esm takes the function's settings from the stack's record (.stack/function.json), not its environment.
    stack.start_service("esm", settings=function_settings(sc))
    try:
        env = stack.env()
        store = build_service(load_settings(), CountingTelemetry()).debouncer.store
        for i in range(sc.tenants):
            for cube in cubes:
                store.delete(RefreshKey(tenant_name(i), cube))
        journal = stack.logs / "invocations.jsonl"
        cube_log = stack.logs / "cube.log"
        journal_at = journal.stat().st_size if journal.exists() else 0
        cube_at = cube_log.stat().st_size
        producer = Producer({"bootstrap.servers": env.kafka_bootstrap_servers, "log_level": 3})
        targets = {0: "User", 1: "Tenant", 2: "Group"}
        t0 = time.time() + 1.0
        origin = start - 1
        records = sorted((kb.oldest_s + j * 0.001, kb) for kb in batches for j in range(kb.count))
        for n, (at, kb) in enumerate(records):
            time.sleep(max(0.0, t0 + (at - origin) - time.time()))
            value = {
                "eventType": "ENTITY_UPDATED",
                "entityType": targets[kb.etype],
                "entityId": f"e-{n}",
                "tenantId": tenant_name(kb.tenant),
                "timestamp": int(time.time() * 1000),
            }
            producer.produce(stack_topic(), value=json.dumps(value).encode(), key=tenant_name(kb.tenant).encode())
            producer.poll(0)
        producer.flush(15)
        del producer  # before the topic's cluster stops
        # The last trailing refreshes (one window, SQS delivery) and their verifications (2 s later, then
        # delivered): wait at least that long, then until the mappings' journal has been quiet for 8 s
        # (a loaded machine delays the deliveries; counting too early misses them).
        time.sleep(sc.window_s + 8)
        quiet_since, size = time.monotonic(), journal.stat().st_size if journal.exists() else 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 8:
            time.sleep(1)
            now_size = journal.stat().st_size if journal.exists() else 0
            if now_size != size:
                quiet_since, size = time.monotonic(), now_size
        entries = [json.loads(line) for line in journal.read_bytes()[journal_at:].decode().splitlines() if line]
        # Cube's log does not say a job POST's action: verification's `get` polls are POSTs to the same
        # path. Both are counted, and compared with the simulated POSTs + GETs.
        requests = sum(
            1
            for line in cube_log.read_bytes()[cube_at:].decode(errors="replace").splitlines()
            if '"path":"/cubejs-api/v1/pre-aggregations/jobs"' in line and '"method":"POST"' in line
        )
        calls: Counter[str] = Counter()
        for e in entries:
            calls.update(e.get("calls", {}))
        return {
            "cube_requests": requests,
            "records": sum(e["records"] for e in entries if e["source"] == "kafka"),
            "msk_invocations": sum(1 for e in entries if e["source"] == "kafka"),
            "sqs_received": sum(e["records"] for e in entries if e["source"] == "sqs"),
            "failures": sum(e["failures"] for e in entries),
            **calls,
        }
    finally:
        stack.stop_service("esm")
        stack.set_function_settings(previous)
        if not before["kafka"].up:
            stack.stop_service("kafka")
        if before["esm"].up:  # a developer's event sources: back, with their settings
            stack.start_service("esm")


def stack_topic() -> str:
    from bench.sim.report import ROOT  # noqa: PLC0415
    from devstack.template import event_sources  # noqa: PLC0415

    return event_sources(ROOT / "template.yaml").topic


def with_requests(counts: dict[str, float]) -> dict[str, float]:
    """Cube's jobs endpoint receives the job POSTs and verification's `get` polls alike; the jobs Cube
    queued (one token each) are the partitions the simulated Cube built."""
    return counts | {
        "cube_requests": counts.get("cube_posts", 0.0) + counts.get("cube_gets", 0.0),
        "cube_jobs": counts.get("partitions_built", 0.0),
    }


def agrees(simulated: float, measured: float) -> bool:
    return abs(simulated - measured) <= max(MIN_SLACK, TOLERANCE * simulated)


def table(
    title: str, sim: dict[str, float], real: dict[str, float], compared: tuple[str, ...] = COMPARED
) -> tuple[str, bool]:
    rows = [title, "| count | simulated | measured | agree (max(2, 10%)) |", "|---|---|---|---|"]
    ok = True
    for name in compared:
        s, m = sim.get(name, 0.0), real.get(name, 0.0)
        good = agrees(s, m)
        ok &= good
        rows.append(f"| {name} | {s:.0f} | {m:.0f} | {'yes' if good else 'NO'} |")
    return "\n".join(rows), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--window-s", type=float, default=3.0, help="W of the live run (CUBE_PREAGG_DEBOUNCE_MS / 1000)")
    ap.add_argument("--model-window-s", type=float, default=None, help="W the model assumes (default: the live W)")
    ap.add_argument("--seconds", type=int, default=45, help="length of the schedule")
    ap.add_argument(
        "--event-sources",
        action="store_true",
        help="produce to the local Kafka topic and let the stack's event source mappings invoke the function",
    )
    args = ap.parse_args(argv)
    live = scenario(args.window_s)
    compared: tuple[str, ...] = COMPARED
    if args.event_sources:  # the local mapping is one consumer for all partitions: one batch stream
        live = live.with_(partitions=1)
        compared = ES_COMPARED
    batches, start, end = make_schedule(live, args.seconds)
    records = sum(kb.count for kb in batches)
    print(f"schedule: {len(batches)} key-batches, {records} mutations, {args.seconds} s, W = {live.window_s:g} s")
    model = Model("the model", args.model_window_s if args.model_window_s is not None else live.window_s)
    flushes = len({(kb.flush_s, kb.partition) for kb in batches})
    models = [model, *wrong_models(live.window_s)]
    with local_stack(live) as stack:
        layout = LocalLayout.of(stack.jobs)
        print("jobs per refresh in the local Cube: " + ", ".join(f"{c} {n}" for c, n in stack.jobs.items()))
        sims = [
            with_requests(simulate(live.with_(window_s=m.window_s), batches, start, end, layout, budget=m.budget))
            | {"msk_invocations": flushes}
            for m in models
        ]
        began = time.time()
        real = measure(stack, live, batches, start, end, event_sources=args.event_sources)
    if args.event_sources:
        print(
            f"live run through the local event sources: {time.time() - began:.0f} s; {real.get('records', 0)} "
            f"records delivered, {real.get('failures', 0)} reported failures"
        )
    else:
        print(
            f"live run: {time.time() - began:.0f} s; {real.get('records', 0)} records sent, "
            f"{real.get('ddb_reads', 0)} DynamoDB reads (dynalite ignores ReturnValuesOnConditionCheckFailure, "
            "so the adapter reads after a failed condition)"
        )
    text, ok = table(
        f"\n{model.name}: W = {model.window_s:g} s, build budget {model.budget} (the live run: W = "
        f"{live.window_s:g} s, budget {BUDGET}):",
        sims[0],
        real,
        compared,
    )
    print(text)
    told_apart = True
    for wrong, sim_wrong in zip(models[1:], sims[1:], strict=True):
        text_wrong, ok_wrong = table(
            f"\ndeliberately wrong model, {wrong.name} (must NOT agree):", sim_wrong, real, compared
        )
        print(text_wrong)
        told_apart &= not ok_wrong
    if not ok:
        print("\nFAIL: the model does not agree with the local stack")
        return 1
    if not told_apart:
        print("\nFAIL: a wrong model agrees too: the check cannot tell them apart")
        return 1
    print("\nPASS: the model agrees; every wrong model does not")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
