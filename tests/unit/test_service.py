"""The pipeline over in-memory fakes: coalescing, debouncing, Cube calls, failures."""

import pytest

from handler.adapters.memory import InMemoryDebounceStore, RecordingCube
from handler.domain.decode import decode_msk_event
from handler.domain.errors import CubeRejected, CubeUnreachable
from handler.domain.model import RecordRef
from handler.domain.service import serial_map
from handler.wiring import ThreadMap
from tests.builders import FakeClock, Rig, msk_event, mutation

TENANTS = ["tenant-1", "tenant-2", "tenant-3"]
TYPES = ["User", "Tenant", "Group"]


def burst(n: int) -> list[dict]:
    return [mutation(TENANTS[i % 3], TYPES[(i // 3) % 3], f"e-{i}", timestamp=1_795_953_600_000 + i) for i in range(n)]


def run(rig: Rig, values: list) -> tuple[set, object]:
    batch = decode_msk_event(msk_event(*values), now_ms=rig.clock.now)
    outcome = rig.service.process_mutations(batch.mutations, deadline_ms=rig.deadline)
    return outcome.failed | {b.ref for b in batch.invalid}, outcome


@pytest.mark.parametrize("map_io", [serial_map, ThreadMap(8)], ids=["serial", "threads"])
def test_service_900_records_make_9_claims_and_3_posts_then_none_inside_the_window(map_io):
    rig = Rig(map_io=map_io)
    failed, _ = run(rig, burst(900))
    assert not failed
    assert rig.store.writes == 9
    assert len(rig.cube.requests) == 3
    assert sorted(sel["cubes"] for _, sels in rig.cube.requests for sel in sels) == [["Groups", "Tenants", "Users"]] * 3
    rig.clock.advance(1_000)
    failed, _ = run(rig, burst(900))
    assert not failed
    assert len(rig.cube.requests) == 3  # no new Cube call inside the window
    assert len(rig.scheduler.messages) == 9  # one trailing refresh per key instead


def test_service_coalesces_a_key_however_many_records_share_it():
    rig = Rig()
    run(rig, [mutation(entity_id=f"u{i}") for i in range(50)])
    assert rig.telemetry.counts["KeysCoalesced"] == 1
    assert len(rig.cube.requests) == 1


def test_service_unmapped_entity_types_are_counted_and_acknowledged():
    rig = Rig()
    failed, _ = run(rig, [mutation(entity_type="Invoice"), mutation()])
    assert not failed
    assert rig.telemetry.counts["UnmappedEvents"] == 1


def test_service_cube_4xx_reports_records_and_releases_claims_without_retry():
    rig = Rig()
    rig.cube.failures.append(CubeRejected("Cube rejected the request (403): Invalid token", status=403))
    failed, outcome = run(rig, [mutation(), mutation(entity_id="u2")])
    assert len(failed) == 2
    assert len(rig.cube.requests) == 1
    assert rig.telemetry.counts["CubeErrorsByClass[ErrorClass=client]"] == 1
    assert rig.store.get(next(iter(rig.store.items))).started_at is None  # released
    assert "Invalid token" in outcome.by_status("failed")[0].detail


def test_service_cube_down_releases_claim_so_redelivered_batch_refreshes_at_once():
    rig = Rig()
    rig.cube.failures.append(CubeUnreachable("Cube unreachable (ConnectError)"))
    failed, _ = run(rig, [mutation()])
    assert len(failed) == 1
    rig.clock.advance(100)
    failed, _ = run(rig, [mutation()])  # the redelivery
    assert not failed
    assert len(rig.cube.requests) == 2
    assert rig.telemetry.counts["ClaimsReleased"] == 1


@pytest.mark.parametrize("map_io", [serial_map, ThreadMap(8)], ids=["serial", "threads"])
def test_service_failure_of_one_tenant_does_not_fail_the_others(map_io):
    rig = Rig(map_io=map_io)
    rig.cube.failures.append(CubeUnreachable("down"))  # the first tenant's POST (sorted: tenant-1)
    failed, _ = run(rig, [mutation("tenant-1"), mutation("tenant-2"), mutation("tenant-3")])
    assert len(failed) == 1
    assert len(rig.cube.requests) == 3


def test_service_staleness_is_measured_from_the_oldest_mutation():
    rig = Rig()
    run(rig, [mutation(timestamp=rig.clock.now - 4_000), mutation(timestamp=rig.clock.now - 1_000)])
    assert rig.telemetry.timings["RefreshStaleness"] == [4_000]


def due_trailing_refreshes(rig: Rig) -> list:
    """9 keys refreshed, then debounced inside the window: their trailing refreshes, now due."""
    run(rig, burst(9))
    rig.clock.advance(1_000)
    run(rig, burst(9))
    rig.clock.advance(29_000)
    return rig.scheduler.due(rig.clock.now)


def test_service_trailing_refresh_posts_once_per_tenant():
    rig = Rig()
    due = due_trailing_refreshes(rig)
    outcome = rig.service.process_trailing(
        [(RecordRef("sqs", i), m) for i, m in enumerate(due)], deadline_ms=rig.deadline
    )
    assert not outcome.failed
    assert len(rig.cube.requests) == 6
    assert rig.telemetry.counts["TrailingFired"] == 9


class SlowStore(InMemoryDebounceStore):
    """Every conditional write takes `write_ms` of the fake clock (a slow or throttled table)."""

    def __init__(self, clock, write_ms: int) -> None:
        super().__init__()
        self.clock, self.write_ms = clock, write_ms

    def claim(self, key, **kw):
        self.clock.advance(self.write_ms)
        return super().claim(key, **kw)

    def release(self, key, **kw):
        self.clock.advance(self.write_ms)
        return super().release(key, **kw)


class SlowCube(RecordingCube):
    def __init__(self, clock, call_ms: int, *, down: bool) -> None:
        super().__init__()
        self.clock, self.call_ms, self.down = clock, call_ms, down

    def trigger(self, tenant_id, selectors, *, deadline_ms):
        self.clock.advance(self.call_ms)
        assert self.clock.now <= deadline_ms
        if self.down:
            return [CubeUnreachable("down") for _ in selectors]
        return super().trigger(tenant_id, selectors, deadline_ms=deadline_ms)


@pytest.mark.parametrize("cube_down", [False, True], ids=["cube-up", "cube-down"])
def test_service_10000_tenants_with_60s_left_stop_claiming_in_time_report_the_rest_and_release_every_claim(cube_down):
    """Issue 12.7: 10,000 distinct tenants at 10 ms per write would take 100 s of claims alone; the
    batch must end by its deadline, report every record it did not refresh, and leave no claim."""
    clock = FakeClock()
    store = SlowStore(clock, write_ms=10)
    cube = SlowCube(clock, call_ms=10, down=cube_down)
    rig = Rig(clock=clock, store=store, cube=cube)
    batch = decode_msk_event(
        msk_event(*[mutation(f"t{i}", entity_id=f"u{i}") for i in range(10_000)], partitions=1), now_ms=clock.now
    )
    start = clock.now
    deadline = start + 60_000
    outcome = rig.service.process_mutations(batch.mutations, deadline_ms=deadline)
    assert clock.now <= deadline, f"ran {clock.now - start} ms against 60,000 ms"
    refreshed = outcome.by_status("refreshed")
    assert len(refreshed) + len(outcome.by_status("failed")) == 10_000
    assert len(outcome.failed) == 10_000 - len(refreshed)  # every record not refreshed is reported
    assert len(cube.requests) < 10_000  # it stopped starting work
    if cube_down:
        assert refreshed == []
    else:
        assert len(refreshed) >= 1_000
    assert all(state.claim_token is None for key, state in store.items.items() if key not in {k.key for k in refreshed})


def test_service_trailing_refreshes_with_no_time_left_are_reported_without_any_write():
    rig = Rig()
    due = due_trailing_refreshes(rig)
    writes, requests = rig.store.writes, len(rig.cube.requests)
    outcome = rig.service.process_trailing(
        [(RecordRef("sqs", i), m) for i, m in enumerate(due)], deadline_ms=rig.clock.now
    )
    assert outcome.failed == {RecordRef("sqs", i) for i in range(len(due))}
    assert (rig.store.writes, len(rig.cube.requests)) == (writes, requests)


# -- by entity type (issue 18, item 20: the Grafana view) --------------------------------------------------------
def by_entity_type(rig: Rig, name: str) -> dict[str, int]:
    prefix = f"{name}[EntityType="
    return {k[len(prefix) : -1]: v for k, v in rig.telemetry.counts.items() if k.startswith(prefix)}


def test_service_counts_events_and_refreshes_by_mapped_entity_type_only():
    rig = Rig()
    values = [mutation(entity_type="User", entity_id=f"u{i}") for i in range(3)] + [
        mutation(entity_type="Group"),
        mutation(entity_type="Invoice"),  # unmapped: a tenant's typo must not become a metric dimension
    ]
    run(rig, values)
    assert by_entity_type(rig, "EventsByEntityType") == {"User": 3, "Group": 1}
    assert by_entity_type(rig, "RefreshesByEntityType") == {"User": 1, "Group": 1}  # one key each was refreshed


def test_service_debounced_keys_are_events_by_entity_type_but_not_refreshes():
    rig = Rig()
    run(rig, [mutation(entity_type="User")])
    rig.clock.advance(1_000)
    run(rig, [mutation(entity_type="User", entity_id="u2")])  # inside the window: debounced
    assert by_entity_type(rig, "EventsByEntityType") == {"User": 2}
    assert by_entity_type(rig, "RefreshesByEntityType") == {"User": 1}
    assert rig.telemetry.counts["Debounced"] == 1


def test_service_failed_refresh_is_not_counted_as_a_refresh_of_its_entity_type():
    rig = Rig()
    rig.cube.failures.append(CubeRejected("Cube rejected the request (403): Invalid token", status=403))
    run(rig, [mutation(entity_type="User")])
    assert by_entity_type(rig, "EventsByEntityType") == {"User": 1}
    assert by_entity_type(rig, "RefreshesByEntityType") == {}
