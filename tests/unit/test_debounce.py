"""The debounce protocol on the in-memory store (same conditions as the DynamoDB adapter)."""

from handler.domain.debounce import Claim, Debounced, NothingToDo, Rescheduled
from handler.domain.model import RefreshKey
from tests.builders import Rig

KEY = RefreshKey("tenant-1", "Users")


def test_debounce_first_mutation_claims_leading_refresh():
    rig = Rig()
    decision = rig.debouncer.decide(KEY, rig.clock.now)
    assert isinstance(decision, Claim)
    assert rig.store.get(KEY).started_at == rig.clock.now


def test_debounce_mutation_inside_window_schedules_one_trailing_refresh_at_window_end():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    start = rig.clock.now
    rig.clock.advance(1_000)
    first = rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(1_000)
    second = rig.debouncer.decide(KEY, rig.clock.now)
    assert isinstance(first, Debounced) and first.scheduled and first.due_at == start + 30_000
    assert isinstance(second, Debounced) and not second.scheduled  # joined the scheduled one
    assert len(rig.scheduler.messages) == 1
    state = rig.store.get(KEY)
    assert state.trailing_state == "scheduled" and state.dirty_at == rig.clock.now


def test_debounce_after_window_claims_again():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(30_000)
    assert isinstance(rig.debouncer.decide(KEY, rig.clock.now), Claim)


def test_debounce_leading_claim_over_a_scheduled_trailing_refresh_covers_its_oldest_mutation():
    # The trailing refresh's message is late (waiting for build budget, say) when a new mutation claims
    # the key: that refresh covers the trailing one's mutations too, so it is as old as they are (its
    # place in the budget's line, its staleness and its window).
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(5_000)
    pending = rig.clock.now
    rig.debouncer.decide(KEY, pending)
    rig.clock.advance(40_000)

    claim = rig.debouncer.decide(KEY, rig.clock.now)

    assert isinstance(claim, Claim) and not claim.trailing
    assert claim.oldest_event_ms == pending


def test_debounce_trailing_fires_at_window_end_and_finishes():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(5_000)
    rig.debouncer.decide(KEY, rig.clock.now - 100)
    rig.clock.advance(25_000)
    (message,) = rig.scheduler.due(rig.clock.now)
    claim = rig.debouncer.fire(message)
    assert isinstance(claim, Claim) and claim.trailing
    assert claim.oldest_event_ms == rig.clock.now - 25_100
    rig.debouncer.refreshed(claim)
    assert rig.store.get(KEY).trailing_token is None


def test_debounce_trailing_delivered_early_is_rescheduled_to_window_end():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    start = rig.clock.now
    rig.clock.advance(1_000)
    rig.debouncer.decide(KEY, rig.clock.now)
    (message,) = rig.scheduler.messages
    rig.scheduler.messages.clear()
    result = rig.debouncer.fire(message)
    assert result == Rescheduled(KEY, start + 30_000)
    assert rig.scheduler.messages[0].token == message.token


def test_debounce_trailing_covered_by_a_later_leading_refresh_does_nothing():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(1_000)
    rig.debouncer.decide(KEY, rig.clock.now)
    (message,) = rig.scheduler.messages
    rig.clock.advance(29_000)
    assert isinstance(rig.debouncer.decide(KEY, rig.clock.now), Claim)  # a leading refresh after the mutation
    rig.clock.advance(30_000)
    result = rig.debouncer.fire(message)
    assert isinstance(result, NothingToDo)
    assert rig.store.get(KEY).trailing_token is None


def test_debounce_released_claim_lets_the_retry_claim_at_once():
    rig = Rig()
    claim = rig.debouncer.decide(KEY, rig.clock.now)
    assert rig.debouncer.release(claim)
    rig.clock.advance(10)
    assert isinstance(rig.debouncer.decide(KEY, rig.clock.now), Claim)


def test_debounce_release_restores_the_previous_window_start():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    first_start = rig.clock.now
    rig.clock.advance(40_000)
    claim = rig.debouncer.decide(KEY, rig.clock.now)
    rig.debouncer.release(claim)
    assert rig.store.get(KEY).started_at == first_start


def test_debounce_mutation_during_running_trailing_schedules_a_new_one():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(1_000)
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(29_000)
    (message,) = rig.scheduler.due(rig.clock.now)
    running = rig.debouncer.fire(message)
    assert isinstance(running, Claim)
    rig.clock.advance(10)
    late = rig.debouncer.decide(KEY, rig.clock.now)  # arrives while the trailing refresh is in flight
    assert isinstance(late, Debounced) and late.scheduled
    rig.debouncer.refreshed(running)  # must not drop the new trailing refresh
    state = rig.store.get(KEY)
    assert state.trailing_state == "scheduled" and state.trailing_token != message.token


def test_debounce_trailing_claim_that_died_is_taken_again_after_the_window():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(1_000)
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(29_000)
    (message,) = rig.scheduler.due(rig.clock.now)
    assert isinstance(rig.debouncer.fire(message), Claim)  # ... and the invocation dies here
    rig.clock.advance(5_000)  # SQS makes the message visible again
    assert isinstance(rig.debouncer.fire(message), Rescheduled)
    rig.clock.advance(25_000)
    (later,) = rig.scheduler.due(rig.clock.now)  # the copy re-sent for the window's end
    assert isinstance(rig.debouncer.fire(later), Claim)
    # the original message, delivered once more (SQS: at least once), is an older copy: it stops
    assert isinstance(rig.debouncer.fire(message), NothingToDo)


def test_debounce_force_claims_inside_the_window():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    rig.clock.advance(1)
    assert isinstance(rig.debouncer.decide(KEY, rig.clock.now, force=True), Claim)


def test_debounce_state_expires_by_ttl_a_day_after_the_window():
    rig = Rig()
    rig.debouncer.decide(KEY, rig.clock.now)
    assert rig.store.get(KEY).expires_at == (rig.clock.now + 60_000) // 1000 + 86_400
