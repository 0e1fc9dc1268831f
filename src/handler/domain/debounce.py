"""The debounce protocol: a leading refresh per key per window, and a trailing one for whatever the
window suppressed, so no accepted mutation is left stale.

Per key, a refresh may start only when none started within the window (`startedAt`). A claim is
optimistic: it counts as the refresh unless it is released after Cube refused it. A mutation that
arrives inside the window marks the key dirty and makes sure a trailing refresh is scheduled for the
window's end; the trailing refresh claims through the same condition. Crash safety:
- the trailing message is sent before the store records it, so a recorded trailing refresh always
  has a message in flight (a message whose record never landed finds a different token and stops);
- a claim that dies before Cube is called is not released: for a leading claim the batch is
  redelivered and marks the key dirty again; for a trailing claim the message is redelivered and the
  `running` state it left behind lets it claim again once the window has passed;
- a trailing refresh that Cube refused is released but stays `running`: its message comes back only
  after the SQS visibility timeout, so a later mutation must not join it and wait that long; it
  schedules a fresh message instead (the old one then finds itself superseded);
- a trailing refresh dropped as covered is dropped only if no mutation joined it meanwhile;
- a mutation that replaces a running trailing refresh marks the key dirty no earlier than that
  refresh's claim: the claim may die before Cube is called, and the replacement must still run.
- a leading claim covers every pending mutation, so it removes the key's `pendingSince` (the next
  mutation starts it afresh: a trailing refresh reports as its oldest a mutation it covers, not one
  the leading refresh covered) and its release restores it; coverage itself is `dirtyAt` against
  `startedAt`, never `pendingSince`.

Under load (docs/load-aware.md): the window is the key's own (`windowMs`, adaptive, see
handler.domain.window); no claim passes while a refresh of the key is still in Cube (the in-flight
gate, `inflightUntil`), so the mutation joins the trailing refresh, which either rides along with the
queued build (a poll sent after its newest mutation found every job `scheduled`) or waits for the
build to be settled; a claim that finds no build budget is deferred: given back, its trailing
refresh re-sent for later.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from handler.domain.errors import StoreUnavailable
from handler.domain.model import RefreshKey
from handler.domain.ports import (
    Clock,
    DebounceStore,
    KeyState,
    TrailingMessage,
    TrailingScheduler,
    Waiting,
    WriteResult,
)
from handler.domain.window import Windows

# Idle keys linger this long after their last write before TTL removes them (TTL is lazy anyway:
# every condition compares timestamps, never relies on an item having gone).
KEY_IDLE_TTL_S = 24 * 3600
# A trailing refresh held by the in-flight gate looks again after the build's age so far, doubled
# each time, between these bounds: the verifier's poll cadence (handler.domain.verify). The verifier
# also wakes it when it settles the build.
GATE_RECHECK_MIN_MS = 2_000
GATE_RECHECK_MAX_MS = 60_000


def gate_recheck_ms(state: KeyState, now: int) -> int:
    age = now - (state.jobs_started_at if state.jobs_started_at is not None else now)
    return max(GATE_RECHECK_MIN_MS, min(GATE_RECHECK_MAX_MS, age))


def _new_token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Claim:
    key: RefreshKey
    token: str
    started_at: int
    previous_started_at: int | None
    oldest_event_ms: int | None
    trailing_token: str | None = None
    previous_window_ends_at: int | None = None
    window_ms: int | None = None  # the window this claim opened (the key's effective window)
    # A leading claim covers the key's pending mutations, so its write stops counting them as pending
    # (removes pendingSince); given back (release) they count again, as old as they were.
    previous_pending_since: int | None = None
    expected_jobs: int = 1  # the jobs its refresh is expected to queue (its last refresh's, else its target's)
    force: bool = False

    @property
    def trailing(self) -> bool:
        return self.trailing_token is not None

    @property
    def oldest(self) -> int:
        return self.oldest_event_ms if self.oldest_event_ms is not None else self.started_at


@dataclass(frozen=True, slots=True)
class Debounced:
    key: RefreshKey
    scheduled: bool  # this call scheduled a new trailing refresh (else it joined one)
    due_at: int | None


@dataclass(frozen=True, slots=True)
class Rescheduled:
    key: RefreshKey
    due_at: int


@dataclass(frozen=True, slots=True)
class NothingToDo:
    key: RefreshKey
    reason: str
    rode_along: bool = False  # covered by the key's queued build (docs/load-aware.md)


class Debouncer:
    def __init__(
        self,
        store: DebounceStore,
        scheduler: TrailingScheduler,
        clock: Clock,
        window_ms: int,
        *,
        windows: Windows | None = None,
        new_token: Callable[[], str] = _new_token,
        attempts: int = 4,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.clock = clock
        self.window_ms = window_ms
        # Each key's window range (adaptive between base and maximum); a fixed window by default.
        self.windows = windows or Windows(window_ms)
        self._new_token = new_token
        self._attempts = attempts
        # Jobs the last refresh of each target (whole or partition keys) queued, as this instance saw:
        # the expected size of a key's first refresh, which has no job count of its own on record.
        self._jobs_of_target: dict[tuple[str, bool], int] = {}

    def note_jobs(self, key: RefreshKey, jobs: int) -> None:
        """Cube queued `jobs` for a refresh of `key`: keys of its target with no refresh on record are
        expected to queue as many (admission weighs a refresh by its expected jobs; counting a first
        refresh as one job let the jobs in Cube pass the budget)."""
        if jobs > 0:
            self._jobs_of_target[(key.target, bool(key.partition))] = jobs

    def _expires_at(self, now: int, key: RefreshKey) -> int:
        return (now + 2 * self.windows.range_for(key).max_ms) // 1000 + KEY_IDLE_TTL_S

    def _claim(
        self,
        key: RefreshKey,
        *,
        trailing_token: str | None = None,
        force: bool = False,
        trailing_due_at: int | None = None,
    ) -> tuple[int, str, WriteResult]:
        now = self.clock.now_ms()
        token = self._new_token()
        res = self.store.claim(
            key,
            now=now,
            window_ms=self.windows.base(key),
            claim_token=token,
            expires_at=self._expires_at(now, key),
            trailing_token=trailing_token,
            force=force,
            trailing_due_at=trailing_due_at,
        )
        return now, token, res

    def _put_off(self, message: TrailingMessage, due_at: int, now: int) -> None:
        """Re-send the trailing refresh for later, then record its new due time: older copies of the
        message (SQS delivers at least once) then stop instead of re-sending themselves, so copies do
        not multiply while a key waits."""
        self.scheduler.schedule(replace(message, due_at=due_at), now=now)
        self.store.reschedule_trailing(message.key, trailing_token=message.token, due_at=due_at)

    def _claimed(  # noqa: PLR0917
        self,
        key: RefreshKey,
        token: str,
        now: int,
        previous: KeyState | None,
        oldest: int | None,
        trailing_token: str | None = None,
        *,
        force: bool = False,
    ) -> Claim:
        if previous is not None and previous.job_tokens:
            jobs = len(previous.job_tokens)
        else:
            jobs = self._jobs_of_target.get((key.target, bool(key.partition)), 1)
        return Claim(
            key,
            token,
            now,
            previous.started_at if previous else None,
            oldest,
            trailing_token=trailing_token,
            previous_window_ends_at=previous.window_ends_at if previous else None,
            window_ms=self.windows.current(key, previous.window_ms if previous else None),
            expected_jobs=jobs,
            force=force,
            previous_pending_since=previous.pending_since if previous and trailing_token is None else None,
        )

    def decide(self, key: RefreshKey, oldest_event_ms: int, *, force: bool = False) -> Claim | Debounced:
        """One debounce decision for a key that received mutations (oldest event time given)."""
        for _ in range(self._attempts):
            now, token, res = self._claim(key, force=force)
            if res.ok:
                previous = res.state
                # A leading claim over a scheduled trailing refresh covers that refresh's mutations too
                # (which is then dropped as covered): its oldest is theirs, and so is its place in the
                # budget's line (docs/load-aware.md, "Waiting, oldest first").
                if previous is not None and previous.trailing_token and previous.pending_since is not None:
                    oldest_event_ms = min(oldest_event_ms, previous.pending_since)
                return self._claimed(key, token, now, previous, oldest_event_ms, force=force)
            state = res.state
            if state is None:  # deleted between our write and the read: claim again
                continue
            debounced = self._debounce(key, oldest_event_ms, now, state)
            if debounced is not None:
                return debounced
        raise StoreUnavailable(f"no debounce decision for {key.pk} after {self._attempts} contended attempts")

    def _debounce(
        self,
        key: RefreshKey,
        oldest_event_ms: int,
        now: int,
        state: KeyState,
        *,
        not_before: int = 0,
        waiting: Waiting | None = None,
    ) -> Debounced | None:
        """The key may not refresh now: join its scheduled trailing refresh, or schedule one for the
        window's end (or the in-flight gate's next look, or `not_before`). None: contended, try again."""
        expires_at = self._expires_at(now, key)
        if state.trailing_token and state.trailing_state == "scheduled":
            joined = self.store.join_trailing(
                key,
                now=now,
                oldest_event_ms=oldest_event_ms,
                trailing_token=state.trailing_token,
                expires_at=expires_at,
                waiting=waiting,
            )
            return Debounced(key, scheduled=False, due_at=state.trailing_due_at) if joined.ok else None
        due_at = max(now, state.window_end(self.windows.base(key)), not_before)
        if state.gated(now):
            due_at = max(due_at, now + gate_recheck_ms(state, now))
        message = TrailingMessage(key.tenant_id, key.target, self._new_token(), due_at, partition=key.partition)
        self.scheduler.schedule(message, now=now)
        replaces = state.trailing_token if state.trailing_state == "running" else None
        marked = self.store.schedule_trailing(
            key,
            now=now,
            oldest_event_ms=oldest_event_ms,
            trailing_token=message.token,
            due_at=due_at,
            replaces=replaces,
            expires_at=expires_at,
            replaces_started_at=state.started_at if replaces else None,
            waiting=waiting,
        )
        return Debounced(key, scheduled=True, due_at=due_at) if marked.ok else None

    def defer(self, claim: Claim, *, due_at: int, waiting: Waiting) -> Debounced:
        """No build budget for this claim: give it back and come back at `due_at`, the key registered
        as waiting. A trailing refresh is re-sent (its message first) and put back to `scheduled`; a
        leading claim is released and its mutations go to the key's trailing refresh, as if the claim
        had failed. Either way a message is in flight for them. Raises StoreUnavailable,
        SchedulerUnavailable (the caller reports the records)."""
        key = claim.key
        if claim.trailing_token is not None:
            now = self.clock.now_ms()
            message = TrailingMessage(key.tenant_id, key.target, claim.trailing_token, due_at, partition=key.partition)
            self.scheduler.schedule(message, now=now)
            self.store.requeue_trailing(
                key,
                claim_token=claim.token,
                trailing_token=claim.trailing_token,
                previous_started_at=claim.previous_started_at,
                previous_window_ends_at=claim.previous_window_ends_at,
                now=now,
                due_at=due_at,
                waiting=waiting,
            )
            # A newer mutation may have replaced the claimed refresh meanwhile: the store then keeps the
            # replacement, as old as the claim's mutations (they are still pending: it posted nothing).
            # Refused only if the key moved on (a forced claim took it): the re-sent message then finds
            # another token or a fresh claim, as any superseded trailing message does.
            return Debounced(key, scheduled=True, due_at=due_at)
        self.release(claim)
        for _ in range(self._attempts):
            now = self.clock.now_ms()
            state = self.store.get(key) or KeyState()
            debounced = self._debounce(key, claim.oldest, now, state, not_before=due_at, waiting=waiting)
            if debounced is not None:
                return debounced
        raise StoreUnavailable(f"no deferral of {key.pk} after {self._attempts} contended attempts")

    def fire(self, message: TrailingMessage) -> Claim | Rescheduled | NothingToDo:
        """A trailing refresh came due: claim it, put it off to the window's end, ride along with the
        key's queued build, or drop it."""
        key = message.key
        for _ in range(self._attempts):
            now, token, res = self._claim(key, trailing_token=message.token, trailing_due_at=message.due_at)
            if res.ok:
                st = res.state
                return self._claimed(key, token, now, st, st.pending_since if st else None, message.token)
            state = res.state
            if state is None:
                return NothingToDo(key, "key has no state")
            if state.trailing_token not in (None, message.token):
                return NothingToDo(key, "superseded by a newer trailing refresh")
            if state.trailing_token is not None and (state.trailing_due_at or 0) > message.due_at:
                return NothingToDo(key, "superseded by a later copy of this trailing refresh")
            if state.gated(now) and state.trailing_token is not None:
                if (
                    state.trailing_state == "scheduled"
                    and state.queued_seen_at is not None
                    and state.dirty_at is not None
                    and state.dirty_at < state.queued_seen_at
                ):
                    # Every job of the key's refresh in Cube was still waiting at a poll sent after
                    # the newest mutation: those builds read it (docs/load-aware.md, "Coverage").
                    if self.store.drop_trailing(key, trailing_token=message.token, dirty_at=state.dirty_at):
                        return NothingToDo(key, "rides along with the key's queued build", rode_along=True)
                    continue
                later_at = max(now + gate_recheck_ms(state, now), state.window_end(self.windows.base(key)))
                self._put_off(message, later_at, now)
                return Rescheduled(key, later_at)
            window_end = state.window_end(self.windows.base(key))
            if now < window_end:
                self._put_off(message, window_end, now)
                return Rescheduled(key, window_end)
            if state.trailing_token is None:
                return NothingToDo(key, "covered by a refresh that started after the last mutation")
            # Covered, but a mutation may join between our read and this write: drop the record only
            # if it is unchanged, else claim again (the joined mutation made the key stale).
            if self.store.drop_trailing(key, trailing_token=message.token, dirty_at=state.dirty_at):
                return NothingToDo(key, "covered by a refresh that started after the last mutation")
        raise StoreUnavailable(f"no trailing decision for {key.pk} after {self._attempts} contended attempts")

    def refreshed(self, claim: Claim) -> None:
        """Cube queued the jobs. A leading claim needs no write (it was optimistic)."""
        if claim.trailing_token is not None:
            self.store.finish_trailing(claim.key, trailing_token=claim.trailing_token)

    def release(self, claim: Claim) -> bool:
        """Cube did not queue the jobs: give the window back so a retry refreshes at once."""
        return self.store.release(
            claim.key,
            claim_token=claim.token,
            previous_started_at=claim.previous_started_at,
            previous_window_ends_at=claim.previous_window_ends_at,
            previous_pending_since=claim.previous_pending_since,
        )
