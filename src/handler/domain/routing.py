"""Which cubes (or pre-aggregations) an entity type makes stale."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from handler.domain.model import UPDATED, EntityMutation, RefreshKey, Selector, is_valid_target
from handler.domain.partitions import GRANULARITIES, DateRange, cover, merge, partitions_for

DEFAULT_ENTITY_CUBE_MAP: dict[str, tuple[str, ...]] = {
    "User": ("Users",),
    "Tenant": ("Tenants",),
    "Group": ("Groups",),
}
# `fullmatch`: a `$` would also match before a trailing newline.
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
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
        try:
            return partitions_for(instants, self.granularity, timezones)
        except ValueError:  # outside the calendar: an unusable hint, like a malformed one
            return None


def _route(entity_type: str, entry: Any) -> Route:
    where = f"entity type {entity_type!r}"
    if isinstance(entry, str):
        if not is_valid_target(entry):
            raise ValueError(f"{where} maps to invalid cube names {[entry]!r}")
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
        if text != EVENT_TIMESTAMP and not (
            text.startswith(HINT_PREFIX) and _FIELD.fullmatch(text[len(HINT_PREFIX) :])
        ):
            raise ValueError(f"{where}: partitionBy must be 'timestamp' or 'timeHints.<field>', got {partition_by!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"{where}: granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    elif granularity is not None:
        raise ValueError(f"{where}: granularity without partitionBy")
    fields = entry.get("fields")
    if fields is not None and (
        not isinstance(fields, list)
        or not fields
        or not all(isinstance(f, str) and _FIELD.fullmatch(f) for f in fields)
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
        self._cubes = frozenset(r.target.split(".", 1)[0] for rs in routes.values() for r in rs)

    def covers(self, target: str) -> bool:
        """Whether refreshing `target` (a cube name or a pre-aggregation id) is this function's
        business: its cube is the cube of a mapped target. Queue messages and operations naming any
        other target are refused (a forged message must not make Cube build it)."""
        return target.split(".", 1)[0] in self._cubes

    def cubes(self) -> list[str]:
        return sorted(self._cubes)

    def routes_for(self, entity_type: str) -> tuple[Route, ...]:
        return self._routes.get(entity_type, ())

    def targets_for(self, entity_type: str) -> tuple[str, ...]:
        return tuple(r.target for r in self.routes_for(entity_type))

    def entity_types(self) -> list[str]:
        return sorted(self._routes)


DEFAULT_MAX_SELECTORS = 10


def _range_of(key: RefreshKey) -> DateRange | None:
    """The key's partition, or None for the whole target (also for a label that does not parse, and
    for a cube name: only pre-aggregation ids are partitioned)."""
    if not key.partition or "." not in key.target:
        return None
    try:
        return DateRange.parse(key.partition)
    except ValueError:
        return None


def _ranged_selectors(
    ranged: Mapping[str, list[tuple[DateRange, RefreshKey]]], base: Mapping[str, object], *, covering: bool
) -> list[Selector]:
    """One selector per distinct range, shared by the targets that need exactly that range. Per target,
    overlapping and adjacent ranges are merged (`covering`: into one range from first to last), so no
    partition is asked for twice in one request."""
    by_range: dict[DateRange, tuple[list[str], list[RefreshKey]]] = {}
    for target in sorted(ranged):
        items = ranged[target]
        merged = [cover(r for r, _ in items)] if covering else merge(r for r, _ in items)
        for span in merged:
            targets, keys = by_range.setdefault(span, ([], []))
            targets.append(target)
            keys.extend(k for r, k in items if span.start <= r.start and r.end <= span.end)
    return [
        Selector({**base, "preAggregations": targets, "dateRange": span.cube_date_range()}, tuple(sorted(keys)))
        for span, (targets, keys) in sorted(by_range.items())
    ]


def build_selectors(
    targets: Sequence[str | RefreshKey],
    tenant_id: str,
    timezones: Sequence[str],
    *,
    max_selectors: int = DEFAULT_MAX_SELECTORS,
) -> list[Selector]:
    """Cube job selectors for one tenant's claimed keys (a bare target name means its whole-target
    key). Cube ANDs a selector's filters and takes one `dateRange` per selector, so:
    - cube names share one selector, which also covers every key of those cubes' pre-aggregations;
    - pre-aggregation ids refreshed whole share another, which also covers their partition keys;
    - partition keys get one selector per distinct (merged) range, in local time for every zone.
    Past `max_selectors`, each target's ranges become one covering range, then the whole target,
    then (when cube names and pre-aggregation ids together still need two selectors and one is
    allowed) the pre-aggregation ids become their cubes: one selector rebuilding more, never less.
    Every key is covered by exactly one selector."""
    keys = sorted({t if isinstance(t, RefreshKey) else RefreshKey(tenant_id, t) for t in targets})
    base: dict[str, object] = {
        "contexts": [{"securityContext": {"tenantId": tenant_id}}],
        "timezones": list(timezones),
    }
    cubes = sorted({k.target for k in keys if "." not in k.target})
    cube_keys = [k for k in keys if k.cube in cubes]
    rest = [k for k in keys if k.cube not in cubes]
    whole = {k.target for k in rest if _range_of(k) is None}
    ranged: dict[str, list[tuple[DateRange, RefreshKey]]] = {}
    for key in rest:
        span = _range_of(key)
        if span is not None and key.target not in whole:
            ranged.setdefault(key.target, []).append((span, key))

    fixed = int(bool(cubes)) + int(bool(whole))
    partial = _ranged_selectors(ranged, base, covering=False)
    if fixed + len(partial) > max_selectors:
        partial = _ranged_selectors(ranged, base, covering=True)
    if fixed + len(partial) > max_selectors:
        whole |= set(ranged)
        partial = []
    if int(bool(cubes)) + int(bool(whole)) > max_selectors:
        cubes = sorted(set(cubes) | {t.split(".", 1)[0] for t in whole})
        cube_keys, rest, whole = keys, [], set()

    selectors: list[Selector] = []
    if cubes:
        selectors.append(Selector({**base, "cubes": cubes}, tuple(cube_keys)))
    if whole:
        covered = tuple(k for k in rest if k.target in whole)
        selectors.append(Selector({**base, "preAggregations": sorted(whole)}, covered))
    return selectors + partial
