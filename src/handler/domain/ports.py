"""Ports the domain owns. Adapters implement them with boto3 and httpx; tests with in-memory fakes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from handler.domain.errors import CubeError
from handler.domain.model import RefreshKey, Selector

_T = TypeVar("_T")
_R = TypeVar("_R")


class Clock(Protocol):
    def now_ms(self) -> int: ...


@dataclass(frozen=True, slots=True)
class KeyState:
    """What the debounce store holds for one key (see docs/architecture.md)."""

    started_at: int | None = None
    claim_token: str | None = None
    dirty_at: int | None = None
    pending_since: int | None = None
    trailing_token: str | None = None
    trailing_state: str | None = None  # "scheduled" | "running"
    trailing_due_at: int | None = None
    expires_at: int | None = None
    # The last build outcome verified (see handler.domain.verify): the refresh it belongs to, ...
    build_started_at: int | None = None
    build_status: str | None = None  # "done" | "failed" | "dead_lettered" | "nothing_to_build"
    build_seen_at: int | None = None  # when the verification saw it
    freshness_lag_ms: int | None = None
    build_failure_class: str | None = None
    build_error: str | None = None  # Cube's error text, redacted
    build_failures: int | None = None  # consecutive failed builds (0 after a done one)
    retrigger_due_at: int | None = None
    # The job tokens of the newest refresh whose verification was scheduled (for `preagg-refresh jobs`).
    jobs_started_at: int | None = None
    job_tokens: tuple[str, ...] | None = None
    # A refresh whose job tokens did not fit one verify message is verified in parts: the parts of
    # the refresh that started at `build_parts_of` whose jobs were all seen done.
    build_parts_of: int | None = None
    build_parts: frozenset[int] | None = None
    # Load-aware refresh (docs/load-aware.md): the adaptive window, the in-flight gate and its
    # ride-along horizon, and the wait for build budget.
    window_ms: int | None = None  # the key's effective debounce window
    window_ends_at: int | None = None  # the last claim's start plus the window in force then
    inflight_until: int | None = None  # a refresh of the key is in Cube (queued or building) until then
    queued_seen_at: int | None = None  # a poll sent then found every job of that refresh `scheduled`
    poll_seq: int | None = None  # the in-flight refresh's verify messages sent so far (a copy stops)
    waiting_since: int | None = None  # waiting for build budget since (its oldest pending mutation)
    waiting_until: int | None = None  # ... registration valid until then (renewed at each deferral)

    def gated(self, now: int) -> bool:
        """A refresh of this key is still in Cube: no other may be posted."""
        return self.inflight_until is not None and self.inflight_until > now

    def window_end(self, base_ms: int) -> int:
        """When the current window ends (items written before the adaptive window have no
        `windowEndsAt`: their window is the base)."""
        if self.window_ends_at is not None:
            return self.window_ends_at
        return (self.started_at or 0) + base_ms


@dataclass(frozen=True, slots=True)
class BuildRecord:
    """A verified build outcome of the refresh that started at `started_at`."""

    started_at: int
    status: str  # "done" | "failed" | "dead_lettered" | "nothing_to_build"
    seen_at: int
    freshness_lag_ms: int | None = None
    failure_class: str = ""
    error: str = ""
    failures: int = 0
    retrigger_due_at: int | None = None
    window_ms: int | None = None  # the key's next effective window (adaptive), None: unchanged


@dataclass(frozen=True, slots=True)
class Waiting:
    """A key deferred for build budget registers as waiting (oldest mutation first): the sort key is
    its oldest pending mutation, the registration lapses at `until` unless renewed."""

    since: int
    until: int


@dataclass(frozen=True, slots=True)
class Waiter:
    """A registered waiting key, as the `waiting` index lists it."""

    key: RefreshKey
    since: int
    trailing_token: str | None
    trailing_due_at: int | None = None


@dataclass(frozen=True, slots=True)
class Slot:
    """One unit of build budget: free, or leased to a refresh until `until`."""

    index: int
    lease: str | None = None
    until: int | None = None
    key: str | None = None

    def free(self, now: int) -> bool:
        return self.lease is None or self.until is None or self.until <= now


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a conditional write: `ok`, and the item as it was (before a success, or as it
    blocked a failure). `state` is None when the item did not exist."""

    ok: bool
    state: KeyState | None


class DebounceStore(Protocol):
    """Conditional writes on one item per key. Every method is a single atomic conditional write
    (or a read): the conditions are what make the debounce global across invocations."""

    def claim(
        self,
        key: RefreshKey,
        *,
        now: int,
        window_ms: int,
        claim_token: str,
        expires_at: int,
        trailing_token: str | None = None,
        force: bool = False,
        trailing_due_at: int | None = None,
    ) -> WriteResult:
        """Leading claim (trailing_token None): succeeds when the window is over (`startedAt <=
        now - window_ms` and `windowEndsAt <= now`) and no refresh of the key is in Cube
        (`inflightUntil` absent or past); `force` skips both. Sets startedAt=now, claimToken and
        windowEndsAt = now + the key's windowMs (window_ms if it has none); a leading claim also removes
        pendingSince (it covers every pending mutation: the next mutation starts it afresh). Trailing claim:
        additionally requires trailingToken to be absent or equal, the message to be current (its
        `trailing_due_at` not older than `trailingDueAt`: a copy of a re-sent message is not), and the
        key to be stale (dirtyAt >= startedAt) or a previous trailing attempt to have died
        (trailingState = running); sets trailingState=running."""
        ...

    def release(
        self,
        key: RefreshKey,
        *,
        claim_token: str,
        previous_started_at: int | None,
        previous_window_ends_at: int | None = None,
        previous_pending_since: int | None = None,
    ) -> bool:
        """Undo a claim whose refresh failed: restore startedAt and windowEndsAt (and pendingSince,
        which a leading claim removed, when `previous_pending_since` is given), drop claimToken.
        Only if claimToken still equals ours. A trailing refresh stays `running`, so later mutations
        schedule a fresh message instead of joining one that waits out its SQS visibility timeout."""
        ...

    def requeue_trailing(
        self,
        key: RefreshKey,
        *,
        claim_token: str,
        trailing_token: str,
        previous_started_at: int | None,
        previous_window_ends_at: int | None,
        now: int,
        due_at: int,
        waiting: Waiting,
    ) -> bool:
        """A trailing claim found no build budget: give the claim back (as `release`) and put the
        trailing refresh back to `scheduled`, due at `due_at` (its message is re-sent first), the key
        marked dirty now and registered as waiting. Only if claimToken and trailingToken are ours; or,
        the claim still ours, when a newer mutation replaced the claimed refresh (`schedule_trailing`
        with `replaces`): then give the claim back and keep the replacement (its token and due time),
        its pendingSince lowered to `waiting.since` (the claim's oldest: it posted nothing, so those
        mutations are still pending) and the key registered as waiting since the lower of the two."""
        ...

    def join_trailing(
        self,
        key: RefreshKey,
        *,
        now: int,
        oldest_event_ms: int,
        trailing_token: str,
        expires_at: int,
        waiting: Waiting | None = None,
    ) -> WriteResult:
        """Record a debounced mutation on a trailing refresh that is scheduled and not yet running
        (`waiting`: the key was deferred for build budget: register it)."""
        ...

    def schedule_trailing(
        self,
        key: RefreshKey,
        *,
        now: int,
        oldest_event_ms: int,
        trailing_token: str,
        due_at: int,
        replaces: str | None,
        expires_at: int,
        replaces_started_at: int | None = None,
        waiting: Waiting | None = None,
    ) -> WriteResult:
        """Record a debounced mutation and a new trailing refresh: when none exists (replaces None),
        or in place of one that is running (replaces = its token, replaces_started_at = the startedAt
        read with it). A replacement marks the key dirty no earlier than that claim: the running
        refresh may have died before reaching Cube, and the new one must then not find the key clean."""
        ...

    def reschedule_trailing(self, key: RefreshKey, *, trailing_token: str, due_at: int) -> bool:
        """The trailing refresh's message was re-sent due at `due_at`: record it (only later, only for
        this token), so older copies of the message stop instead of re-sending themselves."""
        ...

    def finish_trailing(self, key: RefreshKey, *, trailing_token: str) -> bool:
        """Forget a trailing refresh that ran (Cube accepted it), and the key's waiting registration."""
        ...

    def drop_trailing(self, key: RefreshKey, *, trailing_token: str, dirty_at: int | None) -> bool:
        """Forget a scheduled trailing refresh that has nothing to do, only if no mutation joined it
        since it was read (dirtyAt unchanged)."""
        ...

    def record_build(self, key: RefreshKey, record: BuildRecord) -> bool:
        """Record a verified build outcome, only if no outcome of this or a later refresh is recorded
        (`buildStartedAt < record.started_at`): duplicates and stale verifications change nothing."""
        ...

    def record_jobs(
        self, key: RefreshKey, *, started_at: int, tokens: Sequence[str], inflight_until: int | None = None
    ) -> bool:
        """Keep the job tokens of the refresh that started at `started_at`, unless a later refresh's
        are recorded already. `inflight_until`: its builds are in Cube: raise the in-flight gate until
        then, forget the previous refresh's ride-along horizon and the key's waiting registration."""
        ...

    def observe_pending(
        self,
        key: RefreshKey,
        *,
        started_at: int,
        inflight_until: int,
        scheduled_at: int | None,
        poll_seq: int | None = None,
    ) -> bool:
        """A poll found the refresh of `started_at` still in Cube: renew its gate and, when every job
        was `scheduled` at the poll sent at `scheduled_at`, record that as its ride-along horizon;
        `poll_seq`: the number of the verify message just sent for it. Only while that refresh is the
        key's in-flight one (`jobsStartedAt` and a gate)."""
        ...

    def clear_inflight(self, key: RefreshKey, *, started_at: int) -> bool:
        """The refresh of `started_at` is settled: drop the gate and its ride-along horizon, only if it
        is still the key's in-flight refresh."""
        ...

    def waiters(self, scope: str, *, now: int, limit: int) -> list[Waiter]:
        """Keys registered as waiting for build budget in `scope` and still live, oldest first (an
        eventually consistent index: best effort)."""
        ...

    def record_part(self, key: RefreshKey, *, started_at: int, part: int) -> frozenset[int]:
        """Note that every job of part `part` of the refresh that started at `started_at` is done;
        answer the parts of that refresh noted so far (this one included). Parts of an older refresh
        are replaced; nothing is noted (empty answer) when an outcome of this or a later refresh is
        recorded, or parts of a later refresh are being noted."""
        ...

    def get(self, key: RefreshKey) -> KeyState | None: ...

    def scan(self, tenant_id: str | None = None) -> list[tuple[RefreshKey, KeyState]]: ...

    def delete(self, key: RefreshKey) -> None: ...


class BudgetStore(Protocol):
    """Build budget slots (docs/load-aware.md): one item per slot, each taken or renewed with one
    conditional write, so the budget is shared by every concurrent invocation; a lease that is not
    renewed lapses, so a crashed invocation cannot keep its slots."""

    def budget_slots(self, scope: str, count: int) -> list[Slot]: ...

    def take_slot(self, scope: str, index: int, *, lease: str, key: str, now: int, until: int) -> bool:
        """Only if the slot is free (no lease, or its lease lapsed at or before `now`)."""
        ...

    def renew_slot(self, scope: str, index: int, *, lease: str, until: int) -> bool:
        """Only if the slot still holds `lease`."""
        ...

    def free_slot(self, scope: str, index: int, *, lease: str) -> bool:
        """Only if the slot still holds `lease`."""
        ...

    def waiters(self, scope: str, *, now: int, limit: int) -> list[Waiter]: ...


@dataclass(frozen=True, slots=True)
class TrailingMessage:
    tenant_id: str
    target: str
    token: str
    due_at: int
    attempt: int = 0  # retries after Cube failed this trailing refresh
    partition: str = ""  # RefreshKey.partition: a DateRange label, or empty for the whole target

    @property
    def key(self) -> RefreshKey:
        return RefreshKey(self.tenant_id, self.target, self.partition)


class TrailingScheduler(Protocol):
    def schedule(self, message: TrailingMessage, *, now: int) -> None:
        """Deliver `message` back to the function at or after message.due_at (early is allowed:
        the receiver re-schedules)."""
        ...


# Cube's answer to one selector: the job tokens it queued, or why it did not.
type CubeAnswer = list[str] | CubeError


class CubeJobs(Protocol):
    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        """Queue pre-aggregation builds for one tenant: one answer per selector, in order, either
        Cube's job tokens or the typed error of that selector. Never raises for one selector's
        failure, so the jobs Cube accepted for the others are kept."""
        ...


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One job as Cube's `get` action reports it: `status` (`scheduled`, `processing`, `done`,
    `failure: <error>`, `missing_partition`, `not_found`, ...) and the tenant ids of the security
    contexts of its selector (job tokens are not tenant-scoped in Cube: this is checked)."""

    status: str
    tenant_ids: tuple[str, ...] = ()
    table: str = ""


class JobStatusReader(Protocol):
    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> Mapping[str, JobStatus]:
        """Cube's view of these jobs, asked with the tenant's token. A token Cube does not know is
        absent or `not_found`. Raises CubeError."""
        ...


class BuildMessage(Protocol):
    def as_body(self) -> dict[str, object]: ...


class BuildQueue(Protocol):
    def send(self, message: BuildMessage, *, due_at: int, now: int) -> None:
        """Deliver a verify or retrigger message back to the function at or after `due_at`.
        Raises SchedulerUnavailable."""
        ...

    def dead_letter(self, message: BuildMessage) -> None:
        """Park a build that failed after its re-triggers where an operator finds and replays it.
        Raises SchedulerUnavailable."""
        ...


class Mapper(Protocol):
    """How the remote calls of one batch are spread: serially (`serial_map`: deterministic, for
    tests and the model checks) or over a thread pool (the deployed wiring). Results keep the input
    order; an exception of one call is raised to the caller."""

    def __call__(self, fn: Callable[[_T], _R], items: Sequence[_T], /) -> list[_R]: ...


def serial_map[T, R](fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(item) for item in items]


class Telemetry(Protocol):
    def count(self, name: str, value: int = 1, dimension: tuple[str, str] | None = None) -> None: ...

    def timing(self, name: str, ms: float) -> None: ...
