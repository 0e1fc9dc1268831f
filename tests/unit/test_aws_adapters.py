"""SQS scheduler and Secrets Manager access on moto; the Powertools-decorated entry point."""

import json
from dataclasses import dataclass

import boto3
import pytest
from moto import mock_aws

from handler import app
from handler.adapters.aws import SqsTrailingScheduler, cached_secret
from handler.domain.errors import SchedulerUnavailable
from handler.domain.ports import TrailingMessage
from tests.builders import T0, Rig, load_event


@pytest.fixture
def aws():
    with mock_aws():
        yield


def test_sqs_scheduler_sends_the_trailing_message_body(aws):
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(QueueName="trailing")["QueueUrl"]
    SqsTrailingScheduler(sqs, url).schedule(TrailingMessage("t1", "Users", "tok", T0), now=T0)
    (msg,) = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)["Messages"]
    assert json.loads(msg["Body"]) == {
        "kind": "trailing",
        "tenantId": "t1",
        "target": "Users",
        "token": "tok",
        "dueAt": T0,
        "attempt": 0,
    }


def test_sqs_scheduler_delays_to_the_due_time_capped_at_15_minutes():
    sent = {}

    class Client:
        def send_message(self, **kwargs):
            sent.update(kwargs)

    SqsTrailingScheduler(Client(), "q").schedule(TrailingMessage("t1", "Users", "tok", T0 + 3_600_000), now=T0)
    assert sent["DelaySeconds"] == 900
    SqsTrailingScheduler(Client(), "q").schedule(TrailingMessage("t1", "Users", "tok", T0 - 5), now=T0)
    assert sent["DelaySeconds"] == 0
    SqsTrailingScheduler(Client(), "q").schedule(TrailingMessage("t1", "Users", "tok", T0 + 1_001), now=T0)
    assert sent["DelaySeconds"] == 2


def test_sqs_scheduler_failure_is_a_scheduler_error(aws):
    sqs = boto3.client("sqs", region_name="us-east-1")
    with pytest.raises(SchedulerUnavailable):
        SqsTrailingScheduler(sqs, "https://sqs.us-east-1.amazonaws.com/123456789012/missing").schedule(
            TrailingMessage("t1", "Users", "tok", T0), now=T0
        )


def test_secret_is_read_from_secrets_manager_and_cached(aws):
    sm = boto3.client("secretsmanager", region_name="us-east-1")
    arn = sm.create_secret(Name="cube", SecretString="raw-cube-api-secret-value-0123456789")["ARN"]
    fetch = cached_secret(arn)
    assert fetch() == "raw-cube-api-secret-value-0123456789"
    sm.put_secret_value(SecretId=arn, SecretString="rotated")
    assert fetch() == "raw-cube-api-secret-value-0123456789"  # cached across invocations


@dataclass
class Context:
    function_name: str = "preagg-refresh"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:preagg-refresh"
    aws_request_id: str = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def test_lambda_handler_emits_emf_metrics_and_never_logs_the_payload(monkeypatch, capsys):
    rig = Rig(telemetry=app.telemetry)
    monkeypatch.setattr(app, "_service", lambda: rig.service)
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "INFO")
    response = app.lambda_handler(load_event("burst-3-tenants.json"), Context())
    assert response == {"batchItemFailures": []}
    out = capsys.readouterr().out
    emf = [json.loads(line) for line in out.splitlines() if '"_aws"' in line]
    names = {m["Name"] for doc in emf for d in doc["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}
    assert {"EventsReceived", "KeysCoalesced", "RefreshesTriggered", "RefreshesByCube", "CubeLatency"} <= names
    by_cube = [doc for doc in emf if "Cube" in doc]
    assert sorted(doc["Cube"] for doc in by_cube) == ["Groups", "Tenants", "Users"]
    assert all(doc["RefreshesByCube"] == [3.0] and doc["service"] == "preagg-refresh" for doc in by_cube)
    assert "user-0" not in out  # entity ids (payload) are not logged


def test_lambda_handler_emits_events_and_refreshes_by_entity_type_as_emf(monkeypatch, capsys):
    rig = Rig(telemetry=app.telemetry)
    monkeypatch.setattr(app, "_service", lambda: rig.service)
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    app.lambda_handler(load_event("burst-3-tenants.json"), Context())  # 12 User, 12 Tenant, 12 Group mutations
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    typed = [doc for doc in emf if "EntityType" in doc]
    by_type = {(doc["EntityType"], name): doc[name] for doc in typed for name in doc if "By" in name}
    assert by_type == {
        **{(t, "EventsByEntityType"): [12.0] for t in ("User", "Tenant", "Group")},
        **{(t, "RefreshesByEntityType"): [3.0] for t in ("User", "Tenant", "Group")},  # one key per tenant
    }
    dims = [d["Dimensions"] for doc in emf if "EntityType" in doc for d in doc["_aws"]["CloudWatchMetrics"]]
    assert all(sorted(ds[0]) == ["EntityType", "service"] for ds in dims)
