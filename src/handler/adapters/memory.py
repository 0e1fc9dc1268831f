"""In-memory implementations of the ports, with the same conditional semantics as the DynamoDB
adapter. Used by the local invoke, the benchmarks, unit tests and the model check; never as proof
that the deployed system works."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from handler.domain.errors import CubeError
from handler.domain.model import RefreshKey, Selector
from handler.domain.ports import (
    BuildMessage,
    BuildRecord,
    CubeAnswer,
    JobStatus,
    KeyState,
    Slot,
    TrailingMessage,
    Waiter,
    Waiting,
    WriteResult,
)

_NOT_WAITING = {"waiting_since": None, "waiting_until": None}


def _waiting(st: KeyState, waiting: Waiting | None, pending: int | None) -> KeyState:
    """Register (or renew) a key as waiting for build budget, since its oldest pending mutation."""
    if waiting is None:
        return st
    since = pending if pending is not None else waiting.since
    return replace(st, waiting_since=since, waiting_until=waiting.until)


class InMemoryDebounceStore:
    """Thread-safe; each method is atomic, like one DynamoDB conditional write. Also the build budget
    (slots) and the index of waiting keys, like the DynamoDB table holds them."""

    def __init__(self) -> None:
        self.items: dict[RefreshKey, KeyState] = {}
        self.slots: dict[tuple[str, int], Slot] = {}
        self.writes = 0
        self._lock = threading.Lock()

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
        with self._lock:
            self.writes += 1
            old = self.items.get(key)
            st = old or KeyState()
            window_over = (st.started_at is None or st.started_at <= now - window_ms) and (
                st.window_ends_at is None or st.window_ends_at <= now
            )
            window_over = window_over and not st.gated(now)
            if trailing_token is None:
                ok = force or window_over
            else:
                stale = st.dirty_at is not None and (st.started_at is None or st.dirty_at >= st.started_at)
                current = trailing_due_at is None or st.trailing_due_at is None or st.trailing_due_at <= trailing_due_at
                ok = (
                    st.trailing_token in (None, trailing_token)
                    and current
                    and window_over
                    and (stale or st.trailing_state == "running")
                )
            if not ok:
                return WriteResult(False, old)
            window = st.window_ms if st.window_ms is not None else window_ms
            new = replace(
                st, started_at=now, claim_token=claim_token, expires_at=expires_at, window_ends_at=now + window
            )
            if trailing_token is not None:
                new = replace(new, trailing_token=trailing_token, trailing_state="running")
            else:  # it covers every pending mutation: they no longer count as pending
                new = replace(new, pending_since=None)
            self.items[key] = new
            return WriteResult(True, old)

    def release(
        self,
        key: RefreshKey,
        *,
        claim_token: str,
        previous_started_at: int | None,
        previous_window_ends_at: int | None = None,
        previous_pending_since: int | None = None,
    ) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.claim_token != claim_token:
                return False
            st = replace(st, started_at=previous_started_at, window_ends_at=previous_window_ends_at, claim_token=None)
            if previous_pending_since is not None:
                st = replace(st, pending_since=previous_pending_since)
            self.items[key] = st
            return True

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
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.claim_token != claim_token or st.trailing_state is None:
                return False
            if st.trailing_token != trailing_token:  # replaced by a newer mutation's (scheduled) refresh
                if st.trailing_state != "scheduled":
                    return False
                pending = min(st.pending_since, waiting.since) if st.pending_since is not None else waiting.since
                st = replace(
                    st,
                    started_at=previous_started_at,
                    window_ends_at=previous_window_ends_at,
                    claim_token=None,
                    pending_since=pending,
                )
                self.items[key] = _waiting(st, waiting, pending)
                return True
            pending = st.pending_since if st.pending_since is not None else now
            st = replace(
                st,
                started_at=previous_started_at,
                window_ends_at=previous_window_ends_at,
                claim_token=None,
                trailing_state="scheduled",
                trailing_due_at=due_at,
                dirty_at=now,
                pending_since=pending,
            )
            self.items[key] = _waiting(st, waiting, pending)
            return True

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
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.trailing_token != trailing_token or st.trailing_state != "scheduled":
                return WriteResult(False, st)
            if st.dirty_at is not None and st.dirty_at >= now:
                if waiting is not None:
                    self.items[key] = _waiting(st, waiting, st.pending_since)
                return WriteResult(True, st)  # a later mutation is already recorded: it covers ours
            pending = st.pending_since if st.pending_since is not None else oldest_event_ms
            new = replace(st, dirty_at=now, pending_since=pending, expires_at=expires_at)
            self.items[key] = _waiting(new, waiting, pending)
            return WriteResult(True, st)

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
        with self._lock:
            self.writes += 1
            old = self.items.get(key)
            st = old or KeyState()
            if replaces is None:
                ok = st.trailing_token is None
            else:
                ok = (
                    st.trailing_token == replaces
                    and st.trailing_state == "running"
                    and st.started_at == replaces_started_at
                )
            if not ok:
                return WriteResult(False, old)
            pending = oldest_event_ms if replaces or st.pending_since is None else st.pending_since
            new = replace(
                st,
                dirty_at=max(now, replaces_started_at or 0) if replaces else now,
                pending_since=pending,
                trailing_token=trailing_token,
                trailing_state="scheduled",
                trailing_due_at=due_at,
                expires_at=expires_at,
            )
            self.items[key] = _waiting(new, waiting, pending)
            return WriteResult(True, old)

    def reschedule_trailing(self, key: RefreshKey, *, trailing_token: str, due_at: int) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.trailing_token != trailing_token:
                return False
            if st.trailing_due_at is not None and st.trailing_due_at >= due_at:
                return False
            self.items[key] = replace(st, trailing_due_at=due_at)
            return True

    def finish_trailing(self, key: RefreshKey, *, trailing_token: str) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.trailing_token != trailing_token:
                return False
            self.items[key] = replace(
                st, trailing_token=None, trailing_state=None, trailing_due_at=None, pending_since=None, **_NOT_WAITING
            )
            return True

    def drop_trailing(self, key: RefreshKey, *, trailing_token: str, dirty_at: int | None) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if (
                st is None
                or st.trailing_token != trailing_token
                or st.trailing_state != "scheduled"
                or st.dirty_at != dirty_at
            ):
                return False
            self.items[key] = replace(
                st, trailing_token=None, trailing_state=None, trailing_due_at=None, pending_since=None, **_NOT_WAITING
            )
            return True

    def record_build(self, key: RefreshKey, record: BuildRecord) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or (st.build_started_at is not None and st.build_started_at >= record.started_at):
                return False
            self.items[key] = replace(
                st,
                build_started_at=record.started_at,
                build_status=record.status,
                build_seen_at=record.seen_at,
                freshness_lag_ms=record.freshness_lag_ms,
                build_failure_class=record.failure_class or None,
                build_error=record.error or None,
                build_failures=record.failures,
                retrigger_due_at=record.retrigger_due_at,
                window_ms=record.window_ms if record.window_ms is not None else st.window_ms,
            )
            return True

    def record_jobs(
        self, key: RefreshKey, *, started_at: int, tokens: Sequence[str], inflight_until: int | None = None
    ) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or (st.jobs_started_at is not None and st.jobs_started_at >= started_at):
                return False
            st = replace(st, jobs_started_at=started_at, job_tokens=tuple(tokens))
            if inflight_until is not None:
                st = replace(st, inflight_until=inflight_until, queued_seen_at=None, poll_seq=None, **_NOT_WAITING)
            self.items[key] = st
            return True

    def observe_pending(
        self,
        key: RefreshKey,
        *,
        started_at: int,
        inflight_until: int,
        scheduled_at: int | None,
        poll_seq: int | None = None,
    ) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.jobs_started_at != started_at or st.inflight_until is None:
                return False
            st = replace(st, inflight_until=inflight_until)
            if poll_seq is not None:
                st = replace(st, poll_seq=poll_seq)
            if scheduled_at is not None:
                st = replace(st, queued_seen_at=scheduled_at)
            self.items[key] = st
            return True

    def clear_inflight(self, key: RefreshKey, *, started_at: int) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.jobs_started_at != started_at:
                return False
            self.items[key] = replace(st, inflight_until=None, queued_seen_at=None, poll_seq=None)
            return True

    def waiters(self, scope: str, *, now: int, limit: int) -> list[Waiter]:
        with self._lock:
            live = [
                Waiter(k, st.waiting_since, st.trailing_token, st.trailing_due_at)
                for k, st in self.items.items()
                if st.waiting_since is not None and st.waiting_until is not None and st.waiting_until > now
            ]
        return sorted(live, key=lambda w: (w.since, w.key.pk))[:limit]

    # -- build budget slots ------------------------------------------------------------------
    def budget_slots(self, scope: str, count: int) -> list[Slot]:
        with self._lock:
            return [self.slots.get((scope, i), Slot(i)) for i in range(count)]

    def take_slot(self, scope: str, index: int, *, lease: str, key: str, now: int, until: int) -> bool:
        with self._lock:
            self.writes += 1
            if not self.slots.get((scope, index), Slot(index)).free(now):
                return False
            self.slots[(scope, index)] = Slot(index, lease, until, key)
            return True

    def renew_slot(self, scope: str, index: int, *, lease: str, until: int) -> bool:
        with self._lock:
            self.writes += 1
            slot = self.slots.get((scope, index))
            if slot is None or slot.lease != lease:
                return False
            self.slots[(scope, index)] = replace(slot, until=until)
            return True

    def free_slot(self, scope: str, index: int, *, lease: str) -> bool:
        with self._lock:
            self.writes += 1
            slot = self.slots.get((scope, index))
            if slot is None or slot.lease != lease:
                return False
            self.slots[(scope, index)] = Slot(index)
            return True

    def record_part(self, key: RefreshKey, *, started_at: int, part: int) -> frozenset[int]:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or (st.build_started_at is not None and st.build_started_at >= started_at):
                return frozenset()
            if st.build_parts_of is not None and st.build_parts_of > started_at:
                return frozenset()
            noted = (st.build_parts or frozenset()) if st.build_parts_of == started_at else frozenset()
            noted |= {part}
            self.items[key] = replace(st, build_parts_of=started_at, build_parts=noted)
            return noted

    def get(self, key: RefreshKey) -> KeyState | None:
        with self._lock:
            return self.items.get(key)

    def scan(self, tenant_id: str | None = None) -> list[tuple[RefreshKey, KeyState]]:
        with self._lock:
            return sorted((k, v) for k, v in self.items.items() if tenant_id in (None, k.tenant_id))

    def delete(self, key: RefreshKey) -> None:
        with self._lock:
            self.items.pop(key, None)


@dataclass
class RecordingScheduler:
    """Keeps scheduled trailing messages; `due(now)` hands back the ones whose time has come."""

    messages: list[TrailingMessage] = field(default_factory=list)

    def schedule(self, message: TrailingMessage, *, now: int) -> None:
        self.messages.append(message)

    def due(self, now: int) -> list[TrailingMessage]:
        ready = [m for m in self.messages if m.due_at <= now]
        self.messages = [m for m in self.messages if m.due_at > now]
        return ready


@dataclass
class RecordingCube:
    """Answers like Cube's jobs API: one token per selector target. Can be told to fail: `failures`
    are handed out one per selector, in order; `refuse` fails every selector naming that target
    (a renamed pre-aggregation). Thread-safe, like the HTTP client it stands in for."""

    requests: list[tuple[str, list[dict[str, object]]]] = field(default_factory=list)
    failures: list[CubeError] = field(default_factory=list)
    refuse: dict[str, CubeError] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        answers: list[CubeAnswer] = []
        with self._lock:
            self.requests.append((tenant_id, [dict(s.body) for s in selectors]))
            number = len(self.requests)
            for selector in selectors:
                names = [*_names(selector.body, "cubes"), *_names(selector.body, "preAggregations")]
                refused = next((self.refuse[n] for n in names if n in self.refuse), None)
                failure = refused or (self.failures.pop(0) if self.failures else None)
                answers.append(failure or [f"job-{tenant_id}-{name.replace('.', '_')}-{number}" for name in names])
        return answers


def _names(body: Mapping[str, object], field_name: str) -> list[str]:
    names = body.get(field_name) or []
    assert isinstance(names, list)
    return [str(n) for n in names]


@dataclass
class RecordingBuildQueue:
    """Keeps verify/retrigger messages with their due time, and dead letters."""

    messages: list[tuple[int, BuildMessage]] = field(default_factory=list)
    dead_letters: list[BuildMessage] = field(default_factory=list)

    def send(self, message: BuildMessage, *, due_at: int, now: int) -> None:
        self.messages.append((due_at, message))

    def dead_letter(self, message: BuildMessage) -> None:
        self.dead_letters.append(message)

    def due(self, now: int) -> list[BuildMessage]:
        ready = [m for d, m in self.messages if d <= now]
        self.messages = [(d, m) for d, m in self.messages if d > now]
        return ready


@dataclass
class ScriptedJobs:
    """Cube's `get` action: each token's status is whatever the test set (default `done`); a token
    never set is unknown (`not_found`) unless `known_by_default`."""

    statuses: dict[str, str] = field(default_factory=dict)
    tenants: dict[str, str] = field(default_factory=dict)  # token -> tenant its job belongs to
    failures: list[CubeError] = field(default_factory=list)
    requests: list[tuple[str, list[str]]] = field(default_factory=list)
    default: str = "done"

    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> dict[str, JobStatus]:
        self.requests.append((tenant_id, list(tokens)))
        if self.failures:
            raise self.failures.pop(0)
        answer = {}
        for token in tokens:
            status = self.statuses.get(token, self.default)
            if status != "not_found":
                answer[token] = JobStatus(status, (self.tenants.get(token, tenant_id),))
        return answer


@dataclass
class CountingTelemetry:
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def count(self, name: str, value: int = 1, dimension: tuple[str, str] | None = None) -> None:
        label = name if dimension is None else f"{name}[{dimension[0]}={dimension[1]}]"
        self.counts[label] = self.counts.get(label, 0) + value

    def timing(self, name: str, ms: float) -> None:
        self.timings.setdefault(name, []).append(ms)
