"""The refresh pipeline: mutations in, coalesced and debounced keys, one Cube request per tenant."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from handler.domain.debounce import Claim, Debounced, Debouncer, Rescheduled
from handler.domain.errors import CubeError, SchedulerUnavailable, StoreUnavailable
from handler.domain.model import EntityMutation, RecordRef, RefreshKey
from handler.domain.ports import Clock, CubeJobs, Telemetry, TrailingMessage
from handler.domain.routing import EntityCubeMap, build_selectors

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Group:
    refs: list[RecordRef] = field(default_factory=list)
    oldest_event_ms: int = 2**63


@dataclass(frozen=True, slots=True)
class KeyOutcome:
    key: RefreshKey
    status: str  # refreshed | debounced | failed | rescheduled | skipped
    detail: str = ""
    job_tokens: tuple[str, ...] = ()


@dataclass(slots=True)
class Outcome:
    failed: set[RecordRef] = field(default_factory=set)
    keys: list[KeyOutcome] = field(default_factory=list)

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
    ) -> None:
        self.routes = routes
        self.debouncer = debouncer
        self.cube = cube
        self.telemetry = telemetry
        self.clock = clock
        self.timezones = tuple(timezones)

    # -- MSK batches -------------------------------------------------------------------------
    def process_mutations(self, mutations: Iterable[tuple[RecordRef, EntityMutation]], *, deadline_ms: int) -> Outcome:
        groups: dict[RefreshKey, _Group] = {}
        unmapped = 0
        for ref, mutation in mutations:
            targets = self.routes.targets_for(mutation.entity_type)
            if not targets:
                unmapped += 1
                continue
            for target in targets:
                key = RefreshKey(mutation.tenant_id, target)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group()
                group.refs.append(ref)
                group.oldest_event_ms = min(group.oldest_event_ms, mutation.timestamp)
        if unmapped:
            self.telemetry.count("UnmappedEvents", unmapped)
        self.telemetry.count("KeysCoalesced", len(groups))

        outcome = Outcome()
        claims: dict[str, list[Claim]] = defaultdict(list)
        for key in sorted(groups):
            group = groups[key]
            try:
                decision = self.debouncer.decide(key, group.oldest_event_ms)
            except (StoreUnavailable, SchedulerUnavailable) as exc:
                log.warning("debounce decision failed", extra={"key": key.pk, "error": str(exc)})
                outcome.failed.update(group.refs)
                outcome.keys.append(KeyOutcome(key, "failed", type(exc).__name__))
                continue
            if isinstance(decision, Claim):
                claims[key.tenant_id].append(decision)
            else:
                self._debounced(decision, outcome)

        for tenant_id in sorted(claims):
            ok_keys = self._refresh(tenant_id, claims[tenant_id], deadline_ms, outcome)
            for claim in claims[tenant_id]:
                if claim.key not in ok_keys:
                    outcome.failed.update(groups[claim.key].refs)
        return outcome

    def _debounced(self, decision: Debounced, outcome: Outcome) -> None:
        self.telemetry.count("Debounced")
        if decision.scheduled:
            self.telemetry.count("TrailingScheduled")
        detail = f"trailing refresh due at {decision.due_at}" if decision.due_at else ""
        outcome.keys.append(KeyOutcome(decision.key, "debounced", detail))

    # -- trailing refreshes ------------------------------------------------------------------
    def process_trailing(self, messages: Iterable[tuple[RecordRef, TrailingMessage]], *, deadline_ms: int) -> Outcome:
        outcome = Outcome()
        claims: dict[str, list[Claim]] = defaultdict(list)
        refs: dict[RefreshKey, list[RecordRef]] = defaultdict(list)
        for ref, message in messages:
            try:
                result = self.debouncer.fire(message)
            except (StoreUnavailable, SchedulerUnavailable) as exc:
                log.warning("trailing refresh failed", extra={"key": message.key.pk, "error": str(exc)})
                outcome.failed.add(ref)
                continue
            if isinstance(result, Claim):
                refs[result.key].append(ref)
                claims[result.key.tenant_id].append(result)
            elif isinstance(result, Rescheduled):
                outcome.keys.append(KeyOutcome(result.key, "rescheduled", f"due at {result.due_at}"))
            else:
                outcome.keys.append(KeyOutcome(result.key, "skipped", result.reason))
        for tenant_id in sorted(claims):
            self.telemetry.count("TrailingFired", len(claims[tenant_id]))
            ok_keys = self._refresh(tenant_id, claims[tenant_id], deadline_ms, outcome)
            for claim in claims[tenant_id]:
                if claim.key not in ok_keys:
                    outcome.failed.update(refs[claim.key])
        return outcome

    # -- manual operations -------------------------------------------------------------------
    def refresh_now(self, tenant_id: str, targets: Sequence[str], *, force: bool, deadline_ms: int) -> Outcome:
        """Refresh a tenant's targets as if a mutation arrived now (`force`: ignore the window)."""
        outcome = Outcome()
        now = self.clock.now_ms()
        claims: list[Claim] = []
        for target in sorted(set(targets)):
            key = RefreshKey(tenant_id, target)
            try:
                decision = self.debouncer.decide(key, now, force=force)
            except (StoreUnavailable, SchedulerUnavailable) as exc:
                outcome.keys.append(KeyOutcome(key, "failed", str(exc)))
                continue
            if isinstance(decision, Claim):
                claims.append(decision)
            else:
                self._debounced(decision, outcome)
        if claims:
            self._refresh(tenant_id, claims, deadline_ms, outcome)
        return outcome

    # -- the one place Cube is called --------------------------------------------------------
    def _refresh(self, tenant_id: str, claims: list[Claim], deadline_ms: int, outcome: Outcome) -> set[RefreshKey]:
        selectors = build_selectors([c.key.target for c in claims], tenant_id, self.timezones)
        started = self.clock.now_ms()
        try:
            tokens = self.cube.trigger(tenant_id, selectors, deadline_ms=deadline_ms)
        except CubeError as exc:
            self.telemetry.count("CubeErrors")
            self.telemetry.count("CubeErrorsByClass", dimension=("ErrorClass", exc.error_class))
            log.warning(
                "cube refused or failed the refresh",
                extra={
                    "tenant_id": tenant_id,
                    "targets": [c.key.target for c in claims],
                    "error_class": exc.error_class,
                    "status": exc.status,
                    "error": str(exc),
                },
            )
            for claim in claims:
                self._release(claim)
                outcome.keys.append(KeyOutcome(claim.key, "failed", f"{exc.error_class}: {exc}"))
            return set()
        self.telemetry.timing("CubeLatency", self.clock.now_ms() - started)
        for claim in claims:
            self._refreshed(claim)
            self.telemetry.count("RefreshesTriggered")
            self.telemetry.count("RefreshesByCube", dimension=("Cube", claim.key.cube))
            if claim.oldest_event_ms is not None:
                self.telemetry.timing("RefreshStaleness", max(0, claim.started_at - claim.oldest_event_ms))
            outcome.keys.append(
                KeyOutcome(claim.key, "refreshed", "trailing" if claim.trailing else "leading", tuple(tokens))
            )
        log.info(
            "refresh queued",
            extra={"tenant_id": tenant_id, "targets": [c.key.target for c in claims], "jobs": len(tokens)},
        )
        return {c.key for c in claims}

    def _refreshed(self, claim: Claim) -> None:
        try:
            self.debouncer.refreshed(claim)
        except StoreUnavailable as exc:
            # Harmless: the trailing record stays `running` and the next mutation replaces it.
            log.warning("trailing refresh bookkeeping failed", extra={"key": claim.key.pk, "error": str(exc)})

    def _release(self, claim: Claim) -> None:
        try:
            released = self.debouncer.release(claim)
        except StoreUnavailable as exc:
            # The claim stays; its window ends on its own and the redelivered records re-mark the key.
            log.error("claim release failed", extra={"key": claim.key.pk, "error": str(exc)})
            return
        if released:
            self.telemetry.count("ClaimsReleased")
