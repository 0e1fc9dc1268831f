"""Partition ranges, time hints, field filters and the richer ENTITY_CUBE_MAP form."""

from datetime import UTC, date, datetime

import pytest

from handler.domain.model import EntityMutation, RefreshKey
from handler.domain.partitions import DateRange, cover, merge, partition_of, partitions_for
from handler.domain.routing import EntityCubeMap, Route, build_selectors


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def event(**extra: object) -> EntityMutation:
    base = {
        "eventType": "ENTITY_UPDATED",
        "entityType": "User",
        "entityId": "u-1",
        "tenantId": "tenant-1",
        "timestamp": ms("2026-11-29T12:00:00"),
    }
    return EntityMutation.model_validate({**base, **extra})


MONTHLY = Route("Users.dailyStatusCounts", "timeHints.createdAt", "month", frozenset({"status", "createdAt"}))


@pytest.mark.parametrize(
    ("day", "granularity", "expected"),
    [
        (date(2026, 2, 14), "day", "2026-02-14..2026-02-14"),
        (date(2026, 2, 14), "week", "2026-02-09..2026-02-15"),
        (date(2026, 2, 14), "month", "2026-02-01..2026-02-28"),
        (date(2024, 2, 14), "month", "2024-02-01..2024-02-29"),
        (date(2026, 12, 31), "month", "2026-12-01..2026-12-31"),
        (date(2026, 11, 30), "quarter", "2026-10-01..2026-12-31"),
        (date(2026, 5, 1), "year", "2026-01-01..2026-12-31"),
    ],
)
def test_partition_of_day_matches_cubes_local_calendar_ranges(day, granularity, expected):
    assert partition_of(day, granularity).label == expected


def test_date_range_label_round_trips_and_gives_cubes_local_timestamps():
    r = DateRange.parse("2026-11-01..2026-11-30")
    assert r.label == "2026-11-01..2026-11-30"
    assert r.cube_date_range() == ["2026-11-01T00:00:00.000", "2026-11-30T23:59:59.999"]
    for bad in ["2026-11", "2026-11-30..2026-11-01", "x..y", "2026-11-01...2026-11-30"]:
        with pytest.raises(ValueError):
            DateRange.parse(bad)


def test_partitions_for_an_instant_near_midnight_differ_per_time_zone():
    instant = ms("2026-12-01T02:00:00")  # still November 30 in New York
    assert {r.label for r in partitions_for([instant], "month", ["UTC"])} == {"2026-12-01..2026-12-31"}
    both = partitions_for([instant], "month", ["UTC", "America/New_York"])
    assert {r.label for r in both} == {"2026-11-01..2026-11-30", "2026-12-01..2026-12-31"}


def test_merge_joins_overlapping_and_adjacent_ranges_only():
    nov, dec, feb = (partition_of(date(2026, m, 1), "month") for m in (11, 12, 2))
    assert merge([dec, feb, nov, nov]) == [feb, DateRange(nov.start, dec.end)]
    assert cover([dec, feb]) == DateRange(feb.start, dec.end)


def test_update_hint_with_old_and_new_selects_both_rows_partitions():
    moved = event(timeHints={"createdAt": {"old": "2025-01-20T10:00:00Z", "new": ms("2025-06-02T00:00:00")}})
    assert {r.label for r in MONTHLY.partitions(moved, ["UTC"]) or ()} == {
        "2025-01-01..2025-01-31",
        "2025-06-01..2025-06-30",
    }


@pytest.mark.parametrize(
    ("event_type", "hint", "expected"),
    [
        ("ENTITY_CREATED", {"new": "2025-03-14T09:30:00Z"}, {"2025-03-01..2025-03-31"}),
        ("ENTITY_DELETED", {"old": "2025-03-14T09:30:00Z"}, {"2025-03-01..2025-03-31"}),
        ("ENTITY_UPDATED", {"old": None, "new": "2025-03-14T09:30:00Z"}, {"2025-03-01..2025-03-31"}),
        # An update that names only one side cannot rule out that the row moved: whole target.
        ("ENTITY_UPDATED", {"new": "2025-03-14T09:30:00Z"}, None),
        ("ENTITY_DELETED", {"new": "2025-03-14T09:30:00Z"}, None),
        ("ENTITY_CREATED", {"old": "2025-03-14T09:30:00Z"}, None),
        ("ENTITY_CREATED", {"new": None}, None),  # no time at all: nothing to narrow on
        ("ENTITY_UPDATED", {"old": "yesterday", "new": "2025-03-14"}, None),
        ("ENTITY_UPDATED", "2025-03-14", None),
        ("ENTITY_UPDATED", {"when": "2025-03-14"}, None),
        ("ENTITY_UPDATED", {"old": -5, "new": 0}, None),
        ("ENTITY_UPDATED", {"old": True, "new": True}, None),
    ],
)
def test_time_hint_rules_never_narrow_on_what_they_cannot_know(event_type, hint, expected):
    mutation = event(eventType=event_type, timeHints={"createdAt": hint})
    got = MONTHLY.partitions(mutation, ["UTC"])
    assert (None if got is None else {r.label for r in got}) == expected


def test_missing_or_malformed_hints_never_invalidate_the_record():
    for hints in [None, [], "x", {"createdAt": []}, {"": {"old": 1, "new": 2}}, {f"f{i}": {} for i in range(99)}]:
        mutation = event(timeHints=hints, changedFields="status")
        assert MONTHLY.partitions(mutation, ["UTC"]) is None
        assert mutation.changed_fields is None
    assert MONTHLY.partitions(event(), ["UTC"]) is None


def test_event_timestamp_can_select_partitions():
    route = Route("Audit.byDay", "timestamp", "day")
    assert {r.label for r in route.partitions(event(), ["UTC"]) or ()} == {"2026-11-29..2026-11-29"}


@pytest.mark.parametrize(
    ("event_type", "changed", "skipped"),
    [
        ("ENTITY_UPDATED", ["email"], True),
        ("ENTITY_UPDATED", [], True),
        ("ENTITY_UPDATED", ["email", "status"], False),
        ("ENTITY_UPDATED", None, False),
        ("ENTITY_CREATED", ["email"], False),
        ("ENTITY_DELETED", ["email"], False),
        ("ENTITY_ARCHIVED", ["email"], False),
    ],
)
def test_field_filter_skips_only_updates_that_touch_none_of_the_targets_fields(event_type, changed, skipped):
    extra = {} if changed is None else {"changedFields": changed}
    assert MONTHLY.skips(event(eventType=event_type, **extra)) is skipped
    assert not Route("Users").skips(event(eventType=event_type, **extra)), "no fields configured: depends on all"


def test_richer_map_form_mixes_with_the_plain_form():
    routes = EntityCubeMap(
        {
            "User": [
                "Users.main",
                {
                    "target": "Users.dailyStatusCounts",
                    "partitionBy": "timeHints.createdAt",
                    "granularity": "month",
                    "fields": ["status", "createdAt"],
                },
                {"target": "Groups", "fields": ["groupId"]},
            ],
            "Tenant": ["Tenants"],
        }
    )
    assert routes.targets_for("User") == ("Users.main", "Users.dailyStatusCounts", "Groups")
    assert routes.routes_for("User")[1] == MONTHLY
    assert routes.routes_for("User")[2] == Route("Groups", fields=frozenset({"groupId"}))
    assert routes.routes_for("Tenant") == (Route("Tenants"),)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"target": "Users", "partitionBy": "timeHints.createdAt", "granularity": "month"}, "pre-aggregation id"),
        ({"target": "Users.d", "partitionBy": "createdAt", "granularity": "month"}, "partitionBy must be"),
        ({"target": "Users.d", "partitionBy": "timeHints.a.b", "granularity": "month"}, "partitionBy must be"),
        ({"target": "Users.d", "partitionBy": "timestamp", "granularity": "hour"}, "granularity must be"),
        ({"target": "Users.d", "partitionBy": "timestamp"}, "granularity must be"),
        ({"target": "Users.d", "granularity": "month"}, "granularity without partitionBy"),
        ({"target": "Users.d", "fields": []}, "'fields'"),
        ({"target": "Users.d", "fields": "status"}, "'fields'"),
        ({"target": "Users.d", "field": ["status"]}, "unknown keys"),
        ({"partitionBy": "timestamp"}, "'target'"),
        (42, "cube name or an object"),
    ],
)
def test_richer_map_form_refuses_bad_targets_naming_them(entry, message):
    with pytest.raises(ValueError, match=message):
        EntityCubeMap({"User": [entry]})


def test_same_target_twice_with_different_settings_is_refused():
    with pytest.raises(ValueError, match="twice"):
        EntityCubeMap({"User": ["Users.d", {"target": "Users.d", "fields": ["status"]}]})


def test_refresh_key_with_a_partition_round_trips_through_its_pk():
    key = RefreshKey("tenant-1", "Users.dailyStatusCounts", "2026-11-01..2026-11-30")
    assert key.pk == "tenant-1#Users.dailyStatusCounts#2026-11-01..2026-11-30"
    assert RefreshKey.from_pk(key.pk) == key
    assert RefreshKey.from_pk("tenant-1#Users") == RefreshKey("tenant-1", "Users")
    assert key.whole == key.whole.whole == RefreshKey("tenant-1", "Users.dailyStatusCounts")
    assert key.whole.pk == "tenant-1#Users.dailyStatusCounts"


# ------------------------------------------------------------------ selectors for partition keys

DAILY = "Users.dailyStatusCounts"


def pkey(target: str, *months: str, tenant: str = "t1") -> list[RefreshKey]:
    """Partition keys of whole months, e.g. pkey(DAILY, "2025-03")."""
    out = []
    for month in months:
        year, mon = (int(x) for x in month.split("-"))
        out.append(RefreshKey(tenant, target, partition_of(date(year, mon, 1), "month").label))
    return out


def test_selectors_one_per_distinct_range_with_adjacent_months_merged():
    keys = pkey(DAILY, "2025-03", "2025-04", "2025-09") + pkey("Groups.byMonth", "2025-09")
    selectors = build_selectors(keys, "t1", ["UTC", "Europe/Paris"])
    assert [(s.body["preAggregations"], s.body["dateRange"]) for s in selectors] == [
        ([DAILY], ["2025-03-01T00:00:00.000", "2025-04-30T23:59:59.999"]),
        (["Groups.byMonth", DAILY], ["2025-09-01T00:00:00.000", "2025-09-30T23:59:59.999"]),
    ]
    assert all(s.body["timezones"] == ["UTC", "Europe/Paris"] for s in selectors)
    assert all(s.body["contexts"] == [{"securityContext": {"tenantId": "t1"}}] for s in selectors)
    assert sorted(k for s in selectors for k in s.keys) == sorted(keys), "each key covered exactly once"


def test_selectors_a_whole_key_covers_the_partition_keys_of_its_target_and_cube():
    keys = [RefreshKey("t1", DAILY), *pkey(DAILY, "2025-03"), *pkey("Groups.byMonth", "2025-01")]
    keys += [RefreshKey("t1", "Groups"), RefreshKey("t1", "Users.main")]
    selectors = build_selectors(keys, "t1", ["UTC"])
    assert [s.body.get("cubes") or s.body.get("preAggregations") for s in selectors] == [
        ["Groups"],
        ["Users.dailyStatusCounts", "Users.main"],
    ]
    assert all("dateRange" not in s.body for s in selectors)
    assert selectors[0].keys == (RefreshKey("t1", "Groups"), *pkey("Groups.byMonth", "2025-01"))
    assert sorted(k for s in selectors for k in s.keys) == sorted(keys)


def test_selectors_past_the_cap_become_one_covering_range_then_the_whole_target():
    months = [f"2025-{m:02d}" for m in (1, 3, 5, 7, 9, 11)]
    keys = pkey(DAILY, *months) + pkey("Groups.byMonth", "2025-01", "2025-03")
    capped = build_selectors(keys, "t1", ["UTC"], max_selectors=2)
    assert [(s.body["preAggregations"], s.body["dateRange"]) for s in capped] == [
        (["Groups.byMonth"], ["2025-01-01T00:00:00.000", "2025-03-31T23:59:59.999"]),
        ([DAILY], ["2025-01-01T00:00:00.000", "2025-11-30T23:59:59.999"]),
    ]
    (whole,) = build_selectors(keys, "t1", ["UTC"], max_selectors=1)
    assert whole.body["preAggregations"] == ["Groups.byMonth", DAILY] and "dateRange" not in whole.body
    assert sorted(whole.keys) == sorted(keys)
    exact = build_selectors(keys, "t1", ["UTC"], max_selectors=6)  # Groups shares January's and March's
    assert [len(s.keys) for s in exact] == [2, 2, 1, 1, 1, 1]


def test_selectors_treat_an_unreadable_partition_or_a_partitioned_cube_name_as_whole():
    keys = [RefreshKey("t1", DAILY, "2025-03"), RefreshKey("t1", "Groups", "2025-03-01..2025-03-31")]
    selectors = build_selectors(keys, "t1", ["UTC"])
    assert [s.body.get("cubes") or s.body.get("preAggregations") for s in selectors] == [["Groups"], [DAILY]]
    assert all("dateRange" not in s.body for s in selectors)


def test_settings_refuse_a_bad_richer_map_or_an_unknown_zone_naming_the_variable(monkeypatch):
    from handler.settings import ConfigurationError, load_settings  # noqa: PLC0415

    base = {
        "CUBE_API_URL": "https://cube.example.com/cubejs-api",
        "CUBE_API_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:1:secret:x",
        "DEBOUNCE_TABLE_NAME": "t",
        "REFRESH_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/q",
    }
    for name, value in base.items():
        monkeypatch.setenv(name, value)
    bad_map = '{"User": [{"target": "Users", "partitionBy": "timeHints.createdAt", "granularity": "month"}]}'
    with pytest.raises(ConfigurationError, match=r"ENTITY_CUBE_MAP.*'Users'.*pre-aggregation id"):
        load_settings(ENTITY_CUBE_MAP=bad_map)
    with pytest.raises(ConfigurationError, match=r"CUBE_TIMEZONES.*Mars/Olympus"):
        load_settings(CUBE_TIMEZONES="UTC,Mars/Olympus")
    good = load_settings(ENTITY_CUBE_MAP=bad_map.replace('"Users"', '"Users.daily"'), CUBE_PREAGG_MAX_SELECTORS="4")
    assert good.entity_cube_map.routes_for("User")[0].partition_by == "timeHints.createdAt"
    assert good.max_selectors == 4
