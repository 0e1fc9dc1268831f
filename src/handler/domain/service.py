"""The refresh pipeline: mutations in, coalesced and debounced keys, one Cube request per tenant."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from handler.domain.admission import NO_LEASE, Admission, Decision, Lease, Request, defer_delay_ms
from handler.domain.debounce import Claim, Debounced, Debouncer, NothingToDo, Rescheduled
from handler.domain.errors import (
    CubeError,
    CubeNotSent,
    CubeServerError,
    OutOfTime,
    SchedulerUnavailable,
    StoreUnavailable,
)
from handler.domain.model import EntityMutation, RecordRef, RefreshKey, Selector
from handler.domain.ports import (
    BuildRecord,
    Clock,
    CubeAnswer,
    CubeJobs,
    Mapper,
    Telemetry,
    TrailingMessage,
    Waiter,
    Waiting,
    serial_map,
)
from handler.domain.routing import DEFAULT_MAX_SELECTORS, EntityCubeMap, build_selectors
from handler.domain.verify import BuildTarget, BuildVerifier, RetriggerMessage, VerifyMessage, is_valid_job_token

log = logging.getLogger(__name__)

# Backoff of a trailing refresh that Cube failed (5xx, timeout, unreachable): about an hour in all.
TRAILING_RETRY_DELAYS_MS = (
    2_000,
    5_000,
    10_000,
    30_000,
    60_000,
    120_000,
    300_000,
    300_000,
    300_000,
    300_000,
    300_000,
    300_000,
    300_000,
    300_000,
    300_000,
    300_000,
    300_000,
)


@dataclass(frozen=True, slots=True)
class Budget:
    """How a batch spends the time to its deadline, so that the bound holds however slow each call
    is: conditional writes (claims) start only in the first third, Cube requests (each followed by
    the sending of its verification) only until two thirds, and the rest is left for releasing what
    Cube did not take (a release is one write, like a claim, so it needs no more time than the
    claims took)."""

    claims_until: int
    cube_until: int
    deadline: int

    @classmethod
    def split(cls, now: int, deadline_ms: int) -> Budget:
        span = max(0, deadline_ms - now)
        return cls(now + span // 3, now + 2 * span // 3, deadline_ms)


@dataclass(slots=True)
class _Group:
    refs: list[RecordRef] = field(default_factory=list)
    oldest_event_ms: int = 2**63
    entity_types: set[str] = field(default_factory=set)  # only mapped ones: few, a safe metric dimension

    def add(self, ref: RecordRef, event_ms: int, entity_types: Iterable[str] = ()) -> None:
        self.refs.append(ref)  # a record may appear twice (several partitions folded into one key): harmless
        self.oldest_event_ms = min(self.oldest_event_ms, event_ms)
        self.entity_types.update(entity_types)


@dataclass(frozen=True, slots=True)
class _Asked:
    """One tenant's Cube request as its worker left it: the selectors, Cube's answer to each, how long
    Cube took, and the keys whose verification could not be scheduled."""

    selectors: list[Selector]
    answers: list[CubeAnswer]
    latency: int
    unverified: set[RefreshKey]


def _verifiable(answer: CubeAnswer) -> CubeAnswer:
    """Job tokens a verify message can carry (the rule its parser applies), or a server error for the
    selector: a refresh whose jobs cannot be verified is not counted as refreshed."""
    if isinstance(answer, CubeError) or all(is_valid_job_token(t) for t in answer):
        return answer
    return CubeServerError("Cube answered job tokens this function cannot verify (not 1-128 of A-Z a-z 0-9 _ -)")


def _per_key(
    selectors: Sequence[Selector], answers: Sequence[CubeAnswer]
) -> tuple[dict[RefreshKey, list[str]], dict[RefreshKey, CubeError]]:
    """Per key, the job tokens of the selectors covering it, or the error of one of them (a 4xx
    decides: retrying the key cannot help while one of its selectors is refused)."""
    tokens: dict[RefreshKey, list[str]] = defaultdict(list)
    errors: dict[RefreshKey, CubeError] = {}
    for selector, answer in zip(selectors, answers, strict=True):
        for key in selector.keys:
            if not isinstance(answer, CubeError):
                tokens[key].extend(answer)
            elif key not in errors or not answer.retryable:
                errors[key] = answer
    return tokens, errors


@dataclass(frozen=True, slots=True)
class KeyOutcome:
    key: RefreshKey
    status: str  # refreshed | debounced | deferred | failed | rescheduled | skipped
    detail: str = ""
    job_tokens: tuple[str, ...] = ()


@dataclass(slots=True)
class Outcome:
    failed: set[RecordRef] = field(default_factory=set)
    keys: list[KeyOutcome] = field(default_factory=list)
    errors: dict[RefreshKey, CubeError] = field(default_factory=dict)

    def by_status(self, status: str) -> list[KeyOutcome]:
        return [k for k in self.keys if k.status == status]


class RefreshService:
    def __init__(  # noqa: PLR0917
        self,
        routes: EntityCubeMap,
        debouncer: Debouncer,
        cube: CubeJobs,
        telemetry: Telemetry,
        clock: Clock,
        timezones: Sequence[str],
        map_io: Mapper = serial_map,
        verifier: BuildVerifier | None = None,
        *,
        max_selectors: int = DEFAULT_MAX_SELECTORS,
        admission: Admission | None = None,
    ) -> None:
        self._map = map_io
        self.max_selectors = max_selectors
        # None (or a budget of 0): no admission control, every claim posts.
        self.admission = admission
        # None: refreshes are not verified (tests and the model check of the debounce alone).
        self.verifier = verifier
        self.routes = routes
        self.debouncer = debouncer
        self.cube = cube
        self.telemetry = telemetry
        self.clock = clock
        self.timezones = tuple(timezones)

    # -- MSK batches -------------------------------------------------------------------------
    def process_mutations(self, mutations: Iterable[tuple[RecordRef, EntityMutation]], *, deadline_ms: int) -> Outcome:
        groups = self._group(mutations)
        self.telemetry.count("KeysCoalesced", len(groups))

        outcome = Outcome()
        budget = Budget.split(self.clock.now_ms(), deadline_ms)
        claims: dict[str, list[Claim]] = defaultdict(list)
        decisions = self._decide_all([(k, groups[k].oldest_event_ms) for k in sorted(groups)], budget)
        for key, decision in decisions:
            if isinstance(decision, Exception):
                if not isinstance(decision, OutOfTime):
                    log.warning("debounce decision failed", extra={"key": key.pk, "error": str(decision)})
                outcome.failed.update(groups[key].refs)
                outcome.keys.append(KeyOutcome(key, "failed", type(decision).__name__))
            elif isinstance(decision, Claim):
                claims[key.tenant_id].append(decision)
            else:
                self._debounced(decision, outcome)
        self._log_out_of_time(decisions)

        ok_keys = self._refresh_all(claims, budget, outcome)
        for tenant_claims in claims.values():
            for claim in tenant_claims:
                if claim.key not in ok_keys:
                    outcome.failed.update(groups[claim.key].refs)
        # By mapped entity type (the map's keys: few, a cheap dimension): the refreshes this batch's mutations
        # started. Trailing refreshes carry no entity type; they are counted as TrailingFired.
        refreshed = Counter(t for key in ok_keys for t in groups[key].entity_types)
        for entity_type, value in sorted(refreshed.items()):
            self.telemetry.count("RefreshesByEntityType", value, dimension=("EntityType", entity_type))
        return outcome

    def _group(self, mutations: Iterable[tuple[RecordRef, EntityMutation]]) -> dict[RefreshKey, _Group]:
        """The refresh keys a batch makes stale, each with its records and oldest event time: one per
        (tenant, target), or one per partition a mutation's time hint falls in. A whole-target key
        takes in the partition keys of its target (and a cube's, of its pre-aggregations): its
        refresh rebuilds them too. An update that changed none of a target's fields skips it."""
        groups: dict[RefreshKey, _Group] = {}
        unmapped = skipped = fallbacks = 0
        mapped: list[str] = []
        for ref, mutation in mutations:
            routes = self.routes.routes_for(mutation.entity_type)
            if not routes:
                unmapped += 1
                continue
            mapped.append(mutation.entity_type)
            for route in routes:
                if route.skips(mutation):
                    skipped += 1
                    continue
                whole = RefreshKey(mutation.tenant_id, route.target)
                partitions = route.partitions(mutation, self.timezones)
                if partitions is None:
                    fallbacks += route.partition_by is not None
                    keys = [whole]
                else:
                    keys = [RefreshKey(whole.tenant_id, whole.target, p.label) for p in sorted(partitions)]
                for key in keys:
                    groups.setdefault(key, _Group()).add(ref, mutation.timestamp, (mutation.entity_type,))
        # A batch that touches more partitions of one target than one request may carry ranges for
        # gets the whole-target key instead: it would be widened to (nearly) the whole target at the
        # Cube request anyway, and one key costs one DynamoDB write instead of one per partition.
        per_target: dict[RefreshKey, int] = {}
        for key in groups:
            if key.partition:
                per_target[key.whole] = per_target.get(key.whole, 0) + 1
        for whole, count in per_target.items():
            if count > self.max_selectors:
                groups.setdefault(whole, _Group())
        for key in [k for k in groups if k.partition]:
            cover = next((c for c in (key.whole, RefreshKey(key.tenant_id, key.cube)) if c in groups), None)
            if cover is not None:
                group = groups.pop(key)
                for ref in group.refs:
                    groups[cover].add(ref, group.oldest_event_ms, group.entity_types)
        for name, value in (
            ("UnmappedEvents", unmapped),
            ("SkippedByFields", skipped),
            ("WholeTargetFallbacks", fallbacks),
        ):
            if value:
                self.telemetry.count(name, value)
        for entity_type, value in sorted(Counter(mapped).items()):
            self.telemetry.count("EventsByEntityType", value, dimension=("EntityType", entity_type))
        return groups

    def _decide_all(
        self, keys: Sequence[tuple[RefreshKey, int]], budget: Budget, *, force: bool = False
    ) -> list[tuple[RefreshKey, Claim | Debounced | Exception]]:
        def decide(item: tuple[RefreshKey, int]) -> tuple[RefreshKey, Claim | Debounced | Exception]:
            key, oldest = item
            if self.clock.now_ms() >= budget.claims_until:
                return key, OutOfTime("not started: the function's deadline is near")
            try:
                return key, self.debouncer.decide(key, oldest, force=force)
            except (StoreUnavailable, SchedulerUnavailable) as exc:
                return key, exc

        return self._map(decide, keys)

    @staticmethod
    def _log_out_of_time(decisions: Sequence[tuple[RefreshKey, object]]) -> None:
        skipped = sum(1 for _, d in decisions if isinstance(d, OutOfTime))
        if skipped:
            log.warning(
                "deadline near: keys not started, their records are reported for retry",
                extra={"keys_not_started": skipped, "keys": len(decisions)},
            )

    def _debounced(self, decision: Debounced, outcome: Outcome) -> None:
        self.telemetry.count("Debounced")
        if decision.scheduled:
            self.telemetry.count("TrailingScheduled")
        detail = f"trailing refresh due at {decision.due_at}" if decision.due_at else ""
        outcome.keys.append(KeyOutcome(decision.key, "debounced", detail))

    # -- trailing refreshes ------------------------------------------------------------------
    def process_trailing(
        self, messages: Iterable[tuple[RecordRef, TrailingMessage]], *, deadline_ms: int, wake: bool = True
    ) -> Outcome:
        outcome = Outcome()
        budget = Budget.split(self.clock.now_ms(), deadline_ms)
        claims: dict[str, list[Claim]] = defaultdict(list)
        refs: dict[RefreshKey, list[tuple[RecordRef, TrailingMessage]]] = defaultdict(list)
        for ref, message in messages:
            if self.clock.now_ms() >= budget.claims_until:
                outcome.failed.add(ref)  # not started: SQS delivers it again
                continue
            try:
                result = self.debouncer.fire(message)
            except (StoreUnavailable, SchedulerUnavailable) as exc:
                log.warning("trailing refresh failed", extra={"key": message.key.pk, "error": str(exc)})
                outcome.failed.add(ref)
                continue
            if isinstance(result, Claim):
                refs[result.key].append((ref, message))
                claims[result.key.tenant_id].append(result)
            elif isinstance(result, Rescheduled):
                outcome.keys.append(KeyOutcome(result.key, "rescheduled", f"due at {result.due_at}"))
            else:
                self._skipped(result, outcome)
        fired = sum(len(c) for c in claims.values())
        if fired:
            self.telemetry.count("TrailingFired", fired)
        ok_keys = self._refresh_all(claims, budget, outcome, wake=wake)
        for tenant_claims in claims.values():
            for claim in tenant_claims:
                if claim.key not in ok_keys:
                    for ref, message in refs[claim.key]:
                        if not self._retry_later(message, outcome.errors.get(claim.key)):
                            outcome.failed.add(ref)
        return outcome

    def _skipped(self, result: NothingToDo, outcome: Outcome) -> None:
        if result.rode_along:
            self.telemetry.count("RideAlongs")
        outcome.keys.append(KeyOutcome(result.key, "skipped", result.reason))

    def _retry_later(self, message: TrailingMessage, error: CubeError | None) -> bool:
        """Cube failed a trailing refresh: come back after a short backoff instead of waiting out the
        SQS visibility timeout (6x the function timeout). 4xx, and failures past the last backoff, go
        back to SQS, whose redrive policy ends in the trailing DLQ."""
        if error is None or not error.retryable or message.attempt >= len(TRAILING_RETRY_DELAYS_MS):
            return False
        now = self.clock.now_ms()
        retry = replace(message, due_at=now + TRAILING_RETRY_DELAYS_MS[message.attempt], attempt=message.attempt + 1)
        try:
            self.debouncer.scheduler.schedule(retry, now=now)
        except SchedulerUnavailable:
            return False
        self.telemetry.count("TrailingRetried")
        return True

    # -- build verification (handler.domain.verify) -----------------------------------------
    def process_verify(self, messages: Iterable[tuple[RecordRef, VerifyMessage]], *, deadline_ms: int) -> Outcome:
        outcome = Outcome()
        items = list(messages)
        if self.verifier is None:
            log.error("verify messages received but verification is not wired: reported for redelivery")
            outcome.failed.update(ref for ref, _ in items)
            return outcome
        settled = self.verifier.settle(items, deadline_ms=deadline_ms)
        outcome.failed |= settled.failed
        self._wake_after(settled.keys, settled.freed_slots, deadline_ms, outcome)
        return outcome

    # -- waking what waits on a settled build or on budget (docs/load-aware.md) --------------
    def _wake_after(self, keys: Sequence[RefreshKey], freed_slots: int, deadline_ms: int, outcome: Outcome) -> None:
        """Builds were settled: fire now the trailing refreshes their gate held back, and the oldest
        keys waiting for the budget they freed. Best effort: each of them has its own message in
        flight anyway (a wake only saves it the wait)."""
        now = self.clock.now_ms()
        messages: list[TrailingMessage] = []
        for key in dict.fromkeys(keys):
            try:
                state = self.debouncer.store.get(key)
            except StoreUnavailable:
                continue
            if (
                state is not None
                and state.trailing_token is not None
                and state.trailing_state == "scheduled"
                and not state.gated(now)
                and state.window_end(self.debouncer.windows.base(key)) <= now
            ):
                due = state.trailing_due_at if state.trailing_due_at is not None else now
                messages.append(
                    TrailingMessage(key.tenant_id, key.target, state.trailing_token, due, partition=key.partition)
                )
        if self.admission is not None and freed_slots:
            try:
                waiters = self.admission.waiters(freed_slots)
            except StoreUnavailable:
                waiters = []
            messages += self._wake_messages(waiters, now)
        self._wake(messages, deadline_ms, outcome)

    @staticmethod
    def _wake_messages(waiters: Sequence[Waiter], now: int) -> list[TrailingMessage]:
        # The message as the key's record has it (its due time: a wake is a current copy, not an old one).
        return [
            TrailingMessage(
                w.key.tenant_id,
                w.key.target,
                w.trailing_token,
                w.trailing_due_at if w.trailing_due_at is not None else now,
                partition=w.key.partition,
            )
            for w in waiters
            if w.trailing_token is not None
        ]

    def _wake(self, messages: Sequence[TrailingMessage], deadline_ms: int, outcome: Outcome) -> None:
        unique = list({(m.key, m.token): m for m in messages}.values())
        if not unique:
            return
        self.telemetry.count("Wakes", len(unique))
        woken = self.process_trailing(
            [(RecordRef("wake", i), m) for i, m in enumerate(unique)], deadline_ms=deadline_ms, wake=False
        )
        outcome.keys += woken.keys  # their failures are not ours to report: their own messages stay

    def process_retrigger(self, messages: Iterable[tuple[RecordRef, RetriggerMessage]], *, deadline_ms: int) -> Outcome:
        """Re-trigger keys whose build failed, through the debounce protocol: each key is decided as
        if a mutation as old as the oldest one the failed refresh covered arrived now (claim now, or
        join / schedule the trailing refresh of the window)."""
        outcome = Outcome()
        budget = Budget.split(self.clock.now_ms(), deadline_ms)
        claims: dict[str, list[Claim]] = defaultdict(list)
        refs: dict[RefreshKey, set[RecordRef]] = defaultdict(set)
        for ref, message in messages:
            if message.dead_lettered:
                log.info("replaying a dead-lettered build", extra={"tenant_id": message.tenant_id})
            due = self.verifier.still_due(message) if self.verifier is not None else message.refresh_keys()
            covered = sorted({k for k, _ in message.refresh_keys()} - {k for k, _ in due})
            if covered:
                log.info(
                    "re-trigger covered by a newer refresh: nothing to do",
                    extra={"tenant_id": message.tenant_id, "keys": [k.pk for k in covered]},
                )
                outcome.keys.extend(KeyOutcome(k, "skipped", "covered by a newer refresh") for k in covered)
            for key, decision in self._decide_all(due, budget):
                if isinstance(decision, Exception):
                    log.warning("retrigger decision failed", extra={"key": key.pk, "error": str(decision)})
                    outcome.failed.add(ref)
                elif isinstance(decision, Claim):
                    claims[key.tenant_id].append(decision)
                    refs[key].add(ref)
                else:
                    self._debounced(decision, outcome)
        ok_keys = self._refresh_all(claims, budget, outcome)
        for tenant_claims in claims.values():
            for claim in tenant_claims:
                if claim.key not in ok_keys:  # SQS redelivers; after maxReceiveCount the DLQ (alarmed)
                    outcome.failed |= refs[claim.key]
        return outcome

    # -- manual operations -------------------------------------------------------------------
    def refresh_now(self, tenant_id: str, targets: Sequence[str], *, force: bool, deadline_ms: int) -> Outcome:
        """Refresh a tenant's targets as if a mutation arrived now (`force`: ignore the window)."""
        outcome = Outcome()
        now = self.clock.now_ms()
        budget = Budget.split(now, deadline_ms)
        claims: list[Claim] = []
        keys = [(RefreshKey(tenant_id, target), now) for target in sorted(set(targets))]
        for key, decision in self._decide_all(keys, budget, force=force):
            if isinstance(decision, Exception):
                outcome.keys.append(KeyOutcome(key, "failed", str(decision)))
            elif isinstance(decision, Claim):
                claims.append(decision)
            else:
                self._debounced(decision, outcome)
        self._refresh_all({tenant_id: claims} if claims else {}, budget, outcome)
        return outcome

    # -- admission (handler.domain.admission) -----------------------------------------------
    def _admit(
        self, claims: dict[str, list[Claim]], outcome: Outcome
    ) -> tuple[dict[str, list[Claim]], dict[RefreshKey, Lease], set[RefreshKey], list[Claim], list[Waiter]]:
        """Leases of build budget for the claims that fit; the others are deferred (given back, their
        trailing refresh re-sent for later, the key registered as waiting). Returns the admitted claims
        by tenant, their leases, the keys deferred (their records are acknowledged: a message carries
        them), the claims whose deferral failed (released and reported like a failed refresh), and
        the waiters to wake."""
        everything = [c for tenant in sorted(claims) for c in claims[tenant]]
        asking = [c for c in everything if not c.force]
        if self.admission is None or not self.admission.enabled or not asking:
            return claims, {}, set(), [], []
        try:
            decision = self.admission.admit([Request(c.key, c.oldest, c.expected_jobs) for c in asking])
        except StoreUnavailable as exc:
            log.warning("build budget unreadable: claims deferred", extra={"error": str(exc)})
            decision = Decision(deferred=[c.key for c in asking])
        deferred_keys = set(decision.deferred)
        admitted: dict[str, list[Claim]] = defaultdict(list)
        deferred: set[RefreshKey] = set()
        unsettled: list[Claim] = []
        for claim in everything:
            if claim.key not in deferred_keys:
                admitted[claim.key.tenant_id].append(claim)
            elif self._defer(claim, outcome):
                deferred.add(claim.key)
            else:
                unsettled.append(claim)
        return dict(admitted), decision.leases, deferred, unsettled, decision.wake

    def _defer(self, claim: Claim, outcome: Outcome) -> bool:
        now = self.clock.now_ms()
        age = max(0, now - claim.oldest)
        due = now + defer_delay_ms(age)
        waiting = Waiting(claim.oldest, due + defer_delay_ms(age) + 60_000)
        try:
            self.debouncer.defer(claim, due_at=due, waiting=waiting)
        except (StoreUnavailable, SchedulerUnavailable) as exc:
            log.warning("deferral failed", extra={"key": claim.key.pk, "error": str(exc)})
            outcome.keys.append(KeyOutcome(claim.key, "failed", f"deferral failed: {exc}"))
            return False
        self.telemetry.count("KeysDeferred")
        self.telemetry.timing("BacklogAge", age)
        outcome.keys.append(KeyOutcome(claim.key, "deferred", f"over the build budget: back at {due}"))
        return True

    def _free(self, leases: dict[RefreshKey, Lease], keys: Iterable[RefreshKey]) -> None:
        if self.admission is None:
            return
        for key in keys:
            lease = leases.pop(key, NO_LEASE)
            if lease.slots:
                try:
                    self.admission.free(lease)
                except StoreUnavailable as exc:  # its lease lapses on its own
                    log.warning("build budget not freed", extra={"key": key.pk, "error": str(exc)})

    # -- the one place Cube is called --------------------------------------------------------
    def _refresh_all(
        self, claims: dict[str, list[Claim]], budget: Budget, outcome: Outcome, *, wake: bool = True
    ) -> set[RefreshKey]:
        """Admission first (handler.domain.admission: the claims over the build budget are deferred),
        then one Cube request per tenant, its verification scheduled by the same worker right after
        Cube's answer (tenants spread by the mapper, all inside the Cube phase of the budget); then
        the bookkeeping in order; then, spread again, the writes that follow a refresh and the
        releases of what Cube did not take (there may be thousands of each). Returns the keys whose
        records are settled: refreshed, or deferred with their trailing refresh in flight."""
        claims, leases, deferred, unsettled, waiters = self._admit(claims, outcome)
        tenants = sorted(claims)
        ok: set[RefreshKey] = set()
        unsent = 0
        after: list[tuple[Claim, bool]] = []
        asked_all = self._map(lambda tenant_id: self._ask_cube(tenant_id, claims[tenant_id], budget, leases), tenants)
        for tenant_id, asked in zip(tenants, asked_all, strict=True):
            unsent += sum(1 for a in asked.answers if isinstance(a, CubeNotSent))
            refreshed, nothing = self._settle(tenant_id, claims[tenant_id], asked, outcome)
            ok |= {c.key for c in refreshed}
            after.extend((c, c in nothing) for c in refreshed)
        if unsent:
            log.warning("deadline near: Cube requests not sent, claims released", extra={"selectors_not_sent": unsent})
        self._map(self._after_refresh, after)
        failed = [c for tenant in tenants for c in claims[tenant] if c.key not in ok]
        released = self._map(self._release, [*failed, *unsettled])
        if any(released):
            self.telemetry.count("ClaimsReleased", sum(released))
        # No build in Cube for these: a failed or unsent request, or nothing to build.
        self._free(leases, [c.key for c in failed] + [c.key for c, nothing in after if nothing])
        if wake and waiters:
            self._wake(self._wake_messages(waiters, self.clock.now_ms()), budget.deadline, outcome)
        return ok | deferred

    def _ask_cube(self, tenant_id: str, claims: list[Claim], budget: Budget, leases: dict[RefreshKey, Lease]) -> _Asked:
        """Runs in a worker: Cube's request for one tenant's claimed keys, then the verification of
        what Cube accepted (sent before any bookkeeping: see _verify_later)."""
        selectors = build_selectors(
            [c.key for c in claims], tenant_id, self.timezones, max_selectors=self.max_selectors
        )
        started = self.clock.now_ms()
        if started >= budget.cube_until:
            late = CubeNotSent("not sent: the function's deadline is near")
            return _Asked(selectors, [late for _ in selectors], 0, set())
        answers = [_verifiable(a) for a in self.cube.trigger(tenant_id, selectors, deadline_ms=budget.cube_until)]
        latency = self.clock.now_ms() - started
        tokens, errors = _per_key(selectors, answers)
        accepted = [(c, tuple(tokens[c.key])) for c in claims if c.key not in errors]
        return _Asked(selectors, answers, latency, self._verify_later(tenant_id, accepted, leases))

    def _settle(
        self, tenant_id: str, claims: list[Claim], asked: _Asked, outcome: Outcome
    ) -> tuple[list[Claim], list[Claim]]:
        """Per key: refreshed when every selector covering it was accepted (with those selectors'
        job tokens) and its verification scheduled; otherwise its claim is released (by the caller)
        and the error kept for the caller. Answers the refreshed claims, and those of them Cube had
        nothing to build for."""
        tokens, errors = _per_key(asked.selectors, asked.answers)
        for selector, answer in zip(asked.selectors, asked.answers, strict=True):
            if isinstance(answer, CubeError) and not isinstance(answer, CubeNotSent):
                self._log_cube_error(tenant_id, selector, answer)
        if len(errors) < len(claims):
            self.telemetry.timing("CubeLatency", asked.latency)
        refreshed: list[Claim] = []
        for claim in claims:
            error = errors.get(claim.key)
            if error is not None:  # released by the caller, with the others
                outcome.keys.append(KeyOutcome(claim.key, "failed", f"{error.error_class}: {error}"))
                outcome.errors[claim.key] = error
                continue
            if claim.key in asked.unverified:  # released and reported: the redelivery refreshes and verifies again
                outcome.keys.append(KeyOutcome(claim.key, "failed", "the build verification could not be scheduled"))
                continue
            refreshed.append(claim)
            self.debouncer.note_jobs(claim.key, len(tokens[claim.key]))
            self.telemetry.count("RefreshesTriggered")
            if claim.window_ms is not None:
                self.telemetry.timing("EffectiveWindow", claim.window_ms)
            self.telemetry.count("RefreshesByCube", dimension=("Cube", claim.key.cube))
            if claim.oldest_event_ms is not None:
                self.telemetry.timing("RefreshStaleness", max(0, claim.started_at - claim.oldest_event_ms))
            detail = ("trailing" if claim.trailing else "leading") + ("" if tokens[claim.key] else ", nothing to build")
            outcome.keys.append(KeyOutcome(claim.key, "refreshed", detail, tuple(tokens[claim.key])))
        nothing = [c for c in refreshed if not tokens[c.key]]
        self._nothing_to_build(tenant_id, nothing)
        if refreshed:
            log.info(
                "refresh queued",
                extra={
                    "tenant_id": tenant_id,
                    "targets": [c.key.target for c in refreshed],
                    "jobs": sum(len(a) for a in asked.answers if not isinstance(a, CubeError)),
                },
            )
        return refreshed, nothing

    def _log_cube_error(self, tenant_id: str, selector: Selector, exc: CubeError) -> None:
        self.telemetry.count("CubeErrors")
        self.telemetry.count("CubeErrorsByClass", dimension=("ErrorClass", exc.error_class))
        log.warning(
            "cube refused or failed the refresh",
            extra={
                "tenant_id": tenant_id,
                "targets": [k.pk.split("#", 1)[1] for k in selector.keys],
                "error_class": exc.error_class,
                "status": exc.status,
                "error": str(exc),
            },
        )

    def _verify_later(
        self, tenant_id: str, accepted: Sequence[tuple[Claim, tuple[str, ...]]], leases: dict[RefreshKey, Lease]
    ) -> set[RefreshKey]:
        """Schedule the verification of the builds Cube accepted (before any bookkeeping: the keys
        whose verification could not be scheduled are released and their records redelivered, so
        no accepted refresh goes unverified). Keys Cube answered with no job are not verified: see
        _nothing_to_build. Answers the keys not scheduled. The verify messages carry each key's
        build-budget lease; the verifier records the jobs with the key's in-flight gate up, which the
        verification lowers when the build is settled (docs/load-aware.md)."""
        if self.verifier is None:
            return set()
        targets = [
            BuildTarget(c.key, tokens, c.started_at, c.oldest, lease=leases.get(c.key, NO_LEASE))
            for c, tokens in accepted
            if tokens
        ]
        return self.verifier.schedule(tenant_id, targets)

    def _nothing_to_build(self, tenant_id: str, claims: Sequence[Claim]) -> None:
        """Keys Cube accepted with no job: a partition outside the pre-aggregation's build range (Cube
        has no rollup of that range, so nothing of it is stale), or a target that names no
        pre-aggregation (a configuration error, which whole-target keys of the target surface as a
        400). Counted and logged here, recorded on the key's item by _after_refresh (`stats` shows
        it), never retried."""
        if not claims:
            return
        self.telemetry.count("NothingToBuild", len(claims))
        log.warning(
            "Cube has nothing to build for these keys (outside the pre-aggregation's build range, or no such"
            " pre-aggregation)",
            extra={"tenant_id": tenant_id, "keys": [c.key.pk for c in claims]},
        )

    def _after_refresh(self, item: tuple[Claim, bool]) -> None:
        """The writes that follow a refreshed key (run side by side): the trailing bookkeeping, and
        the record of a key Cube had nothing to build for."""
        claim, nothing_to_build = item
        self._refreshed(claim)
        if nothing_to_build:
            try:
                record = BuildRecord(claim.started_at, "nothing_to_build", self.clock.now_ms())
                self.debouncer.store.record_build(claim.key, record)
            except StoreUnavailable as exc:  # only `stats` reads it
                log.warning("build outcome not recorded", extra={"key": claim.key.pk, "error": str(exc)})

    def _refreshed(self, claim: Claim) -> None:
        try:
            self.debouncer.refreshed(claim)
        except StoreUnavailable as exc:
            # Harmless: the trailing record stays `running` and the next mutation replaces it.
            log.warning("trailing refresh bookkeeping failed", extra={"key": claim.key.pk, "error": str(exc)})

    def _release(self, claim: Claim) -> bool:
        try:
            return self.debouncer.release(claim)
        except StoreUnavailable as exc:
            # The claim stays; its window ends on its own and the redelivered records re-mark the key.
            log.error("claim release failed", extra={"key": claim.key.pk, "error": str(exc)})
            return False
