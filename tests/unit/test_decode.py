import base64
import json

import pytest

from handler.domain.decode import MalformedEvent, decode_msk_event, decode_trailing_message
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
    batch = decode_msk_event(msk_event(mutation(), value))
    assert len(batch.mutations) == 1
    assert [bad.reason for bad in batch.invalid] == [reason]


def test_decode_invalid_detail_names_the_field_without_its_value():
    batch = decode_msk_event(msk_event(mutation(tenant="secret tenant name!")))
    (bad,) = batch.invalid
    assert "tenantId" in bad.detail
    assert "secret tenant name" not in bad.detail


def test_decode_accepts_iso_timestamps_and_tolerates_unknown_fields():
    # T0 is 2026-11-29T12:00:00Z in epoch milliseconds
    for stamp in ("2026-11-29T12:00:00Z", "2026-11-29T13:00:00+01:00", "2026-11-29T12:00:00", str(T0), T0):
        batch = decode_msk_event(msk_event(mutation(timestamp=stamp, source="ui", version=3)))
        ((_, m),) = batch.mutations
        assert m.timestamp == T0, stamp
        assert m.tenant_id == "tenant-1"


def test_decode_record_refs_name_topic_partition_and_offset():
    batch = decode_msk_event(msk_event(None, partitions=1))
    (bad,) = batch.invalid
    assert bad.ref.as_failure() == {"itemIdentifier": {"partition": "core.entities.lifecycle.mutated-0", "offset": 100}}


def test_decode_event_without_records_is_malformed():
    with pytest.raises(MalformedEvent):
        decode_msk_event({"eventSource": "aws:kafka"})


def test_decode_record_without_offset_is_malformed():
    event = {"records": {"t-0": [{"topic": "t", "partition": 0, "value": None}]}}
    with pytest.raises(MalformedEvent):
        decode_msk_event(event)


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
