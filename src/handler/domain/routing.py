"""Which cubes (or pre-aggregations) an entity type makes stale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from handler.domain.model import RefreshKey, Selector, is_valid_target

DEFAULT_ENTITY_CUBE_MAP: dict[str, tuple[str, ...]] = {
    "User": ("Users",),
    "Tenant": ("Tenants",),
    "Group": ("Groups",),
}


class EntityCubeMap:
    """entity type -> targets. Targets are cube names or `Cube.preAggregation` ids."""

    def __init__(self, mapping: Mapping[str, Sequence[str]] | None = None) -> None:
        source = DEFAULT_ENTITY_CUBE_MAP if mapping is None else mapping
        routes: dict[str, tuple[str, ...]] = {}
        for entity_type, targets in source.items():
            if not entity_type or isinstance(targets, str):
                raise ValueError(f"entity type {entity_type!r} must map to a list of cube names")
            bad = [t for t in targets if not is_valid_target(t)]
            if bad:
                raise ValueError(f"entity type {entity_type!r} maps to invalid cube names {bad!r}")
            routes[entity_type] = tuple(dict.fromkeys(targets))
        self._routes = routes

    def targets_for(self, entity_type: str) -> tuple[str, ...]:
        return self._routes.get(entity_type, ())

    def entity_types(self) -> list[str]:
        return sorted(self._routes)


def build_selectors(targets: Sequence[str], tenant_id: str, timezones: Sequence[str]) -> list[Selector]:
    """Cube job selectors for one tenant. Cube ANDs the selector's filters, so cube names and
    pre-aggregation ids cannot share one selector: ids whose cube is already targeted whole are
    covered by the cube's selector, the others get a selector of their own."""
    wanted = sorted(set(targets))
    cubes = [t for t in wanted if "." not in t]
    preaggs = [t for t in wanted if "." in t and t.split(".", 1)[0] not in cubes]
    base: dict[str, object] = {
        "contexts": [{"securityContext": {"tenantId": tenant_id}}],
        "timezones": list(timezones),
    }
    selectors: list[Selector] = []
    if cubes:
        covered = [t for t in wanted if t.split(".", 1)[0] in cubes]
        selectors.append(Selector({**base, "cubes": cubes}, tuple(RefreshKey(tenant_id, t) for t in covered)))
    if preaggs:
        selectors.append(
            Selector({**base, "preAggregations": preaggs}, tuple(RefreshKey(tenant_id, t) for t in preaggs))
        )
    return selectors
