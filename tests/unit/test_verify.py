"""Build verification over in-memory fakes: every status Cube reports, re-triggers, dead letters,
duplicates and crashes (handler.domain.verify)."""

import json

import pytest

from handler.adapters.memory import (
    CountingTelemetry,
    InMemoryDebounceStore,
    RecordingBuildQueue,
    ScriptedJobs,
)
from handler.domain import verify
from handler.domain.decode import decode_msk_event
from handler.domain.decode import decode_queue_message as decode_build_message
from handler.domain.errors import CubeRejected, CubeServerError, StoreUnavailable
from handler.domain.model import RecordRef, RefreshKey
from handler.domain.ports import BuildRecord, JobStatus
from handler.domain.verify import (
    MAX_RETRIGGERS,
    BuildTarget,
    BuildVerifier,
    RetriggerMessage,
    RetriggerTarget,
    VerifyMessage,
    classify,
    redact,
)
from tests.builders import T0, FakeClock, msk_event, mutation
from tests.builders import Rig as ServiceRig

KEY = RefreshKey("tenant-1", "Users")
TIMEOUT = 600_000


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = InMemoryDebounceStore()
        self.jobs = ScriptedJobs()
        self.queue = RecordingBuildQueue()
        self.telemetry = CountingTelemetry()
        self.verifier = BuildVerifier(self.store, self.jobs, self.queue, self.telemetry, self.clock, TIMEOUT)

    def refresh(
        self, key: RefreshKey = KEY, tokens: tuple[str, ...] = ("tok1",), oldest: int = T0 - 500
    ) -> BuildTarget:
        """A refresh Cube accepted now: the key's claim, then the verify message."""
        now = self.clock.now_ms()
        self.store.claim(key, now=now, window_ms=1_000, claim_token=f"c{now}", expires_at=0, force=True)
        target = BuildTarget(key, tokens, now, oldest)
        self.verifier.schedule(key.tenant_id, [target])
        return target

    def deliver(self) -> set[RecordRef]:
        """Advance to the next due message and deliver every verify message due then."""
        due = min(d for d, m in self.queue.messages if isinstance(m, VerifyMessage))
        self.clock.now = max(self.clock.now, due)
        ready = [m for d, m in self.queue.messages if isinstance(m, VerifyMessage) and d <= self.clock.now]
        self.queue.messages = [(d, m) for d, m in self.queue.messages if not any(m is r for r in ready)]
        return self.verifier.process([(RecordRef("sqs", i), m) for i, m in enumerate(ready)], deadline_ms=10**15)

    def retriggers(self) -> list[RetriggerMessage]:
        return [m for _, m in self.queue.messages if isinstance(m, RetriggerMessage)]


def target(tokens: tuple[str, ...] = ("a", "b")) -> BuildTarget:
    return BuildTarget(KEY, tokens, T0, T0 - 100)


@pytest.mark.parametrize(
    ("statuses", "state", "cls"),
    [
        ({"a": "done", "b": "done"}, "done", ""),
        ({"a": "done", "b": "processing"}, "pending", ""),
        ({"a": "scheduled", "b": "done"}, "pending", ""),
        ({"a": "done", "b": "failure: permission denied for table users"}, "failed", "failure"),
        ({"a": "missing_partition", "b": "done"}, "failed", "missing_partition"),
        ({"a": "done"}, "failed", "not_found"),
        ({"a": "not_found", "b": "done"}, "failed", "not_found"),
        ({"a": "pre_agg_not_found", "b": "done"}, "failed", "failure"),
    ],
)
def test_classify_each_status_settles_the_key_by_its_worst_job(statuses, state, cls):
    jobs = {t: JobStatus(s, ("tenant-1",)) for t, s in statuses.items() if s != "not_found"}
    verdict = classify(target(), jobs, "tenant-1", now=T0, deadline_at=T0 + 1)
    assert (verdict.state, verdict.failure_class) == (state, cls)


def test_classify_pending_past_the_build_deadline_is_a_timeout():
    jobs = {"a": JobStatus("processing", ("tenant-1",)), "b": JobStatus("done", ("tenant-1",))}
    verdict = classify(target(), jobs, "tenant-1", now=T0 + 5, deadline_at=T0 + 5)
    assert (verdict.state, verdict.failure_class) == ("failed", "timeout")
    assert "processing" in verdict.error


def test_classify_a_job_of_another_tenant_is_a_tenant_mismatch_whatever_its_status():
    jobs = {"a": JobStatus("done", ("tenant-2",)), "b": JobStatus("done", ("tenant-1",))}
    assert classify(target(), jobs, "tenant-1", now=T0, deadline_at=T0 + 1).failure_class == "tenant_mismatch"


def test_redact_masks_literals_and_key_values_and_bounds_length():
    text = "failure: duplicate key value violates constraint \"u\"\n Key (email)=(bob@example.com) near 'secret'"
    out = redact(text)
    assert "bob@example.com" not in out and "secret" not in out
    assert "Key (email)=(?)" in out and "'?'" in out and "\n" not in out
    assert len(redact("x" * 5000)) <= 240


def test_messages_round_trip_through_their_json_bodies():
    verify = VerifyMessage("tenant-1", T0 + 9, (BuildTarget(KEY, ("t1", "t2"), T0, T0 - 5),), poll=3)
    assert decode_build_message(json.dumps(verify.as_body())) == verify
    retrigger = RetriggerMessage(
        "tenant-1", (), 2, "failure", "boom", dead_lettered=True
    )  # targets checked below: at least one
    with pytest.raises(ValueError, match="no targets"):
        decode_build_message(json.dumps(retrigger.as_body()))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("not json", "not JSON"),
        ('{"kind": "trailing"}', "invalid tenantId"),
        ('{"kind": "other"}', "not a trailing-refresh message"),
        ('{"kind": "verify", "tenantId": "bad tenant!", "targets": []}', "invalid tenantId"),
        ('{"kind": "verify", "tenantId": "t", "targets": [{"target": "Users", "tokens": ["x y"]}]}', "job tokens"),
        ('{"kind": "verify", "tenantId": "t", "targets": [{"target": "Users;drop", "tokens": ["x"]}]}', "target"),
        (
            '{"kind": "retrigger", "tenantId": "t", "attempt": -1, "targets": [{"target": "U", "oldestAt": 1}]}',
            "attempt",
        ),
    ],
)
def test_decode_build_message_rejects_malformed_bodies_with_a_safe_reason(body, error):
    with pytest.raises(ValueError, match=error):
        decode_build_message(body)


def test_verifier_done_records_the_build_and_emits_freshness_lag():
    rig = Rig()
    rig.refresh(oldest=T0 - 500)
    assert rig.queue.messages[0][0] == T0 + 2_000  # first poll after 2 s
    assert rig.deliver() == set()
    state = rig.store.get(KEY)
    assert state is not None
    assert (state.build_status, state.build_failures, state.freshness_lag_ms) == ("done", 0, 2_500)
    assert rig.telemetry.timings["FreshnessLag"] == [2_500]
    assert rig.telemetry.timings["BuildDuration"] == [2_000]
    assert rig.telemetry.counts["BuildsSucceeded"] == 1
    assert rig.queue.messages == []


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        # waiting: the phase is the wait since the refresh started (2 s at the first poll), doubling
        ("scheduled", [2_000, 4_000, 8_000, 16_000]),
        # building: the phase starts again at the first poll that finds it started
        ("processing", [2_000, 2_000, 4_000, 8_000]),
    ],
)
def test_verifier_pending_polls_again_after_the_phases_age_doubling_until_done(status, expected):
    rig = Rig()
    rig.jobs.statuses["tok1"] = status
    rig.refresh()
    dues = []
    for _ in range(4):
        rig.deliver()
        dues.append(rig.queue.messages[0][0] - rig.clock.now)
    assert dues == expected
    rig.jobs.statuses["tok1"] = "done"
    rig.deliver()
    assert rig.store.get(KEY).build_status == "done"
    assert len(rig.jobs.requests) == 5  # one Cube request per poll


def test_verifier_polls_a_long_wait_at_most_once_a_minute():
    rig = Rig()
    rig.jobs.statuses["tok1"] = "scheduled"
    rig.refresh()
    for _ in range(12):
        rig.deliver()
    assert rig.queue.messages[0][0] - rig.clock.now == 60_000


def test_verifier_stuck_build_fails_as_timeout_at_the_deadline_from_its_start_and_is_retriggered():
    rig = Rig()
    rig.jobs.statuses["tok1"] = "processing"
    rig.refresh()
    while not rig.retriggers():
        rig.deliver()
    # The build was first seen started at the first poll (2 s): the deadline counts from there, and the
    # last poll is moved to the deadline itself.
    assert rig.clock.now == T0 + 2_000 + TIMEOUT
    assert rig.store.get(KEY).build_failure_class == "timeout"
    assert rig.telemetry.counts["BuildsFailed[FailureClass=timeout]"] == 1


def test_verifier_a_build_waiting_in_cubes_queue_is_alive_however_long_until_the_queue_bound():
    rig = Rig()
    rig.jobs.statuses["tok1"] = "scheduled"
    rig.refresh()
    while rig.clock.now < T0 + 2 * TIMEOUT:  # far past the build timeout: still waiting, still alive
        rig.deliver()
    assert rig.retriggers() == [] and rig.store.get(KEY).build_status is None
    rig.jobs.statuses["tok1"] = "processing"  # it starts: the build timeout counts from now
    rig.deliver()
    started = rig.clock.now
    rig.jobs.statuses["tok1"] = "done"
    rig.deliver()
    assert rig.store.get(KEY).build_status == "done" and rig.retriggers() == []
    assert started < T0 + 3 * TIMEOUT


def test_verifier_a_build_still_waiting_at_the_queue_bound_is_stuck_and_retriggered():
    rig = Rig()
    rig.jobs.statuses["tok1"] = "scheduled"
    rig.refresh()
    while not rig.retriggers():
        rig.deliver()
    assert rig.clock.now == T0 + verify.QUEUED_BOUND_MS
    assert rig.store.get(KEY).build_failure_class == "timeout"


@pytest.mark.parametrize("status", ["failure: relation does not exist", "missing_partition", "not_found"])
def test_verifier_failed_build_retriggers_only_the_failed_key_after_a_backoff(status):
    rig = Rig()
    other = RefreshKey("tenant-1", "Groups")
    rig.store.claim(other, now=T0, window_ms=1, claim_token="x", expires_at=0)
    rig.store.claim(KEY, now=T0, window_ms=1, claim_token="y", expires_at=0)
    rig.jobs.statuses["bad"] = status
    rig.verifier.schedule(
        "tenant-1", [BuildTarget(KEY, ("bad",), T0, T0 - 9), BuildTarget(other, ("good",), T0, T0 - 9)]
    )
    rig.deliver()
    [(due, message)] = rig.queue.messages
    assert isinstance(message, RetriggerMessage)
    assert message.refresh_keys() == [(KEY, T0 - 9)] and message.attempt == 1
    assert due == rig.clock.now + 2_000
    assert rig.store.get(KEY).retrigger_due_at == due
    assert rig.store.get(other).build_status == "done"
    assert rig.telemetry.counts["BuildsRetriggered"] == 1


def test_verifier_dead_letters_after_the_last_retrigger_and_resets_on_success():
    rig = Rig()
    rig.jobs.default = "failure: permission denied for table users"
    for n in range(1, MAX_RETRIGGERS + 2):
        rig.clock.advance(1_000)
        rig.refresh()
        rig.deliver()
        assert rig.store.get(KEY).build_failures == n
    retriggers = [m.attempt for m in rig.retriggers()]
    assert retriggers == list(range(1, MAX_RETRIGGERS + 1))
    [letter] = rig.queue.dead_letters
    assert isinstance(letter, RetriggerMessage) and letter.dead_lettered
    assert letter.error == "failure: permission denied for table users"
    assert rig.store.get(KEY).build_status == "dead_lettered"
    assert rig.telemetry.counts["BuildsDeadLettered"] == 1
    rig.jobs.default = "done"
    rig.clock.advance(1_000)
    rig.refresh()
    rig.deliver()
    assert (rig.store.get(KEY).build_status, rig.store.get(KEY).build_failures) == ("done", 0)


def test_verifier_refresh_started_after_the_dead_letter_gets_a_fresh_budget_of_retriggers():
    rig = Rig()
    rig.jobs.default = "failure: permission denied for table users"
    for _ in range(MAX_RETRIGGERS + 1):
        rig.clock.advance(1_000)
        rig.refresh()
        rig.deliver()
    assert rig.store.get(KEY).build_status == "dead_lettered" and len(rig.queue.dead_letters) == 1
    rig.queue.messages.clear()
    # The replay of the dead letter (or a new mutation) refreshes after it: re-trigger 1 of 5 again.
    rig.clock.advance(1_000)
    rig.refresh()
    rig.deliver()
    state = rig.store.get(KEY)
    assert (state.build_status, state.build_failures) == ("failed", 1)
    assert [m.attempt for m in rig.retriggers()] == [1]
    assert len(rig.queue.dead_letters) == 1


def test_verifier_refresh_started_before_the_dead_letter_does_not_restart_the_budget():
    rig = Rig()
    rig.jobs.default = "failure: boom"
    for _ in range(MAX_RETRIGGERS):
        rig.clock.advance(1_000)
        rig.refresh()
        rig.deliver()
    rig.clock.advance(1_000)
    older = rig.refresh()  # in flight while the next one is dead-lettered
    rig.queue.messages.clear()
    rig.clock.advance(1_000)
    rig.refresh()
    rig.deliver()
    assert rig.store.get(KEY).build_status == "dead_lettered"
    # The older refresh's failure arrives after the dead letter: it is settled already (older than
    # the recorded refresh), so no re-trigger and no second dead letter.
    rig.clock.advance(1_000)
    rig.verifier.schedule(KEY.tenant_id, [older])
    rig.deliver()
    assert rig.retriggers() == [] and len(rig.queue.dead_letters) == 1


def test_verifier_duplicate_verify_messages_settle_once():
    rig = Rig()
    rig.jobs.default = "failure: boom"
    rig.refresh()
    [(due, message)] = rig.queue.messages
    rig.queue.messages.append((due, message))  # SQS delivered it twice
    rig.clock.now = due
    ready = rig.queue.due(due)
    rig.verifier.process([(RecordRef("sqs", 0), ready[0])], deadline_ms=10**15)
    rig.verifier.process([(RecordRef("sqs", 1), ready[1])], deadline_ms=10**15)
    assert rig.store.get(KEY).build_failures == 1
    assert rig.telemetry.counts["BuildsFailed[FailureClass=failure]"] == 1
    assert len(rig.retriggers()) == 1


def test_verifier_crash_between_the_retrigger_and_its_record_retriggers_again_on_redelivery():
    rig = Rig()
    rig.jobs.default = "not_found"
    rig.refresh()
    [(due, message)] = rig.queue.messages
    rig.clock.now = due
    rig.queue.due(due)
    real = rig.store.record_build

    def crash(key: RefreshKey, record: BuildRecord) -> bool:
        raise StoreUnavailable("crashed")

    rig.store.record_build = crash  # type: ignore[method-assign]
    assert rig.verifier.process([(RecordRef("sqs", 0), message)], deadline_ms=10**15) == {RecordRef("sqs", 0)}
    rig.store.record_build = real  # type: ignore[method-assign]
    assert rig.verifier.process([(RecordRef("sqs", 0), message)], deadline_ms=10**15) == set()
    assert len(rig.retriggers()) == 2  # the re-trigger is repeated, never lost (debounce absorbs the copy)
    assert rig.store.get(KEY).build_failures == 1


def test_verifier_failure_with_a_newer_refresh_started_is_still_retriggered():
    """Mutations may ride along with the failed build (docs/load-aware.md): the newer refresh may
    have started before them, so the failure is re-triggered; the re-trigger goes through the debounce
    protocol, which joins or waits for the newer refresh."""
    rig = Rig()
    rig.jobs.default = "failure: boom"
    rig.refresh()
    rig.clock.advance(1_500)
    rig.store.claim(KEY, now=rig.clock.now, window_ms=1_000, claim_token="newer", expires_at=0)
    rig.deliver()
    assert len(rig.retriggers()) == 1
    assert rig.store.get(KEY).build_failures == 1


def test_verifier_collision_with_another_build_of_the_table_is_retriggered_not_counted():
    rig = Rig()
    rig.jobs.statuses["tok1"] = 'failure: relation "users_main20260101_abc" already exists'
    rig.refresh()
    rig.deliver()
    [retrigger] = rig.retriggers()
    assert retrigger.attempt == 1
    state = rig.store.get(KEY)
    assert (state.build_failure_class, state.build_failures) == ("collision", 0)
    assert rig.telemetry.counts["BuildCollisions"] == 1
    assert not any(k.startswith("BuildsFailed") for k in rig.telemetry.counts)


def test_verifier_a_real_failure_beside_a_collision_decides_the_key():
    jobs = {
        "a": JobStatus('failure: relation "t" already exists', ("tenant-1",)),
        "b": JobStatus("failure: permission denied for table users", ("tenant-1",)),
    }
    assert classify(target(), jobs, "tenant-1", now=T0, deadline_at=T0 + 1).failure_class == "failure"


def test_verifier_4xx_on_verification_dead_letters_and_never_loops():
    rig = Rig()
    rig.refresh()
    rig.jobs.failures.append(CubeRejected("Cube rejected the request (403): Invalid token", status=403))
    assert rig.deliver() == set()
    assert rig.queue.messages == []
    [letter] = rig.queue.dead_letters
    assert letter.failure_class == "rejected"
    assert rig.telemetry.counts["BuildsDeadLettered"] == 1
    assert rig.telemetry.counts["CubeErrorsByClass[ErrorClass=client]"] == 1


def test_verifier_5xx_on_verification_polls_again():
    rig = Rig()
    rig.refresh()
    rig.jobs.failures.append(CubeServerError("Cube failed (500): x", status=500))
    rig.deliver()
    [(_, message)] = rig.queue.messages
    assert isinstance(message, VerifyMessage) and message.poll == 1
    rig.deliver()
    assert rig.store.get(KEY).build_status == "done"


def test_verifier_batches_one_cube_request_per_tenant():
    rig = Rig()
    keys = [RefreshKey("tenant-1", "Users"), RefreshKey("tenant-1", "Groups"), RefreshKey("tenant-2", "Users")]
    for i, key in enumerate(keys):
        rig.refresh(key, tokens=(f"t{i}",))
    rig.deliver()
    assert sorted(t for t, _ in rig.jobs.requests) == ["tenant-1", "tenant-2"]
    assert all(rig.store.get(k).build_status == "done" for k in keys)


def test_service_refresh_verify_failure_retrigger_done_end_to_end_over_fakes():
    rig = ServiceRig(verify=True, window_ms=5_000)
    batch = decode_msk_event(msk_event(mutation(timestamp=T0 - 300)), now_ms=rig.clock.now)
    assert not rig.service.process_mutations(batch.mutations, deadline_ms=rig.deadline).failed
    [(due, verify)] = rig.build_queue.messages
    assert isinstance(verify, VerifyMessage) and verify.targets[0].tokens == ("job-tenant-1-Users-1",)
    assert rig.store.get(KEY).job_tokens == ("job-tenant-1-Users-1",)
    rig.jobs.statuses["job-tenant-1-Users-1"] = "failure: permission denied for table users"
    rig.clock.now = due
    rig.build_queue.due(due)
    assert not rig.service.process_verify([(RecordRef("sqs", 0), verify)], deadline_ms=rig.deadline).failed
    [(due, retrigger)] = rig.build_queue.messages
    assert isinstance(retrigger, RetriggerMessage) and retrigger.refresh_keys() == [(KEY, T0 - 300)]
    rig.clock.now = max(due, T0 + 5_000)  # the window is over: the re-trigger claims at once
    rig.build_queue.due(rig.clock.now)
    assert not rig.service.process_retrigger([(RecordRef("sqs", 0), retrigger)], deadline_ms=rig.deadline).failed
    assert len(rig.cube.requests) == 2
    [(due, verify)] = rig.build_queue.messages
    rig.clock.now = due
    rig.service.process_verify([(RecordRef("sqs", 0), verify)], deadline_ms=rig.deadline)
    state = rig.store.get(KEY)
    assert (state.build_status, state.build_failures, state.freshness_lag_ms) == ("done", 0, due - (T0 - 300))


def test_service_retrigger_inside_the_window_joins_the_debounce_instead_of_calling_cube():

    rig = ServiceRig(verify=True)
    rig.store.claim(KEY, now=T0, window_ms=1, claim_token="c", expires_at=0)
    message = RetriggerMessage("tenant-1", (RetriggerTarget("Users", T0 - 1),), 1)
    outcome = rig.service.process_retrigger([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline)
    assert not outcome.failed and rig.cube.requests == []
    assert [k.status for k in outcome.keys] == ["debounced"]
    assert len(rig.scheduler.messages) == 1  # the trailing refresh of the window covers it
