"""One contract, two stores: the DynamoDB adapter (on moto, table built from template.yaml) and the
in-memory store must agree on every conditional write. (Atomicity under concurrency is proven on
dynalite in tests/integration: moto has no lock around conditional updates.)"""

import boto3
import pytest
from moto import mock_aws

from devstack.template import debounce_table_spec
from handler.adapters.dynamodb import DynamoDBDebounceStore
from handler.adapters.memory import InMemoryDebounceStore
from handler.domain.errors import StoreUnavailable
from handler.domain.model import RefreshKey
from handler.domain.ports import BuildRecord, Waiting
from tests.builders import ROOT, T0

KEY = RefreshKey("tenant-1", "Users")
W = 30_000


@pytest.fixture(params=["memory", "dynamodb"])
def store(request):
    if request.param == "memory":
        yield InMemoryDebounceStore()
        return
    spec = debounce_table_spec(ROOT / "template.yaml")
    assert spec.source != "docs/architecture.md", "the test table must come from template.yaml"
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        client.create_table(
            TableName="debounce",
            KeySchema=spec.key_schema,
            AttributeDefinitions=spec.attribute_definitions,
            GlobalSecondaryIndexes=spec.global_secondary_indexes,
            BillingMode="PAY_PER_REQUEST",
        )
        yield DynamoDBDebounceStore(client, "debounce")


def claim(store, now, token="c1", **kw):
    return store.claim(KEY, now=now, window_ms=W, claim_token=token, expires_at=now // 1000 + 100, **kw)


def test_store_claim_is_refused_inside_the_window_and_returns_the_blocking_state(store):
    assert claim(store, T0).ok
    blocked = claim(store, T0 + W - 1, token="c2")
    assert not blocked.ok
    assert blocked.state.started_at == T0 and blocked.state.claim_token == "c1"
    assert claim(store, T0 + W, token="c3").ok


def test_store_successful_claim_returns_the_previous_state(store):
    claim(store, T0)
    again = claim(store, T0 + W, token="c2")
    assert again.ok and again.state.started_at == T0


def test_store_force_claim_ignores_the_window(store):
    claim(store, T0)
    assert claim(store, T0 + 1, token="c2", force=True).ok


def test_store_release_needs_the_claim_token_and_restores_the_start(store):
    claim(store, T0)
    claim(store, T0 + W, token="c2")
    assert not store.release(KEY, claim_token="other", previous_started_at=T0)
    assert store.release(KEY, claim_token="c2", previous_started_at=T0)
    state = store.get(KEY)
    assert state.started_at == T0 and state.claim_token is None


def test_store_release_of_a_first_claim_leaves_no_window(store):
    claim(store, T0)
    assert store.release(KEY, claim_token="c1", previous_started_at=None)
    assert store.get(KEY).started_at is None
    assert claim(store, T0 + 1, token="c2").ok


def test_store_schedule_then_join_then_trailing_claim(store):
    claim(store, T0)
    sched = store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0 + 5, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert sched.ok
    assert not store.schedule_trailing(
        KEY, now=T0 + 11, oldest_event_ms=T0, trailing_token="t2", due_at=T0 + W, replaces=None, expires_at=1
    ).ok
    assert store.join_trailing(KEY, now=T0 + 20, oldest_event_ms=T0 + 1, trailing_token="t1", expires_at=1).ok
    assert not store.join_trailing(KEY, now=T0 + 21, oldest_event_ms=T0, trailing_token="nope", expires_at=1).ok
    state = store.get(KEY)
    assert (state.dirty_at, state.pending_since, state.trailing_state) == (T0 + 20, T0 + 5, "scheduled")
    # too early for the trailing claim, then on time
    assert not claim(store, T0 + W - 1, token="c2", trailing_token="t1").ok
    running = claim(store, T0 + W, token="c2", trailing_token="t1")
    assert running.ok and store.get(KEY).trailing_state == "running"
    # a join on a running trailing refresh is refused; a replacement is accepted
    assert not store.join_trailing(KEY, now=T0 + W + 1, oldest_event_ms=T0, trailing_token="t1", expires_at=1).ok
    assert store.schedule_trailing(
        KEY,
        now=T0 + W + 2,
        oldest_event_ms=T0 + W + 2,
        trailing_token="t2",
        due_at=T0 + 2 * W,
        replaces="t1",
        expires_at=1,
        replaces_started_at=T0 + W,
    ).ok
    assert not store.finish_trailing(KEY, trailing_token="t1")
    assert store.get(KEY).trailing_token == "t2"


def test_store_a_leading_claim_stops_counting_what_it_covers_as_pending_and_a_release_gives_it_back(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0 + 5, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert claim(store, T0 + W, token="c2").ok  # the leading claim covers the mutation pending since T0 + 5
    state = store.get(KEY)
    assert state.pending_since is None and (state.trailing_token, state.dirty_at) == ("t1", T0 + 10)
    # a mutation after the claim: pending since its own time, not the covered one's
    assert store.join_trailing(KEY, now=T0 + W + 1, oldest_event_ms=T0 + W + 1, trailing_token="t1", expires_at=1).ok
    assert store.get(KEY).pending_since == T0 + W + 1
    # the claim is given back (Cube refused it, or no budget): the mutations it covered are pending again
    assert store.release(KEY, claim_token="c2", previous_started_at=T0, previous_pending_since=T0 + 5)
    state = store.get(KEY)
    assert (state.started_at, state.pending_since, state.dirty_at) == (T0, T0 + 5, T0 + W + 1)
    # a trailing claim leaves pendingSince: its refresh reports it as its oldest
    assert claim(store, T0 + W + 2, token="c3", trailing_token="t1").ok
    assert store.get(KEY).pending_since == T0 + 5


def test_store_drop_trailing_only_if_no_mutation_joined_since_it_was_read(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    seen = store.get(KEY).dirty_at
    store.join_trailing(KEY, now=T0 + 20, oldest_event_ms=T0, trailing_token="t1", expires_at=1)
    assert not store.drop_trailing(KEY, trailing_token="t1", dirty_at=seen)
    assert store.drop_trailing(KEY, trailing_token="t1", dirty_at=T0 + 20)
    state = store.get(KEY)
    assert state.trailing_token is None and state.pending_since is None


def test_store_drop_trailing_leaves_a_running_trailing_refresh(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    claim(store, T0 + W, token="c2", trailing_token="t1")
    assert not store.drop_trailing(KEY, trailing_token="t1", dirty_at=T0 + 10)


def test_store_released_trailing_claim_stays_running_so_new_mutations_do_not_join_it(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    claim(store, T0 + W, token="c2", trailing_token="t1")
    assert store.release(KEY, claim_token="c2", previous_started_at=T0)
    assert store.get(KEY).trailing_state == "running"
    assert not store.join_trailing(KEY, now=T0 + W + 5, oldest_event_ms=T0, trailing_token="t1", expires_at=1).ok
    assert store.schedule_trailing(
        KEY,
        now=T0 + W + 5,
        oldest_event_ms=T0,
        trailing_token="t2",
        due_at=T0 + W + 5,
        replaces="t1",
        expires_at=1,
        replaces_started_at=T0,
    ).ok


def test_store_replacing_a_running_trailing_refresh_marks_dirty_no_earlier_than_its_claim(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    claim(store, T0 + W + 50, token="c2", trailing_token="t1")  # may die before reaching Cube
    args = {"oldest_event_ms": T0 + W, "trailing_token": "t2", "due_at": T0 + 2 * W, "replaces": "t1", "expires_at": 1}
    # the mutation's clock read an earlier time than the claim's
    assert not store.schedule_trailing(KEY, now=T0 + W + 40, replaces_started_at=T0, **args).ok  # stale read
    assert store.schedule_trailing(KEY, now=T0 + W + 40, replaces_started_at=T0 + W + 50, **args).ok
    assert store.get(KEY).dirty_at == T0 + W + 50  # the new trailing refresh finds the key stale


def test_store_trailing_claim_needs_a_stale_key(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    claim(store, T0 + W, token="lead")  # a leading refresh after the mutation: the key is no longer stale
    assert not claim(store, T0 + 2 * W, token="c3", trailing_token="t1").ok
    assert store.drop_trailing(KEY, trailing_token="t1", dirty_at=T0 + 10)
    assert store.get(KEY).trailing_token is None


def test_store_trailing_claim_that_died_running_can_be_taken_again(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 10, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert claim(store, T0 + W, token="c2", trailing_token="t1").ok
    assert claim(store, T0 + 2 * W, token="c3", trailing_token="t1").ok


def test_store_join_with_an_older_time_keeps_the_newer_mark(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 50, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert store.join_trailing(KEY, now=T0 + 40, oldest_event_ms=T0, trailing_token="t1", expires_at=1).ok
    assert store.get(KEY).dirty_at == T0 + 50


def test_store_scan_filters_by_tenant_and_delete_forgets(store):
    claim(store, T0)
    other = RefreshKey("tenant-2", "Groups")
    store.claim(other, now=T0, window_ms=W, claim_token="x", expires_at=1)
    assert [k for k, _ in store.scan()] == [KEY, other]
    assert [k for k, _ in store.scan("tenant-2")] == [other]
    store.delete(other)
    assert store.get(other) is None


def test_dynamodb_store_turns_service_errors_into_store_unavailable():
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        store = DynamoDBDebounceStore(client, "no-such-table")
        with pytest.raises(StoreUnavailable, match="ResourceNotFoundException"):
            claim(store, T0)


def test_store_record_build_keeps_the_newest_refresh_outcome_only(store):
    assert not store.record_build(KEY, BuildRecord(T0, "done", T0 + 5, freshness_lag_ms=7)), "no item yet"
    claim(store, T0)
    failed = BuildRecord(
        T0, "failed", T0 + 5, failure_class="failure", error="boom", failures=1, retrigger_due_at=T0 + 9
    )
    assert store.record_build(KEY, failed)
    assert not store.record_build(KEY, BuildRecord(T0, "done", T0 + 6)), "the same refresh settles once"
    assert not store.record_build(KEY, BuildRecord(T0 - 1, "done", T0 + 6)), "an older refresh never overwrites"
    st = store.get(KEY)
    assert (st.build_started_at, st.build_status, st.build_failures, st.build_error) == (T0, "failed", 1, "boom")
    assert (st.build_failure_class, st.retrigger_due_at, st.started_at) == ("failure", T0 + 9, T0)
    assert store.record_build(KEY, BuildRecord(T0 + 1, "done", T0 + 8, freshness_lag_ms=42))
    st = store.get(KEY)
    assert (st.build_status, st.build_failures, st.freshness_lag_ms) == ("done", 0, 42)
    assert (st.build_error, st.build_failure_class, st.retrigger_due_at) == (None, None, None)


def test_store_partition_keys_of_one_target_are_independent_items(store):
    march = RefreshKey("tenant-1", "Users.daily", "2025-03-01..2025-03-31")
    june = RefreshKey("tenant-1", "Users.daily", "2025-06-01..2025-06-30")
    whole = RefreshKey("tenant-1", "Users.daily")
    for key in (march, june, whole):
        assert store.claim(key, now=T0, window_ms=W, claim_token="c", expires_at=T0 // 1000 + 100).ok
    assert not store.claim(march, now=T0 + 1, window_ms=W, claim_token="d", expires_at=0).ok
    assert [k for k, _ in store.scan("tenant-1")] == sorted([march, june, whole])


# --------------------------------------------------------------------------- load-aware (docs/load-aware.md)


def test_store_claim_opens_the_keys_own_window_and_release_restores_it(store):
    assert claim(store, T0).ok
    assert store.get(KEY).window_ends_at == T0 + W  # no windowMs yet: the base
    store.record_build(KEY, BuildRecord(T0, "done", T0 + 1, window_ms=3 * W))
    assert not claim(store, T0 + W - 1, token="c2").ok
    assert claim(store, T0 + W, token="c3").ok  # the window in force ended; the next one is 3 W
    assert store.get(KEY).window_ends_at == T0 + W + 3 * W
    assert not claim(store, T0 + 3 * W, token="c4").ok  # inside the wider window
    assert store.release(KEY, claim_token="c3", previous_started_at=T0, previous_window_ends_at=T0 + W)
    state = store.get(KEY)
    assert (state.started_at, state.window_ends_at, state.window_ms) == (T0, T0 + W, 3 * W)


def test_store_in_flight_gate_refuses_claims_until_cleared_or_lapsed(store):
    assert claim(store, T0).ok
    assert store.record_jobs(KEY, started_at=T0, tokens=["a"], inflight_until=T0 + 5 * W)
    assert not claim(store, T0 + 2 * W, token="c2").ok
    trailing = store.schedule_trailing(
        KEY, now=T0 + 1, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert trailing.ok
    assert not claim(store, T0 + 2 * W, token="c3", trailing_token="t1").ok
    assert claim(store, T0 + 2 * W, token="c4", force=True).ok  # the operator's force
    assert store.release(KEY, claim_token="c4", previous_started_at=T0, previous_window_ends_at=T0 + W)
    assert not store.clear_inflight(KEY, started_at=T0 - 1)  # not the in-flight refresh
    assert store.clear_inflight(KEY, started_at=T0)
    assert claim(store, T0 + 2 * W, token="c5", trailing_token="t1").ok
    assert claim(store, T0 + 6 * W, token="c6").ok  # (a lapsed gate is shown by the time check alone)


def test_store_gate_lapses_at_inflight_until(store):
    claim(store, T0)
    store.record_jobs(KEY, started_at=T0, tokens=["a"], inflight_until=T0 + 5 * W)
    assert not claim(store, T0 + 5 * W - 1, token="c2").ok
    assert claim(store, T0 + 5 * W, token="c3").ok


def test_store_polls_renew_the_gate_and_raise_the_ride_along_horizon_of_the_in_flight_refresh_only(store):
    claim(store, T0)
    assert not store.observe_pending(KEY, started_at=T0, inflight_until=T0 + 9, scheduled_at=T0 + 5)  # no gate
    store.record_jobs(KEY, started_at=T0, tokens=["a"], inflight_until=T0 + 100)
    assert store.observe_pending(KEY, started_at=T0, inflight_until=T0 + 200, scheduled_at=T0 + 50)
    assert store.observe_pending(KEY, started_at=T0, inflight_until=T0 + 300, scheduled_at=None)
    state = store.get(KEY)
    assert (state.inflight_until, state.queued_seen_at) == (T0 + 300, T0 + 50)
    assert not store.observe_pending(KEY, started_at=T0 - 1, inflight_until=T0 + 999, scheduled_at=T0 + 60)
    # a newer refresh's jobs: a new gate, and no horizon until a poll of it finds it waiting
    assert store.record_jobs(KEY, started_at=T0 + 1, tokens=["b"], inflight_until=T0 + 400)
    assert store.get(KEY).queued_seen_at is None
    assert store.clear_inflight(KEY, started_at=T0 + 1)
    state = store.get(KEY)
    assert (state.inflight_until, state.queued_seen_at) == (None, None)


def test_store_waiting_keys_are_listed_oldest_first_and_lapse(store):
    keys = [RefreshKey(f"tenant-{i}", "Users") for i in range(3)]
    for key, since, until in zip(keys, (T0 + 30, T0 + 10, T0 + 20), (T0 + 900, T0 + 900, T0 + 50), strict=True):
        store.claim(key, now=T0, window_ms=W, claim_token="c", expires_at=1)
        store.schedule_trailing(
            key,
            now=T0,
            oldest_event_ms=since,
            trailing_token=f"t-{key.tenant_id}",
            due_at=T0 + W,
            replaces=None,
            expires_at=1,
            waiting=Waiting(since, until),
        )
    waiters = store.waiters("global", now=T0 + 60, limit=10)
    assert [(w.key, w.since, w.trailing_token) for w in waiters] == [
        (keys[1], T0 + 10, "t-tenant-1"),
        (keys[0], T0 + 30, "t-tenant-0"),
    ]
    assert [w.key for w in store.waiters("global", now=T0 + 60, limit=1)] == [keys[1]]
    # admitted (its jobs recorded) or its trailing refresh finished: no longer waiting
    store.record_jobs(keys[1], started_at=T0, tokens=["a"], inflight_until=T0 + 100)
    store.finish_trailing(keys[0], trailing_token="t-tenant-0")
    assert store.waiters("global", now=T0 + 60, limit=10) == []


def test_store_joining_a_trailing_refresh_can_register_the_key_as_waiting_since_its_oldest(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 1, oldest_event_ms=T0 - 7, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    joined = store.join_trailing(
        KEY, now=T0 + 2, oldest_event_ms=T0 + 2, trailing_token="t1", expires_at=1, waiting=Waiting(T0 + 2, T0 + W)
    )
    assert joined.ok
    [waiter] = store.waiters("global", now=T0, limit=5)
    assert waiter.since == T0 - 7  # the key's oldest pending mutation


def test_store_requeue_gives_the_trailing_claim_back_and_registers_the_wait(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 1, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert claim(store, T0 + W, token="c2", trailing_token="t1").ok
    common = {"trailing_token": "t1", "previous_started_at": T0, "previous_window_ends_at": T0 + W}
    waiting = Waiting(T0, T0 + 9 * W)
    assert not store.requeue_trailing(
        KEY, claim_token="other", now=T0 + W, due_at=T0 + 2 * W, waiting=waiting, **common
    )
    assert store.requeue_trailing(KEY, claim_token="c2", now=T0 + W + 3, due_at=T0 + 2 * W, waiting=waiting, **common)
    state = store.get(KEY)
    assert (state.started_at, state.window_ends_at, state.claim_token) == (T0, T0 + W, None)
    assert (state.trailing_state, state.trailing_due_at, state.dirty_at) == ("scheduled", T0 + 2 * W, T0 + W + 3)
    assert state.waiting_since == T0
    assert claim(store, T0 + W + 4, token="c3", trailing_token="t1").ok  # it can claim again


def test_store_budget_slots_are_taken_once_renewed_freed_and_lapse(store):
    assert [s.free(T0) for s in store.budget_slots("global", 2)] == [True, True]
    assert store.take_slot("global", 0, lease="L1", key=KEY.pk, now=T0, until=T0 + 100)
    assert not store.take_slot("global", 0, lease="L2", key="x", now=T0 + 99, until=T0 + 200)
    assert store.renew_slot("global", 0, lease="L1", until=T0 + 300)
    assert not store.renew_slot("global", 0, lease="L2", until=T0 + 999)
    slot = store.budget_slots("global", 2)[0]
    assert (slot.lease, slot.until, slot.key) == ("L1", T0 + 300, KEY.pk)
    assert store.take_slot("global", 0, lease="L3", key="y", now=T0 + 300, until=T0 + 400)  # lapsed
    assert not store.free_slot("global", 0, lease="L1")
    assert store.free_slot("global", 0, lease="L3")
    assert store.budget_slots("global", 1)[0].free(T0)
    assert store.scan() == [], "budget slots are not refresh keys"


def test_store_a_re_sent_trailing_message_makes_older_copies_unable_to_claim(store):
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 1, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert not store.reschedule_trailing(KEY, trailing_token="t1", due_at=T0 + W)  # only later
    assert not store.reschedule_trailing(KEY, trailing_token="other", due_at=T0 + 2 * W)
    assert store.reschedule_trailing(KEY, trailing_token="t1", due_at=T0 + 2 * W)
    assert store.get(KEY).trailing_due_at == T0 + 2 * W
    old = claim(store, T0 + 2 * W, token="c2", trailing_token="t1", trailing_due_at=T0 + W)
    assert not old.ok
    assert claim(store, T0 + 2 * W, token="c3", trailing_token="t1", trailing_due_at=T0 + 2 * W).ok


def test_store_polls_record_their_sequence_and_a_new_refresh_starts_it_again(store):
    claim(store, T0)
    store.record_jobs(KEY, started_at=T0, tokens=["a"], inflight_until=T0 + 100)
    assert store.observe_pending(KEY, started_at=T0, inflight_until=T0 + 200, scheduled_at=None, poll_seq=3)
    assert store.get(KEY).poll_seq == 3
    store.record_jobs(KEY, started_at=T0 + 1, tokens=["b"], inflight_until=T0 + 300)
    assert store.get(KEY).poll_seq is None


def _claimed_and_replaced(store, *, new_oldest):
    """A trailing claim (c2, refresh t1 with a mutation at T0) whose refresh a newer mutation replaced
    (t2, its oldest `new_oldest`) before the claim was deferred."""
    claim(store, T0)
    store.schedule_trailing(
        KEY, now=T0 + 1, oldest_event_ms=T0, trailing_token="t1", due_at=T0 + W, replaces=None, expires_at=1
    )
    assert claim(store, T0 + W, token="c2", trailing_token="t1").ok
    assert store.schedule_trailing(
        KEY,
        now=T0 + W + 2,
        oldest_event_ms=new_oldest,
        trailing_token="t2",
        due_at=T0 + 2 * W,
        replaces="t1",
        expires_at=1,
        replaces_started_at=T0 + W,
    ).ok
    assert store.get(KEY).pending_since == new_oldest  # the replacement alone (the claim may still post)


def _requeue(store, claim_token="c2"):
    return store.requeue_trailing(
        KEY,
        claim_token=claim_token,
        trailing_token="t1",
        previous_started_at=T0,
        previous_window_ends_at=T0 + W,
        now=T0 + W + 3,
        due_at=T0 + 3 * W,
        waiting=Waiting(T0, T0 + 9 * W),
    )


def test_store_requeue_after_a_newer_mutation_replaced_the_claimed_refresh_keeps_it_as_old_as_the_claim(store):
    _claimed_and_replaced(store, new_oldest=T0 + W + 2)
    assert not _requeue(store, claim_token="other")
    assert _requeue(store)
    state = store.get(KEY)
    assert (state.started_at, state.window_ends_at, state.claim_token) == (T0, T0 + W, None)
    assert (state.trailing_token, state.trailing_state, state.trailing_due_at) == ("t2", "scheduled", T0 + 2 * W)
    assert (state.pending_since, state.waiting_since, state.waiting_until) == (T0, T0, T0 + 9 * W)
    assert [w.key for w in store.waiters("global", now=T0 + W + 3, limit=5)] == [KEY]
    assert claim(store, T0 + W + 4, token="c3", trailing_token="t2", trailing_due_at=T0 + 2 * W).ok


def test_store_requeue_after_a_replacement_keeps_its_pending_since_when_that_is_older(store):
    _claimed_and_replaced(store, new_oldest=T0 - 5)  # a late event, older than the claim's
    assert _requeue(store)
    state = store.get(KEY)
    assert (state.pending_since, state.waiting_since, state.claim_token) == (T0 - 5, T0 - 5, None)


def test_store_requeue_after_a_replacement_is_refused_once_the_replacement_was_claimed(store):
    _claimed_and_replaced(store, new_oldest=T0 + W + 2)
    assert claim(store, T0 + 3 * W, token="c3", trailing_token="t2").ok  # e.g. the window passed
    assert not _requeue(store)
    state = store.get(KEY)
    assert (state.claim_token, state.pending_since, state.trailing_state) == ("c3", T0 + W + 2, "running")
