"""Agreement check: the simulation's smallest scenario, played live on the local stack, against what the
simulation predicts for the very same schedule. Part of the benchmarks (`make bench-sim`), not of CI.

    PYTHONPATH=src:. .venv/bin/python -m bench.sim.agreement [--model-window-s S] [--seconds 45]

1. The simulator's workload generator makes a schedule of MSK batches: 3 tenants (tenant-1..3 of
   cube/seed.sql) x 3 entity types, Zipf-skewed, 2 partitions, a 1 s batching window, W = 3 s.
2. Simulated: the schedule goes through `engine.play_slice` (the real domain code on the in-memory
   store, a simulated clock, modelled SQS delays) with one record per key and batch.
3. Measured: the same schedule is played in real time through `handler.app.handle` with the service
   `handler.wiring.build_service` builds against the local stack (dynalite, moto SQS, the real Cube
   over PostgreSQL), every record sent (the handler coalesces them); trailing refreshes are received
   from the stack's SQS queue and handed to the handler as SQS events (what the event source mapping
   does). DynamoDB and SQS calls are counted at the boto3 clients, Cube job POSTs at the Cube client.
4. Each count must agree within max(2, 10 %). The same comparison is made with a deliberately wrong
   model (W / 3): it must disagree, or the check could not tell a wrong model from a right one.
Exit status 0 only if the right model agrees and the wrong one does not. `--model-window-s` replaces
the model's W (to watch the check fail)."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.sim.engine import Meter, SliceSetup, play_slice
from bench.sim.workload import FLAT, Plan, Scenario, slice_batches, tenant_rates

TOLERANCE = 0.10
MIN_SLACK = 2
NOT_FOR_THE_FUNCTION = {"CUBE_API_SECRET", "PG_DSN"}
COMPARED = ("cube_posts", "ddb_writes", "sqs_sends")


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
        seed=11,
    )


def tenant_name(i: int) -> str:
    return f"tenant-{i + 1}"


def make_schedule(sc: Scenario, seconds: int) -> tuple[list[Any], float, float]:
    plan = Plan(np.arange(sc.tenants), np.ones(sc.tenants), seconds, 0, 0.0, 0.0)
    batches, start, end = slice_batches(sc, tenant_rates(sc), plan, 12, np.random.default_rng(sc.seed))
    return batches, start, end


def simulate(sc: Scenario, batches: list[Any], start: float, end: float) -> dict[str, float]:
    meter = Meter({tenant_name(i): 1.0 for i in range(sc.tenants)})
    setup = SliceSetup(sc, meter, dict.fromkeys(range(sc.tenants), 1.0), 1.0, np.random.default_rng(0), tenant_name)
    play_slice(setup, batches, start - 1, end + 3_600, 12)
    return dict(meter.counts)


@dataclass
class Measured:
    counts: Counter[str]
    lock: threading.Lock

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n


def measure(
    sc: Scenario, batches: list[Any], start: float, end: float, *, event_sources: bool = False
) -> dict[str, float]:
    from devstack import Stack  # noqa: PLC0415
    from devstack.cubeapi import CubeApi, Spacer  # noqa: PLC0415
    from devstack.stack import SERVICES  # noqa: PLC0415

    stack = Stack()
    before = stack.status()
    # The local event sources stay off: this check delivers MSK batches and SQS messages itself.
    down = [name for name in SERVICES if not before[name].up]
    print(f"local stack: {'starting ' + ', '.join(down) if down else 'already running'}")
    stack.start()
    try:
        env = stack.env()
        for name, value in env.as_environ().items():
            if name not in NOT_FOR_THE_FUNCTION:
                os.environ[name] = value
        os.environ["CUBE_PREAGG_DEBOUNCE_MS"] = str(int(sc.window_s * 1000))
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
        os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
        os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
        cubes = ("Users", "Tenants", "Groups")[: sc.entity_types]
        api = CubeApi(stack, env)
        spacer = Spacer()
        for i in range(sc.tenants):  # first builds into a tenant schema can race in Cube: do them first
            api.build(tenant_name(i), cubes, spacer=spacer)
        if event_sources:
            return _play_through_event_sources(stack, sc, batches, start, cubes)
        return _play_live(sc, batches, start, end, env, cubes)
    finally:
        if len(down) == len(SERVICES):
            stack.stop()
        else:
            for name in down:
                stack.stop_service(name)


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
    stack.start_service("esm", settings={"CUBE_PREAGG_DEBOUNCE_MS": str(int(sc.window_s * 1000))})
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
        return {
            "cube_requests": requests,
            "records": sum(e["records"] for e in entries if e["source"] == "kafka"),
            "msk_invocations": sum(1 for e in entries if e["source"] == "kafka"),
            "sqs_received": sum(e["records"] for e in entries if e["source"] == "sqs"),
            "failures": sum(e["failures"] for e in entries),
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
    """Cube's jobs endpoint receives the job POSTs and verification's `get` polls alike."""
    return counts | {"cube_requests": counts.get("cube_posts", 0.0) + counts.get("cube_gets", 0.0)}


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
    compared = COMPARED
    if args.event_sources:  # the local mapping is one consumer for all partitions: one batch stream
        live = live.with_(partitions=1)
        compared = ("cube_requests", "msk_invocations", "sqs_received")
    batches, start, end = make_schedule(live, args.seconds)
    records = sum(kb.count for kb in batches)
    print(f"schedule: {len(batches)} key-batches, {records} mutations, {args.seconds} s, W = {live.window_s:g} s")
    model_w = args.model_window_s if args.model_window_s is not None else live.window_s
    flushes = len({(kb.flush_s, kb.partition) for kb in batches})
    sim = with_requests(simulate(live.with_(window_s=model_w), batches, start, end)) | {"msk_invocations": flushes}
    wrong_w = live.window_s / 3
    sim_wrong = with_requests(simulate(live.with_(window_s=wrong_w), batches, start, end)) | {
        "msk_invocations": flushes
    }
    began = time.time()
    real = measure(live, batches, start, end, event_sources=args.event_sources)
    if args.event_sources:
        print(
            f"live run through the local event sources: {time.time() - began:.0f} s; {real.get('records', 0)} "
            f"records delivered, {real.get('failures', 0)} reported failures (DynamoDB writes are not visible "
            "from outside the mappings' process)"
        )
    else:
        print(
            f"live run: {time.time() - began:.0f} s; {real.get('records', 0)} records sent, "
            f"{real.get('cube_jobs', 0)} Cube job tokens, {real.get('ddb_reads', 0)} DynamoDB reads "
            "(dynalite ignores ReturnValuesOnConditionCheckFailure, so the adapter reads after a failed condition)"
        )
    text, ok = table(f"\nmodel W = {model_w:g} s (the live run's W = {live.window_s:g} s):", sim, real, compared)
    print(text)
    text_wrong, ok_wrong = table(
        f"\ndeliberately wrong model, W = {wrong_w:g} s (must NOT agree):", sim_wrong, real, compared
    )
    print(text_wrong)
    if not ok:
        print("\nFAIL: the model does not agree with the local stack")
        return 1
    if ok_wrong:
        print("\nFAIL: a wrong model agrees too: the check cannot tell them apart")
        return 1
    print("\nPASS: the model agrees; the wrong model does not")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
