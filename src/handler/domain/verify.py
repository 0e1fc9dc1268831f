"""From queued to built: verify every refresh Cube accepted, re-trigger what failed, measure freshness.

After Cube accepts a refresh, a *verify* message (one per tenant request, delayed on the refresh
queue) carries the job tokens of each key. Delivered, it polls Cube once for all of them
(`{"action": "get", "resType": "object", "tokens": [...]}`) and settles each key:
- every job `done`: the build is recorded on the key's item, `FreshnessLag` (seen done minus the
  oldest mutation the refresh covers) and `BuildDuration` are emitted;
- `scheduled` / `processing`: polled again later (2 s doubling to 60 s) until the build deadline
  (`CUBE_PREAGG_BUILD_TIMEOUT_MS` after the refresh started), then it counts as failed (`timeout`);
- `failure: ...`, `missing_partition`, `not_found` (Cube restarted: job tokens live in its memory),
  a job whose security context names another tenant, or the deadline passed: the key failed. A
  *retrigger* message is sent for the failed keys after a backoff; delivered, it goes through the
  debounce protocol like a mutation as old as the oldest one the failed refresh covered. After
  `MAX_RETRIGGERS` consecutive failures of a key, the retrigger message is dead-lettered instead
  (an operator redrives it to the refresh queue to replay it) and `BuildsDeadLettered` alarms. A
  refresh that starts after the dead letter (the replay, or a new mutation) has a fresh budget.

Crash and duplicate safety: messages are sent before the outcome is recorded, and the record is
conditional on the refresh being newer than the last one recorded (`buildStartedAt`), so a duplicate
or redelivered verify message finds its refresh settled and does nothing, and a crash between a
poll and its re-trigger only repeats the poll. A duplicate that raced the first one to the re-trigger
costs at most one extra refresh, which the debounce window absorbs.

Under load (docs/load-aware.md): a build that is still `scheduled` or `processing` is alive. Each
poll that finds it so renews the key's in-flight gate and its build-budget lease, and records, when
every job is still `scheduled`, the poll's send time as the key's ride-along horizon. The build
deadline counts from the first poll that finds it started (`processingAt`); a build still waiting
`QUEUED_BOUND_MS` after its refresh started is stuck. A build that lost a race with another build of
the same table (`failure: relation ... already exists`) is a collision: re-triggered, not counted.
Settling a build (done or failed) drops the gate and frees the lease; the caller then wakes the key's
waiting trailing refresh and the oldest keys waiting for budget."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from handler.domain.admission import LEASE_MS, NO_LEASE, Admission, Lease
from handler.domain.errors import CubeError, SchedulerUnavailable, StoreUnavailable
from handler.domain.model import RecordRef, RefreshKey, is_valid_target, is_valid_tenant
from handler.domain.partitions import DateRange
from handler.domain.ports import (
    BuildQueue,
    BuildRecord,
    Clock,
    DebounceStore,
    JobStatus,
    JobStatusReader,
    KeyState,
    Telemetry,
)
from handler.domain.window import Windows

log = logging.getLogger(__name__)

# Delay before poll n (0-based): 2 s doubling to 60 s, then every 60 s until the build deadline.
POLL_DELAYS_MS = (2_000, 4_000, 8_000, 16_000, 32_000, 60_000)
# Delay before re-trigger n (1-based) of a key whose build failed; after the last, dead-letter.
RETRIGGER_DELAYS_MS = (2_000, 10_000, 30_000, 60_000, 120_000)
MAX_RETRIGGERS = len(RETRIGGER_DELAYS_MS)
# Cube drops a job from its queue an hour after it was posted, waiting or running (cube-js/cube
# RefreshScheduler.postBuildJobs: orphanedTimeout 3600 s); a build still waiting after this is stuck.
QUEUED_BOUND_MS = 65 * 60_000

FAILURE_CLASSES = (
    "failure",
    "missing_partition",
    "not_found",
    "timeout",
    "tenant_mismatch",
    "rejected",
    "collision",
)
# Cube names a rollup table with a one-second timestamp: two builds of one partition in the same second
# collide and the loser fails with this (observed on Cube 1.7.43; docs/cube-jobs-api.md, hazard c).
COLLISION = "already exists"
# A job of another tenant (a bug or a token mix-up) and a 4xx on verification (token, scope) cannot
# be fixed by building again: dead-lettered and alarmed at once, never looped.
NOT_RETRIGGERED = frozenset({"tenant_mismatch", "rejected"})
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MAX_ERROR = 240


def poll_delay_ms(poll: int) -> int:
    return POLL_DELAYS_MS[min(poll, len(POLL_DELAYS_MS) - 1)]


def phase_delay_ms(age_ms: int) -> int:
    """The next poll of a pending build: after its phase's age so far (doubling), 2 s to 60 s."""
    return max(POLL_DELAYS_MS[0], min(POLL_DELAYS_MS[-1], age_ms))


def redact(text: str) -> str:
    """Cube's error text without values: quoted literals and `Key (col)=(value)` details are masked
    (a database error can quote row data), whitespace collapsed, length bounded."""
    text = re.sub(r"'(?:[^']|'')*'", "'?'", text)
    text = re.sub(r"\)=\([^)]*\)", ")=(?)", text)
    text = " ".join(text.split())
    return text[:_MAX_ERROR]


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class BuildTarget:
    """One key of a refresh Cube accepted: its job tokens, when the refresh started, the oldest
    mutation it covers, the build budget it holds, and what the polls saw so far: the last poll that
    found every job still `scheduled` (`scheduled_at`), the first that found the build started
    (`processing_at`)."""

    key: RefreshKey
    tokens: tuple[str, ...]
    started_at: int
    oldest_ms: int
    lease: Lease = NO_LEASE
    scheduled_at: int | None = None
    processing_at: int | None = None

    def deadline(self, *, build_timeout_ms: int, queued_bound_ms: int) -> int:
        """When a still pending build counts as stuck: the build timeout after it started, or the
        queue bound after its refresh started while it has not."""
        if self.processing_at is not None:
            return self.processing_at + build_timeout_ms
        return self.started_at + queued_bound_ms

    def as_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "target": self.key.target,
            "tokens": list(self.tokens),
            "startedAt": self.started_at,
            "oldestAt": self.oldest_ms,
        }
        if self.key.partition:
            body["partition"] = self.key.partition
        if self.lease.slots:
            body["lease"] = self.lease.token
            body["slots"] = list(self.lease.slots)
        if self.scheduled_at is not None:
            body["scheduledAt"] = self.scheduled_at
        if self.processing_at is not None:
            body["processingAt"] = self.processing_at
        return body


@dataclass(frozen=True, slots=True)
class VerifyMessage:
    tenant_id: str
    deadline_at: int  # build deadline: the earliest refresh start plus CUBE_PREAGG_BUILD_TIMEOUT_MS
    targets: tuple[BuildTarget, ...]
    poll: int = 0  # polls done before this one

    def as_body(self) -> dict[str, Any]:
        return {
            "kind": "verify",
            "tenantId": self.tenant_id,
            "deadlineAt": self.deadline_at,
            "poll": self.poll,
            "targets": [t.as_body() for t in self.targets],
        }


@dataclass(frozen=True, slots=True)
class RetriggerTarget:
    target: str
    oldest_ms: int
    partition: str = ""  # RefreshKey.partition


@dataclass(frozen=True, slots=True)
class RetriggerMessage:
    """Refresh these keys again through the debounce protocol. `attempt` is the re-trigger number
    (1-based); a dead-lettered message carries the failure (class and redacted Cube error) and is
    replayed as one more re-trigger when an operator redrives it to the refresh queue."""

    tenant_id: str
    targets: tuple[RetriggerTarget, ...]
    attempt: int
    failure_class: str = ""
    error: str = ""
    dead_lettered: bool = False

    def refresh_keys(self) -> list[tuple[RefreshKey, int]]:
        return [(RefreshKey(self.tenant_id, t.target, t.partition), t.oldest_ms) for t in self.targets]

    def as_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "retrigger",
            "tenantId": self.tenant_id,
            "attempt": self.attempt,
            "targets": [
                {"target": t.target, "oldestAt": t.oldest_ms} | ({"partition": t.partition} if t.partition else {})
                for t in self.targets
            ],
        }
        if self.failure_class:
            body["failureClass"] = self.failure_class
            body["error"] = self.error
        if self.dead_lettered:
            body["deadLettered"] = True
        return body


def _int(data: Mapping[str, Any], name: str, what: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} message has an invalid {name}")
    return value


def _partition(item: Mapping[str, Any], what: str) -> str:
    """A partition key's range label, or "" for a whole-target key."""
    partition = item.get("partition", "")
    if partition == "":
        return ""
    try:
        if not isinstance(partition, str):
            raise ValueError(partition)
        return DateRange.parse(partition).label
    except ValueError:
        raise ValueError(f"{what} message has an invalid partition") from None


def _tenant_and_targets(data: Mapping[str, Any], what: str) -> tuple[str, list[Mapping[str, Any]]]:
    tenant = data.get("tenantId")
    if not (isinstance(tenant, str) and is_valid_tenant(tenant)):
        raise ValueError(f"{what} message has an invalid tenantId")
    targets = data.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, Mapping) for t in targets):
        raise ValueError(f"{what} message has no targets")
    for item in targets:
        target = item.get("target")
        if not (isinstance(target, str) and is_valid_target(target)):
            raise ValueError(f"{what} message has an invalid target")
    return tenant, targets


def parse_verify(data: Mapping[str, Any]) -> VerifyMessage:
    """A verify message body (already JSON-decoded, kind "verify"); raises ValueError, safe to log."""
    tenant, items = _tenant_and_targets(data, "verify")
    targets = []
    for item in items:
        tokens = item.get("tokens")
        if (
            not isinstance(tokens, list)
            or not tokens
            or not all(isinstance(t, str) and _TOKEN_RE.match(t) for t in tokens)
        ):
            raise ValueError("verify message has invalid job tokens")
        targets.append(
            BuildTarget(
                RefreshKey(tenant, item["target"], _partition(item, "verify")),
                tuple(tokens),
                _int(item, "startedAt", "verify"),
                _int(item, "oldestAt", "verify"),
                _lease(item),
                _int(item, "scheduledAt", "verify") if "scheduledAt" in item else None,
                _int(item, "processingAt", "verify") if "processingAt" in item else None,
            )
        )
    return VerifyMessage(tenant, _int(data, "deadlineAt", "verify"), tuple(targets), _int(data, "poll", "verify"))


def _lease(item: Mapping[str, Any]) -> Lease:
    """The build budget a target holds: a lease token and its slot numbers, or none."""
    if "lease" not in item and "slots" not in item:
        return NO_LEASE
    token, slots = item.get("lease"), item.get("slots")
    if (
        not isinstance(token, str)
        or not _TOKEN_RE.match(token)
        or not isinstance(slots, list)
        or not slots
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1_000 for i in slots)
    ):
        raise ValueError("verify message has an invalid lease")
    return Lease(token, tuple(slots))


def parse_retrigger(data: Mapping[str, Any]) -> RetriggerMessage:
    tenant, items = _tenant_and_targets(data, "retrigger")
    targets = tuple(
        RetriggerTarget(item["target"], _int(item, "oldestAt", "retrigger"), _partition(item, "retrigger"))
        for item in items
    )
    failure_class, error = data.get("failureClass", ""), data.get("error", "")
    if not isinstance(failure_class, str) or not isinstance(error, str):
        raise ValueError("retrigger message has an invalid failureClass or error")
    return RetriggerMessage(
        tenant,
        targets,
        _int(data, "attempt", "retrigger"),
        failure_class,
        error,
        dead_lettered=data.get("deadLettered") is True,
    )


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True, slots=True)
class Verdict:
    target: BuildTarget
    state: str  # done | pending | failed
    failure_class: str = ""
    error: str = ""


def classify(
    target: BuildTarget, jobs: Mapping[str, JobStatus], tenant_id: str, *, now: int, deadline_at: int
) -> Verdict:
    """What Cube's answer says about one key's jobs. The worst job decides: a job of another tenant,
    then a failed build, a missing partition, an unknown token; then any job still queued or running
    (failed as `timeout` once the build deadline has passed); else every job is done."""
    statuses = [jobs.get(token) or JobStatus("not_found") for token in target.tokens]
    foreign = [j for j in statuses if j.status != "not_found" and j.tenant_ids != (tenant_id,)]
    if foreign:
        return Verdict(target, "failed", "tenant_mismatch", "a job's security context names another tenant")
    failures = [j for j in statuses if j.status.startswith("failure") or j.status == "pre_agg_not_found"]
    for job in failures:
        if COLLISION not in job.status:
            return Verdict(target, "failed", "failure", redact(job.status))
    if failures:
        return Verdict(target, "failed", "collision", redact(failures[0].status))
    for cls in ("missing_partition", "not_found"):
        if any(j.status == cls for j in statuses):
            return Verdict(target, "failed", cls, cls)
    if all(j.status.startswith("done") for j in statuses):
        return Verdict(target, "done")
    if now >= deadline_at:
        pending = sorted({j.status for j in statuses if not j.status.startswith("done")})
        return Verdict(target, "failed", "timeout", f"not built by the build deadline ({', '.join(pending)})")
    return Verdict(target, "pending")


# --------------------------------------------------------------------------- the verifier


def _previous_failures(state: KeyState | None, started_at: int) -> int:
    """The key's consecutive failed builds before this one. A refresh that started after the key was
    dead-lettered (an operator's replay of the dead letter, or a new mutation) gets a fresh budget of
    re-triggers: the alarm has fired, and what comes next is a new attempt, not more of the old one."""
    if state is None or not state.build_failures:
        return 0
    if state.build_status == "dead_lettered" and state.build_seen_at is not None and started_at > state.build_seen_at:
        return 0
    return state.build_failures


@dataclass(slots=True)
class Settled:
    """What a batch of verify messages settled: the refs to redeliver, the keys whose build ended
    (done or failed: the gate is down, their waiting trailing refresh can go), and how many budget
    slots were freed (as many waiting keys can go)."""

    failed: set[RecordRef] = field(default_factory=set)
    keys: list[RefreshKey] = field(default_factory=list)
    freed_slots: int = 0


class BuildVerifier:
    """Schedules verifications of accepted refreshes and settles them when they come due."""

    def __init__(  # noqa: PLR0917
        self,
        store: DebounceStore,
        cube: JobStatusReader,
        queue: BuildQueue,
        telemetry: Telemetry,
        clock: Clock,
        build_timeout_ms: int,
        *,
        admission: Admission | None = None,
        windows: Windows | None = None,
        queued_bound_ms: int = QUEUED_BOUND_MS,
        lease_ms: int = LEASE_MS,
    ) -> None:
        self.store = store
        self.cube = cube
        self.queue = queue
        self.telemetry = telemetry
        self.clock = clock
        self.build_timeout_ms = build_timeout_ms
        self.admission = admission  # None: no build budget (its leases are never taken)
        self.windows = windows  # None: a fixed window (nothing to adapt)
        self.queued_bound_ms = queued_bound_ms
        self.lease_ms = lease_ms

    def _deadline(self, target: BuildTarget) -> int:
        return target.deadline(build_timeout_ms=self.build_timeout_ms, queued_bound_ms=self.queued_bound_ms)

    def schedule(self, tenant_id: str, targets: Sequence[BuildTarget]) -> None:
        """One verify message for the keys of one accepted tenant request. Raises SchedulerUnavailable."""
        if not targets:
            return
        now = self.clock.now_ms()
        # The chain's hard end: no build can be pending longer than queued, then built.
        deadline = min(t.started_at for t in targets) + self.queued_bound_ms + self.build_timeout_ms
        self.queue.send(VerifyMessage(tenant_id, deadline, tuple(targets)), due_at=now + poll_delay_ms(0), now=now)

    def process(self, messages: Iterable[tuple[RecordRef, VerifyMessage]], *, deadline_ms: int) -> set[RecordRef]:
        """Settle due verify messages; one Cube request per tenant. Returns the refs to redeliver."""
        return self.settle(messages, deadline_ms=deadline_ms).failed

    def settle(self, messages: Iterable[tuple[RecordRef, VerifyMessage]], *, deadline_ms: int) -> Settled:
        by_tenant: dict[str, list[tuple[RecordRef, VerifyMessage]]] = defaultdict(list)
        for ref, message in messages:
            by_tenant[message.tenant_id].append((ref, message))
        settled = Settled()
        for tenant_id, items in sorted(by_tenant.items()):
            tokens = sorted({tok for _, m in items for t in m.targets for tok in t.tokens})
            answer: Mapping[str, JobStatus] | CubeError
            sent = self.clock.now_ms()  # before the request: what Cube answers holds at or after this
            try:
                answer = self.cube.job_statuses(tenant_id, tokens, deadline_ms=deadline_ms)
            except CubeError as exc:
                answer = exc
            for ref, message in items:
                try:
                    self._settle(message, answer, sent, settled)
                except (StoreUnavailable, SchedulerUnavailable) as exc:
                    log.warning("build verification failed", extra={"tenant_id": tenant_id, "error": str(exc)})
                    settled.failed.add(ref)
        return settled

    def _settle(
        self, message: VerifyMessage, answer: Mapping[str, JobStatus] | CubeError, sent: int, settled: Settled
    ) -> None:
        now = self.clock.now_ms()
        if isinstance(answer, CubeError):
            self.telemetry.count("CubeErrors")
            self.telemetry.count("CubeErrorsByClass", dimension=("ErrorClass", answer.error_class))
            log.warning(
                "build verification: Cube answered with an error",
                extra={"tenant_id": message.tenant_id, "error_class": answer.error_class, "error": str(answer)},
            )
            alive = [t for t in message.targets if now < min(self._deadline(t), message.deadline_at)]
            if answer.retryable and alive:
                # Unknown state: keep the builds' gate and budget while we ask again.
                self._continue(message, alive, now, sent=None)
                return
            cls = "rejected" if not answer.retryable else "timeout"
            verdicts = [Verdict(t, "failed", cls, redact(str(answer))) for t in message.targets]
        else:
            verdicts = [self._classify(t, answer, message, now, sent) for t in message.targets]
        pending = [v.target for v in verdicts if v.state == "pending"]
        if pending:
            self._continue(message, pending, now, sent=sent)
        self._fail([v for v in verdicts if v.state == "failed"], message.tenant_id, now)
        for verdict in verdicts:
            if verdict.state == "done":
                self._done(verdict.target, now)
        for verdict in verdicts:
            if verdict.state != "pending":
                self._release(verdict.target, settled)

    def _classify(
        self, target: BuildTarget, jobs: Mapping[str, JobStatus], message: VerifyMessage, now: int, sent: int
    ) -> Verdict:
        """Classify, after noting what this poll (sent at `sent`) saw of the build's progress: every
        job still `scheduled` (the ride-along horizon moves to `sent`), or started (`processing_at`)."""
        statuses = [jobs.get(token) for token in target.tokens]
        if all(j is not None and j.status == "scheduled" for j in statuses):
            target = replace(target, scheduled_at=sent)
        elif target.processing_at is None:
            target = replace(target, processing_at=now)
        deadline = min(self._deadline(target), message.deadline_at)
        return classify(target, jobs, message.tenant_id, now=now, deadline_at=deadline)

    def _continue(self, message: VerifyMessage, pending: list[BuildTarget], now: int, *, sent: int | None) -> None:
        """Poll the pending builds again: the next message first, then the records. A copy of a message
        (SQS delivers at least once) whose next poll another copy already sent stops here, so copies do
        not multiply over a long wait; a redelivery after a crash between the send and the record may
        send once more, and that copy stops at the next poll."""
        fresh = [t for t in pending if not self._sent_already(t, message.poll)]
        if not fresh:
            return
        self._poll_again(message, fresh, now)
        for target in fresh:
            seen = target.scheduled_at if sent is not None and target.scheduled_at == sent else None
            self._renew(target, now, scheduled_at=seen, poll_seq=message.poll + 1)

    def _sent_already(self, target: BuildTarget, poll: int) -> bool:
        state = self.store.get(target.key)
        return (
            state is not None
            and state.jobs_started_at == target.started_at
            and state.poll_seq is not None
            and state.poll_seq > poll
        )

    def _renew(self, target: BuildTarget, now: int, *, scheduled_at: int | None, poll_seq: int) -> None:
        """The build is alive: keep its gate and budget, raise its ride-along horizon, measure the wait."""
        until = now + self.lease_ms
        self.store.observe_pending(
            target.key, started_at=target.started_at, inflight_until=until, scheduled_at=scheduled_at, poll_seq=poll_seq
        )
        if self.admission is not None and target.lease.slots:
            self.admission.renew(target.lease)
        if target.processing_at is None:
            self.telemetry.timing("QueuedBuildAge", max(0, now - target.started_at))
        self.telemetry.timing("BacklogAge", max(0, now - target.oldest_ms))

    def _release(self, target: BuildTarget, settled: Settled) -> None:
        """The build is settled (after its re-trigger and its record): drop the gate, free the budget.
        Both conditional, so a duplicate or a crash repaired by a redelivery changes nothing else."""
        self.store.clear_inflight(target.key, started_at=target.started_at)
        settled.keys.append(target.key)
        if self.admission is not None and target.lease.slots:
            settled.freed_slots += self.admission.free(target.lease)

    def _poll_again(self, message: VerifyMessage, targets: list[BuildTarget], now: int) -> None:
        later = replace(message, targets=tuple(targets), poll=message.poll + 1)
        delay = min(phase_delay_ms(now - (t.processing_at or t.started_at)) for t in targets)
        due = min(now + delay, max(now, min(*(self._deadline(t) for t in targets), message.deadline_at)))
        self.queue.send(later, due_at=due, now=now)

    def _next_window(self, target: BuildTarget, state: KeyState | None) -> int | None:
        if self.windows is None:
            return None
        waited = (target.scheduled_at - target.started_at) if target.scheduled_at is not None else 0
        return self.windows.after_build(target.key, state.window_ms if state else None, queue_wait_ms=waited)

    def _done(self, target: BuildTarget, now: int) -> None:
        lag = max(0, now - target.oldest_ms)
        window = self._next_window(target, self.store.get(target.key) if self.windows is not None else None)
        record = BuildRecord(target.started_at, "done", now, freshness_lag_ms=lag, failures=0, window_ms=window)
        if not self.store.record_build(target.key, record):
            return  # a duplicate, or a newer refresh already settled: it was measured then
        self.telemetry.count("BuildsSucceeded")
        self.telemetry.timing("FreshnessLag", lag)
        self.telemetry.timing("BuildDuration", max(0, now - target.started_at))
        log.info(
            "build done",
            extra={"key": target.key.pk, "freshness_lag_ms": lag, "build_ms": max(0, now - target.started_at)},
        )

    def _fail(self, verdicts: list[Verdict], tenant_id: str, now: int) -> None:
        """Send the re-triggers and dead letters first, then record the outcomes (conditionally).
        A failed build is re-triggered even when a newer refresh of the key has started: mutations
        may ride along with the failed build (docs/load-aware.md), and the re-trigger goes through the
        debounce protocol, which joins or waits for whatever is in flight. A collision with another
        build of the same table is re-triggered without counting as a failure."""
        plans: list[tuple[Verdict, BuildRecord]] = []
        retrigger: dict[int, list[Verdict]] = defaultdict(list)
        dead: list[tuple[Verdict, int]] = []
        for verdict in verdicts:
            target = verdict.target
            state = self.store.get(target.key)
            if state is not None and state.build_started_at is not None and state.build_started_at >= target.started_at:
                continue  # settled already (a duplicate message, or a newer refresh): nothing to do
            previous = _previous_failures(state, target.started_at)
            collided = verdict.failure_class == "collision"
            failures = previous if collided else previous + 1
            due = None
            if not collided and (failures > MAX_RETRIGGERS or verdict.failure_class in NOT_RETRIGGERED):
                dead.append((verdict, failures))
            else:
                attempt = max(1, min(failures, MAX_RETRIGGERS))
                due = now + RETRIGGER_DELAYS_MS[attempt - 1]
                retrigger[attempt].append(verdict)
            status = "dead_lettered" if dead and dead[-1][0] is verdict else "failed"
            plans.append(
                (
                    verdict,
                    BuildRecord(
                        target.started_at,
                        status,
                        now,
                        failure_class=verdict.failure_class,
                        error=verdict.error,
                        failures=failures,
                        retrigger_due_at=due,
                    ),
                )
            )
        for attempt, group in sorted(retrigger.items()):
            msg = RetriggerMessage(
                tenant_id,
                tuple(RetriggerTarget(v.target.key.target, v.target.oldest_ms, v.target.key.partition) for v in group),
                attempt,
            )
            self.queue.send(msg, due_at=now + RETRIGGER_DELAYS_MS[attempt - 1], now=now)
        for verdict, failures in dead:
            target = verdict.target
            letter = RetriggerMessage(
                tenant_id,
                (RetriggerTarget(target.key.target, target.oldest_ms, target.key.partition),),
                failures,
                verdict.failure_class,
                verdict.error,
                dead_lettered=True,
            )
            self.queue.dead_letter(letter)
        for verdict, record in plans:
            if not self.store.record_build(verdict.target.key, record):
                continue
            if verdict.failure_class == "collision":
                self.telemetry.count("BuildCollisions")
            else:
                self.telemetry.count("BuildsFailed", dimension=("FailureClass", verdict.failure_class))
            if record.retrigger_due_at is not None:
                self.telemetry.count("BuildsRetriggered")
            log_extra = {
                "key": verdict.target.key.pk,
                "failure_class": verdict.failure_class,
                "error": verdict.error,
                "failures": record.failures,
            }
            if record.status == "dead_lettered":
                self.telemetry.count("BuildsDeadLettered")
                log.error("build failed after its re-triggers: dead-lettered", extra=log_extra)
            else:
                log.warning("build failed", extra=log_extra)
