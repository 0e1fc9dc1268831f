import pytest

from handler.domain.model import RefreshKey
from handler.domain.routing import EntityCubeMap, build_selectors


def test_routing_default_map_is_the_seed_map():
    routes = EntityCubeMap()
    assert routes.targets_for("User") == ("Users",)
    assert routes.targets_for("Tenant") == ("Tenants",)
    assert routes.targets_for("Group") == ("Groups",)
    assert routes.targets_for("Invoice") == ()


def test_routing_entity_type_may_map_to_several_cubes_and_preaggregations():
    routes = EntityCubeMap({"User": ["Users", "Users.dailyStatusCounts", "Groups", "Users"]})
    assert routes.targets_for("User") == ("Users", "Users.dailyStatusCounts", "Groups")


@pytest.mark.parametrize("bad", [{"User": "Users"}, {"User": ["Users; DROP"]}, {"User": ["a.b.c"]}, {"": ["Users"]}])
def test_routing_invalid_map_is_refused(bad):
    with pytest.raises(ValueError, match="entity type"):
        EntityCubeMap(bad)


def test_selectors_always_carry_the_tenant_security_context():
    (selector,) = build_selectors(["Users"], "tenant-1", ["UTC", "Europe/Paris"])
    assert selector.body == {
        "contexts": [{"securityContext": {"tenantId": "tenant-1"}}],
        "timezones": ["UTC", "Europe/Paris"],
        "cubes": ["Users"],
    }


def test_selectors_split_cubes_and_foreign_preaggregations_because_cube_ands_filters():
    selectors = build_selectors(["Users", "Users.daily", "Groups.main"], "t1", ["UTC"])
    assert [s.body.get("cubes") for s in selectors] == [["Users"], None]
    assert [s.body.get("preAggregations") for s in selectors] == [None, ["Groups.main"]]


def test_selectors_name_the_keys_they_cover_and_a_whole_cube_covers_its_preaggregations():
    selectors = build_selectors(["Users", "Users.daily", "Groups.main"], "t1", ["UTC"])
    assert [s.keys for s in selectors] == [
        (RefreshKey("t1", "Users"), RefreshKey("t1", "Users.daily")),
        (RefreshKey("t1", "Groups.main"),),
    ]
