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
costs at most one extra refresh, which the debounce window absorbs."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

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

log = logging.getLogger(__name__)

# Delay before poll n (0-based): 2 s doubling to 60 s, then every 60 s until the build deadline.
POLL_DELAYS_MS = (2_000, 4_000, 8_000, 16_000, 32_000, 60_000)
# Delay before re-trigger n (1-based) of a key whose build failed; after the last, dead-letter.
RETRIGGER_DELAYS_MS = (2_000, 10_000, 30_000, 60_000, 120_000)
MAX_RETRIGGERS = len(RETRIGGER_DELAYS_MS)

FAILURE_CLASSES = ("failure", "missing_partition", "not_found", "timeout", "tenant_mismatch", "rejected")
# A job of another tenant (a bug or a token mix-up) and a 4xx on verification (token, scope) cannot
# be fixed by building again: dead-lettered and alarmed at once, never looped.
NOT_RETRIGGERED = frozenset({"tenant_mismatch", "rejected"})
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MAX_ERROR = 240


def poll_delay_ms(poll: int) -> int:
    return POLL_DELAYS_MS[min(poll, len(POLL_DELAYS_MS) - 1)]


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
    """One key of a refresh Cube accepted: its job tokens, when the refresh started, and the oldest
    mutation it covers."""

    key: RefreshKey
    tokens: tuple[str, ...]
    started_at: int
    oldest_ms: int


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
            "targets": [
                {"target": t.key.target, "tokens": list(t.tokens), "startedAt": t.started_at, "oldestAt": t.oldest_ms}
                | ({"partition": t.key.partition} if t.key.partition else {})
                for t in self.targets
            ],
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
            )
        )
    return VerifyMessage(tenant, _int(data, "deadlineAt", "verify"), tuple(targets), _int(data, "poll", "verify"))


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
    for job in statuses:
        if job.status.startswith("failure") or job.status == "pre_agg_not_found":
            return Verdict(target, "failed", "failure", redact(job.status))
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
    ) -> None:
        self.store = store
        self.cube = cube
        self.queue = queue
        self.telemetry = telemetry
        self.clock = clock
        self.build_timeout_ms = build_timeout_ms

    def schedule(self, tenant_id: str, targets: Sequence[BuildTarget]) -> None:
        """One verify message for the keys of one accepted tenant request. Raises SchedulerUnavailable."""
        if not targets:
            return
        now = self.clock.now_ms()
        deadline = min(t.started_at for t in targets) + self.build_timeout_ms
        self.queue.send(VerifyMessage(tenant_id, deadline, tuple(targets)), due_at=now + poll_delay_ms(0), now=now)

    def process(self, messages: Iterable[tuple[RecordRef, VerifyMessage]], *, deadline_ms: int) -> set[RecordRef]:
        """Settle due verify messages; one Cube request per tenant. Returns the refs to redeliver."""
        by_tenant: dict[str, list[tuple[RecordRef, VerifyMessage]]] = defaultdict(list)
        for ref, message in messages:
            by_tenant[message.tenant_id].append((ref, message))
        failed: set[RecordRef] = set()
        for tenant_id, items in sorted(by_tenant.items()):
            tokens = sorted({tok for _, m in items for t in m.targets for tok in t.tokens})
            answer: Mapping[str, JobStatus] | CubeError
            try:
                answer = self.cube.job_statuses(tenant_id, tokens, deadline_ms=deadline_ms)
            except CubeError as exc:
                answer = exc
            for ref, message in items:
                try:
                    self._settle(message, answer)
                except (StoreUnavailable, SchedulerUnavailable) as exc:
                    log.warning("build verification failed", extra={"tenant_id": tenant_id, "error": str(exc)})
                    failed.add(ref)
        return failed

    def _settle(self, message: VerifyMessage, answer: Mapping[str, JobStatus] | CubeError) -> None:
        now = self.clock.now_ms()
        if isinstance(answer, CubeError):
            self.telemetry.count("CubeErrors")
            self.telemetry.count("CubeErrorsByClass", dimension=("ErrorClass", answer.error_class))
            log.warning(
                "build verification: Cube answered with an error",
                extra={"tenant_id": message.tenant_id, "error_class": answer.error_class, "error": str(answer)},
            )
            if answer.retryable and now < message.deadline_at:
                self._poll_again(message, list(message.targets), now)
                return
            cls = "rejected" if not answer.retryable else "timeout"
            verdicts = [Verdict(t, "failed", cls, redact(str(answer))) for t in message.targets]
        else:
            verdicts = [
                classify(t, answer, message.tenant_id, now=now, deadline_at=message.deadline_at)
                for t in message.targets
            ]
        pending = [v.target for v in verdicts if v.state == "pending"]
        if pending:
            self._poll_again(message, pending, now)
        self._fail([v for v in verdicts if v.state == "failed"], message.tenant_id, now)
        for verdict in verdicts:
            if verdict.state == "done":
                self._done(verdict.target, now)

    def _poll_again(self, message: VerifyMessage, targets: list[BuildTarget], now: int) -> None:
        later = replace(message, targets=tuple(targets), poll=message.poll + 1)
        due = min(now + poll_delay_ms(later.poll), max(now, message.deadline_at))
        self.queue.send(later, due_at=due, now=now)

    def _done(self, target: BuildTarget, now: int) -> None:
        lag = max(0, now - target.oldest_ms)
        record = BuildRecord(target.started_at, "done", now, freshness_lag_ms=lag, failures=0)
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
        """Send the re-triggers and dead letters first, then record the outcomes (conditionally)."""
        plans: list[tuple[Verdict, BuildRecord]] = []
        retrigger: dict[int, list[Verdict]] = defaultdict(list)
        dead: list[tuple[Verdict, int]] = []
        for verdict in verdicts:
            target = verdict.target
            state = self.store.get(target.key)
            if state is not None and state.build_started_at is not None and state.build_started_at >= target.started_at:
                continue  # settled already (a duplicate message, or a newer refresh): nothing to do
            failures = _previous_failures(state, target.started_at) + 1
            superseded = state is not None and state.started_at is not None and state.started_at > target.started_at
            due = None
            if failures > MAX_RETRIGGERS or verdict.failure_class in NOT_RETRIGGERED:
                dead.append((verdict, failures))
            elif not superseded:  # a newer refresh covers what this one covered, and is verified itself
                due = now + RETRIGGER_DELAYS_MS[failures - 1]
                retrigger[failures].append(verdict)
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
