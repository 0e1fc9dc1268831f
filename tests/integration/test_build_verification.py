"""From queued to built, against the real local stack: each refresh's jobs are verified with Cube's
`get` action until done, a build that really fails in PostgreSQL, a job lost to a Cube restart and a
stuck build are re-triggered and end built, and FreshnessLag is measured. The verify and retrigger
messages are delivered from the stack's SQS queue the way the event source mapping would
(`devstack.observe.deliver_queue_messages`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from devstack import Stack, StackEnv, StackError
from devstack.cubeapi import CubeApi
from devstack.observe import deliver_queue_messages
from handler.adapters.dynamodb import DynamoDBDebounceStore
from handler.domain import verify
from handler.domain.model import RefreshKey
from handler.domain.ports import BuildRecord

from .conftest import Function, Rows, aws, msk, mutation

pytestmark = pytest.mark.integration

W_MS = 2_000


def pump(
    fn: Function, stack: Stack, tenant: str, until: Callable[[], bool], since: int, *, timeout_s: float = 60.0
) -> list[str]:
    """Deliver the tenant's queue messages sent since `since` until `until()`; the kinds delivered."""
    env = stack.env()
    kinds: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            state = fn.state(tenant, "Users")
            raise AssertionError(f"timed out after {timeout_s:.0f} s; delivered {kinds}; key state {state}")
        kinds += [b["kind"] for b in deliver_queue_messages(env, fn.handle, tenant, since_ms=since)]
    return kinds


def restart(stack: Stack, timeout_s: float = 20.0) -> None:
    """Start Cube again once its port is free (a stopped Node server can hold it a moment longer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stack.start_service("cube")
            return
        except StackError as error:
            if "in use" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def recorded(fn: Function, tenant: str, status: str) -> Callable[[], bool]:
    """Whether the key's last recorded build outcome is `status`."""

    def check() -> bool:
        state = fn.state(tenant, "Users")
        return bool(state and state.build_status == status)

    return check


def built(fn: Function, tenant: str, since: int) -> Callable[[], bool]:
    def check() -> bool:
        state = fn.state(tenant, "Users")
        return bool(state and state.build_status == "done" and (state.build_started_at or 0) >= since)

    return check


def test_refresh_is_verified_built_with_the_new_row_and_freshness_lag_within_bound(
    make_function, stack: Stack, cube_api: CubeApi, rows: Rows
) -> None:
    fn = make_function()
    fn.reset("tenant-3", "Users")
    rows.add_user("tenant-3")
    expected = rows.source_count("tenant-3")
    began = int(time.time() * 1000)

    assert fn.handle(msk(mutation("tenant-3"))) == {"batchItemFailures": []}
    kinds = pump(fn, stack, "tenant-3", built(fn, "tenant-3", began), began)

    assert kinds == ["verify"], "one Cube `get` settles a quick build"
    assert cube_api.count("tenant-3").value == expected, "the rebuilt rollup serves the new row"
    state = fn.state("tenant-3", "Users")
    assert state is not None and state.build_failures == 0
    [lag] = fn.telemetry.timings["FreshnessLag"]
    [build] = fn.telemetry.timings["BuildDuration"]
    assert lag == state.freshness_lag_ms
    # W + eps + build time: no debounce wait here (a leading refresh), the first poll comes 2 s after
    # the POST (whole-second SQS delay), the receive waits up to 1 s; eps bounded at 5 s locally.
    assert build <= lag <= W_MS + 5_000 + build, (lag, build)
    assert fn.telemetry.counts["BuildsSucceeded"] == 1


def test_build_failing_in_postgresql_is_retriggered_after_the_fix_and_ends_built(
    make_function, stack: Stack, cube_api: CubeApi, rows: Rows, sabotage
) -> None:
    fn = make_function()
    fn.reset("tenant-b", "Users")
    sabotage("tenant-b", "fail", 1)  # the first build fails in the database, the re-trigger's does not
    rows.add_user("tenant-b")
    expected = rows.source_count("tenant-b")
    began = int(time.time() * 1000)

    assert fn.handle(msk(mutation("tenant-b"))) == {"batchItemFailures": []}

    pump(fn, stack, "tenant-b", recorded(fn, "tenant-b", "failed"), began)
    state = fn.state("tenant-b", "Users")
    assert state is not None
    assert (state.build_failure_class, state.build_failures) == ("failure", 1)
    assert "permission denied for schema pre_aggregations_tenant_b" in (state.build_error or "")
    assert state.retrigger_due_at is not None

    kinds = pump(fn, stack, "tenant-b", built(fn, "tenant-b", began), began)

    assert kinds[0] == "retrigger" and kinds[-1] == "verify"
    state = fn.state("tenant-b", "Users")
    assert state is not None and state.build_failures == 0
    assert fn.telemetry.counts["BuildsFailed[FailureClass=failure]"] == 1
    assert fn.telemetry.counts["BuildsRetriggered"] == 1
    [lag] = fn.telemetry.timings["FreshnessLag"]
    assert lag >= state.build_seen_at - state.build_started_at  # measured from the mutation, not the retry
    assert cube_api.count("tenant-b").value == expected
    assert fn.posts == 2


def dead_letters(stack_env: StackEnv, tenant: str) -> list[dict[str, Any]]:
    """Take the tenant's build dead letters off the trailing DLQ (others are left for 1 s)."""
    sqs = aws("sqs", stack_env)
    found: list[dict[str, Any]] = []
    while True:
        answer = sqs.receive_message(
            QueueUrl=stack_env.build_dead_letter_queue_url, MaxNumberOfMessages=10, VisibilityTimeout=1
        )
        messages = answer.get("Messages", [])
        if not messages:
            return found
        for message in messages:
            body = json.loads(message["Body"])
            if body.get("tenantId") == tenant and body.get("deadLettered"):
                found.append(body)
                sqs.delete_message(
                    QueueUrl=stack_env.build_dead_letter_queue_url, ReceiptHandle=message["ReceiptHandle"]
                )


def test_build_that_never_heals_is_dead_lettered_and_alarmed_then_a_replay_after_the_fix_gets_a_fresh_budget(
    make_function, stack: Stack, stack_env: StackEnv, cube_api: CubeApi, rows: Rows, sabotage, monkeypatch
) -> None:
    # The re-trigger backoff (2 s to 120 s) compressed to 1 s each: the same 5 re-triggers, in seconds.
    monkeypatch.setattr(verify, "RETRIGGER_DELAYS_MS", (1_000,) * verify.MAX_RETRIGGERS)
    fn = make_function()
    fn.reset("tenant-b", "Users")
    dead_letters(stack_env, "tenant-b")  # left by an earlier run
    sabotage("tenant-b", "fail", 10_000)  # every build fails in the database until the fix
    rows.add_user("tenant-b")
    expected = rows.source_count("tenant-b")
    began = int(time.time() * 1000)

    assert fn.handle(msk(mutation("tenant-b"))) == {"batchItemFailures": []}

    kinds = pump(fn, stack, "tenant-b", recorded(fn, "tenant-b", "dead_lettered"), began, timeout_s=150)
    state = fn.state("tenant-b", "Users")
    assert state is not None and state.build_failures == verify.MAX_RETRIGGERS + 1
    assert kinds.count("retrigger") == verify.MAX_RETRIGGERS, kinds
    assert fn.telemetry.counts["BuildsRetriggered"] == verify.MAX_RETRIGGERS
    assert fn.telemetry.counts["BuildsDeadLettered"] == 1  # the build-failed alarm's metric
    [letter] = dead_letters(stack_env, "tenant-b")
    assert (letter["kind"], letter["failureClass"], letter["targets"][0]["target"]) == ("retrigger", "failure", "Users")
    assert "permission denied for schema pre_aggregations_tenant_b" in letter["error"]

    # The fix leaves one more failure to ride out; the replay (the DLQ redriven to the refresh queue)
    # gets a fresh budget: re-trigger 1, then built. Without it the replay would be dead-lettered again.
    sabotage("tenant-b", "fail", 1)
    replayed = int(time.time() * 1000)
    aws("sqs", stack_env).send_message(QueueUrl=stack_env.refresh_queue_url, MessageBody=json.dumps(letter))
    kinds = pump(fn, stack, "tenant-b", built(fn, "tenant-b", replayed), replayed, timeout_s=60)

    assert kinds[0] == "retrigger" and "verify" in kinds, kinds
    state = fn.state("tenant-b", "Users")
    assert state is not None and state.build_failures == 0
    assert fn.telemetry.counts["BuildsDeadLettered"] == 1, "the replay's failure was re-triggered, not dead-lettered"
    assert fn.telemetry.counts["BuildsRetriggered"] == verify.MAX_RETRIGGERS + 1
    assert cube_api.count("tenant-b").value == expected
    assert dead_letters(stack_env, "tenant-b") == []


def test_jobs_lost_to_a_cube_restart_are_not_found_then_retriggered_and_built(
    make_function, stack: Stack, cube_api: CubeApi, rows: Rows
) -> None:
    fn = make_function()
    fn.reset("tenant-1", "Users")
    rows.add_user("tenant-1")
    expected = rows.source_count("tenant-1")
    began = int(time.time() * 1000)

    assert fn.handle(msk(mutation("tenant-1"))) == {"batchItemFailures": []}
    stack.stop_service("cube")  # job tokens live in Cube's memory: the restart forgets them
    restart(stack)

    kinds = pump(fn, stack, "tenant-1", built(fn, "tenant-1", began), began)

    assert kinds[:2] == ["verify", "retrigger"], kinds
    assert fn.telemetry.counts["BuildsFailed[FailureClass=not_found]"] == 1
    assert fn.telemetry.counts["BuildsSucceeded"] == 1
    assert cube_api.count("tenant-1").value == expected


def test_stuck_build_times_out_at_the_build_deadline_is_retriggered_and_built(
    make_function, stack: Stack, cube_api: CubeApi, rows: Rows, sabotage
) -> None:
    fn = make_function(CUBE_PREAGG_BUILD_TIMEOUT_MS="2000")
    fn.reset("tenant-2", "Users")
    sabotage("tenant-2", "stall", 1, 5)  # the first build hangs 5 s in the database
    rows.add_user("tenant-2")
    expected = rows.source_count("tenant-2")
    began = int(time.time() * 1000)

    assert fn.handle(msk(mutation("tenant-2"))) == {"batchItemFailures": []}
    kinds = pump(fn, stack, "tenant-2", built(fn, "tenant-2", began), began)

    assert "retrigger" in kinds, kinds
    assert fn.telemetry.counts["BuildsFailed[FailureClass=timeout]"] >= 1
    assert cube_api.count("tenant-2").value == expected


def test_duplicate_verifications_racing_on_dynalite_settle_a_refresh_once(make_function, stack_env) -> None:
    """16 threads (own boto3 clients) record outcomes of the same refresh, and of an older one, at once:
    dynalite's conditional write lets exactly one of the newest win and none of the older."""
    fn = make_function()
    key = RefreshKey("tenant-3", "Groups")
    fn.reset("tenant-3", "Groups")
    now = int(time.time() * 1000)
    fn.store.claim(key, now=now, window_ms=W_MS, claim_token="c", expires_at=now // 1000 + 3600)
    stores = [DynamoDBDebounceStore(aws("dynamodb", stack_env), stack_env.debounce_table_name) for _ in range(16)]

    def settle(i: int) -> bool:
        started = now if i % 2 == 0 else now - 1_000  # half of them verify an older refresh
        record = BuildRecord(started, "failed", now + i, failure_class="not_found", failures=1)
        return stores[i].record_build(key, record)

    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(settle, range(16)))

    state = fn.state("tenant-3", "Groups")
    assert state is not None and state.build_started_at == now
    assert sum(won[0::2]) == 1, won
    assert sum(won[1::2]) <= 1  # an older one may land first, never after the newer one
    fn.reset("tenant-3", "Groups")
