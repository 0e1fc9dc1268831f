"""Model check of build verification under load (docs/guarantee.md, "From queued to built" and
"Under load"; docs/load-aware.md).

A discrete-event simulation drives the real `RefreshService`, `Debouncer`, `BuildVerifier` and
`Admission` over the real `InMemoryDebounceStore`, with every message (trailing, verify, retrigger)
going through a simulated SQS queue and every refresh through a simulated Cube whose builds really
queue, run and succeed or fail:

- Cube: one build queue (FIFO) with `concurrency` workers. A posted job is `scheduled` while it waits,
  `processing` while a worker builds it (it reads the source when it starts), then `done`; it fails
  (`failure: ...`) while its tenant's table is broken, or hangs (`stuck`) until Cube drops it from the
  queue (`CUBE_DROP_MS` after it was posted: then `missing_partition`). As in Cube, a job posted while
  a job of the same key is still in the queue is not queued (its token reports `missing_partition`),
  and a build of a table already built in the same second fails `relation ... already exists`. A
  restart forgets every job (`not_found`) and empties the queue.
- SQS: due messages arrive up to 500 ms late (after whole-second rounding), some twice (duplicates).
- Crashes: a `Crash` BaseException before or after a chosen step (the Cube poll, a queue send, an
  outcome record, the jobs record, a budget slot write, a gate write) aborts the invocation; its
  messages (or MSK records) come back later, as Lambda redelivers them.
- Load: a build budget of 0 (off), 1, 2 or 4 jobs, Cube concurrency 1-3, builds of 50 ms to 8 s,
  bursts of up to 40 mutations: Cube is often saturated, builds wait `scheduled`, keys are deferred.

Invocations run one at a time (each step atomic); the debounce interleavings are the debounce model
check's (tests/unit/test_debounce_model.py), the concurrent ones of the budget the dynalite race's.
Checks per schedule:
(a) every accepted mutation of a key received at t is covered by a build of that key that Cube
    finished `done` and that *started* (a worker took it) after t, or by a dead letter (alarm) for
    that key sent after t. The build's start is Cube's truth, not the function's view: a mutation
    that rides along with a build that had already started is a violation;
(b) the queue drains: no verification or re-trigger loops (bounded events);
(c) no re-trigger beyond the MAX_RETRIGGERS-th in a row;
(d) each failed build is counted once toward the budget, whatever the deliveries: the refreshes
    that descend from the re-triggers of one failed build (directly, or through the trailing refresh
    a re-trigger scheduled) include at most one counted failure, plus one per crash on that path.
    So a key is dead-lettered only after MAX_RETRIGGERS + 1 distinct failed builds, never after
    copies of one that duplicate deliveries made (issue 19, item 12b);
(e) budget: after every POST, the jobs of ours in Cube (waiting or building) are at most the budget,
    plus the builds the verifier gave up on (timeout: Cube may still run them) and, in schedules with
    crashes, one per crash so far (a crashed invocation's lease lapses while its build may run);
(f) no duplicate builds: no POST of a key while a job of that key is in Cube, except after the
    verifier gave up on it, or after a crash (its gate lapses).
(g) in schedules without crashes, the oldest mutation a refresh reports (its FreshnessLag, and the
    start lag that widens the adaptive window) is one that no earlier refresh of the key covered: no
    refresh of the key the verifier saw done started after it and before this one. (A crashed
    invocation's mutations come back and count as pending again, though a build may have read them.)
(h) in schedules without crashes, a key registered as waiting for build budget waits since no later
    than its oldest mutation that no POST of the key has covered yet: it keeps its place in the
    oldest-first line. Schedules with `interleave` let a mutation of the key arrive while its trailing
    refresh is claimed and being deferred (it replaces that refresh; invocations are otherwise serial).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.adapters.memory import CountingTelemetry, InMemoryDebounceStore
from handler.domain import debounce as debounce_module
from handler.domain.admission import Admission
from handler.domain.debounce import Debouncer
from handler.domain.model import EntityMutation, RecordRef, RefreshKey, Selector
from handler.domain.ports import BuildMessage, BuildRecord, CubeAnswer, JobStatus, TrailingMessage, Waiting
from handler.domain.routing import EntityCubeMap
from handler.domain.service import RefreshService
from handler.domain.verify import MAX_RETRIGGERS, BuildVerifier, RetriggerMessage, VerifyMessage, classify
from handler.domain.window import Windows

W = 5_000
MAX_WINDOW_MS = 4 * W
BUILD_TIMEOUT_MS = 20_000
CUBE_DROP_MS = 60_000  # Cube drops a job this long after it was posted (an hour in Cube)
QUEUED_BOUND_MS = CUBE_DROP_MS + 5_000
ROUTES = EntityCubeMap({"User": ["Users"], "Group": ["Groups"]})
TENANTS = ("t1", "t2", "t3")
REDELIVERY_MS = 3_000  # a crashed invocation's messages come back after this (visibility timeout)
logging.getLogger("handler").setLevel(logging.CRITICAL)
RESULTS: dict[str, Any] = {}


class Crash(BaseException):
    """The invocation dies here (not an Exception: nothing in the code may catch it)."""


@dataclass
class Job:
    key: RefreshKey
    token: str
    created: int
    build_ms: int
    outcome: str  # done | failure | stuck
    queued: bool = True  # False: Cube did not queue it (a job of the key was in the queue)
    start: int | None = None
    end: int | None = None
    result: str = ""  # done | failure | collision | dropped
    lost: bool = False

    def finish(self) -> int:
        assert self.start is not None
        if self.outcome == "stuck":
            return self.created + CUBE_DROP_MS
        return self.start + self.build_ms

    def in_cube(self) -> bool:
        return self.queued and not self.lost and self.end is None


@dataclass
class Spec:
    seed: int
    mutations: int
    broken: dict[str, tuple[int, int]]  # tenant -> [from, to) while its table is broken
    restarts: tuple[int, ...]
    stuck_rate: float
    crash_rate: float
    dup_rate: float
    budget: int = 0
    concurrency: int = 2
    slow_rate: float = 0.0  # share of builds that take 2-8 s instead of 50-500 ms
    burst_ms: int = 60_000  # mutations arrive within this span
    collide_rate: float = 0.0  # share of builds that race another writer's build of their table
    interleave: float = 0.0  # share of trailing deferrals a mutation of the key arrives during (h)


@dataclass
class World:
    spec: Spec
    rng: random.Random
    now: int = 0
    events: list[tuple[int, int, str, Any]] = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)
    jobs: dict[str, Job] = field(default_factory=dict)
    waiting: list[Job] = field(default_factory=list)
    running: list[Job] = field(default_factory=list)
    cube_time: int = 0
    token_seq: itertools.count = field(default_factory=itertools.count)
    restarted_at: int = -1
    dead: dict[RefreshKey, list[int]] = field(default_factory=lambda: defaultdict(list))
    given_up: set[tuple[RefreshKey, int]] = field(default_factory=set)  # (key, refresh start) timed out
    max_retriggers_in_a_row: int = 0
    cube_gets: int = 0
    cube_posts: int = 0
    crashes: int = 0
    duplicates: int = 0
    lags: list[int] = field(default_factory=list)
    max_in_cube: int = 0
    over_budget: list[str] = field(default_factory=list)
    duplicate_builds: list[str] = field(default_factory=list)
    statuses_seen: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (d): which failed build a refresh descends from. A cause is (key, start of the failed refresh).
    causes: dict[RefreshKey, tuple[RefreshKey, int]] = field(default_factory=dict)  # of the invocation running
    verifying: dict[RefreshKey, int] = field(default_factory=dict)  # the verify message being settled
    retrigger_origin: dict[int, dict[RefreshKey, tuple[RefreshKey, int]]] = field(default_factory=dict)
    trailing_cause: dict[str, tuple[RefreshKey, int]] = field(default_factory=dict)
    post_cause: dict[tuple[RefreshKey, int], tuple[RefreshKey, int]] = field(default_factory=dict)
    counted_by_cause: dict[tuple[RefreshKey, int], int] = field(default_factory=lambda: defaultdict(int))
    crashes_by_cause: dict[tuple[RefreshKey, int], int] = field(default_factory=lambda: defaultdict(int))
    keep: list[Any] = field(default_factory=list)  # messages whose id() keys retrigger_origin
    # (g): each refresh's first verify message (key, start, oldest it reports); the starts seen done
    reported: dict[tuple[RefreshKey, int], int] = field(default_factory=dict)
    done_starts: dict[RefreshKey, list[int]] = field(default_factory=lambda: defaultdict(list))
    # (h): each key's accepted mutations (order received, event time), the order of its last POST (or
    # of the drop of a trailing refresh found covered)
    order: itertools.count = field(default_factory=itertools.count)
    mutations: dict[RefreshKey, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    last_post: dict[RefreshKey, int] = field(default_factory=dict)
    waited_late: list[str] = field(default_factory=list)
    replaced_while_deferred: int = 0
    mutate: Any = None  # receive one mutation of a key now (set by simulate)

    def now_ms(self) -> int:
        return self.now

    def push(self, at: int, kind: str, payload: Any) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, payload))

    def maybe_crash(self, where: str) -> None:
        if self.rng.random() < self.spec.crash_rate:
            self.crashes += 1
            raise Crash(where)

    # -- Cube's build queue ----------------------------------------------------------------------
    def advance(self, until: int) -> None:
        """Run Cube's queue up to `until`: workers take waiting jobs in order, builds end."""
        while True:
            for job in list(self.waiting):
                if job.created + CUBE_DROP_MS <= self.cube_time:  # Cube drops a job that waited an hour
                    self.waiting.remove(job)
                    job.end, job.result = job.created + CUBE_DROP_MS, "dropped"
            if len(self.running) < self.spec.concurrency and self.waiting:
                job = self.waiting.pop(0)
                job.start = max(job.created, self.cube_time)
                second = job.created // 1000
                if any(
                    o.key == job.key and o.result == "done" and o.created // 1000 == second and o is not job
                    for o in self.jobs.values()
                ) or (job.outcome == "done" and self.spec.collide_rate and self.rng.random() < self.spec.collide_rate):
                    # the table of this second exists already (ours, or built by another writer: an
                    # operator's rebuild, Cube's own refresh worker); the other build may have read
                    # before our mutations, so it does not cover them
                    job.outcome = "collision"
                self.running.append(job)
                continue
            if self.running:
                nxt = min(self.running, key=Job.finish)
                if nxt.finish() <= until:
                    self.cube_time = max(self.cube_time, nxt.finish())
                    self.running.remove(nxt)
                    nxt.end = nxt.finish()
                    nxt.result = {"stuck": "dropped"}.get(nxt.outcome, nxt.outcome)
                    continue
            break
        self.cube_time = max(self.cube_time, until)

    def restart(self) -> None:
        self.advance(self.now)
        self.restarted_at = self.now
        for job in [*self.waiting, *self.running]:
            job.lost = True
        self.waiting, self.running = [], []

    def ours_in_cube(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.in_cube()]

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        self.advance(self.now)
        self.cube_posts += 1
        answers: list[CubeAnswer] = []
        for selector in selectors:
            tokens = []
            for key in selector.keys:
                self.last_post[key] = next(self.order)
                if key in self.causes:
                    self.post_cause[(key, self.now)] = self.causes[key]
                token = f"j{next(self.token_seq)}"
                lo, hi = self.spec.broken.get(tenant_id, (0, 0))
                outcome = "failure" if lo <= self.now < hi else "done"
                if outcome == "done" and self.rng.random() < self.spec.stuck_rate:
                    outcome = "stuck"
                slow = self.rng.random() < self.spec.slow_rate
                build_ms = self.rng.randint(2_000, 8_000) if slow else self.rng.randint(50, 500)
                job = Job(key, token, self.now, build_ms, outcome)
                alive = [j for j in self.ours_in_cube() if j.key == key]
                if alive:
                    job.queued = False  # Cube does not queue a forced job whose query is queued
                    if not any((key, j.created) in self.given_up for j in alive) and not self.crashes:
                        self.duplicate_builds.append(f"{key.pk}: posted at {self.now} while {alive[0].token} in Cube")
                else:
                    self.waiting.append(job)
                self.jobs[token] = job
                tokens.append(token)
            answers.append(tokens)
        self._check_budget()
        return answers

    def _check_budget(self) -> None:
        if not self.spec.budget:
            return
        in_cube = self.ours_in_cube()
        self.max_in_cube = max(self.max_in_cube, len(in_cube))
        given_up = sum(1 for j in in_cube if (j.key, j.created) in self.given_up)
        allowed = self.spec.budget + given_up + self.crashes
        if len(in_cube) > allowed:
            self.over_budget.append(f"{len(in_cube)} jobs in Cube at {self.now} > {allowed} allowed")

    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> Mapping[str, JobStatus]:
        self.advance(self.now)
        self.cube_gets += 1
        self.maybe_crash("poll")
        answer: dict[str, JobStatus] = {}
        for token in tokens:
            job = self.jobs.get(token)
            if job is None or job.created < self.restarted_at:
                continue  # Cube forgot it: not_found
            if not job.queued or job.result == "dropped":
                status = "missing_partition"
            elif job.end is None:
                status = "processing" if job.start is not None else "scheduled"
            else:
                status = {
                    "done": "done",
                    "failure": "failure: permission denied for table users",
                    "collision": 'failure: relation "users_main20260101_x" already exists',
                }[job.result]
            self.statuses_seen[status.split(":")[0]] += 1
            answer[token] = JobStatus(status, (job.key.tenant_id,))
        return answer


class SimStore(InMemoryDebounceStore):
    """The real store, with crash points around the writes load-awareness added."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    def record_build(self, key: RefreshKey, record: BuildRecord) -> bool:
        self.world.maybe_crash("before record")
        ok = super().record_build(key, record)
        if ok and record.status == "done":
            self.world.lags.append(record.freshness_lag_ms or 0)
            self.world.done_starts[key].append(record.started_at)
        if ok and record.status in {"failed", "dead_lettered"} and record.failure_class != "collision":
            cause = self.world.post_cause.get((key, record.started_at))
            if cause is not None:
                self.world.counted_by_cause[cause] += 1
        if ok and record.failure_class == "timeout":
            self.world.given_up.add((key, record.started_at))
        self.world.maybe_crash("after record")
        return ok

    def record_jobs(self, key: RefreshKey, **kw: Any) -> bool:
        self.world.maybe_crash("before jobs")
        return super().record_jobs(key, **kw)

    def clear_inflight(self, key: RefreshKey, **kw: Any) -> bool:
        self.world.maybe_crash("before gate down")
        return super().clear_inflight(key, **kw)

    def take_slot(self, scope: str, index: int, **kw: Any) -> bool:
        self.world.maybe_crash("before slot")
        ok = super().take_slot(scope, index, **kw)
        self.world.maybe_crash("after slot")
        return ok

    def free_slot(self, scope: str, index: int, **kw: Any) -> bool:
        self.world.maybe_crash("before free")
        return super().free_slot(scope, index, **kw)

    def requeue_trailing(self, key: RefreshKey, **kw: Any) -> bool:
        self.world.maybe_crash("before requeue")
        if self.world.spec.interleave and self.world.rng.random() < self.world.spec.interleave:
            self.world.mutate(key)  # arrives meanwhile: it replaces the claimed trailing refresh
            state = self.items.get(key)
            self.world.replaced_while_deferred += state is not None and state.trailing_token != kw["trailing_token"]
        ok = super().requeue_trailing(key, **kw)
        self._check_waiting(key, ok)
        return ok

    def drop_trailing(self, key: RefreshKey, **kw: Any) -> bool:
        ok = super().drop_trailing(key, **kw)
        if ok:  # covered: by a refresh since its mutations or the key's queued build (a rider), as (a) checks
            self.world.last_post[key] = next(self.world.order)
        return ok

    def join_trailing(self, key: RefreshKey, **kw: Any) -> Any:
        result = super().join_trailing(key, **kw)
        self._check_waiting(key, result.ok and kw.get("waiting") is not None)
        return result

    def schedule_trailing(self, key: RefreshKey, **kw: Any) -> Any:
        result = super().schedule_trailing(key, **kw)
        self._check_waiting(key, result.ok and kw.get("waiting") is not None)
        return result

    def _check_waiting(self, key: RefreshKey, registered: bool) -> None:
        """(h): the key just registered as waiting: since no later than its oldest mutation that no POST
        (or covered trailing refresh) came after."""
        state = self.items.get(key)
        if not registered or state is None or state.waiting_since is None or self.world.spec.crash_rate:
            return
        posted = self.world.last_post.get(key, -1)
        uncovered = [t for order, t in self.world.mutations[key] if order > posted]
        if uncovered and state.waiting_since > min(uncovered):
            self.world.waited_late.append(
                f"{key.pk} waits since {state.waiting_since}, its mutation of {min(uncovered)} is still pending"
            )


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
        self.world.maybe_crash("before trailing send")
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
        if isinstance(message, VerifyMessage) and message.poll == 0:
            for target in message.targets:
                self.world.reported.setdefault((target.key, target.started_at), target.oldest_ms)
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
    telemetry: CountingTelemetry


def build(spec: Spec, world: World) -> tuple[RefreshService, CountingTelemetry]:
    store = SimStore(world)
    queue = SimQueue(world)
    telemetry = CountingTelemetry()
    windows = Windows(W, MAX_WINDOW_MS)
    admission = Admission(store, world, telemetry, spec.budget, rng=random.Random(spec.seed))
    debouncer = Debouncer(store, queue, world, W, windows=windows)
    verifier = BuildVerifier(
        store,
        world,
        queue,
        telemetry,
        world,
        BUILD_TIMEOUT_MS,
        admission=admission,
        windows=windows,
        queued_bound_ms=QUEUED_BOUND_MS,
    )
    service = RefreshService(
        ROUTES, debouncer, world, telemetry, world, ("UTC",), verifier=verifier, admission=admission
    )
    return service, telemetry


def simulate(spec: Spec, max_events: int = 40_000) -> Verdict:
    rng = random.Random(spec.seed)
    world = World(spec, rng)
    service, telemetry = build(spec, world)
    accepted: list[tuple[RefreshKey, int]] = []
    for i in range(spec.mutations):
        at = rng.randint(0, spec.burst_ms)
        world.push(at, "mutation", (i, rng.choice(TENANTS), rng.choice(("User", "Group")), at))
    for at in spec.restarts:
        world.push(at, "restart", None)

    extra = itertools.count(spec.mutations)

    def mutate(key: RefreshKey) -> None:
        i, entity = next(extra), {"Users": "User", "Groups": "Group"}[key.target]
        order = next(world.order)
        mutation = EntityMutation.model_validate(
            {
                "eventType": "U",
                "entityType": entity,
                "entityId": f"e{i}",
                "tenantId": key.tenant_id,
                "timestamp": world.now,
            }
        )
        outcome = service.process_mutations([(RecordRef("msk", i), mutation)], deadline_ms=world.now + 60_000)
        assert not outcome.failed
        state = service.debouncer.store.get(key)
        if state is not None and state.trailing_token is not None:  # its own trailing refresh (d)
            world.trailing_cause.pop(state.trailing_token, None)
        accepted.append((key, world.now))
        world.mutations[key].append((order, world.now))

    world.mutate = mutate
    handled = 0
    while world.events and handled < max_events:
        at, _, kind, payload = heapq.heappop(world.events)
        world.now = max(world.now, at)
        handled += 1
        if kind == "restart":
            world.restart()
            continue
        deadline = world.now + 60_000
        try:
            if kind == "mutation":
                i, tenant, entity, t = payload
                mutation = EntityMutation.model_validate(
                    {"eventType": "U", "entityType": entity, "entityId": f"e{i}", "tenantId": tenant, "timestamp": t}
                )
                received, order = world.now, next(world.order)
                outcome = service.process_mutations([(RecordRef("msk", i), mutation)], deadline_ms=deadline)
                state = service.debouncer.store.get(RefreshKey(tenant, ROUTES.targets_for(entity)[0]))
                if state is not None and state.trailing_token is not None:  # the mutation joined it: the
                    world.trailing_cause.pop(state.trailing_token, None)  # trailing refresh is its own too
                if outcome.failed:
                    world.push(world.now + REDELIVERY_MS, kind, payload)
                else:
                    accepted.append((RefreshKey(tenant, ROUTES.targets_for(entity)[0]), received))
                    world.mutations[RefreshKey(tenant, ROUTES.targets_for(entity)[0])].append((order, t))
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
    world.advance(world.now + CUBE_DROP_MS)

    violations = []
    built: dict[RefreshKey, list[int]] = defaultdict(list)
    for job in world.jobs.values():
        if job.queued and not job.lost and job.result == "done" and job.start is not None:
            built[job.key].append(job.start)
    for key, t in accepted:
        # Invocations take no time here: a build that the mutation's own invocation posted may start at
        # the instant of receipt (really after the POST, which follows the receipt). A rider's build
        # starts strictly after a poll that came strictly after the mutation.
        covered = any(start >= t for start in built[key])
        alarmed = any(when >= t for when in world.dead[key])
        if not (covered or alarmed):
            violations.append(f"(a) {key.pk}: mutation received at {t} neither built after it nor dead-lettered")
    if world.max_retriggers_in_a_row > MAX_RETRIGGERS:
        violations.append(f"(c) {world.max_retriggers_in_a_row} re-triggers in a row (max {MAX_RETRIGGERS})")
    for (key, failed_at), counted in world.counted_by_cause.items():
        if counted > 1 + world.crashes_by_cause[(key, failed_at)]:
            violations.append(
                f"(d) {key.pk}: the build that failed at {failed_at} was re-built and counted {counted} times"
            )
    violations += [f"(e) {v}" for v in world.over_budget]
    violations += [f"(f) {v}" for v in world.duplicate_builds]
    violations += [f"(h) {v}" for v in world.waited_late]
    if spec.crash_rate == 0:
        for (key, start), oldest in world.reported.items():
            covered_by = [s for s in world.done_starts[key] if oldest < s < start]
            if covered_by:
                violations.append(
                    f"(g) {key.pk}: the refresh at {start} reports {oldest} as its oldest mutation, which the "
                    f"refresh at {covered_by[0]} covered"
                )
    return Verdict(violations, not world.events, world, telemetry)


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
        if draw(st.integers(0, 3)) == 0:
            start = draw(st.integers(0, 60_000))
            # Short outages heal within the re-triggers; some never heal (until 10 min): dead letters.
            broken[tenant] = (start, start + draw(st.sampled_from([5_000, 30_000, 120_000, 600_000])))
    restarts = tuple(sorted(draw(st.lists(st.integers(0, 90_000), max_size=2))))
    return Spec(
        seed=draw(st.integers(0, 2**32)),
        mutations=draw(st.integers(1, 40)),
        broken=broken,
        restarts=restarts,
        stuck_rate=draw(st.sampled_from([0.0, 0.05, 0.2])),
        crash_rate=draw(st.sampled_from([0.0, 0.0, 0.03, 0.1])),
        dup_rate=draw(st.sampled_from([0.0, 0.2, 0.5])),
        budget=draw(st.sampled_from([0, 1, 2, 4])),
        concurrency=draw(st.integers(1, 3)),
        slow_rate=draw(st.sampled_from([0.0, 0.3, 1.0])),
        burst_ms=draw(st.sampled_from([5_000, 60_000])),
        collide_rate=draw(st.sampled_from([0.0, 0.0, 0.1])),
    )


def _record(verdict: Verdict) -> None:
    w = verdict.world
    counts = verdict.telemetry.counts
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
            "ride_alongs": 0,
            "keys_deferred": 0,
            "collisions": 0,
            "max_jobs_in_cube_with_budget": 0,
            "max_retriggers_in_a_row": 0,
            "worst_freshness_lag_ms": 0,
            "failed_builds_retriggered": 0,
            "max_counted_rebuilds_of_one_failed_build": 0,
            "polls_seeing": defaultdict(int),
        },
    )
    totals["schedules"] += 1
    totals["violations"] += len(verdict.violations) + (0 if verdict.drained else 1)
    totals["builds_done"] += sum(1 for j in w.jobs.values() if j.result == "done" and j.queued and not j.lost)
    totals["dead_letters"] += sum(len(v) for v in w.dead.values())
    totals["crashes"] += w.crashes
    totals["duplicates"] += w.duplicates
    totals["cube_posts"] += w.cube_posts
    totals["cube_gets"] += w.cube_gets
    totals["ride_alongs"] += counts.get("RideAlongs", 0)
    totals["keys_deferred"] += counts.get("KeysDeferred", 0)
    totals["collisions"] += counts.get("BuildCollisions", 0)
    totals["max_jobs_in_cube_with_budget"] = max(totals["max_jobs_in_cube_with_budget"], w.max_in_cube)
    totals["max_retriggers_in_a_row"] = max(totals["max_retriggers_in_a_row"], w.max_retriggers_in_a_row)
    totals["worst_freshness_lag_ms"] = max(totals["worst_freshness_lag_ms"], max(w.lags, default=0))
    totals["failed_builds_retriggered"] += len(w.retrigger_origin)
    totals["max_counted_rebuilds_of_one_failed_build"] = max(
        totals["max_counted_rebuilds_of_one_failed_build"], max(w.counted_by_cause.values(), default=0)
    )
    for status, n in w.statuses_seen.items():
        totals["polls_seeing"][status] += n


@settings(
    max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(specs())
def test_verify_model_every_mutation_is_built_by_a_build_that_started_after_it_or_alarmed(spec: Spec) -> None:
    verdict = simulate(spec)
    _record(verdict)
    assert verdict.drained, "the queue never drained: a verification or re-trigger loop"
    assert not verdict.violations, verdict.violations[:5]


# ----------------------------------------------------------------------------- the checker can fail
# Each broken variant below is a plausible mistake; the checker must catch it on schedules where it
# matters (a saturated Cube, riders, a budget).
SATURATED = [
    Spec(seed, 30, {}, (), 0.0, 0.0, 0.0, budget=2, concurrency=1, slow_rate=1.0, burst_ms=20_000)
    for seed in range(1, 9)
]


# Builds that start at once and run for seconds, and a few more mutations while they run: where a
# mistake in riding along shows.
RIDERS = [Spec(seed, 6, {}, (), 0.0, 0.0, 0.0, concurrency=3, slow_rate=1.0, burst_ms=15_000) for seed in range(1, 41)]

# Busy keys, quick builds, no budget: mutations often arrive after a window's end but before its trailing
# message (SQS delivers it late), so a leading claim covers what the trailing refresh had pending.
BUSY = [Spec(seed, 40, {}, (), 0.0, 0.0, 0.0, concurrency=2, burst_ms=60_000) for seed in range(1, 21)]


# Over budget, with a mutation of the key arriving during half the deferrals of a claimed trailing
# refresh (it replaces that refresh): where a key can lose its place in the oldest-first line.
INTERLEAVED = [replace(spec, interleave=0.5, budget=1) for spec in SATURATED]


def _violations(specs_: Sequence[Spec]) -> list[str]:
    return [v for spec in specs_ for v in simulate(spec).violations]


def _caught(specs_: Sequence[Spec], check: str, name: str) -> int:
    """How many schedules show a violation of `check`; printed with pytest -s."""
    caught = sum(1 for spec in specs_ if any(v.startswith(check) for v in simulate(spec).violations))
    print(f"\n[model:broken] {name}: {check} in {caught} of {len(specs_)} schedules")
    return caught


def test_verify_model_saturated_schedules_hold_and_exercise_riding_along_and_waiting():
    verdicts = [simulate(spec) for spec in [*SATURATED, *(replace(s, budget=0) for s in SATURATED), *RIDERS, *BUSY]]
    assert all(v.drained and not v.violations for v in verdicts), [v.violations[:3] for v in verdicts]
    assert sum(v.telemetry.counts.get("RideAlongs", 0) for v in verdicts) > 0
    assert sum(v.telemetry.counts.get("KeysDeferred", 0) for v in verdicts) > 0


def test_verify_model_a_mutation_during_a_deferral_keeps_the_key_waiting_since_its_oldest_mutation():
    verdicts = [simulate(spec) for spec in INTERLEAVED]
    assert all(v.drained and not v.violations for v in verdicts), [v.violations[:3] for v in verdicts]
    assert sum(v.world.replaced_while_deferred for v in verdicts) > 0, "the race was exercised"


def test_verify_model_checker_catches_a_deferral_that_forgets_the_replaced_refreshs_mutations(monkeypatch) -> None:
    """The code before: a deferral whose trailing refresh a newer mutation replaced is refused, and the
    replacement counts only that mutation as pending: the key waits since it, behind younger keys."""
    real_requeue = InMemoryDebounceStore.requeue_trailing

    def refused_when_replaced(self: InMemoryDebounceStore, key: RefreshKey, **kw: Any) -> bool:
        state = self.items.get(key)
        if state is not None and state.trailing_token != kw["trailing_token"]:
            return False
        return real_requeue(self, key, **kw)

    monkeypatch.setattr(InMemoryDebounceStore, "requeue_trailing", refused_when_replaced)
    assert _caught(INTERLEAVED, "(h)", "a deferral that forgets the replaced refresh's mutations") > 0


def test_verify_model_checker_catches_a_verifier_that_ignores_failures() -> None:
    """The check can fail: a verifier that drops failed builds leaves mutations unbuilt."""
    original = BuildVerifier._fail

    def swallow(self: BuildVerifier, verdicts: list[Any], tenant_id: str, now: int) -> None:
        return None

    BuildVerifier._fail = swallow  # type: ignore[method-assign]
    try:
        spec = Spec(1, 5, {"t1": (0, 600_000), "t2": (0, 600_000), "t3": (0, 600_000)}, (), 0.0, 0.0, 0.0)
        assert _caught([spec], "(a)", "a verifier that ignores failures") > 0
    finally:
        BuildVerifier._fail = original  # type: ignore[method-assign]


def test_verify_model_checker_catches_riding_along_with_a_build_that_had_started(monkeypatch) -> None:
    """A rider needs every job still `scheduled`: taking `processing` for waiting lets a mutation ride
    along with a build that read the source before it."""

    def processing_taken_for_waiting(
        self: BuildVerifier, target: Any, jobs: Mapping[str, JobStatus], message: Any, now: int, sent: int
    ) -> Any:
        statuses = [jobs.get(token) for token in target.tokens]
        if all(j is not None and j.status in ("scheduled", "processing") for j in statuses):
            target = replace(target, scheduled_at=sent)
        if target.processing_at is None and not all(j is not None and j.status == "scheduled" for j in statuses):
            target = replace(target, processing_at=now)
        deadline = min(self._deadline(target), message.deadline_at)
        return classify(target, jobs, message.tenant_id, now=now, deadline_at=deadline)

    monkeypatch.setattr(BuildVerifier, "_classify", processing_taken_for_waiting)
    assert _caught(RIDERS, "(a)", "riding along with a started build") > 0


def test_verify_model_checker_catches_riding_along_without_a_poll_after_the_mutation(monkeypatch) -> None:
    """A rider needs a poll sent after its newest mutation: dropping the trailing refresh whenever the
    key's build was ever seen waiting leaves later mutations unbuilt."""
    real_get = InMemoryDebounceStore.get

    def horizon_ignored(self: InMemoryDebounceStore, key: RefreshKey) -> Any:
        state = real_get(self, key)
        if state is not None and state.queued_seen_at is not None and state.dirty_at is not None:
            return replace(state, queued_seen_at=max(state.queued_seen_at, state.dirty_at + 1))
        return state

    monkeypatch.setattr(InMemoryDebounceStore, "get", horizon_ignored)
    real_claim = InMemoryDebounceStore.claim

    def claim(self: InMemoryDebounceStore, key: RefreshKey, **kw: Any) -> Any:
        result = real_claim(self, key, **kw)
        if not result.ok and result.state is not None:
            return type(result)(False, horizon_ignored(self, key))
        return result

    monkeypatch.setattr(InMemoryDebounceStore, "claim", claim)
    assert _caught([*SATURATED, *RIDERS], "(a)", "riding along without a poll after the mutation") > 0


def test_verify_model_checker_catches_an_admission_that_ignores_the_budget(monkeypatch) -> None:
    from handler.domain.admission import NO_LEASE, Decision  # noqa: PLC0415

    monkeypatch.setattr(Admission, "admit", lambda self, requests: Decision({r.key: NO_LEASE for r in requests}))
    assert _caught(SATURATED, "(e)", "admission ignoring the budget") > 0


def test_verify_model_checker_catches_leases_that_are_never_renewed(monkeypatch) -> None:
    """A lease lapses LEASE_MS after it was taken unless polls renew it: builds that wait longer in
    Cube's queue then no longer count, and more are admitted than the budget allows."""
    monkeypatch.setattr(Admission, "renew", lambda self, lease: None)
    long_queue = [
        Spec(seed, 40, {}, (), 0.0, 0.0, 0.0, budget=4, concurrency=1, slow_rate=1.0, burst_ms=60_000)
        for seed in range(1, 5)
    ]
    original_init = Admission.__init__

    def short_lease(self: Admission, *args: Any, **kw: Any) -> None:  # shorter than a wait behind 3 builds
        original_init(self, *args, **{**kw, "lease_ms": 10_000})

    monkeypatch.setattr(Admission, "__init__", short_lease)
    assert _caught(long_queue, "(e)", "leases never renewed") > 0


def test_verify_model_checker_catches_a_second_build_posted_while_the_first_is_in_cube(monkeypatch) -> None:
    """Without the in-flight gate a key posts again while its build waits: Cube does not queue it (or
    it collides), and the duplicate is reported."""
    real_record_jobs = InMemoryDebounceStore.record_jobs

    def no_gate(self: InMemoryDebounceStore, key: RefreshKey, **kw: Any) -> bool:
        return real_record_jobs(self, key, **{**kw, "inflight_until": None})

    monkeypatch.setattr(InMemoryDebounceStore, "record_jobs", no_gate)
    unlimited = [replace(spec, budget=0) for spec in SATURATED]
    assert _caught(unlimited, "(f)", "no in-flight gate") > 0


def test_verify_model_checker_catches_a_deferral_that_loses_the_trailing_refresh(monkeypatch) -> None:
    """Over budget a key is deferred: if its claim is given back without a trailing refresh in
    flight, its mutations are never built."""

    def forget(self: Debouncer, claim: Any, *, due_at: int, waiting: Waiting) -> Any:
        self.release(claim)
        return debounce_module.Debounced(claim.key, scheduled=False, due_at=None)

    monkeypatch.setattr(Debouncer, "defer", forget)
    assert _caught(SATURATED, "(a)", "a deferral that loses the trailing refresh") > 0


def test_verify_model_checker_catches_a_leading_claim_that_leaves_what_it_covered_pending(monkeypatch) -> None:
    """A leading claim that keeps the key's pendingSince (the code before it removed it): the trailing
    refresh after it reports a mutation the leading refresh covered as its oldest (the stale start lag
    that doubled the window of busy keys in the 100,000-tenant simulation)."""
    real_claim = InMemoryDebounceStore.claim

    def keeps_pending(self: InMemoryDebounceStore, key: RefreshKey, **kw: Any) -> Any:
        result = real_claim(self, key, **kw)
        if result.ok and kw.get("trailing_token") is None and result.state is not None:
            self.items[key] = replace(self.items[key], pending_since=result.state.pending_since)
        return result

    monkeypatch.setattr(InMemoryDebounceStore, "claim", keeps_pending)
    assert _caught(BUSY, "(g)", "a leading claim that leaves what it covered pending") > 0


def test_verify_model_checker_catches_a_duplicate_retrigger_that_builds_again() -> None:
    """Check (d) can fail: re-triggers that never look for a newer refresh (every delivery of one goes
    through the debounce) re-build a failed build twice under duplicate deliveries (issue 19, 12b)."""
    original = BuildVerifier.still_due
    BuildVerifier.still_due = lambda self, message: message.refresh_keys()  # type: ignore[method-assign]
    try:
        broken = dict.fromkeys(TENANTS, (0, 60_000))
        specs_ = [Spec(seed, 3, broken, (), 0.0, 0.0, 0.5, burst_ms=5_000) for seed in range(1, 9)]
        assert _caught(specs_, "(d)", "duplicate re-triggers that build again") > 0
    finally:
        BuildVerifier.still_due = original  # type: ignore[method-assign]


def test_verify_model_summary() -> None:
    """Prints the totals of the run (after the property test, in file order)."""
    totals = RESULTS.get("verify")
    assert totals is not None and totals["schedules"] >= 1000
    totals["polls_seeing"] = dict(totals["polls_seeing"])
    print("\n[model:verify] " + " ".join(f"{k}={v}" for k, v in totals.items()))
    assert totals["violations"] == 0
    assert totals["dead_letters"] > 0 and totals["crashes"] > 0 and totals["duplicates"] > 0
    assert totals["ride_alongs"] > 0 and totals["keys_deferred"] > 0 and totals["collisions"] > 0
    seen = totals["polls_seeing"]
    assert all(seen.get(s, 0) > 0 for s in ("scheduled", "processing", "done", "failure", "missing_partition"))
