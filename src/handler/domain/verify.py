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

Size: SQS refuses a message body over 256 KiB, and Cube answers one token per partition x time
zone x context, thousands for one request. The keys of one request are packed into as many verify
messages as their tokens need; a key whose tokens alone do not fit one message is verified in
*parts* (its tokens split across messages), and it counts as built only when every part's jobs
are done (`record_part`).

Crash and duplicate safety: messages are sent before the outcome is recorded, and the record is
conditional on the refresh being newer than the last one recorded (`buildStartedAt`), so a duplicate
or redelivered verify message finds its refresh settled and does nothing, and a crash between a
poll and its re-trigger only repeats the poll. A re-trigger names the refresh whose build failed;
delivered again (a duplicate, or a second re-trigger sent by a redelivered verify message) after a
newer refresh of its key had its verification scheduled or its outcome recorded, it does nothing:
that refresh covers the same mutations and is verified itself. So each failed build is re-built
once and counted once toward the budget, whatever the deliveries.

Under load (docs/load-aware.md): a build that is still `scheduled` or `processing` is alive. Each
poll that finds it so renews the key's in-flight gate and its build-budget lease, and records, when
every job is still `scheduled`, the poll's send time as the key's ride-along horizon. The build
deadline counts from the first poll that finds it started (`processingAt`); a build still waiting
`QUEUED_BOUND_MS` after its refresh started is stuck. A build that lost a race with another build of
the same table (`failure: relation ... already exists`) is a collision: re-triggered, not counted.
Settling a build (done or failed) drops the gate and frees the lease; the caller then wakes the key's
waiting trailing refresh and the oldest keys waiting for budget. A key verified in parts has no
ride-along horizon (no one poll sees all its jobs) and is settled when every part is."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from handler.domain.admission import LEASE_MS, NO_LEASE, Admission, Lease
from handler.domain.errors import CubeError, SchedulerUnavailable, StoreUnavailable, redact_values
from handler.domain.model import RecordRef, RefreshKey, is_valid_target, is_valid_tenant
from handler.domain.partitions import DateRange
from handler.domain.ports import (
    BuildMessage,
    BuildQueue,
    BuildRecord,
    Clock,
    DebounceStore,
    JobStatus,
    JobStatusReader,
    KeyState,
    Mapper,
    Telemetry,
    serial_map,
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
# Cube names a rollup table with a one-second timestamp: two builds of one partition in the same second
# collide and the loser fails with this (observed on Cube 1.7.43; docs/cube-jobs-api.md, hazard c).
COLLISION = "already exists"

FAILURE_CLASSES = ("failure", "missing_partition", "not_found", "timeout", "tenant_mismatch", "rejected", "collision")
# A job of another tenant (a bug or a token mix-up) and a 4xx on verification (token, scope) cannot
# be fixed by building again: dead-lettered and alarmed at once, never looped.
NOT_RETRIGGERED = frozenset({"tenant_mismatch", "rejected"})
# A job token as this function accepts it (Cube's are 32-character md5 hex). `fullmatch`: a `$` would
# also match before a trailing newline.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_ERROR = 240

# SQS refuses a message body over 256 KiB (262,144 bytes). Verify messages are packed below it, with
# room for the fields a later poll rewrites (`poll`), and with at most MAX_TARGETS_PER_MESSAGE keys so
# that settling one message is a bounded amount of work.
MAX_MESSAGE_BYTES = 256 * 1024
_BODY_BUDGET = MAX_MESSAGE_BYTES - 1_024
MAX_TARGETS_PER_MESSAGE = 100
MAX_PARTS = 10_000
# Cube is polled with at most this many tokens per request (its answer carries a selector per token).
MAX_TOKENS_PER_POLL = 2_000
# The job tokens kept on a key's item for `preagg-refresh jobs` (a DynamoDB item holds 400 KB).
MAX_RECORDED_TOKENS = 1_000
# Times a queue message names (a refresh's start, the oldest mutation it covers) may lie this far
# ahead of the function's clock (clock skew between invocations); further is a forged or corrupt
# message: a future start would make every genuine outcome of the key look older, and be ignored.
MAX_CLOCK_SKEW_MS = 60_000


def poll_delay_ms(poll: int) -> int:
    return POLL_DELAYS_MS[min(poll, len(POLL_DELAYS_MS) - 1)]


def phase_delay_ms(age_ms: int) -> int:
    """The next poll of a pending build: after its phase's age so far (doubling), 2 s to 60 s."""
    return max(POLL_DELAYS_MS[0], min(POLL_DELAYS_MS[-1], age_ms))


def is_valid_job_token(value: object) -> bool:
    return isinstance(value, str) and _TOKEN_RE.fullmatch(value) is not None


def redact(text: str) -> str:
    """Cube's error text without values (errors.redact_values: quoted text and `Key (col)=(value)`
    details are masked, since a database error can quote row data), whitespace collapsed, length
    bounded. PostgreSQL quotes values in double quotes as well as relation and column names
    (`invalid input syntax for type integer: "jane@example.com"`, `relation "users" does not
    exist`): both are masked, so no value can leak, at the price of the names (Cube's own log has
    the full text)."""
    return " ".join(redact_values(text).split())[:_MAX_ERROR]


def encode(message: BuildMessage) -> str:
    """A verify or retrigger message's SQS body (compact JSON, as its size is counted here)."""
    return json.dumps(message.as_body(), separators=(",", ":"))


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class BuildTarget:
    """One key of a refresh Cube accepted: its job tokens, when the refresh started, and the oldest
    mutation it covers. `part` of `parts`: the share of the key's tokens one message carries, when
    they do not fit one message (else 0 of 1). Under load: the build budget it holds, and what the
    polls saw so far: the last poll that found every job still `scheduled` (`scheduled_at`), the
    first that found the build started (`processing_at`)."""

    key: RefreshKey
    tokens: tuple[str, ...]
    started_at: int
    oldest_ms: int
    part: int = 0
    parts: int = 1
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
        return (
            {"target": self.key.target, "tokens": list(self.tokens), "startedAt": self.started_at}
            | {"oldestAt": self.oldest_ms}
            | ({"partition": self.key.partition} if self.key.partition else {})
            | ({"part": [self.part, self.parts]} if self.parts > 1 else {})
            | ({"lease": self.lease.token, "slots": list(self.lease.slots)} if self.lease.slots else {})
            | ({"scheduledAt": self.scheduled_at} if self.scheduled_at is not None else {})
            | ({"processingAt": self.processing_at} if self.processing_at is not None else {})
        )


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


def verify_messages(tenant_id: str, deadline_at: int, targets: Sequence[BuildTarget]) -> list[VerifyMessage]:
    """The verify messages of one accepted tenant request: keys packed in order, each message under
    the SQS size limit and MAX_TARGETS_PER_MESSAGE; a key whose tokens alone are too many for one
    message is split into parts (see the module docstring)."""
    envelope = len(encode(VerifyMessage(tenant_id, deadline_at, (), poll=10**9)))
    room = _BODY_BUDGET - envelope
    messages: list[VerifyMessage] = []
    batch: list[BuildTarget] = []
    size = 0
    for piece in (p for t in targets for p in _split(t, room)):
        cost = len(json.dumps(piece.as_body(), separators=(",", ":"))) + 1  # and its comma
        if batch and (size + cost > room or len(batch) >= MAX_TARGETS_PER_MESSAGE):
            messages.append(VerifyMessage(tenant_id, deadline_at, tuple(batch)))
            batch, size = [], 0
        batch.append(piece)
        size += cost
    if batch:
        messages.append(VerifyMessage(tenant_id, deadline_at, tuple(batch)))
    return messages


def _split(target: BuildTarget, room: int) -> list[BuildTarget]:
    """The target as it is, or its tokens spread over parts that each fit `room` bytes."""
    if len(json.dumps(target.as_body(), separators=(",", ":"))) + 1 <= room:
        return [target]
    bare = replace(target, tokens=(), part=MAX_PARTS - 1, parts=MAX_PARTS)
    overhead = len(json.dumps(bare.as_body(), separators=(",", ":"))) + 1
    chunks: list[list[str]] = [[]]
    size = overhead
    for token in target.tokens:
        cost = len(token) + 3  # quotes and comma (tokens are ASCII)
        if chunks[-1] and size + cost > room:
            chunks.append([])
            size = overhead
        chunks[-1].append(token)
        size += cost
    return [replace(target, tokens=tuple(c), part=i, parts=len(chunks)) for i, c in enumerate(chunks)]


@dataclass(frozen=True, slots=True)
class RetriggerTarget:
    target: str
    oldest_ms: int
    partition: str = ""  # RefreshKey.partition
    started_at: int | None = None  # the refresh whose build failed (None: a message from before it was sent)


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
                {"target": t.target, "oldestAt": t.oldest_ms}
                | ({"partition": t.partition} if t.partition else {})
                | ({"startedAt": t.started_at} if t.started_at is not None else {})
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


def _part(item: Mapping[str, Any]) -> tuple[int, int]:
    part = item.get("part", [0, 1])
    if (
        not isinstance(part, list)
        or len(part) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in part)
        or not 0 <= part[0] < part[1] <= MAX_PARTS
    ):
        raise ValueError("verify message has an invalid part")
    return part[0], part[1]


def parse_verify(data: Mapping[str, Any]) -> VerifyMessage:
    """A verify message body (already JSON-decoded, kind "verify"); raises ValueError, safe to log."""
    tenant, items = _tenant_and_targets(data, "verify")
    targets = []
    for item in items:
        tokens = item.get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(is_valid_job_token(t) for t in tokens):
            raise ValueError("verify message has invalid job tokens")
        part, parts = _part(item)
        targets.append(
            BuildTarget(
                RefreshKey(tenant, item["target"], _partition(item, "verify")),
                tuple(tokens),
                _int(item, "startedAt", "verify"),
                _int(item, "oldestAt", "verify"),
                part,
                parts,
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
        not is_valid_job_token(token)
        or not isinstance(token, str)
        or not isinstance(slots, list)
        or not slots
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1_000 for i in slots)
    ):
        raise ValueError("verify message has an invalid lease")
    return Lease(token, tuple(slots))


def parse_retrigger(data: Mapping[str, Any]) -> RetriggerMessage:
    tenant, items = _tenant_and_targets(data, "retrigger")
    targets = tuple(
        RetriggerTarget(
            item["target"],
            _int(item, "oldestAt", "retrigger"),
            _partition(item, "retrigger"),
            _int(item, "startedAt", "retrigger") if "startedAt" in item else None,
        )
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


def check_times(message: VerifyMessage | RetriggerMessage, *, now_ms: int) -> None:
    """Refuse a message naming a time ahead of the function's clock (beyond MAX_CLOCK_SKEW_MS): this
    function never writes one, so the message is forged or corrupt. Raises ValueError, safe to log."""
    latest = now_ms + MAX_CLOCK_SKEW_MS
    if isinstance(message, VerifyMessage):
        times = [
            v
            for t in message.targets
            for v in (t.started_at, t.oldest_ms, t.scheduled_at, t.processing_at)
            if v is not None
        ]
    else:
        times = [v for t in message.targets for v in (t.started_at, t.oldest_ms) if v is not None]
    if any(v > latest for v in times):
        kind = "verify" if isinstance(message, VerifyMessage) else "retrigger"
        raise ValueError(f"{kind} message names a time in the future (startedAt or oldestAt)")


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


def _covered(state: KeyState | None, started_at: int) -> bool:
    """A refresh of the key that started after `started_at` has its verification scheduled (its job
    tokens are recorded) or its outcome recorded: it covers every mutation the refresh of
    `started_at` covered, and its own verification settles them."""
    if state is None:
        return False
    return any(v is not None and v > started_at for v in (state.jobs_started_at, state.build_started_at))


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
        map_io: Mapper = serial_map,
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
        self._map = map_io
        self.admission = admission  # None: no build budget (its leases are never taken)
        self.windows = windows  # None: a fixed window (nothing to adapt)
        self.queued_bound_ms = queued_bound_ms
        self.lease_ms = lease_ms

    def _deadline(self, target: BuildTarget) -> int:
        return target.deadline(build_timeout_ms=self.build_timeout_ms, queued_bound_ms=self.queued_bound_ms)

    def _hard_deadline(self, targets: Sequence[BuildTarget]) -> int:
        """No build can be pending longer than queued, then built: the end of a chain of polls."""
        return min(t.started_at for t in targets) + self.queued_bound_ms + self.build_timeout_ms

    # -- scheduling (inside the refresh's Cube call: see RefreshService._refresh_all) ------------
    def schedule(self, tenant_id: str, targets: Sequence[BuildTarget]) -> set[RefreshKey]:
        """The verify messages of the keys of one accepted tenant request, then their job tokens on
        the keys' items, with each key's in-flight gate up (docs/load-aware.md; without it the next
        refresh of the key may collide with this build: the failure is logged). Answers the keys
        whose verification could not be scheduled (a send failed): their claims must be released."""
        if not targets:
            return set()
        now = self.clock.now_ms()
        deadline = self._hard_deadline(targets)
        unscheduled: set[RefreshKey] = set()
        for message in verify_messages(tenant_id, deadline, targets):
            try:
                self.queue.send(message, due_at=now + poll_delay_ms(0), now=now)
            except SchedulerUnavailable as exc:
                log.error(
                    "build verification could not be scheduled", extra={"tenant_id": tenant_id, "error": str(exc)}
                )
                unscheduled.update(t.key for t in message.targets)
        for target in targets:
            if target.key in unscheduled:
                continue
            try:
                self.store.record_jobs(
                    target.key,
                    started_at=target.started_at,
                    tokens=target.tokens[:MAX_RECORDED_TOKENS],
                    inflight_until=now + self.lease_ms,
                )
            except StoreUnavailable as exc:
                log.warning("job tokens not recorded", extra={"key": target.key.pk, "error": str(exc)})
        return unscheduled

    def still_due(self, message: RetriggerMessage) -> list[tuple[RefreshKey, int]]:
        """The keys of a re-trigger (with the oldest mutation each covers) that no newer refresh
        covers yet: a duplicate delivery, or a second re-trigger of the same failed build, finds
        the refresh the first one started and does nothing. A key whose item cannot be read is due
        (the debounce protocol then absorbs a copy)."""

        def due(target: RetriggerTarget) -> bool:
            if target.started_at is None:
                return True
            try:
                state = self.store.get(RefreshKey(message.tenant_id, target.target, target.partition))
            except StoreUnavailable:
                return True
            return not _covered(state, target.started_at)

        flags = self._map(due, message.targets)
        return [item for item, flag in zip(message.refresh_keys(), flags, strict=True) if flag]

    # -- settling -----------------------------------------------------------------------------
    def process(self, messages: Iterable[tuple[RecordRef, VerifyMessage]], *, deadline_ms: int) -> set[RecordRef]:
        """Settle due verify messages (see `settle`). Returns the refs to redeliver."""
        return self.settle(messages, deadline_ms=deadline_ms).failed

    def settle(self, messages: Iterable[tuple[RecordRef, VerifyMessage]], *, deadline_ms: int) -> Settled:
        """Settle due verify messages: Cube is polled once per tenant (tenants side by side), then
        each message is settled, its per-key writes side by side. Polls and settlements start only
        in the first two thirds of the time left; a message not started by then is sent again, due
        at once."""
        by_tenant: dict[str, list[tuple[RecordRef, VerifyMessage]]] = defaultdict(list)
        for ref, message in messages:
            by_tenant[message.tenant_id].append((ref, message))
        now = self.clock.now_ms()
        cutoff = now + 2 * max(0, deadline_ms - now) // 3
        tenants = sorted(by_tenant)

        def poll(tenant_id: str) -> tuple[int, Mapping[str, JobStatus] | CubeError]:
            tokens = sorted({tok for _, m in by_tenant[tenant_id] for t in m.targets for tok in t.tokens})
            sent = self.clock.now_ms()  # before the request: what Cube answers holds at or after this
            answer: dict[str, JobStatus] = {}
            for start in range(0, len(tokens), MAX_TOKENS_PER_POLL):
                chunk = tokens[start : start + MAX_TOKENS_PER_POLL]
                try:
                    answer.update(self.cube.job_statuses(tenant_id, chunk, deadline_ms=cutoff))
                except CubeError as exc:
                    return sent, exc
            return sent, answer

        settled = Settled()
        for tenant_id, (sent, answer) in zip(tenants, self._map(poll, tenants), strict=True):
            for ref, message in by_tenant[tenant_id]:
                try:
                    if self.clock.now_ms() >= cutoff:
                        self._continue_later(message)
                    else:
                        self._settle(message, answer, sent, settled)
                except (StoreUnavailable, SchedulerUnavailable) as exc:
                    log.warning("build verification failed", extra={"tenant_id": tenant_id, "error": str(exc)})
                    settled.failed.add(ref)
        return settled

    def _continue_later(self, message: VerifyMessage) -> None:
        """Out of time before this message was settled: the same message again, due at once."""
        now = self.clock.now_ms()
        self.queue.send(message, due_at=now, now=now)

    def _settle(
        self, message: VerifyMessage, answer: Mapping[str, JobStatus] | CubeError, sent: int, settled: Settled
    ) -> None:
        now = self.clock.now_ms()
        # The chain's hard end is the earliest refresh start plus the queue bound and the build timeout,
        # whatever the message says: a forged deadline cannot keep a stuck build polled for ever.
        message = replace(message, deadline_at=min(message.deadline_at, self._hard_deadline(message.targets)))
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
        failed = [v for v in verdicts if v.state == "failed"]
        self._fail(failed, message.tenant_id, now)
        ended = [v.target for v in failed]
        ended += self._done_all([v.target for v in verdicts if v.state == "done"], now)
        for target in ended:
            self._release(target, settled)

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

        def renew(target: BuildTarget) -> None:
            # Only a key verified in one message has a ride-along horizon: a part sees only its jobs.
            whole = target.parts == 1
            seen = target.scheduled_at if whole and sent is not None and target.scheduled_at == sent else None
            self._renew(target, now, scheduled_at=seen, poll_seq=message.poll + 1 if whole else None)

        self._map(renew, fresh)

    def _sent_already(self, target: BuildTarget, poll: int) -> bool:
        if target.parts > 1:  # the parts of one key are several chains: no copy check
            return False
        state = self.store.get(target.key)
        return (
            state is not None
            and state.jobs_started_at == target.started_at
            and state.poll_seq is not None
            and state.poll_seq > poll
        )

    def _renew(self, target: BuildTarget, now: int, *, scheduled_at: int | None, poll_seq: int | None) -> None:
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

    def _next_window(self, target: BuildTarget) -> int | None:
        """The key's next window (the adaptive window: from how long after its oldest mutation this
        build started, at least: the last moment it was known not to have started, i.e. the last poll
        that found every job waiting, or its refresh's start; the polls' own granularity, 2 s and more,
        must not pass for a backlog)."""
        if self.windows is None:
            return None
        state = self.store.get(target.key)
        started = max(target.started_at, target.scheduled_at or 0)
        lag = max(0, started - target.oldest_ms)
        return self.windows.after_build(target.key, state.window_ms if state else None, start_lag_ms=lag)

    def _done_all(self, targets: list[BuildTarget], now: int) -> list[BuildTarget]:
        """Record each done build (the writes side by side), then measure the ones recorded here.
        Answers the targets whose key is settled now or was already (a part whose other parts are
        still building is not: its key keeps its gate and budget)."""

        def record_done(target: BuildTarget) -> tuple[bool, bool]:
            if target.parts > 1:
                noted = self.store.record_part(target.key, started_at=target.started_at, part=target.part)
                if not noted >= set(range(target.parts)):
                    return False, not noted  # other parts are still being built (or it is settled)
            lag = max(0, now - target.oldest_ms)
            done = BuildRecord(
                target.started_at,
                "done",
                now,
                freshness_lag_ms=lag,
                failures=0,
                window_ms=self._next_window(target),
            )
            return self.store.record_build(target.key, done), True

        ended: list[BuildTarget] = []
        for target, (recorded, over) in zip(targets, self._map(record_done, targets), strict=True):
            if over:
                ended.append(target)
            if not recorded:
                continue  # a duplicate, or a newer refresh already settled: it was measured then
            lag = max(0, now - target.oldest_ms)
            self.telemetry.count("BuildsSucceeded")
            self.telemetry.timing("FreshnessLag", lag)
            self.telemetry.timing("BuildDuration", max(0, now - target.started_at))
            log.info(
                "build done",
                extra={"key": target.key.pk, "freshness_lag_ms": lag, "build_ms": max(0, now - target.started_at)},
            )
        return ended

    def _fail(self, verdicts: list[Verdict], tenant_id: str, now: int) -> None:
        """Send the re-triggers and dead letters first, then record the outcomes (conditionally).
        The reads and the records of the keys run side by side. A failed build is re-triggered even
        when a newer refresh of the key has started: mutations may ride along with the failed build
        (docs/load-aware.md), and the re-trigger goes through the debounce protocol, which joins or
        waits for whatever is in flight (a duplicate re-trigger stops at `still_due`). A collision with
        another build of the same table is re-triggered without counting as a failure."""
        by_key: dict[RefreshKey, Verdict] = {}
        for verdict in verdicts:  # parts of one refresh that failed together settle the key once
            by_key.setdefault(verdict.target.key, verdict)
        verdicts = list(by_key.values())
        plans: list[tuple[Verdict, BuildRecord]] = []
        retrigger: dict[int, list[Verdict]] = defaultdict(list)
        dead: list[tuple[Verdict, int]] = []
        for verdict, state in zip(verdicts, self._map(lambda v: self.store.get(v.target.key), verdicts), strict=True):
            target = verdict.target
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
        for attempt, group in sorted(retrigger.items()):  # (a message of at most 100 keys: well under 256 KiB)
            for start in range(0, len(group), MAX_TARGETS_PER_MESSAGE):
                chunk = group[start : start + MAX_TARGETS_PER_MESSAGE]
                msg = RetriggerMessage(tenant_id, tuple(_retrigger_target(v.target) for v in chunk), attempt)
                self.queue.send(msg, due_at=now + RETRIGGER_DELAYS_MS[attempt - 1], now=now)
        for verdict, failures in dead:
            letter = RetriggerMessage(
                tenant_id,
                (_retrigger_target(verdict.target),),
                failures,
                verdict.failure_class,
                verdict.error,
                dead_lettered=True,
            )
            self.queue.dead_letter(letter)
        recorded = self._map(lambda plan: self.store.record_build(plan[0].target.key, plan[1]), plans)
        for (verdict, record), ok in zip(plans, recorded, strict=True):
            if not ok:
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


def _retrigger_target(target: BuildTarget) -> RetriggerTarget:
    return RetriggerTarget(target.key.target, target.oldest_ms, target.key.partition, target.started_at)
