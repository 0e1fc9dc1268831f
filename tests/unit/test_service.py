"""The pipeline over in-memory fakes: coalescing, debouncing, Cube calls, failures."""

import pytest

from handler.domain.decode import decode_msk_event
from handler.domain.errors import CubeRejected, CubeUnreachable
from handler.domain.model import RecordRef
from handler.domain.service import serial_map
from handler.wiring import ThreadMap
from tests.builders import Rig, msk_event, mutation

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


def test_service_trailing_refresh_posts_once_per_tenant():
    rig = Rig()
    run(rig, burst(9))
    rig.clock.advance(1_000)
    run(rig, burst(9))
    rig.clock.advance(29_000)
    due = rig.scheduler.due(rig.clock.now)
    outcome = rig.service.process_trailing(
        [(RecordRef("sqs", i), m) for i, m in enumerate(due)], deadline_ms=rig.deadline
    )
    assert not outcome.failed
    assert len(rig.cube.requests) == 6
    assert rig.telemetry.counts["TrailingFired"] == 9
