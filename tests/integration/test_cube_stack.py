"""End to end against the local stack: MSK events through `handler.app.handle` with the real adapters
(dynalite, moto server SQS and Secrets Manager, a real Cube over PostgreSQL), checked from outside:
Cube's jobs API, `/v1/load`, the rollup tables in PostgreSQL, the debounce item and the SQS queue."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from devstack import Stack, StackEnv
from devstack.cubeapi import CubeApi
from devstack.observe import as_sqs_event, delete_messages, receive_trailing
from handler.domain.decode import decode_msk_event
from handler.domain.routing import EntityCubeMap
from handler.wiring import now_ms
from tests.builders import sample_events

from .conftest import (
    LogCapture,
    Rows,
    all_refs,
    aws,
    msk,
    mutation,
    settle_builds,
    wait_until,
)

pytestmark = pytest.mark.integration

EVENTS = Path(__file__).resolve().parents[2] / "events"
MSK_SAMPLES = sorted(p.name for p in sample_events() if json.loads(p.read_text()).get("eventSource") == "aws:kafka")
# The bad records of events/mixed-bad-records.json (README: one of each kind); the unmapped `Invoice`
# record and the good ones are acknowledged.
TOPIC = "core.entities.lifecycle.mutated"
DOCUMENTED_INVALID = {
    "mixed-bad-records.json": [(f"{TOPIC}-0", 100), (f"{TOPIC}-0", 101)]
    + [(f"{TOPIC}-1", offset) for offset in range(101, 107)],
}


def statuses(fn: Any) -> list[tuple[str, str]]:
    return [(k.key.pk, k.status) for k in fn.service.last.keys]


def new_main_table(cube_api: CubeApi, tenant: str, before: set[str]) -> str:
    created = sorted(t for t in cube_api.tables(tenant) - before if t.startswith("users_main_"))
    assert len(created) == 1, f"expected one new users_main table for {tenant}, got {created}"
    return created[0]


def test_mutation_rebuilds_the_tenants_rollup_and_nothing_else(make_function, cube_api: CubeApi, rows: Rows) -> None:
    fn = make_function()
    fn.reset("tenant-a", "Users")
    served_before = cube_api.count("tenant-a")
    assert "Users.main" in served_before.preaggs, served_before
    tables_a, tables_b = cube_api.tables("tenant-a"), cube_api.tables("tenant-b")

    rows.add_user("tenant-a")
    expected = rows.source_count("tenant-a")
    assert served_before.value == expected - 1
    assert cube_api.count("tenant-a").value == expected - 1, "Cube serves the rollup: stale until rebuilt"

    response = fn.handle(msk(mutation("tenant-a")))

    assert response == {"batchItemFailures": []}
    assert statuses(fn) == [("tenant-a#Users", "refreshed")]
    tokens = fn.tokens("tenant-a")
    assert tokens and fn.service.last.keys[0].job_tokens == tuple(tokens)
    jobs = cube_api.wait_for_jobs("tenant-a", tokens)
    assert set(jobs.statuses.values()) == {"done"}

    main = new_main_table(cube_api, "tenant-a", tables_a)
    assert f"pre_aggregations_tenant_a.{main}" in jobs.tables.values()
    assert cube_api.rollup_count("tenant-a", main) == expected

    def served_new() -> bool:
        served = cube_api.count("tenant-a")
        return served.value == expected and served.preaggs["Users.main"] > served_before.preaggs["Users.main"]

    wait_until(served_new, 30, "Cube to serve the rebuilt Users.main with the new row")
    assert cube_api.tables("tenant-b") == tables_b, "tenant B's rollups must not be touched"


def test_debounce_window_then_trailing_refresh_end_to_end(
    make_function, cube_api: CubeApi, rows: Rows, stack_env: StackEnv
) -> None:
    window = 2500
    fn = make_function(CUBE_PREAGG_DEBOUNCE_MS=str(window))
    fn.reset("tenant-1", "Users")

    assert fn.handle(msk(mutation("tenant-1"))) == {"batchItemFailures": []}
    assert statuses(fn) == [("tenant-1#Users", "refreshed")]
    leading_tokens = fn.tokens("tenant-1")
    posts = fn.posts
    # Inside the window (the debounce item's startedAt was just set): no Cube call, a trailing refresh.
    response = fn.handle(msk(mutation("tenant-1")))
    assert response == {"batchItemFailures": []}
    assert fn.posts == posts, "a mutation inside the window must not call Cube"
    assert statuses(fn) == [("tenant-1#Users", "debounced")]
    assert fn.telemetry.counts.get("TrailingScheduled") == 1
    state = fn.state("tenant-1", "Users")
    assert state is not None and state.started_at is not None
    assert state.trailing_state == "scheduled" and state.trailing_token
    assert state.trailing_due_at == state.started_at + window
    cube_api.wait_for_jobs("tenant-1", leading_tokens)

    # A row lands after the leading build: only the trailing refresh can make Cube serve it.
    tables = cube_api.tables("tenant-1")
    served = cube_api.count("tenant-1")
    rows.add_user("tenant-1")
    expected = rows.source_count("tenant-1")
    assert served.value == expected - 1

    [message] = receive_trailing(stack_env, [state.trailing_token])
    body = json.loads(message["Body"])
    assert body == {
        "kind": "trailing",
        "tenantId": "tenant-1",
        "target": "Users",
        "token": state.trailing_token,
        "dueAt": state.trailing_due_at,
        "attempt": 0,
    }
    assert cube_api.tables("tenant-1") == tables, "nothing was built while the window was open"
    # The leading build's verification (the event source delivers it 2 s after the POST) settles it:
    # no second build of the key is posted while the first is in Cube. Settling may also fire the
    # trailing refresh at once if its window is over by then (a wake); else its own message does.
    settle_builds(fn, stack_env, "tenant-1")
    wait_until(lambda: now_ms() >= body["dueAt"], 10, "the trailing refresh's due time")

    response = fn.handle(as_sqs_event([message], stack_env))

    assert response == {"batchItemFailures": []}
    trailing = [k for o in fn.service.outcomes for k in o.keys if (k.status, k.detail) == ("refreshed", "trailing")]
    assert [k.key.pk for k in trailing] == ["tenant-1#Users"], "exactly one trailing refresh"
    assert fn.posts == posts + 1
    delete_messages(stack_env, [message])
    cube_api.wait_for_jobs("tenant-1", trailing[0].job_tokens)
    assert cube_api.rollup_count("tenant-1", new_main_table(cube_api, "tenant-1", tables)) == expected
    wait_until(lambda: cube_api.count("tenant-1").value == expected, 30, "Cube to serve the trailing rebuild")
    after = fn.state("tenant-1", "Users")
    assert after is not None and after.trailing_token is None and after.claim_token is not None
    assert after.started_at is not None

    # After the window (and the trailing build's verification) a mutation refreshes at once again.
    settle_builds(fn, stack_env, "tenant-1")
    ends = after.window_ends_at or after.started_at + window  # the key's window (adaptive: at least W)
    wait_until(lambda: now_ms() > ends, 30, "the window to pass")
    assert fn.handle(msk(mutation("tenant-1"))) == {"batchItemFailures": []}
    assert statuses(fn) == [("tenant-1#Users", "refreshed")]
    assert fn.posts == posts + 2
    cube_api.wait_for_jobs("tenant-1", fn.service.last.keys[0].job_tokens)


def test_wrong_secret_fails_the_records_names_the_403_and_releases_the_claim(
    make_function, cube_api: CubeApi, stack_env: StackEnv, service_logs: LogCapture
) -> None:
    sm = aws("secretsmanager", stack_env)
    name = f"preagg-refresh/wrong-cube-secret-{uuid.uuid4().hex[:8]}"
    arn = sm.create_secret(Name=name, SecretString=uuid.uuid4().hex)["ARN"]
    try:
        fn = make_function(CUBE_API_SECRET_ARN=arn)
        fn.reset("tenant-3", "Users")
        tables = cube_api.tables("tenant-3")
        event = msk(mutation("tenant-3"), mutation("tenant-3"))

        response = fn.handle(event)

        assert response == {"batchItemFailures": all_refs(event)}
        [key] = fn.service.last.keys
        assert key.status == "failed"
        assert "403" in key.detail and "Invalid token" in key.detail, key.detail
        logs = service_logs.text()
        assert "cube refused or failed the refresh" in logs and "Invalid token" in logs and "403" in logs, logs
        state = fn.state("tenant-3", "Users")
        assert state is not None and state.claim_token is None and state.started_at is None, state
        assert fn.telemetry.counts.get("ClaimsReleased") == 1
        assert cube_api.tables("tenant-3") == tables
    finally:
        sm.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)


def test_cube_down_fails_and_releases_then_redelivery_builds_at_once(
    make_function, cube_api: CubeApi, stack: Stack, stack_env: StackEnv
) -> None:
    # A long window: the redelivery can only refresh at once if the failed claim was released.
    fn = make_function(CUBE_PREAGG_DEBOUNCE_MS="600000")
    fn.reset("tenant-2", "Users")
    previous = now_ms() - 3_600_000  # an earlier refresh, well outside the window
    aws("dynamodb", stack_env).put_item(
        TableName=stack_env.debounce_table_name,
        Item={
            "pk": {"S": "tenant-2#Users"},
            "tenantId": {"S": "tenant-2"},
            "target": {"S": "Users"},
            "startedAt": {"N": str(previous)},
            "expiresAt": {"N": str(previous // 1000 + 86_400)},
        },
    )
    event = msk(mutation("tenant-2"), mutation("tenant-2"))

    stack.stop_service("cube")
    try:
        response = fn.handle(event)
        assert response == {"batchItemFailures": all_refs(event)}
        [key] = fn.service.last.keys
        assert key.status == "failed" and key.detail.startswith("connection:"), key.detail
        state = fn.state("tenant-2", "Users")
        assert state is not None and state.claim_token is None and state.started_at == previous, state
    finally:
        stack.start_service("cube")

    tables = cube_api.tables("tenant-2")
    response = fn.handle(event)  # the same batch, redelivered

    assert response == {"batchItemFailures": []}
    assert statuses(fn) == [("tenant-2#Users", "refreshed")]
    jobs = cube_api.wait_for_jobs("tenant-2", fn.service.last.keys[0].job_tokens)
    assert set(jobs.statuses.values()) == {"done"}
    new_main_table(cube_api, "tenant-2", tables)


@pytest.mark.parametrize("name", MSK_SAMPLES)
def test_sample_event_through_the_stack(name: str, make_function, cube_api: CubeApi) -> None:
    fn = make_function()
    event = json.loads((EVENTS / name).read_text())
    routes = EntityCubeMap()
    keys = {
        (m.tenant_id, t)
        for _, m in decode_msk_event(event, now_ms=now_ms()).mutations
        for t in routes.targets_for(m.entity_type)
    }
    for tenant, target in keys:
        fn.reset(tenant, target)

    response = fn.handle(event)

    invalid = DOCUMENTED_INVALID.get(name, [])
    assert response == {
        "batchItemFailures": [{"itemIdentifier": {"partition": p, "offset": o}} for p, o in sorted(invalid)]
    }
    assert sorted(statuses(fn)) == sorted((f"{t}#{c}", "refreshed") for t, c in keys)
    for call in fn.service.recorder.calls:
        jobs = cube_api.wait_for_jobs(call.tenant_id, call.tokens)
        assert set(jobs.statuses.values()) == {"done"}, (call.tenant_id, jobs.statuses)
    assert {c.tenant_id for c in fn.service.recorder.calls} == {t for t, _ in keys}
