"""Hostile and malformed invocations through `app.handle` (issue 12, items 1, 4, 5, 8, 10): each gets
a clear, structured answer; valid records beside a bad one are still processed."""

import base64
import json
import logging

import pytest

from handler import app
from handler.domain.decode import MalformedEvent, trailing_body
from handler.domain.errors import CubeRejected
from handler.domain.ports import TrailingMessage
from tests.builders import Rig, load_event, msk_event, mutation

DEEP = "[" * 10_000 + "]" * 10_000


def sqs(*bodies: str, ids: list | None = None) -> dict:
    ids = ids if ids is not None else [f"m-{i}" for i in range(len(bodies))]
    records = []
    for message_id, body in zip(ids, bodies, strict=True):
        record = {"eventSource": "aws:sqs", "body": body}
        if message_id is not ...:
            record["messageId"] = message_id
        records.append(record)
    return {"Records": records}


def due_trailing(rig: Rig, tenant: str = "tenant-1", target: str = "Users") -> str:
    """A trailing refresh recorded by a debounced mutation, now due: its SQS body."""
    app.handle(msk_event(mutation(tenant)), None, service=rig.service)
    rig.clock.advance(1_000)
    app.handle(msk_event(mutation(tenant)), None, service=rig.service)
    rig.clock.advance(30_000)
    (message,) = rig.scheduler.due(rig.clock.now)
    assert isinstance(message, TrailingMessage)
    return json.dumps(trailing_body(message))


def test_handler_sqs_body_nested_10000_deep_fails_only_that_message():
    rig = Rig()
    good = due_trailing(rig)
    requests = len(rig.cube.requests)
    response = app.handle(sqs(DEEP, good), None, service=rig.service)
    assert response == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert len(rig.cube.requests) == requests + 1  # the valid trailing refresh ran


def test_handler_msk_value_nested_10000_deep_is_reported_as_too_deep(caplog):
    rig = Rig()
    value = base64.b64encode(DEEP.encode()).decode()
    with caplog.at_level(logging.WARNING):
        response = app.handle(msk_event(mutation(), value, partitions=1), None, service=rig.service)
    assert [f["itemIdentifier"]["offset"] for f in response["batchItemFailures"]] == [101]
    assert [getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "invalid record"] == ["too_deep"]


@pytest.mark.parametrize("source", ["aws:kafka", "SelfManagedKafka", "aws:SelfManagedKafka"])
def test_handler_accepts_every_spelling_of_the_kafka_event_sources(source):
    rig = Rig()
    event = {**msk_event(mutation()), "eventSource": source}
    assert app.handle(event, None, service=rig.service) == {"batchItemFailures": []}
    assert len(rig.cube.requests) == 1


@pytest.mark.parametrize(
    "event",
    [None, [], [{"eventSource": "aws:kafka"}], "event", 42, {"Records": ["x"]}, {"Records": [None]}, {"Records": []}],
    ids=["null", "empty-list", "list", "string", "number", "records-of-strings", "records-of-null", "no-records"],
)
def test_handler_non_aws_envelope_is_a_clear_unrecognised_event_error(event):
    with pytest.raises(MalformedEvent, match="unrecognised event: expected an MSK batch"):
        app.handle(event, None, service=Rig().service)


@pytest.mark.parametrize("ids", [[...], [None], [""], [7]], ids=["absent", "null", "empty", "number"])
def test_handler_sqs_record_without_a_message_id_refuses_the_event_before_any_work(ids):
    rig = Rig()
    good = due_trailing(rig)
    requests = len(rig.cube.requests)
    event = sqs(good, good, ids=["m-0", *ids])
    with pytest.raises(MalformedEvent, match="SQS record 1 has no messageId"):
        app.handle(event, None, service=rig.service)
    assert len(rig.cube.requests) == requests  # nothing done: the whole batch comes back


def test_handler_sqs_message_ids_are_reported_as_given():
    rig = Rig()
    response = app.handle(sqs("not json", ids=["abc-123"]), None, service=rig.service)
    assert response == {"batchItemFailures": [{"itemIdentifier": "abc-123"}]}
    assert "None" not in json.dumps(response)


JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0ZW5hbnRJZCI6InRlbmFudC0xIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


def test_handler_cube_error_text_echoing_the_token_is_redacted_in_logs_and_operation_results(caplog):
    rig = Rig()
    echo = f"Invalid token: Authorization: Bearer {JWT} (raw {JWT})"
    rig.cube.failures.append(CubeRejected(f"Cube rejected the request (403): {echo}", status=403))
    rig.cube.failures.append(CubeRejected(f"Cube rejected the request (403): {echo}", status=403))
    # the model check quietens the `handler` loggers for its whole module: listen to them here
    with caplog.at_level(logging.INFO, logger="handler"), caplog.at_level(logging.INFO):
        app.handle(msk_event(mutation()), None, service=rig.service)
        result = app.handle(load_event("operation-refresh.json"), None, service=rig.service)
    logs = "".join(json.dumps(r.__dict__, default=str) for r in caplog.records)  # message and extras
    assert "cube refused or failed the refresh" in logs
    text = logs + json.dumps(result)
    assert "Invalid token" in logs and "Invalid token" in json.dumps(result)  # Cube's message is kept
    assert "eyJ" not in text and "c2lnbmF0dXJl" not in text
    assert "Bearer [redacted]" in text
