import base64
import json

import pytest
from pydantic import ValidationError

from handler.domain.decode import MAX_FUTURE_MS, MalformedEvent, decode_msk_event, decode_trailing_message
from handler.domain.model import is_valid_tenant
from handler.domain.routing import EntityCubeMap
from handler.operations import OperationRequest
from tests.builders import T0, msk_event, mutation


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "null_value"),
        ("%%%", "bad_base64"),
        (_b64("not json"), "not_json"),
        (_b64("[1, 2]"), "not_object"),
        (
            _b64(json.dumps({"eventType": "X", "entityType": "User", "tenantId": "t1", "timestamp": 1})),
            "invalid_fields",
        ),
        (_b64(json.dumps(mutation(entity_id=42))), "invalid_fields"),  # type: ignore[arg-type]
        (_b64(json.dumps(mutation(tenant="../etc"))), "invalid_fields"),
        (_b64(json.dumps(mutation(tenant=""))), "invalid_fields"),
        (_b64(json.dumps(mutation(timestamp="yesterday"))), "invalid_fields"),
        (_b64(json.dumps(mutation(timestamp=True))), "invalid_fields"),  # type: ignore[arg-type]
    ],
)
def test_decode_bad_record_is_reported_with_its_reason(value, reason):
    batch = decode_msk_event(msk_event(mutation(), value), now_ms=T0)
    assert len(batch.mutations) == 1
    assert [bad.reason for bad in batch.invalid] == [reason]


def test_decode_invalid_detail_names_the_field_without_its_value():
    batch = decode_msk_event(msk_event(mutation(tenant="secret tenant name!")), now_ms=T0)
    (bad,) = batch.invalid
    assert "tenantId" in bad.detail
    assert "secret tenant name" not in bad.detail


def test_decode_accepts_iso_timestamps_and_tolerates_unknown_fields():
    # T0 is 2026-11-29T12:00:00Z in epoch milliseconds
    for stamp in ("2026-11-29T12:00:00Z", "2026-11-29T13:00:00+01:00", "2026-11-29T12:00:00", str(T0), T0):
        batch = decode_msk_event(msk_event(mutation(timestamp=stamp, source="ui", version=3)), now_ms=T0)
        ((_, m),) = batch.mutations
        assert m.timestamp == T0, stamp
        assert m.tenant_id == "tenant-1"


def test_decode_record_refs_name_topic_partition_and_offset():
    batch = decode_msk_event(msk_event(None, partitions=1), now_ms=T0)
    (bad,) = batch.invalid
    assert bad.ref.as_failure() == {"itemIdentifier": {"partition": "core.entities.lifecycle.mutated-0", "offset": 100}}


def test_decode_event_without_records_is_malformed():
    with pytest.raises(MalformedEvent):
        decode_msk_event({"eventSource": "aws:kafka"}, now_ms=T0)


def test_decode_record_without_offset_is_malformed():
    event = {"records": {"t-0": [{"topic": "t", "partition": 0, "value": None}]}}
    with pytest.raises(MalformedEvent):
        decode_msk_event(event, now_ms=T0)


def test_trailing_message_round_trip_and_rejections():
    body = json.dumps({"kind": "trailing", "tenantId": "t1", "target": "Users", "token": "abc", "dueAt": 5})
    message = decode_trailing_message(body)
    assert (message.tenant_id, message.target, message.token, message.due_at) == ("t1", "Users", "abc", 5)
    for broken in [
        "nope",
        json.dumps({"kind": "other"}),
        json.dumps({"kind": "trailing", "tenantId": "a b", "target": "Users", "token": "x", "dueAt": 1}),
        json.dumps({"kind": "trailing", "tenantId": "t1", "target": "Users;drop", "token": "x", "dueAt": 1}),
    ]:
        with pytest.raises(ValueError, match=r"trailing|JSON"):
            decode_trailing_message(broken)


DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize("depth", [300, 10_000])
def test_decode_deeply_nested_json_is_reported_as_too_deep_not_as_not_json(depth):
    value = _b64('{"eventType": ' + "[" * depth + "]" * depth + "}")
    batch = decode_msk_event(msk_event(mutation(), value), now_ms=T0)
    assert [(bad.reason, bad.detail) for bad in batch.invalid] == [
        ("too_deep", "record value is JSON nested too deeply")
    ]
    assert len(batch.mutations) == 1


def test_trailing_message_nested_too_deeply_is_a_value_error_not_a_recursion_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_trailing_message(DEEP)


@pytest.mark.parametrize(
    ("tenant", "target", "error"),
    [
        ("tenant-1\n", "Users", "invalid tenantId"),
        ("tenant-1\r\n", "Users", "invalid tenantId"),
        ("\ntenant-1", "Users", "invalid tenantId"),
        ("tenant-1", "Users\n", "invalid target"),
        ("tenant-1", "Users.daily\n", "invalid target"),
    ],
)
def test_trailing_message_with_a_newline_in_tenant_or_target_is_refused(tenant, target, error):
    body = json.dumps({"kind": "trailing", "tenantId": tenant, "target": target, "token": "x", "dueAt": 1})
    with pytest.raises(ValueError, match=error):
        decode_trailing_message(body)


@pytest.mark.parametrize("value", ["tenant-1\n", "tenant-1\r\n", " tenant-1", "tenant-1 "])
def test_one_tenant_check_everywhere_refuses_a_trailing_newline(value):
    assert not is_valid_tenant(value)
    batch = decode_msk_event(msk_event(mutation(tenant=value)), now_ms=T0)
    assert [bad.reason for bad in batch.invalid] == ["invalid_fields"]
    with pytest.raises(ValidationError):
        OperationRequest.model_validate({"operation": "refresh", "tenantId": value, "cubes": ["Users"]})
    with pytest.raises(ValidationError):
        OperationRequest.model_validate({"operation": "refresh", "tenantId": "tenant-1", "cubes": ["Users\n"]})
    with pytest.raises(ValueError, match="invalid cube names"):
        EntityCubeMap({"User": ["Users\n"]})


@pytest.mark.parametrize(
    "stamp",
    [T0 + MAX_FUTURE_MS + 1, 253_402_300_799_000, 2**63, 2**64, "9999-12-31T23:59:59Z", T0 * 1000],
    ids=["a-day-and-1ms", "year-9999", "2^63", "2^64", "iso-9999", "microseconds"],
)
def test_decode_timestamp_more_than_a_day_ahead_is_refused_with_its_reason(stamp):
    batch = decode_msk_event(msk_event(mutation(timestamp=stamp)), now_ms=T0)
    ((bad),) = batch.invalid
    assert bad.reason == "future_timestamp"
    assert "24 h ahead" in bad.detail
    assert batch.mutations == []


def test_decode_timestamp_up_to_a_day_ahead_and_old_ones_are_accepted():
    for stamp in (T0 + MAX_FUTURE_MS, T0 + 60_000, 0, T0 - 365 * 86_400_000):
        batch = decode_msk_event(msk_event(mutation(timestamp=stamp)), now_ms=T0)
        assert batch.invalid == [], stamp
