"""Admission control (docs/load-aware.md): a budget of build jobs the function may have in Cube at
once, shared by every concurrent invocation through the store's budget slots. A refresh takes as many
slots as it is expected to queue jobs, before its POST; its lease rides in the verify message, is
renewed by each poll that finds the build alive, and is freed when the build is settled. A lease that
is not renewed lapses (`LEASE_MS`), so a crashed invocation cannot keep budget.

Over budget, a key waits: the caller defers it (its trailing refresh comes back later, the key
registered as waiting) and wakes the waiters that go first. Free slots go to requests and live
waiters in order of their oldest mutation, so no tenant starves; a request that does not fit is not
overtaken by smaller ones behind it."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from handler.domain.errors import StoreUnavailable
from handler.domain.model import RefreshKey
from handler.domain.ports import BudgetStore, Clock, Telemetry, Waiter

log = logging.getLogger(__name__)

SCOPE = "global"
# A lease outlives the longest gap between two polls of a pending build (60 s, plus SQS's lateness
# and a failed invocation's quick retry) several times over; a crash frees its slots after this.
LEASE_MS = 300_000
# A deferred key comes back after half its wait so far, between these bounds (it is also woken as
# soon as budget frees, so this is the safety net, not the pace).
DEFER_MIN_MS = 5_000
DEFER_MAX_MS = 60_000
MAX_BUDGET = 100  # one BatchGetItem reads every slot


def defer_delay_ms(age_ms: int) -> int:
    return max(DEFER_MIN_MS, min(DEFER_MAX_MS, age_ms // 2))


def _new_token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Lease:
    """Budget slots held by one key's refresh (empty when admission is off or forced)."""

    token: str = ""
    slots: tuple[int, ...] = ()


NO_LEASE = Lease()


@dataclass(frozen=True, slots=True)
class Request:
    key: RefreshKey
    oldest_ms: int  # its oldest pending mutation: the order of service
    weight: int = 1  # the jobs it is expected to queue


@dataclass(slots=True)
class Decision:
    leases: dict[RefreshKey, Lease] = field(default_factory=dict)
    deferred: list[RefreshKey] = field(default_factory=list)
    wake: list[Waiter] = field(default_factory=list)  # waiters that go first: fire them now


class Admission:
    def __init__(
        self,
        store: BudgetStore,
        clock: Clock,
        telemetry: Telemetry,
        budget: int,
        *,
        scope: str = SCOPE,
        lease_ms: int = LEASE_MS,
        new_token: Callable[[], str] = _new_token,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= budget <= MAX_BUDGET:
            raise ValueError(f"the build budget must be 0..{MAX_BUDGET}")
        self.store = store
        self.clock = clock
        self.telemetry = telemetry
        self.budget = budget
        self.scope = scope
        self.lease_ms = lease_ms
        self._new_token = new_token
        self._rng = rng or random.Random()  # noqa: S311 (spreading slot choice, not crypto)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def admit(self, requests: Sequence[Request]) -> Decision:
        """Leases for the requests that fit, in order of their oldest mutation among the live waiters;
        the others are deferred. Raises StoreUnavailable (the caller then defers them all)."""
        decision = Decision()
        if not requests:
            return decision
        if not self.enabled:
            decision.leases = {r.key: NO_LEASE for r in requests}
            return decision
        now = self.clock.now_ms()
        slots = self.store.budget_slots(self.scope, self.budget)
        free = [s.index for s in slots if s.free(now)]
        # Gauges (read with Maximum): jobs of ours in Cube as the slots say, and the budget.
        self.telemetry.count("BuildsInFlight", self.budget - len(free))
        self.telemetry.count("BuildBudget", self.budget)
        if not free:
            decision.deferred = [r.key for r in requests]
            return decision
        asking = {r.key for r in requests}
        try:
            waiters = [w for w in self.store.waiters(self.scope, now=now, limit=len(free)) if w.key not in asking]
        except StoreUnavailable as exc:  # fairness is best effort; the budget is not
            log.warning("waiting keys could not be read: admitting without their order", extra={"error": str(exc)})
            waiters = []
        line: list[tuple[int, str, Request | Waiter]] = [(w.since, w.key.pk, w) for w in waiters]
        line += [(r.oldest_ms, r.key.pk, r) for r in requests]
        line.sort(key=lambda item: (item[0], item[1]))
        self._rng.shuffle(free)  # concurrent invocations start at different slots
        room = len(free)
        blocked = False
        for _, _, entry in line:
            if isinstance(entry, Waiter):
                if not blocked and room > 0:
                    room -= 1  # its size is unknown here: one slot held for it
                    decision.wake.append(entry)
                continue
            weight = max(1, min(entry.weight, self.budget))
            if blocked or weight > room:
                blocked = True  # nobody behind it goes first: a big key cannot starve
                decision.deferred.append(entry.key)
                continue
            lease = self._take(entry.key, free, weight, now)
            if lease is None:  # another invocation took the slots meanwhile
                blocked = True
                decision.deferred.append(entry.key)
                continue
            free = [i for i in free if i not in lease.slots]
            room -= weight
            decision.leases[entry.key] = lease
        return decision

    def _take(self, key: RefreshKey, free: list[int], weight: int, now: int) -> Lease | None:
        token = self._new_token()
        taken: list[int] = []
        for index in free:
            if len(taken) == weight:
                break
            if self.store.take_slot(self.scope, index, lease=token, key=key.pk, now=now, until=now + self.lease_ms):
                taken.append(index)
        lease = Lease(token, tuple(taken))
        if len(taken) < weight:
            self.free(lease)
            return None
        return lease

    def renew(self, lease: Lease) -> None:
        until = self.clock.now_ms() + self.lease_ms
        for index in lease.slots:
            self.store.renew_slot(self.scope, index, lease=lease.token, until=until)

    def free(self, lease: Lease) -> int:
        """Give the slots back; returns how many this call freed (a duplicate frees none)."""
        return sum(1 for index in lease.slots if self.store.free_slot(self.scope, index, lease=lease.token))

    def waiters(self, limit: int) -> list[Waiter]:
        """The oldest live waiters, to wake when budget frees."""
        if not self.enabled or limit <= 0:
            return []
        return self.store.waiters(self.scope, now=self.clock.now_ms(), limit=limit)
