"""`make demo`: start the local stack, play the sample MSK events through the Lambda handler with its
real adapters (DynamoDB on dynalite, SQS and Secrets Manager on moto, Cube over PostgreSQL), and tell
what happened: events in, bad ones isolated, keys coalesced and debounced, jobs posted and polled,
and the counts Cube serves before and after.

    .venv/bin/python -m devstack.demo [--window-ms 5000] [--keep-running]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devstack.cubeapi import CubeApi, CubeApiError, Spacer
from devstack.stack import SERVICES, Stack, StackEnv, StackError

if TYPE_CHECKING:
    from devstack.observe import ObservedService
    from handler.domain.model import RefreshKey
    from handler.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"
DEMO_TENANTS = ("tenant-1", "tenant-2", "tenant-3")
CUBES = ("Users", "Tenants", "Groups")
STORY_TENANT = "tenant-1"
PRECISE_TENANT = "tenant-h"  # cube/seed.sql: 30 months of users
PRECISE_TARGET = "Users.dailyStatusCounts"
PRECISE_TABLE = "users_daily_status_counts"
PRECISE_MAP = {
    "User": [
        {
            "target": PRECISE_TARGET,
            "partitionBy": "timeHints.createdAt",
            "granularity": "month",
            "fields": ["status", "createdAt"],
        }
    ]
}
# The function gets its Cube secret from Secrets Manager, never from its environment.
NOT_FOR_THE_FUNCTION = {"CUBE_API_SECRET", "PG_DSN"}
QUIET = {
    "POWERTOOLS_SERVICE_NAME": "preagg-refresh",
    "POWERTOOLS_METRICS_NAMESPACE": "PreaggRefresh",
    "POWERTOOLS_LOG_LEVEL": "ERROR",  # the story below replaces the JSON logs
    "POWERTOOLS_METRICS_DISABLED": "true",  # no EMF blobs in the story
    "POWERTOOLS_TRACE_DISABLED": "true",
}


def say(text: str = "") -> None:
    print(text, flush=True)


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%H:%M:%S")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class Demo:
    def __init__(self, stack: Stack, env: StackEnv, window_ms: int) -> None:
        # The handler reads its settings (and Powertools its log level) at import: environment first.
        os.environ.update({k: v for k, v in env.as_environ().items() if k not in NOT_FOR_THE_FUNCTION})
        for name in NOT_FOR_THE_FUNCTION:
            os.environ.pop(name, None)
        os.environ.update(QUIET)
        from devstack import function  # noqa: PLC0415

        for name in function.names():  # the demo's settings are its own, whatever this shell exports
            os.environ.pop(name, None)
        from devstack.observe import build_observed_service  # noqa: PLC0415
        from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
        from handler.app import handle  # noqa: PLC0415
        from handler.settings import load_settings  # noqa: PLC0415

        self.stack = stack
        self.env = env
        self.cube = CubeApi(stack, env)
        self.spacer = Spacer()
        self.settings: Settings = load_settings(CUBE_PREAGG_DEBOUNCE_MS=str(window_ms))
        self.telemetry = CountingTelemetry()
        self.service: ObservedService = build_observed_service(self.settings, self.telemetry, self.spacer)
        self._handle = handle
        self.step = 0

    def handle(self, event: Mapping[str, Any]) -> dict[str, Any]:
        return self._handle(event, None, service=self.service, settings=self.settings)

    # ------------------------------------------------------------------ setup

    def setup(self) -> int:
        from handler.domain.model import RefreshKey  # noqa: PLC0415

        say(
            f"debounce window {self.settings.debounce_ms / 1000:g} s for the demo (production default 30 s; the "
            "demo runs the handler itself, with its own settings: the stack's event sources are not involved)"
        )
        store = self.service.debouncer.store
        for tenant in DEMO_TENANTS:
            for cube in CUBES:
                store.delete(RefreshKey(tenant, cube))
        self.stack.psql("DELETE FROM users WHERE id LIKE 'demo-%'")
        say(f"cleared earlier demo state: debounce items of {', '.join(DEMO_TENANTS)}, demo rows in users")
        began = time.monotonic()
        for tenant in DEMO_TENANTS:
            # The first build into a new tenant schema can race inside Cube (docs/cube-jobs-api.md, hazard d); the
            # helper retries that one error and nothing else.
            self.cube.build(tenant, CUBES, spacer=self.spacer)
        say(
            f"built fresh rollups for {', '.join(DEMO_TENANTS)} so the story starts from a clean slate "
            f"({time.monotonic() - began:.1f} s)"
        )
        served = self.cube.count(STORY_TENANT)
        built = ", ".join(f"{p} built {_clock(ms)}" for p, ms in served.preaggs.items())
        say(f"Cube serves {STORY_TENANT} Users.count = {served.value}  (from {built})")
        return served.value

    def add_user(self, note: str) -> None:
        user_id = f"demo-{STORY_TENANT}-{time.time_ns() // 1000}"
        self.stack.psql(
            f"INSERT INTO users (id, tenant_id, status, created_at) VALUES ('{user_id}', '{STORY_TENANT}', "  # noqa: S608
            "'active', now()::timestamp)"
        )
        source = self.stack.psql(f"SELECT count(*) FROM users WHERE tenant_id = '{STORY_TENANT}'")[0][0]  # noqa: S608
        served = self.cube.count(STORY_TENANT).value
        say(f"  + {note}: inserted user {user_id}; PostgreSQL has {source}, Cube still serves {served} (stale rollup)")

    # ------------------------------------------------------------------ one batch

    def play(self, name: str, blurb: str) -> list[str]:
        """Play one MSK sample; return the pk of every key that was debounced."""
        from handler.domain.decode import decode_msk_event  # noqa: PLC0415
        from handler.wiring import now_ms  # noqa: PLC0415
        from preagg_cli.local import restamp  # noqa: PLC0415

        self.step += 1
        event = json.loads((EVENTS / name).read_text())
        restamp(event, now_ms())  # the samples carry fixed timestamps: the freshness lag counts from now
        say()
        say(f"{self.step}) events/{name}: {blurb}")
        batch = decode_msk_event(event, now_ms=now_ms())
        routes = self.settings.entity_cube_map
        unmapped = sorted({m.entity_type for _, m in batch.mutations if not routes.targets_for(m.entity_type)})
        say(
            f"   in: {_plural(batch.total, 'record')}, {len(batch.invalid)} invalid"
            + (f", unmapped entity types acknowledged: {', '.join(unmapped)}" if unmapped else "")
        )
        for bad in batch.invalid:
            say(f"      isolated {bad.ref.partition}@{bad.ref.offset}: {bad.reason} ({bad.detail})")
        calls_before = len(self.service.recorder.calls)

        response = self.handle(event)

        outcome = self.service.last
        mapped = sum(1 for _, m in batch.mutations if routes.targets_for(m.entity_type))
        say(f"   coalesced {_plural(mapped, 'mutation')} into {_plural(len(outcome.keys), 'key')} (tenant#cube)")
        debounced = []
        for key in outcome.keys:
            if key.status == "debounced":
                debounced.append(key.key.pk)
                state = self.service.debouncer.store.get(key.key)
                due = state.trailing_due_at if state else None
                when = f"trailing refresh due {_clock(due)}" if due else "trailing refresh pending"
                say(
                    f"   debounced {key.key.pk}: refreshed less than {self.settings.debounce_ms / 1000:g} s ago; {when}"
                )
            elif key.status == "failed":
                say(f"   FAILED {key.key.pk}: {key.detail} (claim released, records reported for retry)")
        self._report_jobs(calls_before)
        self._report_builds([k.key for k in outcome.keys if k.status == "refreshed"])
        self._report_response(response, len(batch.invalid))
        return debounced

    def _report_jobs(self, calls_before: int) -> None:
        calls = sorted(self.service.recorder.calls[calls_before:], key=lambda c: c.tenant_id)
        for call in calls:
            targets = sorted(
                {str(t) for s in call.selectors for t in _as_list(s.get("cubes") or s.get("preAggregations"))}
            )
            say(f"   posted jobs: {call.tenant_id} [{', '.join(targets)}] -> {_plural(len(call.tokens), 'job token')}")
        for call in calls:
            result = self.cube.wait_for_jobs(call.tenant_id, call.tokens)
            order = ["scheduled", "processing", "done"]
            seen = sorted(result.seen, key=lambda s: order.index(s) if s in order else len(order))
            say(
                f"   polled {call.tenant_id}: {' -> '.join(seen)} "
                f"({_plural(len(result.statuses), 'job')} in {result.seconds:.1f} s)"
            )

    def _report_builds(self, keys: Sequence[RefreshKey], timeout_s: float = 30.0) -> None:
        """Deliver the function's own verify messages (2 s after each POST) until it has seen every
        refreshed key's build `done`; print the freshness lag it measured."""
        from devstack.observe import deliver_queue_messages  # noqa: PLC0415

        store = self.service.debouncer.store
        pending = set(keys)
        deadline = time.monotonic() + timeout_s
        time.sleep(2.2)  # the first verification is due 2 s after the POST (SQS DelaySeconds)
        while pending and time.monotonic() < deadline:
            # Every receive counts towards the queue's maxReceiveCount for the trailing messages it
            # also sees: one round a second, not a tight loop.
            if not deliver_queue_messages(self.env, self.handle, None, kinds=("verify", "retrigger"), visibility_s=3):
                time.sleep(1.0)
            for key in sorted(pending):
                state = store.get(key)
                if state and state.build_status == "done" and state.build_started_at == state.jobs_started_at:
                    lag = (state.freshness_lag_ms or 0) / 1000
                    say(f"   verified by the function: {key.pk} built, freshness lag {lag:.1f} s (mutation -> built)")
                    pending.discard(key)
        for key in sorted(pending):
            state = store.get(key)
            say(f"   not verified yet: {key.pk} ({state.build_status if state else 'no state'})")

    @staticmethod
    def _report_response(response: Mapping[str, Any], invalid: int) -> None:
        failures = response.get("batchItemFailures", [])
        if not failures:
            say("   Lambda response: no batchItemFailures (the batch is committed)")
        else:
            note = " (the invalid records only: retried by Lambda, then sent to the on-failure destination)"
            say(
                f"   Lambda response: {_plural(len(failures), 'batchItemFailure')}"
                + (note if len(failures) == invalid else "")
            )

    def wait_for_windows(self, name: str) -> None:
        """Wait until the window of every key the good records of `name` map to has ended, so they
        are refreshed at once (the trailing refresh was shown above)."""
        from handler.domain.decode import decode_msk_event  # noqa: PLC0415
        from handler.domain.model import RefreshKey  # noqa: PLC0415
        from handler.wiring import now_ms  # noqa: PLC0415

        batch = decode_msk_event(json.loads((EVENTS / name).read_text()), now_ms=now_ms())
        routes, store = self.settings.entity_cube_map, self.service.debouncer.store
        ends = []
        for _, mutation in batch.mutations:
            for target in routes.targets_for(mutation.entity_type):
                state = store.get(RefreshKey(mutation.tenant_id, target))
                if state and state.started_at:
                    ends.append(state.started_at + self.settings.debounce_ms)
        wait_s = (max(ends, default=0) - now_ms()) / 1000
        if wait_s > 0:
            say()
            say(f"   (waiting {wait_s:.1f} s for the windows above to end, so the next batch refreshes at once)")
            time.sleep(wait_s + 0.1)

    # ------------------------------------------------------------------ trailing refreshes

    def trailing(self, pks: Sequence[str]) -> None:
        from devstack.observe import as_sqs_event, delete_messages, receive_trailing  # noqa: PLC0415
        from handler.domain.model import RefreshKey  # noqa: PLC0415
        from handler.wiring import now_ms  # noqa: PLC0415

        self.step += 1
        say()
        say(f"{self.step}) trailing refreshes: what the window held back")
        store = self.service.debouncer.store
        tokens = {}
        for pk in sorted(set(pks)):
            state = store.get(RefreshKey.from_pk(pk))
            if state and state.trailing_token:
                tokens[state.trailing_token] = pk
        if not tokens:
            say("   nothing was held back: no key was debounced")
            return
        say(f"   waiting for {_plural(len(tokens), 'delayed SQS message')} ({', '.join(sorted(tokens.values()))})")
        messages = receive_trailing(self.env, tokens, timeout_s=60)
        due = max(json.loads(m["Body"])["dueAt"] for m in messages)
        while now_ms() < due:
            time.sleep(min(0.2, (due - now_ms()) / 1000 + 0.01))
        say(f"   received {_plural(len(messages), 'message')}; handing them to the handler as an SQS batch")
        calls_before = len(self.service.recorder.calls)
        response = self.handle(as_sqs_event(messages, self.env))
        for key in self.service.last.keys:
            say(f"   {key.key.pk}: {key.status} {key.detail}".rstrip())
        self._report_jobs(calls_before)
        self._report_builds([k.key for k in self.service.last.keys if k.status == "refreshed"])
        if response.get("batchItemFailures"):
            say(f"   Lambda response: {len(response['batchItemFailures'])} failed (left in the queue for a retry)")
        else:
            delete_messages(self.env, messages)
            say("   Lambda response: no batchItemFailures (the messages are deleted)")

    # ------------------------------------------------------------------ partition-precise refresh

    def precise(self) -> bool:
        """One mutation dated in an old month, routed by its time hint: only that month's partition of
        tenant-h's Users.dailyStatusCounts is rebuilt. True when exactly one was."""
        from devstack.observe import build_observed_service  # noqa: PLC0415
        from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
        from handler.settings import load_settings  # noqa: PLC0415

        self.step += 1
        say()
        say(f"{self.step}) partition-precise refresh: {PRECISE_TENANT} has 30 months of users")
        settings = load_settings(
            CUBE_PREAGG_DEBOUNCE_MS=str(self.settings.debounce_ms), ENTITY_CUBE_MAP=json.dumps(PRECISE_MAP)
        )
        service = build_observed_service(settings, CountingTelemetry(), self.spacer)
        for stale, _ in service.debouncer.store.scan(PRECISE_TENANT):
            service.debouncer.store.delete(stale)
        self.stack.psql("DELETE FROM users WHERE id LIKE 'demo-%'")
        self.cube.build(PRECISE_TENANT, ["Users"], spacer=self.spacer)
        before = self.cube.partition_tables(PRECISE_TENANT, PRECISE_TABLE)
        say(f"   ENTITY_CUBE_MAP routes User to {PRECISE_TARGET} by timeHints.createdAt, monthly")
        say(f"   {PRECISE_TARGET} for {PRECISE_TENANT}: {_plural(len(before), 'monthly partition')} built")
        today = datetime.now(UTC).date()
        index = today.year * 12 + today.month - 1 - 14
        when = datetime(index // 12, index % 12 + 1, 15, 12, tzinfo=UTC)
        last_day = (when.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
        month = [when.strftime("%Y-%m-01"), last_day.strftime("%Y-%m-%d")]
        query = {"measures": ["Users.count"], "timeDimensions": [{"dimension": "Users.createdAt", "dateRange": month}]}
        served = int(self.cube.load(PRECISE_TENANT, query)["data"][0]["Users.count"])
        user_id = f"demo-{PRECISE_TENANT}-{time.time_ns() // 1000}"
        self.stack.psql(
            f"INSERT INTO users (id, tenant_id, status, created_at) VALUES ('{user_id}', '{PRECISE_TENANT}', "  # noqa: S608
            f"'active', '{when.strftime('%Y-%m-%d %H:%M:%S')}')"
        )
        say(f"   + a user created {when:%Y-%m-%d} is inserted; Cube serves {when:%B %Y} signups = {served} (stale)")
        value = {
            "eventType": "ENTITY_CREATED",
            "entityType": "User",
            "entityId": user_id,
            "tenantId": PRECISE_TENANT,
            "timestamp": int(time.time() * 1000),
            "timeHints": {"createdAt": {"new": when.isoformat()}},
        }
        say(f"   event: ENTITY_CREATED with timeHints.createdAt.new = {when.isoformat()}")
        from preagg_cli.local import build_msk_event  # noqa: PLC0415

        sent = time.monotonic()
        response = self._handle(build_msk_event([value]), None, service=service, settings=settings)
        tokens = sorted({t for k in service.last.keys for t in k.job_tokens})
        for outcome in service.last.keys:
            say(f"   key {outcome.key.pk}: {outcome.status} -> {_plural(len(outcome.job_tokens), 'job')}")
        self.cube.wait_for_jobs(PRECISE_TENANT, tokens)
        took = time.monotonic() - sent  # event handled, job posted, partition built
        after = self.cube.partition_tables(PRECISE_TENANT, PRECISE_TABLE)
        rebuilt = sorted(p for p in after if after[p] - before.get(p, set()))  # a new table: rebuilt
        kept = len(before) - len(rebuilt)
        say(
            f"   {len(rebuilt)} of {len(before)} partitions rebuilt ({', '.join(rebuilt)}) {took:.1f} s after the"
            f" event; the other {kept} kept their tables (same names and build times)"
        )
        fresh = int(self.cube.load(PRECISE_TENANT, query)["data"][0]["Users.count"])
        say(f"   Cube now serves {when:%B %Y} signups = {fresh} (was {served})")
        self._report_response(response, 0)
        say()
        say(
            f"{PRECISE_TENANT}: {len(rebuilt)} of {len(before)} partitions rebuilt for one mutation "
            f"(a whole-target refresh rebuilds all {len(before)})"
        )
        return len(rebuilt) == 1


def _story_of(demo: Demo) -> bool:
    """The demo's steps, in order; True when the partition-precise step rebuilt exactly one partition."""
    served = [("before", demo.setup())]
    demo.add_user("a user signs up")
    demo.play("user-updated.json", "the user-updated event of that sign-up (tenant-1, User)")
    served.append(("1) the leading refresh", demo.cube.count(STORY_TENANT).value))
    say(f"   Cube now serves {STORY_TENANT} Users.count = {served[-1][1]} (was {served[0][1]})")
    demo.add_user("another user signs up while a burst arrives")
    held = demo.play("burst-3-tenants.json", "a burst: 36 mutations of Users, Tenants, Groups for 3 tenants")
    served.append(("2) the burst, refreshed at once (the window had ended)", demo.cube.count(STORY_TENANT).value))
    demo.trailing(held)
    served.append(("3) the trailing refresh", demo.cube.count(STORY_TENANT).value))
    say()
    say(f"{STORY_TENANT} Users.count served by Cube: {_story(served)}")
    demo.wait_for_windows("mixed-bad-records.json")
    demo.play("mixed-bad-records.json", "bad records mixed with good ones")
    return demo.precise()


def _story(served: Sequence[tuple[str, int]]) -> str:
    """`20 before -> 21 after 1) ... -> 22 after 3) ...`: only the steps that changed what Cube serves."""
    text = f"{served[0][1]} {served[0][0]}"
    for (_, previous), (step, value) in itertools.pairwise(served):
        if value != previous:
            text += f" -> {value} after {step}"
    return text


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def run(window_ms: int, keep_running: bool) -> int:
    stack = Stack()
    say("preagg-refresh demo: the Lambda handler against a local PostgreSQL + Cube + DynamoDB (dynalite) + SQS (moto)")
    statuses = stack.status()
    down = [name for name in SERVICES if not statuses[name].up]
    installed = (stack.pg_data / "PG_VERSION").exists() and (stack.cube_dir / "node_modules").is_dir()
    # The demo delivers its trailing refreshes itself: a running local SQS event source would take them.
    esm_paused = statuses["esm"].up
    began = time.monotonic()
    try:
        if esm_paused:
            stack.stop_service("esm")
        env = stack.start()
    except StackError as error:
        print(f"demo: the local stack did not start:\n{error}", file=sys.stderr)
        return 1
    if not down:
        kind = "already running"
    elif installed:
        kind = f"started {', '.join(down)}"
    else:
        kind = f"first run: installed Cube from npm, created the PostgreSQL cluster, started {', '.join(down)}"
    say(f"stack ready in {time.monotonic() - began:.1f} s ({kind})")
    if esm_paused:
        say("   (the local event sources are paused while the demo delivers its own trailing refreshes)")
    ok = False
    try:
        ok = _story_of(Demo(stack, env, window_ms))
    except (CubeApiError, StackError, TimeoutError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
    finally:
        if down and not keep_running:
            stack.stop()
            say("stack stopped (the demo started it)")
        else:
            if esm_paused:
                stack.start_service("esm")
            say("the stack is still running; stop it with `make stack-stop`")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__)
    parser.add_argument("--window-ms", type=int, default=5000, help="debounce window (default 5000)")
    parser.add_argument("--keep-running", action="store_true", help="leave a stack the demo started running")
    args = parser.parse_args(argv)
    return run(args.window_ms, args.keep_running)


if __name__ == "__main__":
    sys.exit(main())
