"""Functional tests of the Lambda handler over every sample event in events/ (in-memory fakes)."""

import json

import pytest

from handler import app
from handler.domain.model import RefreshKey
from handler.settings import load_settings
from tests.builders import Rig, load_event, msk_event, mutation, sample_events

EXPECTED_FAILURES = {
    "user-updated.json": 0,
    "burst-3-tenants.json": 0,
    "mixed-bad-records.json": 8,  # every kind of bad record; the unmapped Invoice is acknowledged
    "trailing-refresh-sqs.json": 1,  # the body that is not a trailing message
    "precise-refresh.json": 0,
}
EXPECTED_CUBE_REQUESTS = {
    "user-updated.json": 1,
    "burst-3-tenants.json": 3,
    "mixed-bad-records.json": 2,  # tenant-1 Users, tenant-2 Groups
    "trailing-refresh-sqs.json": 1,
    "operation-refresh.json": 1,
    "precise-refresh.json": 2,  # default map: tenant-h Users, tenant-1 Users (the richer map: test_precise_refresh)
}


def _prepare(name: str, rig: Rig) -> None:
    if name == "trailing-refresh-sqs.json":
        # a debounced mutation recorded the trailing refresh this message announces
        body = json.loads(load_event(name)["Records"][0]["body"])
        key = RefreshKey(body["tenantId"], body["target"])
        rig.store.claim(key, now=body["dueAt"] - 30_000, window_ms=30_000, claim_token="c", expires_at=0)
        rig.store.schedule_trailing(
            key,
            now=body["dueAt"] - 29_000,
            oldest_event_ms=body["dueAt"] - 29_500,
            trailing_token=body["token"],
            due_at=body["dueAt"],
            replaces=None,
            expires_at=0,
        )
        rig.clock.now = body["dueAt"]


@pytest.mark.parametrize("path", sample_events(), ids=lambda p: p.name)
def test_handler_sample_event_is_handled_as_documented(path):
    assert path.name in EXPECTED_CUBE_REQUESTS, f"add an expectation for {path.name}"
    rig = Rig()
    _prepare(path.name, rig)
    response = app.handle(load_event(path.name), None, service=rig.service)
    if "batchItemFailures" in response:
        assert len(response["batchItemFailures"]) == EXPECTED_FAILURES[path.name]
    else:
        assert response["ok"] is True
    assert len(rig.cube.requests) == EXPECTED_CUBE_REQUESTS[path.name]
    for tenant, selectors in rig.cube.requests:
        assert all(s["contexts"] == [{"securityContext": {"tenantId": tenant}}] for s in selectors)


def test_handler_partial_batch_names_exactly_the_bad_records():
    rig = Rig()
    good = [mutation(entity_id=f"u{i}") for i in range(20)]
    bad = [None, "%%%", "bm90IGpzb24=", mutation(tenant="a b"), mutation(timestamp="nope")]
    event = msk_event(*good[:10], *bad, *good[10:], partitions=1)
    response = app.handle(event, None, service=rig.service)
    offsets = sorted(f["itemIdentifier"]["offset"] for f in response["batchItemFailures"])
    assert offsets == [110, 111, 112, 113, 114]
    assert {f["itemIdentifier"]["partition"] for f in response["batchItemFailures"]} == {
        "core.entities.lifecycle.mutated-0"
    }
    assert len(rig.cube.requests) == 1


def test_handler_disabled_acknowledges_everything_and_does_nothing_else():
    rig = Rig()
    settings = load_settings(CUBE_PREAGG_ENABLED="false")
    response = app.handle(load_event("mixed-bad-records.json"), None, service=rig.service, settings=settings)
    assert response == {"batchItemFailures": []}
    assert rig.cube.requests == [] and rig.store.writes == 0


def test_handler_unknown_event_fails_loudly():
    with pytest.raises(ValueError, match="unrecognised event"):
        app.handle({"hello": "world"}, None, service=Rig().service)


def test_handler_operation_with_bad_tenant_is_refused_with_a_clear_error():
    rig = Rig()
    response = app.handle({"operation": "refresh", "tenantId": "../x", "cubes": ["Users"]}, None, service=rig.service)
    assert response["ok"] is False and "tenantId" in response["error"]
    assert rig.cube.requests == []
