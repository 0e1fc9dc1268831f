"""Load-aware refresh against the real local Cube (docs/load-aware.md): Cube's build queue saturated
by another tenant's builds held in PostgreSQL (the local Cube builds 2 jobs at a time: the PostgreSQL
driver's default concurrency), a later mutation rides along with a build still waiting in Cube's
queue (one POST, and the build serves the row committed before that mutation), a build that waits
longer than the build timeout is alive (not failed, not re-triggered), and a shared build budget
makes a second tenant wait for the first's build, then serves it. Queue messages are delivered from
the stack's SQS queue the way the event source mapping would (`devstack.observe`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from devstack import Stack
from devstack.cubeapi import CubeApi
from devstack.observe import deliver_queue_messages

from .conftest import Function, Rows, msk, mutation, wait_until

pytestmark = pytest.mark.integration

W_MS = 2_000
BUSY = "tenant-a"  # its builds hold Cube's two build workers


def posts_for(fn: Function, tenant: str) -> int:
    return sum(1 for call in fn.service.recorder.calls if call.tenant_id == tenant)


def deliver(
    fn: Function, stack: Stack, tenant: str, until: Callable[[], bool], since: int, *, timeout_s: float = 90.0
) -> list[str]:
    """Deliver the tenant's queue messages (verify, trailing, retrigger) sent since `since` (earlier
    ones, left by other tests, are deleted) until `until()`."""
    env = stack.env()
    kinds: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; delivered {kinds}; key {fn.state(tenant, 'Users')}")
        delivered = deliver_queue_messages(env, fn.handle, tenant, visibility_s=5, since_ms=since)
        kinds += [b["kind"] for b in delivered]
    return kinds


def now_ms() -> int:
    return int(time.time() * 1000)


def saturate(fn: Function, sabotage: Callable[[str, str, int, int], None], stalls: int = 4, stall_s: int = 4) -> None:
    """Post BUSY's build with its first `stalls` table builds held `stall_s` each in PostgreSQL: both of
    Cube's build workers are busy for about stalls / 2 x stall_s seconds."""
    fn.reset(BUSY, "Users")
    sabotage(BUSY, "stall", stalls, stall_s)
    assert fn.handle(msk(mutation(BUSY))) == {"batchItemFailures": []}
    assert posts_for(fn, BUSY) == 1


def test_mutation_rides_along_with_a_build_waiting_in_cubes_queue_and_a_long_wait_is_not_a_failure(
    make_function, stack: Stack, cube_api: CubeApi, rows: Rows, sabotage
) -> None:
    # The build timeout is shorter than the wait: a build still `scheduled` is alive, the timeout
    # counts from its start. (Before, it failed as `timeout` at 4 s and was posted again.)
    fn = make_function(CUBE_PREAGG_DEBOUNCE_MS=str(W_MS), CUBE_PREAGG_BUILD_TIMEOUT_MS="4000")
    began = now_ms()
    tenant = "tenant-2"
    fn.reset(tenant, "Users")
    saturate(fn, sabotage)
    rows.add_user(tenant)
    assert fn.handle(msk(mutation(tenant))) == {"batchItemFailures": []}  # queued behind BUSY's builds
    assert posts_for(fn, tenant) == 1
    # A row committed after that POST, then its mutation: the queued build has not read yet.
    rows.add_user(tenant)
    expected = rows.source_count(tenant)
    assert fn.handle(msk(mutation(tenant))) == {"batchItemFailures": []}
    assert [k.status for k in fn.service.last.keys] == ["debounced"]

    def built() -> bool:
        state = fn.state(tenant, "Users")
        return bool(state and state.build_status == "done" and state.trailing_token is None)

    deliver(fn, stack, tenant, built, began)

    counts = fn.telemetry.counts
    assert posts_for(fn, tenant) == 1, "the second mutation rode along: no second POST"
    assert counts.get("RideAlongs") == 1
    assert not any(k.startswith(("BuildsFailed", "BuildsRetriggered")) for k in counts), counts
    assert max(fn.telemetry.timings["QueuedBuildAge"]) > 4_000, "it waited longer than the build timeout"
    wait_until(lambda: cube_api.count(tenant).value == expected, 30, "Cube to serve both rows")


def test_over_budget_a_tenant_waits_for_the_first_build_then_is_built(
    make_function, stack: Stack, cube_api: CubeApi, rows: Rows, sabotage
) -> None:
    # A budget of 1: BUSY's build takes it and leaves no room for tenant-3's.
    fn = make_function(CUBE_PREAGG_DEBOUNCE_MS=str(W_MS), CUBE_PREAGG_BUILD_BUDGET="1")
    began = now_ms()
    tenant = "tenant-3"
    fn.reset(tenant, "Users")
    for slot in fn.store.budget_slots(
        "global", 1
    ):  # an earlier run's lapsed leases are free anyway; a live one would be a leak
        assert slot.free(now_ms()), slot
    saturate(fn, sabotage, stalls=2, stall_s=3)
    rows.add_user(tenant)
    expected = rows.source_count(tenant)

    assert fn.handle(msk(mutation(tenant))) == {"batchItemFailures": []}

    assert [k.status for k in fn.service.last.keys] == ["deferred"], "no POST while the budget is spent"
    assert posts_for(fn, tenant) == 0
    assert fn.state(tenant, "Users").waiting_since is not None  # type: ignore[union-attr]

    def busy_settled() -> bool:
        state = fn.state(BUSY, "Users")
        return bool(state and state.build_status == "done" and state.inflight_until is None)

    def built() -> bool:
        state = fn.state(tenant, "Users")
        return bool(state and state.build_status == "done")

    deliver(fn, stack, BUSY, busy_settled, began)  # settling BUSY's build frees the budget, wakes tenant-3
    deliver(fn, stack, tenant, built, began)

    assert posts_for(fn, tenant) == 1 and fn.telemetry.counts["KeysDeferred"] >= 1
    busy_done = fn.state(BUSY, "Users").build_seen_at  # type: ignore[union-attr]
    assert fn.state(tenant, "Users").build_started_at >= busy_done  # type: ignore[union-attr,operator]
    wait_until(lambda: cube_api.count(tenant).value == expected, 30, "Cube to serve the waiting tenant's row")
    assert all(slot.free(now_ms()) for slot in fn.store.budget_slots("global", 1)), "every lease was freed"
