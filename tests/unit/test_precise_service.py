"""The service with partition-precise and field-level routes (in-memory fakes, fake clock)."""

import json

import pytest

from handler import app
from handler.domain.decode import decode_msk_event, decode_queue_message, decode_trailing_message, trailing_body
from handler.domain.model import RecordRef, RefreshKey
from handler.domain.routing import EntityCubeMap
from handler.domain.verify import BuildTarget, RetriggerMessage, RetriggerTarget, VerifyMessage
from tests.builders import Rig, load_event, msk_event, mutation

DAILY = "Users.dailyStatusCounts"
MAP = {
    "User": [
        {"target": "Users.main", "fields": ["status"]},
        {
            "target": DAILY,
            "partitionBy": "timeHints.createdAt",
            "granularity": "month",
            "fields": ["status", "createdAt"],
        },
    ]
}
MARCH = "2025-03-01..2025-03-31"


def rig(**kw: object) -> Rig:
    return Rig(routes=EntityCubeMap(MAP), **kw)  # type: ignore[arg-type]


def hinted(old: str, new: str, **extra: object) -> dict[str, object]:
    return mutation(timeHints={"createdAt": {"old": old, "new": new}}, **extra)


def run(r: Rig, *values: dict[str, object]):
    refs = [
        (RecordRef("t-0", i), m)
        for i, (_, m) in enumerate(decode_msk_event(msk_event(*values), now_ms=r.clock.now).mutations)
    ]
    return r.service.process_mutations(refs, deadline_ms=r.deadline)


def test_hinted_update_refreshes_only_its_months_partition_per_time_zone():
    r = rig(timezones=("UTC", "America/New_York"))
    out = run(r, hinted("2025-03-14T09:30:00Z", "2025-03-14T09:30:00Z", changedFields=["status"]))
    assert sorted(k.key.pk for k in out.by_status("refreshed")) == [
        "tenant-1#Users.dailyStatusCounts#" + MARCH,
        "tenant-1#Users.main",
    ]
    [(tenant, selectors)] = r.cube.requests
    assert tenant == "tenant-1"
    assert [(s.get("preAggregations"), s.get("dateRange"), s["timezones"]) for s in selectors] == [
        (["Users.main"], None, ["UTC", "America/New_York"]),
        ([DAILY], ["2025-03-01T00:00:00.000", "2025-03-31T23:59:59.999"], ["UTC", "America/New_York"]),
    ]


def test_row_moved_between_months_refreshes_both_partitions_as_separate_keys():
    r = rig()
    out = run(r, hinted("2025-01-20T10:00:00Z", "2025-06-02T08:00:00Z", changedFields=["createdAt"]))
    assert sorted(k.key.partition for k in out.by_status("refreshed") if k.key.target == DAILY) == [
        "2025-01-01..2025-01-31",
        "2025-06-01..2025-06-30",
    ]
    assert "Users.main" not in {k.key.target for k in out.keys}, "main does not read createdAt"
    [(_, selectors)] = r.cube.requests
    assert [s["dateRange"] for s in selectors] == [
        ["2025-01-01T00:00:00.000", "2025-01-31T23:59:59.999"],
        ["2025-06-01T00:00:00.000", "2025-06-30T23:59:59.999"],
    ]


def test_update_of_fields_no_target_reads_posts_nothing_and_is_counted():
    r = rig()
    out = run(r, hinted("2025-03-14", "2025-03-14", changedFields=["email"]))
    assert out.keys == [] and out.failed == set()
    assert r.cube.requests == []
    assert r.telemetry.counts["SkippedByFields"] == 2


def test_mutation_without_hints_refreshes_the_whole_target_and_says_so():
    r = rig()
    out = run(r, mutation(eventType="ENTITY_DELETED"))
    assert sorted(k.key.pk for k in out.by_status("refreshed")) == [
        "tenant-1#Users.dailyStatusCounts",
        "tenant-1#Users.main",
    ]
    [(_, selectors)] = r.cube.requests
    assert [s["preAggregations"] for s in selectors] == [["Users.dailyStatusCounts", "Users.main"]]
    assert all("dateRange" not in s for s in selectors)
    assert r.telemetry.counts["WholeTargetFallbacks"] == 1


def test_a_whole_key_in_the_batch_takes_in_the_partition_keys_of_its_target():
    r = rig()
    out = run(r, hinted("2025-03-14", "2025-03-14", entity_id="a"), mutation(entity_id="b"))
    assert sorted(k.key.pk for k in out.keys) == ["tenant-1#Users.dailyStatusCounts", "tenant-1#Users.main"]
    assert len(r.store.items) == 2


def test_many_months_in_one_batch_are_coalesced_into_merged_ranges_and_capped():
    r = rig()
    r.service.max_selectors = 3
    run(r, *(hinted(m, m, entity_id=m) for m in ["2025-01-10", "2025-05-10", "2025-11-10"]))
    [(_, selectors)] = r.cube.requests
    # main (whole) + January, May, November would be 4 > 3: one covering range instead
    assert [s.get("dateRange") for s in selectors] == [None, ["2025-01-01T00:00:00.000", "2025-11-30T23:59:59.999"]]
    assert len([k for k in r.store.items if k.partition]) == 3, "the keys stay per partition"


def test_more_partitions_of_one_target_than_selectors_in_one_batch_become_the_whole_target_key():
    r = rig()
    r.service.max_selectors = 3
    months = ["2025-01-10", "2025-02-10", "2025-05-10", "2025-08-10"]
    out = run(r, *(hinted(m, m, entity_id=m) for m in months), hinted("2025-03-01", "2025-03-01", tenant="tenant-2"))
    assert sorted(k.key.pk for k in out.keys if k.key.target == DAILY) == [
        f"tenant-1#{DAILY}",
        f"tenant-2#{DAILY}#{MARCH}",
    ]
    assert not [k for k in r.store.items if k.partition and k.tenant_id == "tenant-1"]


def test_two_months_of_one_target_inside_one_window_each_get_their_trailing_refresh():
    r = rig()
    run(r, hinted("2025-03-14", "2025-03-14"), hinted("2025-09-01", "2025-09-01", entity_id="u2"))
    r.clock.advance(1_000)
    out = run(r, hinted("2025-03-20", "2025-03-20", entity_id="u3"), hinted("2025-09-02", "2025-09-02", entity_id="u4"))
    debounced = sorted(k.key.partition for k in out.by_status("debounced") if k.key.target == DAILY)
    assert debounced == [MARCH, "2025-09-01..2025-09-30"]
    messages = [m for m in r.scheduler.messages if m.target == DAILY]
    assert sorted(m.partition for m in messages) == [MARCH, "2025-09-01..2025-09-30"]
    for message in messages:  # the SQS body round-trips the partition
        assert decode_trailing_message(json.dumps(trailing_body(message))) == message
    r.clock.advance(30_000)
    requests = len(r.cube.requests)
    fired = r.service.process_trailing(
        [(RecordRef("sqs", i), m) for i, m in enumerate(r.scheduler.due(r.clock.now))], deadline_ms=r.deadline
    )
    assert sorted(k.key.pk for k in fired.by_status("refreshed") if k.key.target == DAILY) == [
        f"tenant-1#{DAILY}#{MARCH}",
        f"tenant-1#{DAILY}#2025-09-01..2025-09-30",
    ]
    assert len(r.cube.requests) == requests + 1, "coalesced into one request for the tenant"


def test_precise_sample_event_through_the_handler_with_the_richer_map():
    r = rig()
    response = app.handle(load_event("precise-refresh.json"), None, service=r.service)
    assert response == {"batchItemFailures": []}
    keys = sorted(k.pk for k in r.store.items)
    assert keys == [
        "tenant-1#Users.dailyStatusCounts",  # the delete without hints: whole target
        "tenant-1#Users.main",
        "tenant-h#Users.dailyStatusCounts#2025-01-01..2025-01-31",  # moved out of January
        f"tenant-h#Users.dailyStatusCounts#{MARCH}",  # status update dated March 2025
        "tenant-h#Users.dailyStatusCounts#2025-06-01..2025-06-30",  # moved into June
        "tenant-h#Users.dailyStatusCounts#2026-11-01..2026-11-30",  # the create
        "tenant-h#Users.main",
    ]
    assert r.telemetry.counts["SkippedByFields"] == 3  # email update: both; moved row: main
    assert RefreshKey("tenant-h", DAILY, "2024-12-01..2024-12-31") not in r.store.items


def test_verify_and_retrigger_messages_keep_the_partition_of_their_keys():
    key = RefreshKey("tenant-1", DAILY, MARCH)
    verify = VerifyMessage("tenant-1", 9, (BuildTarget(key, ("tok",), 1, 0), BuildTarget(key.whole, ("t2",), 1, 0)))
    assert decode_queue_message(json.dumps(verify.as_body())) == verify
    retrigger = RetriggerMessage("tenant-1", (RetriggerTarget(DAILY, 5, MARCH), RetriggerTarget(DAILY, 6)), 1)
    decoded = decode_queue_message(json.dumps(retrigger.as_body()))
    assert decoded == retrigger and isinstance(decoded, RetriggerMessage)
    assert decoded.refresh_keys() == [(key, 5), (key.whole, 6)]
    bad = verify.as_body()
    bad["targets"][0]["partition"] = "2025-03"
    with pytest.raises(ValueError, match="invalid partition"):
        decode_queue_message(json.dumps(bad))


def test_stats_name_the_partition_of_a_partition_key():
    from handler.domain.ports import KeyState  # noqa: PLC0415
    from handler.operations import describe  # noqa: PLC0415

    row = describe(RefreshKey("tenant-1", DAILY, MARCH), KeyState(started_at=1), 30_000)
    assert (row["target"], row["partition"]) == (DAILY, MARCH)
    assert "partition" not in describe(RefreshKey("tenant-1", DAILY), KeyState(started_at=1), 30_000)


class OutOfRangeCube:
    """Cube with no partition before 2020: a date range there gets no jobs (the adapter turns
    Cube's 400 for it into an empty answer)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def trigger(self, tenant_id, selectors, *, deadline_ms):
        answers = self.inner.trigger(tenant_id, selectors, deadline_ms=deadline_ms)
        return [
            [] if str(s.body.get("dateRange", ["9999"])[0]) < "2020" else a
            for s, a in zip(selectors, answers, strict=True)
        ]


def test_partition_outside_the_build_range_is_nothing_to_build_not_a_failure():
    r = rig(verify=True)
    r.service.cube = OutOfRangeCube(r.cube)
    out = run(r, hinted("2010-03-14T09:30:00Z", "2010-03-14T09:30:00Z", changedFields=["status"]))
    old_key = RefreshKey("tenant-1", DAILY, "2010-03-01..2010-03-31")
    assert not out.failed, "the record is not retried or dead-lettered"
    statuses = {k.key: (k.status, k.detail) for k in out.keys}
    assert statuses[old_key] == ("refreshed", "leading, nothing to build")
    assert r.telemetry.counts["NothingToBuild"] == 1
    assert r.store.get(old_key).build_status == "nothing_to_build"
    # Only the key with jobs is verified.
    [(_, verify)] = r.build_queue.messages
    assert [t.key for t in verify.targets] == [RefreshKey("tenant-1", "Users.main")]
    # A second mutation of that old row inside the window is debounced, not sent to Cube again.
    requests = len(r.cube.requests)
    r.clock.advance(100)
    assert not run(r, hinted("2010-03-14T09:30:00Z", "2010-03-14T09:30:00Z", changedFields=["status"])).failed
    assert len(r.cube.requests) == requests
