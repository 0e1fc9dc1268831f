"""Load-aware refresh over in-memory fakes and a fake clock (docs/load-aware.md): the in-flight gate,
riding along with a queued build, waking what a settled build held back, the shared build budget
(leases, waiting oldest first, lapsed leases) and the adaptive window."""

from __future__ import annotations

from collections.abc import Sequence

from handler.adapters.memory import RecordingCube
from handler.domain.admission import LEASE_MS, Admission, Request
from handler.domain.decode import decode_msk_event
from handler.domain.errors import CubeError
from handler.domain.model import RecordRef, RefreshKey, Selector
from handler.domain.ports import CubeAnswer, KeyState, TrailingMessage, Waiting
from handler.domain.service import Outcome
from handler.domain.verify import VerifyMessage
from handler.domain.window import Windows
from tests.builders import T0, Rig, msk_event, mutation

W = 10_000
USERS = RefreshKey("tenant-1", "Users")


def mutate(rig: Rig, tenant: str = "tenant-1", entity_type: str = "User") -> Outcome:
    batch = decode_msk_event(msk_event(mutation(tenant, entity_type, timestamp=rig.clock.now)), now_ms=rig.clock.now)
    return rig.service.process_mutations(batch.mutations, deadline_ms=rig.deadline)


def poll(rig: Rig) -> Outcome:
    """Deliver every verify message (whatever its due time) as Lambda would, at the current time."""
    ready = [m for _, m in rig.build_queue.messages if isinstance(m, VerifyMessage)]
    rig.build_queue.messages = [(d, m) for d, m in rig.build_queue.messages if not isinstance(m, VerifyMessage)]
    return rig.service.process_verify([(RecordRef("sqs", i), m) for i, m in enumerate(ready)], deadline_ms=rig.deadline)


def fire(rig: Rig) -> Outcome:
    """Deliver every trailing message (whatever its due time)."""
    ready, rig.scheduler.messages = rig.scheduler.messages, []
    return rig.service.process_trailing(
        [(RecordRef("sqs", i), m) for i, m in enumerate(ready)], deadline_ms=rig.deadline
    )


def posts(rig: Rig, tenant: str = "tenant-1") -> int:
    return sum(1 for t, _ in rig.cube.requests if t == tenant)


def state(rig: Rig, key: RefreshKey = USERS) -> KeyState:
    found = rig.store.get(key)
    assert found is not None
    return found


def gated_rig(**kw: object) -> Rig:
    """A key whose build Cube accepted at T0 and has not started."""
    rig = Rig(verify=True, window_ms=W, **kw)  # type: ignore[arg-type]
    rig.jobs.default = "scheduled"
    assert mutate(rig).by_status("refreshed")
    return rig


# --------------------------------------------------------------------------- the in-flight gate


def test_gate_a_mutation_after_the_window_while_the_build_is_in_cube_posts_nothing():
    rig = gated_rig()
    assert state(rig).gated(rig.clock.now)
    rig.clock.advance(W + 1)

    outcome = mutate(rig)

    assert posts(rig) == 1, "no second build of the key while the first is in Cube"
    assert [k.status for k in outcome.keys] == ["debounced"] and not outcome.failed
    assert state(rig).trailing_state == "scheduled"


def test_ride_along_a_poll_sent_after_the_mutation_finds_every_job_scheduled_so_it_needs_no_post():
    rig = gated_rig()
    rig.clock.advance(W + 1)
    mutate(rig)  # the mutation arrives while the build waits in Cube
    rig.clock.advance(2_000)
    poll(rig)  # sent after the mutation: still scheduled
    assert state(rig).queued_seen_at == rig.clock.now > (state(rig).dirty_at or 0)

    outcome = fire(rig)

    assert [k.detail for k in outcome.keys] == ["rides along with the key's queued build"]
    assert rig.telemetry.counts["RideAlongs"] == 1
    assert state(rig).trailing_token is None
    rig.jobs.default = "done"
    rig.clock.advance(4_000)
    poll(rig)
    assert state(rig).build_status == "done" and not state(rig).gated(rig.clock.now)
    assert posts(rig) == 1 and rig.scheduler.messages == []


def test_ride_along_not_for_a_mutation_newer_than_the_last_poll_it_waits_then_gets_its_own_build():
    rig = gated_rig()
    rig.clock.advance(2_000)
    poll(rig)  # scheduled, but before the mutation
    rig.clock.advance(W)
    mutate(rig)

    outcome = fire(rig)

    assert [k.status for k in outcome.keys] == ["rescheduled"], "not known covered yet: it waits"
    rig.jobs.default = "processing"
    rig.clock.advance(2_000)
    poll(rig)  # started: it may have read before the mutation
    assert [k.status for k in fire(rig).keys] == ["rescheduled"]
    assert posts(rig) == 1
    rig.jobs.default = "done"
    rig.clock.advance(2_000)
    settled = poll(rig)  # settling the build wakes the trailing refresh at once

    assert [k.status for k in settled.keys] == ["refreshed"]
    assert posts(rig) == 2 and rig.telemetry.counts["Wakes"] == 1


def test_ride_along_one_started_job_is_enough_to_lose_the_proof():
    rig = Rig(verify=True, window_ms=W, routes=_routes({"User": ["Users", "Users.extra"]}))
    rig.jobs.default = "scheduled"
    mutate(rig)
    [(_, message)] = rig.build_queue.messages
    assert isinstance(message, VerifyMessage)
    tokens = [tok for t in message.targets for tok in t.tokens]
    rig.jobs.statuses[tokens[0]] = "processing"
    rig.clock.advance(W + 1)
    mutate(rig)
    rig.clock.advance(2_000)
    poll(rig)

    outcome = fire(rig)

    assert not any(k.detail.startswith("rides along") for k in outcome.keys)
    assert "RideAlongs" not in rig.telemetry.counts


def test_gate_force_refresh_ignores_it():
    rig = gated_rig()
    outcome = rig.service.refresh_now("tenant-1", ["Users"], force=True, deadline_ms=rig.deadline)
    assert outcome.by_status("refreshed") and posts(rig) == 2


def test_gate_lapses_when_no_poll_renews_it():
    rig = gated_rig()
    rig.build_queue.messages.clear()  # the verification is lost (its message dead-lettered)
    rig.clock.advance(LEASE_MS)
    assert mutate(rig).by_status("refreshed") and posts(rig) == 2


def test_gate_a_retrigger_of_a_failed_build_after_a_newer_build_was_posted_posts_nothing():
    """The newer build was posted after the failed one was settled (the gate was down), so after every
    mutation the failed one covered or carried along: the re-trigger stops (`still_due`)."""
    rig = gated_rig()
    rig.jobs.default = "failure: permission denied"
    rig.clock.advance(2_000)
    poll(rig)  # failed: re-triggered (gate down, settled)
    [(_, retrigger)] = [(d, m) for d, m in rig.build_queue.messages if not isinstance(m, VerifyMessage)]
    rig.jobs.default = "scheduled"
    rig.clock.advance(W + 1)
    mutate(rig)  # a new mutation posts: a new build waits in Cube
    assert posts(rig) == 2
    rig.clock.advance(2_000)
    out = rig.service.process_retrigger([(RecordRef("sqs", 0), retrigger)], deadline_ms=rig.deadline)  # type: ignore[list-item]
    assert [k.status for k in out.keys] == ["skipped"] and posts(rig) == 2


# --------------------------------------------------------------------------- the build budget


def _routes(mapping: dict[str, list[object]]):
    from handler.domain.routing import EntityCubeMap  # noqa: PLC0415

    return EntityCubeMap(mapping)


def test_budget_admits_what_fits_and_defers_the_rest_with_their_records_acknowledged():
    rig = Rig(verify=True, window_ms=W, budget=2)
    rig.jobs.default = "scheduled"
    outcomes = [mutate(rig, tenant) for tenant in ("tenant-1", "tenant-2", "tenant-3")]

    assert [posts(rig, t) for t in ("tenant-1", "tenant-2", "tenant-3")] == [1, 1, 0]
    assert [k.status for k in outcomes[2].keys] == ["deferred"] and not outcomes[2].failed
    deferred = state(rig, RefreshKey("tenant-3", "Users"))
    assert deferred.trailing_state == "scheduled" and deferred.waiting_since is not None
    assert len(rig.scheduler.messages) == 1, "its trailing refresh carries it"
    assert rig.telemetry.counts["KeysDeferred"] == 1
    assert max(rig.telemetry.counts.get(k, 0) for k in ("BuildsInFlight",)) >= 1


def test_budget_freed_by_a_settled_build_goes_to_the_oldest_waiter_first():
    rig = Rig(verify=True, window_ms=W, budget=1)
    rig.jobs.default = "scheduled"
    mutate(rig, "tenant-1")  # holds the budget
    rig.clock.advance(1_000)
    mutate(rig, "tenant-2")  # deferred first: the oldest waiter
    rig.clock.advance(1_000)
    mutate(rig, "tenant-3")  # deferred second
    assert [posts(rig, t) for t in ("tenant-2", "tenant-3")] == [0, 0]
    rig.jobs.default = "done"
    rig.clock.advance(2_000)

    poll(rig)  # tenant-1's build is done: its slot goes to the oldest waiter, at once

    assert (posts(rig, "tenant-2"), posts(rig, "tenant-3")) == (1, 0)


def test_budget_a_new_key_does_not_overtake_older_waiters_it_wakes_them():
    rig = Rig(verify=True, window_ms=W, budget=1)
    rig.jobs.default = "scheduled"
    mutate(rig, "tenant-1")
    rig.clock.advance(1_000)
    mutate(rig, "tenant-2")  # waits
    # tenant-1's slot comes free without a wake (its verification is lost: the lease lapses), just
    # after tenant-2's own message came back and found no room (its registration renewed)
    rig.build_queue.messages.clear()
    rig.clock.advance(LEASE_MS - 2_000)
    assert [k.status for k in fire(rig).keys] == ["deferred"]
    rig.clock.advance(3_000)

    outcome = mutate(rig, "tenant-3")  # newer than tenant-2's wait

    assert [k.status for k in outcome.keys if k.key.tenant_id == "tenant-3"] == ["deferred"]
    assert posts(rig, "tenant-2") == 1, "the older waiter was woken and took the slot"
    assert posts(rig, "tenant-3") == 0


def test_budget_leases_are_renewed_by_polls_and_freed_when_settled():
    rig = Rig(verify=True, window_ms=W, budget=1)
    rig.jobs.default = "scheduled"
    mutate(rig)
    [slot] = rig.store.budget_slots("global", 1)
    assert slot.lease and slot.key == USERS.pk
    rig.clock.advance(LEASE_MS - 1_000)
    poll(rig)
    [renewed] = rig.store.budget_slots("global", 1)
    assert renewed.until == rig.clock.now + LEASE_MS
    rig.jobs.default = "done"
    rig.clock.advance(2_000)
    poll(rig)
    assert rig.store.budget_slots("global", 1)[0].free(rig.clock.now)


def test_budget_weight_is_the_keys_last_job_count_and_a_big_key_is_not_overtaken():
    store_rig = Rig(verify=True, window_ms=W, budget=3)
    admission = Admission(store_rig.store, store_rig.clock, store_rig.telemetry, 3)
    big, small = RefreshKey("t1", "Big"), RefreshKey("t2", "Small")
    first = admission.admit([Request(small, T0, 2)])
    decision = admission.admit([Request(big, T0 - 5, 3), Request(RefreshKey("t3", "Tiny"), T0, 1)])

    assert list(first.leases) == [small] and len(first.leases[small].slots) == 2
    assert decision.leases == {} and decision.deferred == [big, RefreshKey("t3", "Tiny")]


class _TwoJobsCube(RecordingCube):
    """Two jobs per target, as a whole `Users` refresh on the local stack (`main` and one partition)."""

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        answers = super().trigger(tenant_id, selectors, deadline_ms=deadline_ms)
        return [a if isinstance(a, CubeError) else [*a, *(f"{t}-part" for t in a)] for a in answers]


def test_budget_a_keys_first_refresh_weighs_the_jobs_its_targets_last_refresh_queued():
    rig = Rig(verify=True, window_ms=W, budget=4, cube=_TwoJobsCube())
    rig.jobs.default = "scheduled"
    mutate(rig, "tenant-1")  # nothing known yet: weighed 1 (1 slot), Cube queued 2
    rig.clock.advance(1_000)
    mutate(rig, "tenant-2")  # never refreshed: weighed as Users' last refresh, 2 (3 slots)
    rig.clock.advance(1_000)
    mutate(rig, "tenant-3")  # 2 more do not fit (weighed 1, as before, it was posted: 6 jobs in Cube)

    assert [posts(rig, t) for t in ("tenant-1", "tenant-2", "tenant-3")] == [1, 1, 0]
    assert state(rig, RefreshKey("tenant-3", "Users")).waiting_since is not None
    held = [s for s in rig.store.budget_slots("global", 4) if not s.free(rig.clock.now)]
    assert len(held) == 3, "the instance's first refresh of a target is still weighed 1"


def test_budget_zero_means_no_admission_control():
    rig = Rig(verify=True, window_ms=W, budget=0)
    rig.jobs.default = "scheduled"
    for tenant in ("tenant-1", "tenant-2", "tenant-3"):
        mutate(rig, tenant)
    assert len(rig.cube.requests) == 3 and "KeysDeferred" not in rig.telemetry.counts


def test_budget_deferred_trailing_refresh_comes_back_and_is_admitted_when_budget_frees():
    rig = Rig(verify=True, window_ms=W, budget=1)
    rig.jobs.default = "scheduled"
    mutate(rig, "tenant-1")
    mutate(rig, "tenant-2")  # deferred
    rig.build_queue.messages.clear()
    rig.clock.advance(LEASE_MS)  # tenant-1's lease lapses: room again

    outcome = fire(rig)  # tenant-2's own trailing message

    assert [k.status for k in outcome.keys] == ["refreshed"] and posts(rig, "tenant-2") == 1
    assert state(rig, RefreshKey("tenant-2", "Users")).waiting_since is None


def test_budget_a_waiting_key_claimed_again_and_deferred_again_keeps_its_place_in_the_line():
    rig = Rig(verify=True, window_ms=W, budget=1)
    rig.jobs.default = "scheduled"
    mutate(rig, "tenant-1")  # holds the budget
    rig.clock.advance(1_000)
    waiting_since = rig.clock.now
    mutate(rig, "tenant-2")  # deferred: waiting since its mutation
    rig.clock.advance(2_000)

    outcome = mutate(rig, "tenant-2")  # a leading claim (nothing in Cube for it), deferred again

    assert [k.status for k in outcome.keys] == ["deferred"]
    key = RefreshKey("tenant-2", "Users")
    assert (state(rig, key).waiting_since, state(rig, key).pending_since) == (waiting_since, waiting_since)


# --------------------------------------------------------------------------- the adaptive window


def test_window_follows_how_late_builds_start_doubling_under_backlog_halving_when_cube_keeps_up():
    windows = Windows(10_000, 80_000)
    assert windows.after_build(USERS, 40_000, start_lag_ms=90_000) == 80_000  # > 2 W late: wider
    assert windows.after_build(USERS, 40_000, start_lag_ms=500) == 20_000  # started at once: narrower
    assert windows.after_build(USERS, 40_000, start_lag_ms=60_000) == 40_000  # in between: kept
    assert windows.after_build(USERS, 60_000, start_lag_ms=10**6) == 80_000  # at most the maximum
    assert windows.after_build(USERS, 12_000, start_lag_ms=0) == 10_000  # never below the base
    assert Windows(10_000).after_build(USERS, None, start_lag_ms=10**6) == 10_000  # max = base: fixed


def test_window_waiting_for_budget_does_not_widen_the_window_by_itself():
    rig = Rig(verify=True, window_ms=W, budget=1, max_window_ms=8 * W)
    rig.jobs.default = "scheduled"
    mutate(rig, "tenant-1")
    for _ in range(3):
        mutate(rig, "tenant-2")  # deferred again and again
        rig.clock.advance(1_000)
    assert state(rig, RefreshKey("tenant-2", "Users")).window_ms is None


def test_window_a_build_that_started_long_after_its_mutation_widens_the_next_window_and_a_quick_one_narrows_it():
    rig = gated_rig(max_window_ms=8 * W)
    for step in range(4):  # polls find it waiting for 2 + 6 + 10 + 14 = 32 s: more than twice the window
        rig.clock.advance(2_000 + step * 4_000)
        poll(rig)
    rig.jobs.default = "done"
    rig.clock.advance(2_000)
    poll(rig)
    assert state(rig).window_ms == 2 * W
    rig.clock.advance(2 * W)
    assert mutate(rig).by_status("refreshed")
    assert state(rig).window_ends_at == rig.clock.now + 2 * W
    rig.clock.advance(2_000)
    poll(rig)  # done at the first poll, 2 s after its mutation: within the window
    assert state(rig).window_ms == W
    assert rig.telemetry.timings["EffectiveWindow"] == [W, 2 * W]


def test_window_claim_inside_the_keys_wider_window_is_debounced():
    rig = Rig(window_ms=W, max_window_ms=8 * W)
    rig.store.items[USERS] = KeyState(window_ms=4 * W)
    assert mutate(rig).by_status("refreshed")
    rig.clock.advance(2 * W)
    assert mutate(rig).by_status("debounced")
    [message] = rig.scheduler.messages
    assert isinstance(message, TrailingMessage) and message.due_at == T0 + 4 * W


def test_window_requeued_trailing_refresh_is_marked_dirty_so_it_is_not_dropped_as_covered():
    rig = Rig(window_ms=W)
    key = USERS
    rig.store.claim(key, now=T0, window_ms=W, claim_token="c", expires_at=0)
    rig.store.schedule_trailing(
        key, now=T0 + 1, oldest_event_ms=T0, trailing_token="t", due_at=T0 + W, replaces=None, expires_at=0
    )
    claim = rig.store.claim(key, now=T0 + W, window_ms=W, claim_token="c2", expires_at=0, trailing_token="t")
    assert claim.ok
    ok = rig.store.requeue_trailing(
        key,
        claim_token="c2",
        trailing_token="t",
        previous_started_at=T0,
        previous_window_ends_at=T0 + W,
        now=T0 + W + 5,
        due_at=T0 + 2 * W,
        waiting=Waiting(T0, T0 + 3 * W),
    )
    st = state(rig, key)
    assert ok and st.trailing_state == "scheduled" and (st.dirty_at or 0) >= (st.started_at or 0)
    assert st.waiting_since == T0


# --------------------------------------------------------------------------- copies do not multiply


def test_copies_a_duplicated_verify_message_of_a_waiting_build_sends_its_next_poll_once():
    rig = gated_rig()
    [(_, message)] = rig.build_queue.messages
    rig.build_queue.messages.clear()
    rig.clock.advance(2_000)
    for _ in range(3):  # SQS delivers the same message three times
        rig.service.process_verify([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline)  # type: ignore[list-item]
    assert len(rig.build_queue.messages) == 1


def test_copies_an_older_copy_of_a_re_sent_trailing_message_stops():
    rig = gated_rig()
    rig.clock.advance(W + 1)
    mutate(rig)
    [message] = rig.scheduler.messages
    rig.scheduler.messages.clear()
    rig.clock.now = message.due_at  # delivered when due; the build still waits: put off again
    first = rig.service.process_trailing([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline)
    assert [k.status for k in first.keys] == ["rescheduled"] and len(rig.scheduler.messages) == 1
    again = rig.service.process_trailing([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline)  # a duplicate
    assert [k.detail for k in again.keys] == ["superseded by a later copy of this trailing refresh"]
    assert len(rig.scheduler.messages) == 1


# --------------------------------------------------------------------------- keys verified in parts


def test_parts_a_key_verified_in_parts_keeps_its_gate_until_every_part_is_built_and_never_rides_along():
    from handler.domain.verify import BuildTarget  # noqa: PLC0415

    rig = Rig(verify=True, window_ms=W)
    tokens = tuple(f"{i:032x}" for i in range(9_000))  # more than one verify message can carry
    rig.store.claim(USERS, now=T0, window_ms=W, claim_token="c", expires_at=0)
    assert rig.verifier.schedule("tenant-1", [BuildTarget(USERS, tokens, T0, T0 - 1)]) == set()
    messages = [m for _, m in rig.build_queue.messages if isinstance(m, VerifyMessage)]
    assert len(messages) >= 2 and all(t.parts == len(messages) for m in messages for t in m.targets)
    first = set(messages[0].targets[0].tokens)
    rig.jobs.default = "scheduled"
    rig.jobs.statuses.update(dict.fromkeys(first, "done"))
    rig.clock.advance(2_000)
    poll(rig)  # the first part is built, the others wait: the key is not settled
    assert state(rig).gated(rig.clock.now) and state(rig).queued_seen_at is None
    rig.jobs.default = "done"
    rig.clock.advance(2_000)
    poll(rig)
    assert state(rig).build_status == "done" and not state(rig).gated(rig.clock.now)


def test_stats_show_the_effective_window_the_build_in_cube_and_the_wait_for_budget():
    from handler.operations import describe  # noqa: PLC0415

    state = KeyState(started_at=T0, window_ms=4 * W, window_ends_at=T0 + 4 * W, inflight_until=T0 + 9, waiting_since=T0)
    row = describe(USERS, state, W)
    assert row["effectiveWindowMs"] == 4 * W
    assert row["windowEndsAt"].startswith("2026-11-29T12:00:40")  # T0 + the effective window, 40 s
    assert row["buildInCubeUntil"] and row["waitingForBudgetSince"]


def _verified_oldest(rig: Rig) -> list[int]:
    return [t.oldest_ms for _, m in rig.build_queue.messages if isinstance(m, VerifyMessage) for t in m.targets]


def test_window_a_leading_claim_covers_what_was_pending_so_the_trailing_refresh_after_it_is_not_as_old():
    # The trailing message of a window is late (SQS, a busy function) when a mutation after the window
    # makes a leading claim: that refresh covers the pending mutations. The trailing refresh the next
    # mutations join covers only them: as old as they are, not as the ones already covered, so its
    # build, started at once at its window's end while Cube keeps up, does not double the window.
    rig = Rig(verify=True, window_ms=W, max_window_ms=8 * W)
    assert mutate(rig).by_status("refreshed")
    poll(rig)
    rig.clock.advance(1_000)
    assert mutate(rig).by_status("debounced")  # pending since T0 + 1 s, trailing due at T0 + W
    rig.clock.advance(W + 1_000)  # the window is over, its trailing message not delivered yet
    leading_at = rig.clock.now
    assert mutate(rig).by_status("refreshed")
    assert _verified_oldest(rig) == [T0 + 1_000]  # it covers the pending mutation (h16r, 920dcd3)
    poll(rig)
    rig.clock.advance(2_000)
    joined_at = rig.clock.now
    assert mutate(rig).by_status("debounced")
    rig.clock.advance(3_000)
    assert mutate(rig).by_status("debounced")
    fire(rig)  # the late message: put off to the leading claim's window end
    rig.clock.now = leading_at + W
    fire(rig)
    assert posts(rig) == 3
    assert _verified_oldest(rig) == [joined_at]
    poll(rig)
    assert state(rig).window_ms == W
    assert rig.telemetry.timings["FreshnessLag"][-1] == leading_at + W - joined_at


class _MutationAtRequeue:
    """Runs `then` once, just before the store requeues a deferred trailing claim: a mutation that
    arrives while the key's trailing refresh is claimed (`running`) and about to be deferred."""

    def __init__(self, rig: Rig, then: object) -> None:
        self.requeue, self.then = rig.store.requeue_trailing, then
        rig.store.requeue_trailing = self  # type: ignore[method-assign]

    def __call__(self, *args: object, **kw: object) -> bool:
        then, self.then = self.then, None
        if callable(then):
            then()
        return self.requeue(*args, **kw)  # type: ignore[arg-type]


def test_budget_a_mutation_replacing_a_trailing_refresh_being_deferred_keeps_the_keys_place_in_the_line():
    rig = Rig(verify=True, window_ms=W, budget=1)
    rig.jobs.default = "scheduled"
    mutate(rig, "tenant-1")  # holds the budget
    rig.clock.advance(1_000)
    oldest = rig.clock.now
    mutate(rig, "tenant-2")  # deferred: waiting since its mutation
    rig.clock.advance(2_000)
    mutate(rig, "tenant-3")  # deferred: a younger waiter
    rig.clock.advance(W)
    key = RefreshKey("tenant-2", "Users")
    _MutationAtRequeue(rig, lambda: mutate(rig, "tenant-2"))  # replaces the claimed trailing refresh

    ready = [m for m in rig.scheduler.messages if m.tenant_id == "tenant-2"]
    rig.scheduler.messages = [m for m in rig.scheduler.messages if m.tenant_id != "tenant-2"]
    outcome = rig.service.process_trailing([(RecordRef("sqs", 0), ready[0])], deadline_ms=rig.deadline)

    assert [k.status for k in outcome.keys] == ["deferred"]
    st = state(rig, key)
    assert (st.waiting_since, st.pending_since) == (oldest, oldest), "its oldest mutation is still pending"
    assert st.trailing_state == "scheduled" and st.claim_token is None, "the deferred claim was given back"
    rig.jobs.default = "done"
    rig.clock.advance(1_000)

    poll(rig)  # tenant-1's build is done: its slot goes to the oldest waiter

    assert (posts(rig, "tenant-2"), posts(rig, "tenant-3")) == (1, 0)
    assert rig.cube.requests[-1][0] == "tenant-2"
