"""Replay: reading the on-failure S3 objects and DLT dumps, planning, batching, and idempotence."""

import base64
import json

import boto3
import pytest
from moto import mock_aws

from handler import app
from handler.domain.routing import EntityCubeMap
from handler.settings import load_settings
from preagg_cli import replay
from tests.builders import Rig, msk_event, mutation

TOPIC = "core.entities.lifecycle.mutated"


def _b64(obj: object) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def on_failure_object(event: dict, *, payload_as_string: bool = True) -> dict:
    """What Lambda writes to an S3 on-failure destination for a Kafka event source (kafka-on-failure)."""
    return {
        "requestContext": {
            "requestId": "316aa6d0-8154-xmpl-9af7-85d5f4a6bc81",
            "functionArn": "arn:aws:lambda:eu-west-1:123456789012:function:preagg-refresh",
            "condition": "RetryAttemptsExhausted",
            "approximateInvokeCount": 3,
        },
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "version": "1.0",
        "timestamp": "2026-11-29T12:00:06.021Z",
        "KafkaBatchInfo": {
            "batchSize": 2,
            "eventSourceArn": event["eventSourceArn"],
            "bootstrapServers": event["bootstrapServers"],
            "payloadSize": 2039,
            "recordsInfo": {},
        },
        "payload": json.dumps(event) if payload_as_string else event,
    }


def _refs(records):
    return [(r["topic"], r["partition"], r["offset"]) for r in records]


# -- reading -------------------------------------------------------------------------------------
def test_records_from_document_s3_object_with_string_payload_yields_original_records():
    event = msk_event(mutation("tenant-1"), mutation("tenant-2"))
    records = replay.records_from_document(on_failure_object(event), "obj")
    originals = [r for group in event["records"].values() for r in group]
    assert sorted(_refs(records)) == sorted(_refs(originals))
    assert {r["value"] for r in records} == {r["value"] for r in originals}


def test_records_from_document_s3_object_with_object_payload_is_accepted():
    event = msk_event(mutation("tenant-1"))
    records = replay.records_from_document(on_failure_object(event, payload_as_string=False), "obj")
    assert len(records) == 1


def test_records_from_document_metadata_only_record_explains_that_there_is_no_payload():
    doc = on_failure_object(msk_event(mutation()))
    del doc["payload"]
    with pytest.raises(replay.ReplayInputError, match="SQS/SNS destinations keep only offsets"):
        replay.records_from_document(doc, "obj")


def test_parse_text_dlt_dump_json_array_keeps_topic_partition_offset():
    dump = [{"topic": "t", "partition": 3, "offset": 17, "value": _b64(mutation())}]
    records = replay.parse_text(json.dumps(dump), "dump.json")
    assert _refs(records) == [("t", 3, 17)]
    assert records[0]["value"] == dump[0]["value"]


def test_parse_text_dlt_dump_json_lines_with_plain_object_values_encodes_them():
    lines = "\n".join(
        json.dumps({"topic": "t", "partition": 0, "offset": n, "value": mutation(entity_id=f"u{n}")}) for n in (5, 6)
    )
    records = replay.parse_text(lines + "\n", "dump.jsonl")
    assert _refs(records) == [("t", 0, 5), ("t", 0, 6)]
    assert json.loads(base64.b64decode(records[0]["value"]))["entityId"] == "u5"


def test_parse_text_dlt_record_carrying_a_kafka_on_failure_envelope_is_unwrapped():
    event = msk_event(mutation("tenant-1"))
    envelope = on_failure_object(event, payload_as_string=False)
    dlt_record = {"topic": "preagg-refresh-dlt", "partition": 0, "offset": 1, "value": _b64(envelope)}
    records = replay.parse_text(json.dumps([dlt_record]), "dump.json")
    assert records[0]["topic"] == TOPIC  # the original record, not the DLT's


def test_parse_text_msk_event_file_is_accepted():
    event = msk_event(mutation("tenant-1"), mutation("tenant-2"), mutation("tenant-3"))
    assert len(replay.parse_text(json.dumps(event), "events/x.json")) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"hello": 1}', "not a Lambda on-failure record"),
        ('[{"topic": "t", "partition": "x", "offset": 1, "value": null}]', "must be integers"),
        ("{not json\n", "line 1: not JSON"),
    ],
)
def test_parse_text_unreadable_input_names_the_problem(text, message):
    with pytest.raises(replay.ReplayInputError, match=message):
        replay.parse_text(text, "dump.json")


@mock_aws
def test_read_s3_reads_every_object_under_the_prefix():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="dlq")
    first = msk_event(mutation("tenant-1"), mutation("tenant-2"))
    second = msk_event(mutation("tenant-3"))
    prefix = "aws/lambda/esm-uuid/core.entities.lifecycle.mutated-0/2026/11/29/"
    s3.put_object(Bucket="dlq", Key=prefix + "a", Body=json.dumps(on_failure_object(first)).encode())
    s3.put_object(Bucket="dlq", Key=prefix + "b", Body=json.dumps(on_failure_object(second)).encode())
    s3.put_object(Bucket="dlq", Key="elsewhere/c", Body=b"not read")
    seen = []
    records, objects = replay.read_s3(s3, "s3://dlq/aws/lambda/", lambda done, total: seen.append((done, total)))
    assert objects == 2
    assert len(records) == 3
    assert seen == [(1, 2), (2, 2)]


@mock_aws
def test_read_s3_object_that_is_not_json_names_the_object():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="dlq")
    s3.put_object(Bucket="dlq", Key="x/bad", Body=b"{oops")
    with pytest.raises(replay.ReplayInputError, match="s3://dlq/x/bad"):
        replay.read_s3(s3, "s3://dlq/x/")


def test_parse_s3_uri_without_bucket_is_rejected():
    with pytest.raises(replay.ReplayInputError, match="not an s3://bucket/prefix"):
        replay.parse_s3_uri("s3:///prefix")


# -- planning and batching -----------------------------------------------------------------------
def test_plan_counts_per_tenant_and_target_and_lists_invalid_records():
    event = msk_event(
        mutation("tenant-1", "User"),
        mutation("tenant-1", "User", entity_id="u2"),
        mutation("tenant-2", "Group"),
        mutation("tenant-2", "Invoice"),
        "bm90IGpzb24=",  # base64 of "not json"
        None,
    )
    records = replay.records_from_document(event, "e")
    result = replay.plan(records, EntityCubeMap())
    assert result.by_target == {("tenant-1", "Users"): 2, ("tenant-2", "Groups"): 1}
    assert dict(result.unmapped) == {"Invoice": 1}
    assert sorted(bad.reason for bad in result.invalid) == ["not_json", "null_value"]
    assert len(result.records) == 4


def test_plan_same_record_in_two_objects_is_replayed_once():
    event = msk_event(mutation("tenant-1"))
    records = replay.records_from_document([on_failure_object(event), on_failure_object(event)], "two objects")
    result = replay.plan(records, EntityCubeMap())
    assert len(result.records) == 1
    assert result.duplicates == 1


def test_build_events_splits_at_the_batch_size_and_keeps_original_coordinates():
    records = [
        {"topic": "t", "partition": p, "offset": o, "value": _b64(mutation())} for p in (0, 1) for o in range(300)
    ]
    events = replay.build_events(records, batch_records=500)
    assert [sum(len(v) for v in e["records"].values()) for e in events] == [500, 100]
    assert events[0]["eventSource"] == "aws:kafka"
    assert set(events[0]["records"]) == {"t-0", "t-1"}
    assert events[1]["records"]["t-1"][-1]["offset"] == 299


def test_build_events_splits_before_the_lambda_payload_limit():
    big = "A" * 1000
    records = [{"topic": "t", "partition": 0, "offset": o, "value": big} for o in range(10)]
    events = replay.build_events(records, batch_bytes=3_500)
    assert all(sum(len(v) for v in e["records"].values()) <= 3 for e in events)
    assert sum(sum(len(v) for v in e["records"].values()) for e in events) == 10


def test_run_collects_failed_records_and_undeliverable_batches():
    events = replay.build_events(
        [{"topic": "t", "partition": 0, "offset": o, "value": "x"} for o in range(3)], batch_records=2
    )
    answers = iter(
        [{"batchItemFailures": [{"itemIdentifier": {"partition": "t-0", "offset": 1}}]}, RuntimeError("boom")]
    )

    def invoke(event):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    result = replay.run(events, invoke)
    assert not result.ok
    assert result.failed == [{"partition": "t-0", "offset": 1}]
    assert result.errors == ["batch 2: boom"]
    assert result.records == 3


# -- idempotence through the real pipeline (in-memory fakes) --------------------------------------
def _replay_through_handler(rig: Rig, records) -> replay.ReplayResult:
    settings = load_settings()
    events = replay.build_events(replay.plan(records, settings.entity_cube_map).records)
    return replay.run(events, lambda event: app.handle(event, service=rig.service, settings=settings))


def test_replay_twice_within_the_window_second_run_makes_no_cube_request():
    rig = Rig()
    event = msk_event(mutation("tenant-1", "User"), mutation("tenant-2", "Group"), mutation("tenant-2", "User"))
    records = replay.records_from_document(on_failure_object(event), "obj")

    first = _replay_through_handler(rig, records)
    assert first.ok
    assert len(rig.cube.requests) == 2  # one Cube request per tenant
    assert rig.scheduler.messages == []

    rig.clock.advance(1_000)
    second = _replay_through_handler(rig, records)
    assert second.ok  # every record acknowledged
    assert len(rig.cube.requests) == 2  # absorbed by the debounce: no Cube request
    # what the protocol does with a mutation inside the window: one trailing refresh per key,
    # due at the window's end
    due = {(m.tenant_id, m.target): m.due_at for m in rig.scheduler.messages}
    assert due == {
        ("tenant-1", "Users"): rig.clock.now - 1_000 + rig.window_ms,
        ("tenant-2", "Groups"): rig.clock.now - 1_000 + rig.window_ms,
        ("tenant-2", "Users"): rig.clock.now - 1_000 + rig.window_ms,
    }

    rig.clock.advance(1_000)
    third = _replay_through_handler(rig, records)
    assert third.ok
    assert len(rig.cube.requests) == 2
    assert len(rig.scheduler.messages) == 3  # joined the pending trailing refreshes, no new ones


def test_replay_twice_then_trailing_refresh_fires_once_per_tenant():
    rig = Rig()
    records = replay.records_from_document(msk_event(mutation("tenant-1"), mutation("tenant-1", "Group")), "e")
    _replay_through_handler(rig, records)
    rig.clock.advance(1_000)
    _replay_through_handler(rig, records)
    rig.clock.advance(rig.window_ms)
    due = rig.scheduler.due(rig.clock.now)
    sqs_event = {
        "Records": [
            {
                "eventSource": "aws:sqs",
                "messageId": f"m{i}",
                "body": json.dumps(
                    {
                        "kind": "trailing",
                        "tenantId": m.tenant_id,
                        "target": m.target,
                        "token": m.token,
                        "dueAt": m.due_at,
                    }
                ),
            }
            for i, m in enumerate(due)
        ]
    }
    answer = app.handle(sqs_event, service=rig.service, settings=load_settings())
    assert answer == {"batchItemFailures": []}
    # the total extra effect of the second replay: one coalesced trailing refresh per tenant
    assert len(rig.cube.requests) == 2
    assert rig.cube.requests[1][0] == "tenant-1"
