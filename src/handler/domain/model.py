"""Value types of the domain: mutations, record references, refresh keys."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeGuard

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# Tenant ids end up in JWT claims, Cube security contexts and schema names: keep them boring.
TENANT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
# A cube name (`Users`) or a pre-aggregation id (`Users.dailyStatusCounts`).
TARGET_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,127}(\.[A-Za-z_][A-Za-z0-9_]{0,127})?"
# The one check of both, used by every path (MSK, SQS, operations, the entity map). `fullmatch`:
# the whole string must match (a `$` would also match before a trailing newline).
_TENANT_RE = re.compile(TENANT_ID_PATTERN)
_TARGET_RE = re.compile(TARGET_PATTERN)


def is_valid_tenant(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _TENANT_RE.fullmatch(value) is not None


def is_valid_target(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _TARGET_RE.fullmatch(value) is not None


def _tenant_id(value: str) -> str:
    if not is_valid_tenant(value):
        raise ValueError("must be 1-64 characters: letters, digits, '_' or '-', starting with a letter or digit")
    return value


def _target(value: str) -> str:
    if not is_valid_target(value):
        raise ValueError("must be a cube name or a Cube.preAggregation id (letters, digits, '_')")
    return value


TenantId = Annotated[str, AfterValidator(_tenant_id)]
TargetName = Annotated[str, AfterValidator(_target)]


def _epoch_ms(value: Any) -> Any:
    """Accept epoch milliseconds (int) or an ISO-8601 string; leave the rest to pydantic to reject."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be epoch milliseconds or ISO-8601, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError("timestamp must be epoch milliseconds or ISO-8601") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1000)
    return value


NonEmpty = Annotated[str, Field(min_length=1, max_length=256)]


class EntityMutation(BaseModel):
    """One entity-mutation event as services publish it. Unknown fields are tolerated."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, strict=False)

    event_type: NonEmpty = Field(alias="eventType")
    entity_type: NonEmpty = Field(alias="entityType")
    entity_id: NonEmpty = Field(alias="entityId")
    tenant_id: Annotated[TenantId, Field(alias="tenantId")]
    timestamp: Annotated[int, BeforeValidator(_epoch_ms), Field(ge=0, strict=True)]


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where a record sits in its source: a Kafka `<topic>-<partition>` and offset, or an SQS message id."""

    partition: str
    offset: int

    def as_failure(self) -> dict[str, Any]:
        return {"itemIdentifier": {"partition": self.partition, "offset": self.offset}}


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """A record that could not become a mutation. `reason` is a stable code, `detail` is safe to log."""

    ref: RecordRef
    reason: str
    detail: str


@dataclass(frozen=True, slots=True, order=True)
class RefreshKey:
    """The unit of debouncing: one tenant and one cube or pre-aggregation id."""

    tenant_id: str
    target: str

    @property
    def pk(self) -> str:
        return f"{self.tenant_id}#{self.target}"

    @property
    def cube(self) -> str:
        return self.target.split(".", 1)[0]

    @classmethod
    def from_pk(cls, pk: str) -> RefreshKey:
        tenant, _, target = pk.partition("#")
        return cls(tenant, target)


@dataclass(frozen=True, slots=True)
class Selector:
    """One Cube job selector (`body`, the JSON Cube receives) and the refresh keys it covers. A key
    counts as refreshed only when every selector covering it was accepted by Cube."""

    body: dict[str, object]
    keys: tuple[RefreshKey, ...]
