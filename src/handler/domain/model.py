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


_MAX_EPOCH_DIGITS = 19  # an int64


def _epoch_ms(value: Any) -> Any:
    """Accept epoch milliseconds (int) or an ISO-8601 string; leave the rest to pydantic to reject."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be epoch milliseconds or ISO-8601, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():  # ASCII: str.isdigit() is also true of "²³¹"
            if len(text) > _MAX_EPOCH_DIGITS:
                raise ValueError("timestamp must be epoch milliseconds or ISO-8601")
            return int(text)
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:  # its message quotes the value: never passed on
            raise ValueError("timestamp must be epoch milliseconds or ISO-8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1000)
    return value


NonEmpty = Annotated[str, Field(min_length=1, max_length=256)]


# Event types whose rows are added to or removed from every aggregate: never filtered by field.
CREATED, DELETED, UPDATED = "ENTITY_CREATED", "ENTITY_DELETED", "ENTITY_UPDATED"
# `timeHints` and `changedFields` are advice for precision: however malformed, they never make a
# record invalid (that would lose its refresh); unusable advice means "refresh the whole target".
MAX_HINTS = 32
MAX_CHANGED_FIELDS = 256


@dataclass(frozen=True, slots=True)
class TimeHint:
    """A time field of the mutated row: its value before (`old`) and after (`new`) the mutation,
    epoch milliseconds. `None` is a known absent value (JSON null); a key the event left out is
    unknown (`has_old` / `has_new` false)."""

    old: int | None = None
    new: int | None = None
    has_old: bool = False
    has_new: bool = False

    def instants(self, event_type: str) -> tuple[int, ...] | None:
        """The row's time values this mutation can have moved counts at, or None when the hint
        cannot say (then the whole target is refreshed). A create needs `new`, a delete `old`,
        anything else both (an update can move the row from one partition to another)."""
        if event_type == CREATED:
            known = self.has_new
        elif event_type == DELETED:
            known = self.has_old
        else:
            known = self.has_old and self.has_new
        values = tuple(sorted({v for v in (self.old, self.new) if v is not None}))
        return values if known and values else None


def _hint_value(value: Any) -> int | None:
    if value is None:
        return None
    converted = _epoch_ms(value)
    if not isinstance(converted, int) or isinstance(converted, bool) or converted < 0:
        raise ValueError("not a timestamp")
    return converted


def _time_hints(value: Any) -> dict[str, TimeHint | None]:
    """`{"createdAt": {"old": ..., "new": ...}}` -> hints; an entry that cannot be read becomes None."""
    if not isinstance(value, dict):
        return {}
    hints: dict[str, TimeHint | None] = {}
    for name, raw in list(value.items())[:MAX_HINTS]:
        if not isinstance(raw, dict) or not ({"old", "new"} & raw.keys()):
            hints[str(name)] = None
            continue
        try:
            hints[str(name)] = TimeHint(
                _hint_value(raw.get("old")), _hint_value(raw.get("new")), "old" in raw, "new" in raw
            )
        except ValueError:
            hints[str(name)] = None
    return hints


def _changed_fields(value: Any) -> tuple[str, ...] | None:
    """A list of field names, or None (unknown: every target refreshes)."""
    if not isinstance(value, list) or len(value) > MAX_CHANGED_FIELDS:
        return None
    if not all(isinstance(item, str) for item in value):
        return None
    return tuple(sorted(set(value)))


class EntityMutation(BaseModel):
    """One entity-mutation event as services publish it. Unknown fields are tolerated.
    The schema is docs/entity-mutation.schema.json."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, strict=False)

    event_type: NonEmpty = Field(alias="eventType")
    entity_type: NonEmpty = Field(alias="entityType")
    entity_id: NonEmpty = Field(alias="entityId")
    tenant_id: Annotated[TenantId, Field(alias="tenantId")]
    timestamp: Annotated[int, BeforeValidator(_epoch_ms), Field(ge=0, strict=True)]
    changed_fields: Annotated[tuple[str, ...] | None, BeforeValidator(_changed_fields)] = Field(
        None, alias="changedFields"
    )
    time_hints: Annotated[dict[str, TimeHint | None], BeforeValidator(_time_hints)] = Field(
        default_factory=dict, alias="timeHints"
    )


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
    """The unit of debouncing: one tenant, one cube or pre-aggregation id, and optionally one
    partition of it (`partition`: a `DateRange` label such as `2026-11-01..2026-11-30`; empty means
    the whole target). Each key runs the debounce protocol on its own, so a partition key is exactly
    as safe as a whole-target key (docs/guarantee.md)."""

    tenant_id: str
    target: str
    partition: str = ""

    @property
    def pk(self) -> str:
        whole = f"{self.tenant_id}#{self.target}"
        return f"{whole}#{self.partition}" if self.partition else whole

    @property
    def cube(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def whole(self) -> RefreshKey:
        return RefreshKey(self.tenant_id, self.target)

    @classmethod
    def from_pk(cls, pk: str) -> RefreshKey:
        tenant, _, rest = pk.partition("#")
        target, _, partition = rest.partition("#")
        return cls(tenant, target, partition)


@dataclass(frozen=True, slots=True)
class Selector:
    """One Cube job selector (`body`, the JSON Cube receives) and the refresh keys it covers. A key
    counts as refreshed only when every selector covering it was accepted by Cube."""

    body: dict[str, object]
    keys: tuple[RefreshKey, ...]
