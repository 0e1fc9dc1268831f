"""The local event source mappings (devstack/esm.py): retries, bisection and dead letters of the Kafka
mapping with a fake function; the SQS mapping against moto (delay, delete, visibility, redrive)."""

import base64
import json
import time
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from devstack.esm import (
    DYNAMODB_WRITES,
    CallCounter,
    FunctionError,
    KafkaMapping,
    SqsMapping,
    dead_letter_value,
    msk_event,
)
from devstack.template import event_sources
from preagg_cli import replay

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "core.entities.lifecycle.mutated"


def record(partition: int, offset: int, value: bytes = b'{"ok": true}') -> dict:
    return {
        "topic": TOPIC,
        "partition": partition,
        "offset": offset,
        "timestamp": 1_795_953_600_000,
        "timestampType": "CREATE_TIME",
        "key": base64.b64encode(b"tenant-1").decode(),
        "value": base64.b64encode(value).decode(),
        "headers": [{"traceparent": [48, 49]}],
    }


class FakeFunction:
    """Fails the records in `poison` (partial batch response) or raises when `raise_on_poison`."""

    def __init__(self, poison: set[tuple[int, int]], raise_on_poison: bool = False) -> None:
        self.poison, self.raise_on_poison = poison, raise_on_poison
        self.batches: list[list[tuple[int, int]]] = []

    def __call__(self, event):
        refs = [(r["partition"], r["offset"]) for group in event["records"].values() for r in group]
        self.batches.append(refs)
        bad = [ref for ref in refs if ref in self.poison]
        if bad and self.raise_on_poison:
            raise FunctionError("boom")
        return {"batchItemFailures": [{"itemIdentifier": {"partition": f"{TOPIC}-{p}", "offset": o}} for p, o in bad]}


def mapping(function, dead, retries=3, bisect=True):
    return KafkaMapping(function, lambda r, c, n: dead.append((r, c, n)), retries, bisect, pause_s=0)


def test_msk_event_groups_records_by_topic_partition():
    event = msk_event([record(0, 5), record(1, 7), record(0, 6)])
    assert event["eventSource"] == "aws:kafka"
    assert {k: [r["offset"] for r in v] for k, v in event["records"].items()} == {
        f"{TOPIC}-0": [5, 6],
        f"{TOPIC}-1": [7],
    }


def test_kafka_mapping_partial_failure_retries_from_lowest_failed_offset_then_dead_letters_it():
    function, dead = FakeFunction({(0, 6)}), []
    outcome = mapping(function, dead, retries=3).process([record(0, 5), record(0, 6), record(0, 7), record(1, 9)])
    # First the whole batch; then partition 0 from offset 6 on (7 comes again), 3 retries; then the dead letter.
    assert function.batches[0] == [(0, 5), (0, 6), (0, 7), (1, 9)]
    assert function.batches[1:] == [[(0, 6), (0, 7)]] * 3
    assert [(r["partition"], r["offset"]) for r, _, _ in dead] == [(0, 6)]
    assert dead[0][1:] == ("RetryAttemptsExhausted", 4)
    assert outcome.invocations == 4


def test_kafka_mapping_function_error_bisects_down_to_the_poison_record():
    function, dead = FakeFunction({(0, 3)}, raise_on_poison=True), []
    mapping(function, dead, retries=2).process([record(0, o) for o in range(6)])
    assert [(r["partition"], r["offset"]) for r, _, _ in dead] == [(0, 3)]
    delivered_ok = {ref for batch in function.batches if (0, 3) not in batch for ref in batch}
    assert delivered_ok == {(0, 0), (0, 1), (0, 2), (0, 4), (0, 5)}
    assert [batch for batch in function.batches if batch == [(0, 3)]] == [[(0, 3)]] * 3  # first try + 2 retries


def test_kafka_mapping_without_bisect_dead_letters_the_whole_failing_batch():
    function, dead = FakeFunction({(0, 1)}, raise_on_poison=True), []
    mapping(function, dead, retries=1, bisect=False).process([record(0, 0), record(0, 1)])
    assert [(r["partition"], r["offset"]) for r, _, _ in dead] == [(0, 0), (0, 1)]
    assert len(function.batches) == 2


def test_kafka_mapping_answer_naming_a_record_not_in_the_batch_fails_the_batch():
    dead = []

    def wrong(event):
        return {"batchItemFailures": [{"itemIdentifier": {"partition": f"{TOPIC}-0", "offset": 999}}]}

    mapping(wrong, dead, retries=0, bisect=False).process([record(0, 1)])
    assert [(r["partition"], r["offset"]) for r, _, _ in dead] == [(0, 1)]


def test_kafka_mapping_success_invokes_once_and_dead_letters_nothing():
    function, dead = FakeFunction(set()), []
    assert mapping(function, dead).process([record(0, 1), record(2, 4)]).invocations == 1
    assert dead == []


def test_dead_letter_value_carries_the_payload_that_replay_reads_back():
    original = record(2, 41, b"not json")
    value = dead_letter_value(original, "RetryAttemptsExhausted", 11, "127.0.0.1:9092")
    assert value["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert value["KafkaBatchInfo"]["firstOffset"] == 41
    dlt_record = {
        "topic": f"{TOPIC}.dlt",
        "partition": 0,
        "offset": 0,
        "value": base64.b64encode(json.dumps(value).encode()).decode(),
    }
    [back] = replay.records_from_document(dlt_record, "dlt")
    assert (back["topic"], back["partition"], back["offset"], back["value"]) == (
        TOPIC,
        2,
        41,
        original["value"],
    )


def test_event_sources_come_from_template_yaml():
    sources = event_sources(ROOT / "template.yaml")
    assert sources.topic == TOPIC
    assert sources.dead_letter_topic == f"{TOPIC}.dlt"
    assert sources.batch_size >= 1 and sources.maximum_retry_attempts >= -1
    assert sources.bisect_on_function_error is True
    assert sources.visibility_timeout_s > 0 and sources.max_receive_count >= 1


@pytest.fixture
def queue():
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})
        url = sqs.create_queue(QueueName="q", Attributes={"VisibilityTimeout": "1", "RedrivePolicy": redrive})[
            "QueueUrl"
        ]
        yield sqs, url, dlq


def test_sqs_mapping_delivers_when_due_and_deletes_what_succeeded(queue):
    sqs, url, _ = queue
    seen = []
    source = SqsMapping(sqs, url, lambda event: seen.append(event) or {"batchItemFailures": []}, 10, "us-east-1")
    sqs.send_message(QueueUrl=url, MessageBody='{"kind": "anything"}', DelaySeconds=1)
    assert source.poll_once(wait_s=0) == (0, 0)  # not due yet
    time.sleep(1.1)
    assert source.poll_once(wait_s=0) == (1, 0)
    [event] = seen
    assert event["Records"][0]["eventSource"] == "aws:sqs"
    assert event["Records"][0]["body"] == '{"kind": "anything"}'  # delivered unchanged, whatever its kind
    time.sleep(1.1)
    assert source.poll_once(wait_s=0) == (0, 0)  # deleted: it does not come back


def test_sqs_mapping_reported_message_comes_back_then_goes_to_the_dlq(queue):
    sqs, url, dlq = queue

    def fail_all(event):
        return {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in event["Records"]]}

    source = SqsMapping(sqs, url, fail_all, 10, "us-east-1")
    sqs.send_message(QueueUrl=url, MessageBody="x")
    assert source.poll_once(wait_s=0) == (1, 1)
    assert source.poll_once(wait_s=0) == (0, 0)  # invisible for the visibility timeout
    time.sleep(1.1)
    assert source.poll_once(wait_s=0) == (1, 1)  # back, second receive
    time.sleep(1.1)
    assert source.poll_once(wait_s=0) == (0, 0)  # maxReceiveCount 2 reached: moved to the DLQ
    moved = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=0).get("Messages", [])
    assert [m["Body"] for m in moved] == ["x"]


def test_sqs_mapping_function_error_leaves_the_whole_batch(queue):
    sqs, url, _ = queue

    def crash(event):
        raise FunctionError("boom")

    sqs.send_message(QueueUrl=url, MessageBody="a")
    assert SqsMapping(sqs, url, crash, 10, "us-east-1").poll_once(wait_s=0) == (1, 1)


def test_call_counter_counts_the_watched_calls_of_each_invocation(queue):
    """The journal's `calls`: DynamoDB writes and SQS sends, counted at the clients between two resets."""
    sqs, url, _ = queue
    dynamodb = boto3.client("dynamodb", region_name="us-east-1")
    dynamodb.create_table(
        TableName="t",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    calls = CallCounter()
    calls.watch(dynamodb, "dynamodb", DYNAMODB_WRITES, "ddb_writes")
    calls.watch(sqs, "sqs", ("SendMessage",), "sqs_sends")
    dynamodb.update_item(TableName="t", Key={"pk": {"S": "a"}}, UpdateExpression="SET n = :n",
                         ExpressionAttributeValues={":n": {"N": "1"}})  # fmt: skip
    dynamodb.delete_item(TableName="t", Key={"pk": {"S": "a"}})
    dynamodb.get_item(TableName="t", Key={"pk": {"S": "a"}})  # a read: not counted
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    sqs.receive_message(QueueUrl=url)  # not a send
    assert calls.snapshot() == {"ddb_writes": 2, "sqs_sends": 1}
    calls.reset()
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    assert calls.snapshot() == {"sqs_sends": 1}
