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
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from handler.domain.errors import StoreUnavailable
from handler.domain.model import RefreshKey
from handler.domain.ports import Clock, DebounceStore, TrailingMessage, TrailingScheduler, WriteResult

# Idle keys linger this long after their last write before TTL removes them (TTL is lazy anyway:
# every condition compares timestamps, never relies on an item having gone).
KEY_IDLE_TTL_S = 24 * 3600


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

    @property
    def trailing(self) -> bool:
        return self.trailing_token is not None


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


class Debouncer:
    def __init__(
        self,
        store: DebounceStore,
        scheduler: TrailingScheduler,
        clock: Clock,
        window_ms: int,
        *,
        new_token: Callable[[], str] = _new_token,
        attempts: int = 4,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.clock = clock
        self.window_ms = window_ms
        self._new_token = new_token
        self._attempts = attempts

    def _expires_at(self, now: int) -> int:
        return (now + 2 * self.window_ms) // 1000 + KEY_IDLE_TTL_S

    def _claim(
        self, key: RefreshKey, *, trailing_token: str | None = None, force: bool = False
    ) -> tuple[int, str, WriteResult]:
        now = self.clock.now_ms()
        token = self._new_token()
        res = self.store.claim(
            key,
            now=now,
            window_ms=self.window_ms,
            claim_token=token,
            expires_at=self._expires_at(now),
            trailing_token=trailing_token,
            force=force,
        )
        return now, token, res

    def decide(self, key: RefreshKey, oldest_event_ms: int, *, force: bool = False) -> Claim | Debounced:
        """One debounce decision for a key that received mutations (oldest event time given)."""
        for _ in range(self._attempts):
            now, token, res = self._claim(key, force=force)
            if res.ok:
                prev = res.state.started_at if res.state else None
                return Claim(key, token, now, prev, oldest_event_ms)
            state = res.state
            if state is None:  # deleted between our write and the read: claim again
                continue
            if state.trailing_token and state.trailing_state == "scheduled":
                joined = self.store.join_trailing(
                    key,
                    now=now,
                    oldest_event_ms=oldest_event_ms,
                    trailing_token=state.trailing_token,
                    expires_at=self._expires_at(now),
                )
                if joined.ok:
                    return Debounced(key, scheduled=False, due_at=state.trailing_due_at)
                continue
            due_at = max(now, (state.started_at or now) + self.window_ms)
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
                expires_at=self._expires_at(now),
                replaces_started_at=state.started_at if replaces else None,
            )
            if marked.ok:
                return Debounced(key, scheduled=True, due_at=due_at)
        raise StoreUnavailable(f"no debounce decision for {key.pk} after {self._attempts} contended attempts")

    def fire(self, message: TrailingMessage) -> Claim | Rescheduled | NothingToDo:
        """A trailing refresh came due: claim it, put it off to the window's end, or drop it."""
        key = message.key
        for _ in range(self._attempts):
            now, token, res = self._claim(key, trailing_token=message.token)
            if res.ok:
                st = res.state
                return Claim(
                    key,
                    token,
                    now,
                    st.started_at if st else None,
                    st.pending_since if st else None,
                    trailing_token=message.token,
                )
            state = res.state
            if state is None:
                return NothingToDo(key, "key has no state")
            if state.trailing_token not in (None, message.token):
                return NothingToDo(key, "superseded by a newer trailing refresh")
            window_end = (state.started_at or 0) + self.window_ms
            if now < window_end:
                later = replace(message, due_at=window_end)
                self.scheduler.schedule(later, now=now)
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
        return self.store.release(claim.key, claim_token=claim.token, previous_started_at=claim.previous_started_at)
