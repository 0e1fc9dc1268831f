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
    TrailingMessage,
    WriteResult,
)


class InMemoryDebounceStore:
    """Thread-safe; each method is atomic, like one DynamoDB conditional write."""

    def __init__(self) -> None:
        self.items: dict[RefreshKey, KeyState] = {}
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
    ) -> WriteResult:
        with self._lock:
            self.writes += 1
            old = self.items.get(key)
            st = old or KeyState()
            window_over = st.started_at is None or st.started_at <= now - window_ms
            if trailing_token is None:
                ok = force or window_over
            else:
                stale = st.dirty_at is not None and (st.started_at is None or st.dirty_at >= st.started_at)
                ok = (
                    st.trailing_token in (None, trailing_token)
                    and window_over
                    and (stale or st.trailing_state == "running")
                )
            if not ok:
                return WriteResult(False, old)
            new = replace(st, started_at=now, claim_token=claim_token, expires_at=expires_at)
            if trailing_token is not None:
                new = replace(new, trailing_token=trailing_token, trailing_state="running")
            self.items[key] = new
            return WriteResult(True, old)

    def release(self, key: RefreshKey, *, claim_token: str, previous_started_at: int | None) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.claim_token != claim_token:
                return False
            self.items[key] = replace(st, started_at=previous_started_at, claim_token=None)
            return True

    def join_trailing(
        self, key: RefreshKey, *, now: int, oldest_event_ms: int, trailing_token: str, expires_at: int
    ) -> WriteResult:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.trailing_token != trailing_token or st.trailing_state != "scheduled":
                return WriteResult(False, st)
            if st.dirty_at is not None and st.dirty_at >= now:
                return WriteResult(True, st)  # a later mutation is already recorded: it covers ours
            pending = st.pending_since if st.pending_since is not None else oldest_event_ms
            self.items[key] = replace(st, dirty_at=now, pending_since=pending, expires_at=expires_at)
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
            self.items[key] = replace(
                st,
                dirty_at=max(now, replaces_started_at or 0) if replaces else now,
                pending_since=pending,
                trailing_token=trailing_token,
                trailing_state="scheduled",
                trailing_due_at=due_at,
                expires_at=expires_at,
            )
            return WriteResult(True, old)

    def finish_trailing(self, key: RefreshKey, *, trailing_token: str) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or st.trailing_token != trailing_token:
                return False
            self.items[key] = replace(
                st, trailing_token=None, trailing_state=None, trailing_due_at=None, pending_since=None
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
                st, trailing_token=None, trailing_state=None, trailing_due_at=None, pending_since=None
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
            )
            return True

    def record_jobs(self, key: RefreshKey, *, started_at: int, tokens: Sequence[str]) -> bool:
        with self._lock:
            self.writes += 1
            st = self.items.get(key)
            if st is None or (st.jobs_started_at is not None and st.jobs_started_at >= started_at):
                return False
            self.items[key] = replace(st, jobs_started_at=started_at, job_tokens=tuple(tokens))
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
