"""Direct-invoke operations (also used by the operator CLI): refresh now, debounce stats, clear."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handler.domain.errors import CubeError
from handler.domain.model import RefreshKey, TargetName, TenantId
from handler.domain.ports import KeyState
from handler.domain.service import RefreshService
from handler.domain.verify import MAX_RETRIGGERS
from handler.settings import Settings


class OperationError(ValueError):
    """The operation request is invalid; the message says what to fix."""


class OperationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    operation: Literal["refresh", "stats", "clear", "jobs"]
    tenant_id: Annotated[TenantId | None, Field(alias="tenantId")] = None
    entity_type: Annotated[str | None, Field(alias="entityType", min_length=1, max_length=256)] = None
    cubes: list[TargetName] | None = None
    force: bool = False


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def describe(key: RefreshKey, state: KeyState, window_ms: int) -> dict[str, Any]:
    window_ends = state.window_end(window_ms) if state.started_at is not None else None
    return {
        "tenantId": key.tenant_id,
        "target": key.target,
        **({"partition": key.partition} if key.partition else {}),
        "lastRefreshStartedAt": _iso(state.started_at),
        "windowEndsAt": _iso(window_ends),
        "lastDebouncedMutationAt": _iso(state.dirty_at),
        "trailingRefresh": (
            {
                "state": state.trailing_state,
                "dueAt": _iso(state.trailing_due_at),
                "pendingSince": _iso(state.pending_since),
            }
            if state.trailing_token
            else None
        ),
        "expiresAt": _iso(state.expires_at * 1000) if state.expires_at is not None else None,
        # Load-aware refresh (docs/load-aware.md): the key's effective window, its build in Cube (no
        # other refresh of it is posted until then), its wait for build budget.
        "effectiveWindowMs": state.window_ms if state.window_ms is not None else window_ms,
        "buildInCubeUntil": _iso(state.inflight_until),
        "waitingForBudgetSince": _iso(state.waiting_since),
        "lastBuild": (
            {
                "status": state.build_status,
                "refreshStartedAt": _iso(state.build_started_at),
                "seenAt": _iso(state.build_seen_at),
                "freshnessLagMs": state.freshness_lag_ms,
                "failureClass": state.build_failure_class,
                "error": state.build_error,
                "failures": state.build_failures,
                "maxRetriggers": MAX_RETRIGGERS,
                "retriggerDueAt": _iso(state.retrigger_due_at),
            }
            if state.build_status
            else None
        ),
    }


def run_operation(
    event: Mapping[str, Any], service: RefreshService, settings: Settings, *, deadline_ms: int
) -> dict[str, Any]:
    try:
        request = OperationRequest.model_validate(event)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise OperationError(f"invalid operation request: {problems}") from None
    store = service.debouncer.store

    if request.operation == "stats":
        rows = store.scan(request.tenant_id)
        if request.cubes:
            rows = [(k, s) for k, s in rows if k.target in request.cubes or k.cube in request.cubes]
        return {
            "ok": True,
            "operation": "stats",
            "windowMs": settings.debounce_ms,
            "keys": [describe(k, s, settings.debounce_ms) for k, s in rows],
        }

    if request.tenant_id is None:
        raise OperationError(f"'{request.operation}' needs tenantId")
    if request.operation == "jobs":
        return _jobs(request.tenant_id, request.cubes, service, deadline_ms)
    targets = _targets(request, service)

    if request.operation == "clear":
        rows = store.scan(request.tenant_id)
        doomed = [
            k
            for k, _ in rows
            if (request.cubes is None and request.entity_type is None) or k.target in targets or k.cube in targets
        ]
        for key in doomed:
            store.delete(key)
        return {"ok": True, "operation": "clear", "cleared": [k.pk.split("#", 1)[1] for k in doomed]}

    unmapped = [t for t in targets if not service.routes.covers(t)]
    if unmapped:  # its trailing, verify and retrigger messages would be refused as not this function's
        known = ", ".join(service.routes.cubes())
        raise OperationError(f"not a cube of ENTITY_CUBE_MAP: {', '.join(unmapped)} (its cubes: {known})")
    outcome = service.refresh_now(request.tenant_id, targets, force=request.force, deadline_ms=deadline_ms)
    keys = [
        {"target": k.key.target, "status": k.status, "detail": k.detail, "jobs": list(k.job_tokens)}
        for k in outcome.keys
    ]
    return {
        "ok": all(k["status"] != "failed" for k in keys),
        "operation": "refresh",
        "tenantId": request.tenant_id,
        "force": request.force,
        "keys": keys,
    }


def _jobs(tenant_id: str, cubes: list[str] | None, service: RefreshService, deadline_ms: int) -> dict[str, Any]:
    """The live state Cube reports for the jobs of each key's newest accepted refresh."""
    if service.verifier is None:
        raise OperationError("build verification is not configured in this function")
    rows = [
        (k, s)
        for k, s in service.debouncer.store.scan(tenant_id)
        if s.job_tokens and (not cubes or k.target in cubes or k.cube in cubes)
    ]
    tokens = sorted({t for _, s in rows for t in s.job_tokens or ()})
    try:
        jobs = service.verifier.cube.job_statuses(tenant_id, tokens, deadline_ms=deadline_ms) if tokens else {}
    except CubeError as exc:
        return {"ok": False, "operation": "jobs", "tenantId": tenant_id, "error": f"{exc.error_class}: {exc}"}
    keys = []
    for key, state in rows:
        listed = []
        for token in state.job_tokens or ():
            job = jobs.get(token)
            foreign = job is not None and job.tenant_ids != (tenant_id,)
            listed.append(
                {
                    "token": token,
                    "status": "(another tenant's job)" if foreign else (job.status if job else "not_found"),
                    "table": "" if foreign or job is None else job.table,
                }
            )
        keys.append(
            {
                "target": key.target,
                **({"partition": key.partition} if key.partition else {}),
                "refreshStartedAt": _iso(state.jobs_started_at),
                "jobs": listed,
            }
        )
    return {"ok": True, "operation": "jobs", "tenantId": tenant_id, "keys": keys}


def _targets(request: OperationRequest, service: RefreshService) -> list[str]:
    if request.cubes:
        return list(request.cubes)
    if request.entity_type:
        targets = service.routes.targets_for(request.entity_type)
        if not targets:
            known = ", ".join(service.routes.entity_types())
            raise OperationError(f"entity type {request.entity_type!r} maps to no cube (known: {known})")
        return list(targets)
    if request.operation == "clear":
        return []
    raise OperationError("say what to refresh: cubes=[...] or entityType=...")
