"""Direct-invoke operations (also used by the operator CLI): refresh now, debounce stats, clear."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handler.domain.model import RefreshKey, TargetName, TenantId
from handler.domain.ports import KeyState
from handler.domain.service import RefreshService
from handler.settings import Settings


class OperationError(ValueError):
    """The operation request is invalid; the message says what to fix."""


class OperationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    operation: Literal["refresh", "stats", "clear"]
    tenant_id: Annotated[TenantId | None, Field(alias="tenantId")] = None
    entity_type: Annotated[str | None, Field(alias="entityType", min_length=1)] = None
    cubes: list[TargetName] | None = None
    force: bool = False


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def describe(key: RefreshKey, state: KeyState, window_ms: int) -> dict[str, Any]:
    window_ends = state.started_at + window_ms if state.started_at is not None else None
    return {
        "tenantId": key.tenant_id,
        "target": key.target,
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
        return {"ok": True, "operation": "clear", "cleared": [k.target for k in doomed]}

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
