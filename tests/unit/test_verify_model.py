"""Model check of build verification (docs/guarantee.md, "From queued to built").

A discrete-event simulation drives the real `RefreshService`, `Debouncer` and `BuildVerifier` over the
real `InMemoryDebounceStore`, with every message (trailing, verify, retrigger) going through a
simulated SQS queue and every refresh through a simulated Cube whose builds really succeed or fail:

- Cube: each accepted selector becomes one job. A job is `scheduled`, then `processing`, then `done`
  after its build time; it fails (`failure: ...`) while its key's table is broken (a time window per
  key), stays `processing` for ever with some probability (stuck), or is forgotten when Cube restarts
  (`not_found`). A done job covers the mutations older than the claim that posted it.
- SQS: due messages arrive up to 500 ms late (after whole-second rounding), some twice (duplicates).
- Crashes: a `Crash` BaseException before or after a chosen verification step (the Cube poll, the
  re-trigger send, the outcome record, the scheduling of a verification) aborts the invocation; its
  messages (or MSK records) come back later, as Lambda redelivers them.

Invocations run one at a time (each step atomic); the debounce interleavings are the debounce model
check's (tests/unit/test_debounce_model.py). Checks per schedule:
(a) every accepted mutation of a key at t is covered by a build the verifier recorded `done` whose
    refresh started after t, or by a dead letter (alarm) for that key sent after t;
(b) the queue drains: no verification or re-trigger loops (bounded events);
(c) no re-trigger beyond the MAX_RETRIGGERS-th in a row (a crash or a duplicate may repeat one, with
    the same attempt number, which the debounce absorbs);
(d) each failed build is counted once toward the budget, whatever the deliveries: the refreshes
    that descend from the re-triggers of one failed build (directly, or through the trailing refresh
    a re-trigger scheduled) include at most one counted failure, plus one per crash on that path.
    So a key is dead-lettered only after MAX_RETRIGGERS + 1 distinct failed builds, never after
    copies of one that duplicate deliveries made (issue 19, item 12b).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.adapters.memory import CountingTelemetry, InMemoryDebounceStore
from handler.domain.debounce import Debouncer
from handler.domain.model import EntityMutation, RecordRef, RefreshKey, Selector
from handler.domain.ports import BuildMessage, BuildRecord, CubeAnswer, JobStatus, TrailingMessage
from handler.domain.routing import EntityCubeMap
from handler.domain.service import RefreshService
from handler.domain.verify import MAX_RETRIGGERS, BuildVerifier, RetriggerMessage, VerifyMessage

W = 5_000
BUILD_TIMEOUT_MS = 20_000
ROUTES = EntityCubeMap({"User": ["Users"]})
TENANTS = ("t1", "t2")
REDELIVERY_MS = 3_000  # a crashed invocation's messages come back after this (visibility timeout)
logging.getLogger("handler").setLevel(logging.CRITICAL)
RESULTS: dict[str, Any] = {}


class Crash(BaseException):
    """The invocation dies here (not an Exception: nothing in the code may catch it)."""


@dataclass
class Job:
    key: RefreshKey
    tenant: str
    created: int
    build_ms: int
    outcome: str  # done | failure | stuck


@dataclass
class Spec:
    seed: int
    mutations: int
    broken: dict[str, tuple[int, int]]  # tenant -> [from, to) while its table is broken
    restarts: tuple[int, ...]
    stuck_rate: float
    crash_rate: float
    dup_rate: float


@dataclass
class World:
    spec: Spec
    rng: random.Random
    now: int = 0
    events: list[tuple[int, int, str, Any]] = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)
    jobs: dict[str, Job] = field(default_factory=dict)
    token_seq: itertools.count = field(default_factory=itertools.count)
    restarted_at: int = -1
    built: dict[RefreshKey, list[int]] = field(default_factory=lambda: defaultdict(list))  # refresh starts
    dead: dict[RefreshKey, list[int]] = field(default_factory=lambda: defaultdict(list))
    max_retriggers_in_a_row: int = 0
    cube_gets: int = 0
    cube_posts: int = 0
    crashes: int = 0
    duplicates: int = 0
    lags: list[int] = field(default_factory=list)
    # (d): which failed build a refresh descends from. A cause is (key, start of the failed refresh).
    causes: dict[RefreshKey, tuple[RefreshKey, int]] = field(default_factory=dict)  # of the invocation running
    verifying: dict[RefreshKey, int] = field(default_factory=dict)  # the verify message being settled
    retrigger_origin: dict[int, dict[RefreshKey, tuple[RefreshKey, int]]] = field(default_factory=dict)
    trailing_cause: dict[str, tuple[RefreshKey, int]] = field(default_factory=dict)
    post_cause: dict[tuple[RefreshKey, int], tuple[RefreshKey, int]] = field(default_factory=dict)
    counted_by_cause: dict[tuple[RefreshKey, int], int] = field(default_factory=lambda: defaultdict(int))
    crashes_by_cause: dict[tuple[RefreshKey, int], int] = field(default_factory=lambda: defaultdict(int))
    keep: list[Any] = field(default_factory=list)  # messages whose id() keys retrigger_origin

    def now_ms(self) -> int:
        return self.now

    def push(self, at: int, kind: str, payload: Any) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, payload))

    def maybe_crash(self, where: str) -> None:
        if self.rng.random() < self.spec.crash_rate:
            self.crashes += 1
            raise Crash(where)

    # -- Cube ------------------------------------------------------------------------------------
    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        self.cube_posts += 1
        answers: list[CubeAnswer] = []
        for selector in selectors:
            tokens = []
            for key in selector.keys:
                if key in self.causes:
                    self.post_cause[(key, self.now)] = self.causes[key]
                token = f"j{next(self.token_seq)}"
                lo, hi = self.spec.broken.get(tenant_id, (0, 0))
                outcome = "failure" if lo <= self.now < hi else "done"
                if outcome == "done" and self.rng.random() < self.spec.stuck_rate:
                    outcome = "stuck"
                self.jobs[token] = Job(key, tenant_id, self.now, self.rng.randint(50, 3_000), outcome)
                tokens.append(token)
            answers.append(tokens)
        return answers

    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> Mapping[str, JobStatus]:
        self.cube_gets += 1
        self.maybe_crash("poll")
        answer: dict[str, JobStatus] = {}
        for token in tokens:
            job = self.jobs.get(token)
            if job is None or job.created < self.restarted_at:
                continue  # Cube forgot it: not_found
            age = self.now - job.created
            if job.outcome == "stuck" or age < job.build_ms:
                status = "scheduled" if age < 20 else "processing"
            else:
                status = "done" if job.outcome == "done" else "failure: permission denied for table users"
            answer[token] = JobStatus(status, (job.tenant,))
        return answer


class SimStore(InMemoryDebounceStore):
    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    def record_build(self, key: RefreshKey, record: BuildRecord) -> bool:
        self.world.maybe_crash("before record")
        ok = super().record_build(key, record)
        if ok and record.status == "done":
            self.world.built[key].append(record.started_at)
            self.world.lags.append(record.freshness_lag_ms or 0)
        if ok and record.status in {"failed", "dead_lettered"}:
            cause = self.world.post_cause.get((key, record.started_at))
            if cause is not None:
                self.world.counted_by_cause[cause] += 1
        self.world.maybe_crash("after record")
        return ok


class SimQueue:
    """The refresh queue (trailing, verify and retrigger messages) and the dead-letter queue."""

    def __init__(self, world: World) -> None:
        self.world = world

    def _deliver(self, message: Any, due_at: int, now: int) -> None:
        rounded = now + -(-(max(0, due_at - now)) // 1000) * 1000
        at = rounded + self.world.rng.randint(0, 500)
        self.world.push(at, "message", message)
        if self.world.rng.random() < self.world.spec.dup_rate:
            self.world.duplicates += 1
            self.world.push(at + self.world.rng.randint(0, 1_500), "message", message)

    def schedule(self, message: TrailingMessage, *, now: int) -> None:
        if message.key in self.world.causes:
            self.world.trailing_cause[message.token] = self.world.causes[message.key]
        self._deliver(message, message.due_at, now)

    def send(self, message: BuildMessage, *, due_at: int, now: int) -> None:
        self.world.maybe_crash("before send")
        if isinstance(message, RetriggerMessage):  # it re-builds the failed refreshes being settled
            self.world.keep.append(message)
            self.world.retrigger_origin[id(message)] = {
                key: (key, self.world.verifying[key])
                for key, _ in message.refresh_keys()
                if key in self.world.verifying
            }
        self._deliver(message, due_at, now)
        if isinstance(message, RetriggerMessage):  # its attempt: consecutive failures of its keys
            self.world.max_retriggers_in_a_row = max(self.world.max_retriggers_in_a_row, message.attempt)
        self.world.maybe_crash("after send")

    def dead_letter(self, message: BuildMessage) -> None:
        assert isinstance(message, RetriggerMessage)
        for key, _ in message.refresh_keys():
            self.world.dead[key].append(self.world.now)


@dataclass
class Verdict:
    violations: list[str]
    drained: bool
    world: World


def simulate(spec: Spec, max_events: int = 20_000) -> Verdict:
    rng = random.Random(spec.seed)
    world = World(spec, rng)
    store = SimStore(world)
    queue = SimQueue(world)
    telemetry = CountingTelemetry()
    debouncer = Debouncer(store, queue, world, W)
    verifier = BuildVerifier(store, world, queue, telemetry, world, BUILD_TIMEOUT_MS)
    service = RefreshService(ROUTES, debouncer, world, telemetry, world, ("UTC",), verifier=verifier)
    accepted: list[tuple[RefreshKey, int]] = []
    for i in range(spec.mutations):
        at = rng.randint(0, 60_000)
        world.push(at, "mutation", (i, rng.choice(TENANTS), at))
    for at in spec.restarts:
        world.push(at, "restart", None)

    handled = 0
    while world.events and handled < max_events:
        at, _, kind, payload = heapq.heappop(world.events)
        world.now = max(world.now, at)
        handled += 1
        if kind == "restart":
            world.restarted_at = world.now
            continue
        deadline = world.now + 60_000
        try:
            if kind == "mutation":
                i, tenant, t = payload
                mutation = EntityMutation.model_validate(
                    {"eventType": "U", "entityType": "User", "entityId": f"e{i}", "tenantId": tenant, "timestamp": t}
                )
                outcome = service.process_mutations([(RecordRef("msk", i), mutation)], deadline_ms=deadline)
                state = store.items.get(RefreshKey(tenant, "Users"))
                if state is not None and state.trailing_token is not None:  # the mutation joined it: the
                    world.trailing_cause.pop(state.trailing_token, None)  # trailing refresh is its own too
                if outcome.failed:
                    world.push(world.now + REDELIVERY_MS, kind, payload)
                else:
                    accepted.append((RefreshKey(tenant, "Users"), t))
            else:
                ref = RecordRef("sqs", 0)
                world.causes, world.verifying = _causes(world, payload), {}
                if isinstance(payload, VerifyMessage):
                    world.verifying = {t.key: t.started_at for t in payload.targets}
                    outcome = service.process_verify([(ref, payload)], deadline_ms=deadline)
                elif isinstance(payload, RetriggerMessage):
                    outcome = service.process_retrigger([(ref, payload)], deadline_ms=deadline)
                else:
                    outcome = service.process_trailing([(ref, payload)], deadline_ms=deadline)
                if outcome.failed:
                    world.push(world.now + REDELIVERY_MS, kind, payload)
        except Crash:
            for cause in set(world.causes.values()):
                world.crashes_by_cause[cause] += 1
            world.push(world.now + REDELIVERY_MS, kind, payload)
        world.causes = {}

    violations = []
    for key, t in accepted:
        built = any(start >= t for start in world.built[key])
        alarmed = any(when >= t for when in world.dead[key])
        if not (built or alarmed):
            violations.append(f"{key.pk}: mutation at {t} neither built nor dead-lettered")
    if world.max_retriggers_in_a_row > MAX_RETRIGGERS:
        violations.append(f"{world.max_retriggers_in_a_row} re-triggers in a row (max {MAX_RETRIGGERS})")
    for (key, failed_at), counted in world.counted_by_cause.items():
        if counted > 1 + world.crashes_by_cause[(key, failed_at)]:
            violations.append(
                f"{key.pk}: the build that failed at {failed_at} was re-built and counted {counted} times"
            )
    return Verdict(violations, not world.events, world)


def _causes(world: World, payload: Any) -> dict[RefreshKey, tuple[RefreshKey, int]]:
    """The failed builds a message re-builds: a re-trigger's (as sent), or a trailing refresh's that a
    re-trigger scheduled."""
    if isinstance(payload, RetriggerMessage):
        return dict(world.retrigger_origin.get(id(payload), {}))
    if isinstance(payload, TrailingMessage) and payload.token in world.trailing_cause:
        return {payload.key: world.trailing_cause[payload.token]}
    return {}


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    broken: dict[str, tuple[int, int]] = {}
    for tenant in TENANTS:
        if draw(st.booleans()):
            start = draw(st.integers(0, 60_000))
            # Short outages heal within the re-triggers; some never heal (until 10 min): dead letters.
            broken[tenant] = (start, start + draw(st.sampled_from([5_000, 30_000, 120_000, 600_000])))
    restarts = tuple(sorted(draw(st.lists(st.integers(0, 90_000), max_size=2))))
    return Spec(
        seed=draw(st.integers(0, 2**32)),
        mutations=draw(st.integers(1, 25)),
        broken=broken,
        restarts=restarts,
        stuck_rate=draw(st.sampled_from([0.0, 0.05, 0.3])),
        crash_rate=draw(st.sampled_from([0.0, 0.05, 0.2])),
        dup_rate=draw(st.sampled_from([0.0, 0.2, 0.5])),
    )


def _record(verdict: Verdict) -> None:
    w = verdict.world
    totals = RESULTS.setdefault(
        "verify",
        {
            "schedules": 0,
            "violations": 0,
            "builds_done": 0,
            "dead_letters": 0,
            "crashes": 0,
            "duplicates": 0,
            "cube_posts": 0,
            "cube_gets": 0,
            "max_retriggers_in_a_row": 0,
            "worst_freshness_lag_ms": 0,
            "failed_builds_retriggered": 0,
            "max_counted_rebuilds_of_one_failed_build": 0,
        },
    )
    totals["schedules"] += 1
    totals["violations"] += len(verdict.violations) + (0 if verdict.drained else 1)
    totals["builds_done"] += sum(len(v) for v in w.built.values())
    totals["dead_letters"] += sum(len(v) for v in w.dead.values())
    totals["crashes"] += w.crashes
    totals["duplicates"] += w.duplicates
    totals["cube_posts"] += w.cube_posts
    totals["cube_gets"] += w.cube_gets
    totals["max_retriggers_in_a_row"] = max(totals["max_retriggers_in_a_row"], w.max_retriggers_in_a_row)
    totals["worst_freshness_lag_ms"] = max(totals["worst_freshness_lag_ms"], max(w.lags, default=0))
    totals["failed_builds_retriggered"] += len(w.retrigger_origin)
    totals["max_counted_rebuilds_of_one_failed_build"] = max(
        totals["max_counted_rebuilds_of_one_failed_build"], max(w.counted_by_cause.values(), default=0)
    )


@settings(
    max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(specs())
def test_verify_model_every_mutation_is_built_or_alarmed(spec: Spec) -> None:
    verdict = simulate(spec)
    _record(verdict)
    assert verdict.drained, "the queue never drained: a verification or re-trigger loop"
    assert not verdict.violations, verdict.violations[:5]


def test_verify_model_checker_catches_a_verifier_that_ignores_failures() -> None:
    """The check can fail: a verifier that records failed builds as done leaves mutations unbuilt."""
    original = BuildVerifier._fail

    def swallow(self: BuildVerifier, verdicts: list[Any], tenant_id: str, now: int) -> None:
        return None

    BuildVerifier._fail = swallow  # type: ignore[method-assign]
    try:
        spec = Spec(1, 5, {"t1": (0, 600_000), "t2": (0, 600_000)}, (), 0.0, 0.0, 0.0)
        verdict = simulate(spec)
    finally:
        BuildVerifier._fail = original  # type: ignore[method-assign]
    assert verdict.violations


def test_verify_model_checker_catches_a_duplicate_retrigger_that_builds_again() -> None:
    """Check (d) can fail: re-triggers that never look for a newer refresh (every delivery of one goes
    through the debounce) re-build a failed build twice under duplicate deliveries (issue 19, 12b)."""
    original = BuildVerifier.still_due
    BuildVerifier.still_due = lambda self, message: message.refresh_keys()  # type: ignore[method-assign]
    try:
        verdict = simulate(Spec(2, 2, {"t1": (0, 30_000)}, (), 0.0, 0.0, 0.5))
    finally:
        BuildVerifier.still_due = original  # type: ignore[method-assign]
    assert any("re-built and counted 2 times" in v for v in verdict.violations), verdict.violations


def test_verify_model_summary() -> None:
    """Prints the totals of the run (after the property test, in file order)."""
    totals = RESULTS.get("verify")
    assert totals is not None and totals["schedules"] >= 1000
    print("\n[model:verify] " + " ".join(f"{k}={v}" for k, v in totals.items()))
    assert totals["violations"] == 0
    assert totals["dead_letters"] > 0 and totals["crashes"] > 0 and totals["duplicates"] > 0
