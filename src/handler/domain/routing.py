"""Which cubes (or pre-aggregations) an entity type makes stale."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from handler.domain.model import UPDATED, EntityMutation, is_valid_target
from handler.domain.partitions import GRANULARITIES, DateRange, partitions_for

DEFAULT_ENTITY_CUBE_MAP: dict[str, tuple[str, ...]] = {
    "User": ("Users",),
    "Tenant": ("Tenants",),
    "Group": ("Groups",),
}
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_ROUTE_KEYS = {"target", "partitionBy", "granularity", "fields"}
EVENT_TIMESTAMP = "timestamp"
HINT_PREFIX = "timeHints."


@dataclass(frozen=True, slots=True)
class Route:
    """One target of an entity type, and what narrows its refresh: `partition_by` (the event's own
    `timestamp`, or `timeHints.<field>`) with the target's partition `granularity`, and `fields`,
    the entity fields the target's measures, dimensions and filters read (None: all of them)."""

    target: str
    partition_by: str | None = None
    granularity: str | None = None
    fields: frozenset[str] | None = None

    def skips(self, mutation: EntityMutation) -> bool:
        """An update whose changed fields are all outside `fields` cannot change this target.
        Creates and deletes change counts whatever the fields; without changedFields nothing skips."""
        if self.fields is None or mutation.event_type != UPDATED or mutation.changed_fields is None:
            return False
        return self.fields.isdisjoint(mutation.changed_fields)

    def partitions(self, mutation: EntityMutation, timezones: Sequence[str]) -> set[DateRange] | None:
        """The partitions this mutation can have changed, or None for the whole target (no
        partitioning configured, or the hint is missing or unusable)."""
        if self.partition_by is None or self.granularity is None:
            return None
        if self.partition_by == EVENT_TIMESTAMP:
            instants: tuple[int, ...] | None = (mutation.timestamp,)
        else:
            hint = mutation.time_hints.get(self.partition_by.removeprefix(HINT_PREFIX))
            instants = hint.instants(mutation.event_type) if hint is not None else None
        if not instants:
            return None
        return partitions_for(instants, self.granularity, timezones)


def _route(entity_type: str, entry: Any) -> Route:
    where = f"entity type {entity_type!r}"
    if isinstance(entry, str):
        if not is_valid_target(entry):
            raise ValueError(f"{where} maps to invalid cube name {entry!r}")
        return Route(entry)
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: each target must be a cube name or an object with 'target'")
    unknown = sorted(set(entry) - _ROUTE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (allowed: {sorted(_ROUTE_KEYS)})")
    target = entry.get("target")
    if not isinstance(target, str) or not is_valid_target(target):
        raise ValueError(f"{where}: 'target' must be a cube name or Cube.preAggregation id, got {target!r}")
    where = f"{where}, target {target!r}"
    partition_by, granularity = entry.get("partitionBy"), entry.get("granularity")
    if partition_by is not None:
        if "." not in target:
            raise ValueError(
                f"{where}: partitionBy needs a pre-aggregation id (Cube.preAggregation): a cube's"
                " pre-aggregations may partition on different time dimensions"
            )
        text = partition_by if isinstance(partition_by, str) else ""
        if text != EVENT_TIMESTAMP and not (text.startswith(HINT_PREFIX) and _FIELD.match(text[len(HINT_PREFIX) :])):
            raise ValueError(f"{where}: partitionBy must be 'timestamp' or 'timeHints.<field>', got {partition_by!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"{where}: granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    elif granularity is not None:
        raise ValueError(f"{where}: granularity without partitionBy")
    fields = entry.get("fields")
    if fields is not None and (
        not isinstance(fields, list) or not fields or not all(isinstance(f, str) and _FIELD.match(f) for f in fields)
    ):
        raise ValueError(f"{where}: 'fields' must be a non-empty list of field names")
    return Route(target, partition_by, granularity, frozenset(fields) if fields is not None else None)


class EntityCubeMap:
    """entity type -> routes. A route is a cube name or `Cube.preAggregation` id, or an object
    `{"target", "partitionBy", "granularity", "fields"}` (see the README, Configuration)."""

    def __init__(self, mapping: Mapping[str, Sequence[Any]] | None = None) -> None:
        source = DEFAULT_ENTITY_CUBE_MAP if mapping is None else mapping
        routes: dict[str, tuple[Route, ...]] = {}
        for entity_type, entries in source.items():
            if not entity_type or isinstance(entries, str | Mapping) or not isinstance(entries, Sequence):
                raise ValueError(f"entity type {entity_type!r} must map to a list of cube names")
            by_target: dict[str, Route] = {}
            for entry in entries:
                route = _route(entity_type, entry)
                if by_target.get(route.target, route) != route:
                    raise ValueError(f"entity type {entity_type!r} lists target {route.target!r} twice, differently")
                by_target[route.target] = route
            routes[entity_type] = tuple(by_target.values())
        self._routes = routes

    def routes_for(self, entity_type: str) -> tuple[Route, ...]:
        return self._routes.get(entity_type, ())

    def targets_for(self, entity_type: str) -> tuple[str, ...]:
        return tuple(r.target for r in self.routes_for(entity_type))

    def entity_types(self) -> list[str]:
        return sorted(self._routes)


def build_selectors(targets: Sequence[str], tenant_id: str, timezones: Sequence[str]) -> list[dict[str, object]]:
    """Cube job selectors for one tenant. Cube ANDs the selector's filters, so cube names and
    pre-aggregation ids cannot share one selector: ids whose cube is already targeted whole are
    dropped, the others get a selector of their own."""
    cubes = sorted({t for t in targets if "." not in t})
    preaggs = sorted({t for t in targets if "." in t and t.split(".", 1)[0] not in cubes})
    base: dict[str, object] = {
        "contexts": [{"securityContext": {"tenantId": tenant_id}}],
        "timezones": list(timezones),
    }
    selectors: list[dict[str, object]] = []
    if cubes:
        selectors.append({**base, "cubes": cubes})
    if preaggs:
        selectors.append({**base, "preAggregations": preaggs})
    return selectors
