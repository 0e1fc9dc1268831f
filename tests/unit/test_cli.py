"""The operator CLI: commands over in-memory fakes (in-process target), target resolution (moto),
the Lambda invoker, exit codes and output."""

import io
import json
import os

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from handler import app
from handler.domain.errors import CubeRejected, CubeUnreachable
from handler.domain.model import RecordRef, RefreshKey
from handler.observability import logger
from handler.settings import load_settings
from preagg_cli import cli
from tests.builders import Rig, msk_event, mutation


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def in_process(rig: Rig, sent: list | None = None, s3=None, bucket=None) -> cli.Target:
    settings = load_settings()

    def invoke(payload):
        if sent is not None:
            sent.append(payload)
        return app.handle(payload, service=rig.service, settings=settings)

    return cli.Target("test", invoke, lambda: settings.entity_cube_map, lambda: s3, dead_letter_bucket=bucket)


def run(argv, target=None, stdin=None):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, target=target, stdin=stdin or io.StringIO(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- refresh -------------------------------------------------------------------------------------
def test_refresh_by_entity_type_refreshes_its_cubes_and_exits_0():
    rig = Rig()
    code, out, _ = run(["refresh", "--tenant", "tenant-1", "--entity-type", "User"], in_process(rig))
    assert code == 0
    assert "Users" in out
    assert "refreshed (leading), 1 Cube job(s) queued" in out
    assert rig.cube.requests[0][0] == "tenant-1"


def test_refresh_sends_the_direct_invoke_payload():
    sent: list = []
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users", "--cube", "Groups", "--force"], in_process(Rig(), sent))
    assert sent == [{"operation": "refresh", "tenantId": "tenant-1", "force": True, "cubes": ["Users", "Groups"]}]


def test_refresh_within_the_window_is_debounced_and_force_bypasses_it():
    rig = Rig()
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)
    code, out, _ = run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)
    assert code == 0
    assert "debounced" in out
    assert "--force" in out
    assert len(rig.cube.requests) == 1
    code, out, _ = run(["refresh", "--tenant", "tenant-1", "--cube", "Users", "--force"], target)
    assert code == 0
    assert "refreshed" in out
    assert len(rig.cube.requests) == 2


def test_refresh_cube_refusal_exits_1_with_cubes_error_and_what_to_check():
    rig = Rig()
    rig.cube.failures.append(CubeRejected("Cube answered 403: Invalid token", status=403))
    code, out, _ = run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], in_process(rig))
    assert code == 1
    assert "Invalid token" in out
    assert "CUBE_API_SECRET_ARN" in out


def test_refresh_cube_unreachable_exits_1_and_points_at_cube():
    rig = Rig()
    rig.cube.failures.append(CubeUnreachable("connection refused"))
    code, out, _ = run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], in_process(rig))
    assert code == 1
    assert "check Cube is up at CUBE_API_URL" in out


def test_refresh_unknown_entity_type_exits_2_with_the_known_ones():
    code, out, err = run(["refresh", "--tenant", "tenant-1", "--entity-type", "Invoice"], in_process(Rig()))
    assert code == 2
    assert out == ""
    assert "maps to no cube" in err
    assert "User" in err


def test_refresh_json_prints_the_raw_result():
    code, out, _ = run(["refresh", "--tenant", "tenant-1", "--cube", "Users", "--json"], in_process(Rig()))
    assert code == 0
    result = json.loads(out)
    assert result["operation"] == "refresh"
    assert result["keys"][0]["status"] == "refreshed"


def test_refresh_without_tenant_is_a_usage_error():
    code, _, _ = run(["refresh", "--cube", "Users"], in_process(Rig()))
    assert code == 2


# -- stats ---------------------------------------------------------------------------------------
def test_stats_shows_last_refresh_and_pending_trailing_refresh_per_key():
    rig = Rig()
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)  # debounced: trailing scheduled
    run(["refresh", "--tenant", "tenant-2", "--cube", "Groups"], target)
    code, out, _ = run(["stats"], target)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "TENANT",
        "TARGET",
        "LAST",
        "REFRESH",
        "WINDOW",
        "ENDS",
        "TRAILING",
        "PENDING",
        "SINCE",
        "LAST",
        "BUILD",
        "EXPIRES",
    ]
    users = next(line for line in lines if "tenant-1" in line)
    assert "Users" in users
    assert "scheduled, due" in users
    assert "2 key(s), window 30000 ms" in out


def test_stats_filters_by_tenant_and_cube_and_prints_json():
    rig = Rig()
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users", "--cube", "Groups"], target)
    run(["refresh", "--tenant", "tenant-2", "--cube", "Users"], target)
    code, out, _ = run(["stats", "--tenant", "tenant-1", "--cube", "Users", "--json"], target)
    assert code == 0
    keys = json.loads(out)["keys"]
    assert [(k["tenantId"], k["target"]) for k in keys] == [("tenant-1", "Users")]


def test_stats_with_no_state_says_so():
    code, out, _ = run(["stats"], in_process(Rig()))
    assert code == 0
    assert "no debounce state" in out


# -- clear ---------------------------------------------------------------------------------------
def _two_keys(rig):
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users", "--cube", "Groups"], target)
    return target


def test_clear_with_yes_deletes_only_the_named_cube():
    rig = Rig()
    target = _two_keys(rig)
    code, out, _ = run(["clear", "--tenant", "tenant-1", "--cube", "Users", "--yes"], target)
    assert code == 0
    assert "cleared 1 key(s) of tenant tenant-1: Users" in out
    assert [k for k, _ in rig.store.scan()] == [RefreshKey("tenant-1", "Groups")]


def test_clear_without_yes_and_no_terminal_refuses_and_keeps_state():
    rig = Rig()
    target = _two_keys(rig)
    code, _, err = run(["clear", "--tenant", "tenant-1"], target)
    assert code == 2
    assert "--yes" in err
    assert len(rig.store.scan()) == 2


def test_clear_asks_and_a_no_keeps_state():
    rig = Rig()
    target = _two_keys(rig)
    code, _, err = run(["clear", "--tenant", "tenant-1"], target, stdin=Tty("n\n"))
    assert code == 1
    assert "ALL cubes" in err
    assert len(rig.store.scan()) == 2


def test_clear_asks_and_a_yes_clears_every_cube_of_the_tenant():
    rig = Rig()
    target = _two_keys(rig)
    code, out, _ = run(["clear", "--tenant", "tenant-1"], target, stdin=Tty("y\n"))
    assert code == 0
    assert "cleared 2 key(s)" in out
    assert rig.store.scan() == []


# -- replay --------------------------------------------------------------------------------------
def _dump(tmp_path, *values):
    event = msk_event(*values)
    records = [r for group in event["records"].values() for r in group]
    path = tmp_path / "dlt.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_replay_dry_run_prints_the_plan_and_sends_nothing(tmp_path):
    rig = Rig()
    sent: list = []
    path = _dump(
        tmp_path, mutation("tenant-1"), mutation("tenant-1", entity_id="u2"), mutation("tenant-2", "Group"), "eA=="
    )
    code, out, _ = run(["replay", "--file", path, "--dry-run"], in_process(rig, sent))
    assert code == 0
    assert sent == []
    assert rig.store.writes == 0
    assert "4 record(s): 3 valid, 1 invalid" in out
    assert any(line.split() == ["tenant-1", "Users", "2"] for line in out.splitlines())
    assert any(line.split() == ["tenant-2", "Groups", "1"] for line in out.splitlines())
    assert "invalid core.entities.lifecycle.mutated-" in out
    assert "not_json" in out


def test_replay_dry_run_json_is_the_plan(tmp_path):
    path = _dump(tmp_path, mutation("tenant-1"))
    code, out, _ = run(["replay", "--file", path, "--dry-run", "--json"], in_process(Rig()))
    assert code == 0
    assert json.loads(out)["byTenant"] == {"tenant-1": {"Users": 1}}


def test_replay_file_runs_records_through_the_pipeline_and_exits_0(tmp_path):
    rig = Rig()
    sent: list = []
    path = _dump(tmp_path, mutation("tenant-1"), mutation("tenant-2", "Group"))
    code, out, _ = run(["replay", "--file", path], in_process(rig, sent))
    assert code == 0
    assert "replayed 2 record(s) in 1 batch(es)" in out
    assert len(sent) == 1
    assert sent[0]["eventSource"] == "aws:kafka"
    assert len(rig.cube.requests) == 2


def test_replay_with_invalid_records_exits_1_unless_skip_invalid(tmp_path):
    path = _dump(tmp_path, mutation("tenant-1"), None)
    code, out, _ = run(["replay", "--file", path], in_process(Rig()))
    assert code == 1
    assert "1 invalid record(s) were not sent" in out
    code, _, _ = run(["replay", "--file", path, "--skip-invalid"], in_process(Rig()))
    assert code == 0


def test_replay_records_failing_again_exit_1_and_are_named(tmp_path):
    rig = Rig()
    rig.cube.failures.append(CubeUnreachable("down"))
    path = _dump(tmp_path, mutation("tenant-1"))
    code, out, _ = run(["replay", "--file", path], in_process(rig))
    assert code == 1
    assert "failed again core.entities.lifecycle.mutated-" in out


def test_replay_missing_file_is_a_usage_error(tmp_path):
    code, _, err = run(["replay", "--file", str(tmp_path / "nope.json")], in_process(Rig()))
    assert code == 2
    assert "cannot read" in err


@mock_aws
def test_replay_s3_dlq_reads_the_stacks_dead_letter_bucket():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="stack-dlq")
    event = msk_event(mutation("tenant-1"), mutation("tenant-2"))
    envelope = {
        "requestContext": {"condition": "RetryAttemptsExhausted"},
        "version": "1.0",
        "payload": json.dumps(event),
    }
    s3.put_object(Bucket="stack-dlq", Key="aws/lambda/x/obj", Body=json.dumps(envelope).encode())
    rig = Rig()
    code, out, _ = run(["replay", "--s3", "dlq"], in_process(rig, s3=s3, bucket="stack-dlq"))
    assert code == 0, out
    assert "replayed 2 record(s)" in out
    assert len(rig.cube.requests) == 2


@mock_aws
def test_replay_s3_empty_prefix_is_a_usage_error():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="dlq-bucket")
    code, _, err = run(["replay", "--s3", "s3://dlq-bucket/none/"], in_process(Rig(), s3=s3))
    assert code == 2
    assert "no objects under s3://dlq-bucket/none/" in err


# -- targets -------------------------------------------------------------------------------------
def test_no_local_stack_and_no_stack_exits_2_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "INSTALLED_ROOT", tmp_path)  # no stack in the checkout either
    code, _, err = run(["stats"])
    assert code == 2
    assert "run `make stack-start` or pass --stack NAME" in err


def test_local_target_sets_the_stack_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    env_file = tmp_path / ".stack" / "env.json"
    env_file.parent.mkdir()
    env_file.write_text(json.dumps({"DEBOUNCE_TABLE_NAME": "local-table"}))
    # The function's settings: what the stack recorded (`make stack-start`), not this shell's.
    recorded = {"environ": {"ENTITY_CUBE_MAP": '{"Order": ["Orders"]}'}, "summary": ""}
    (env_file.parent / "function.json").write_text(json.dumps(recorded))
    os.environ["CUBE_PREAGG_DEBOUNCE_MS"] = "1234"
    monkeypatch.chdir(tmp_path / ".stack")
    assert cli.find_env_file() == env_file.resolve()
    target = cli.local_target(env_file)
    assert os.environ["DEBOUNCE_TABLE_NAME"] == "local-table"
    assert target.routes().targets_for("Order") == ("Orders",)
    assert "CUBE_PREAGG_DEBOUNCE_MS" not in os.environ  # the default, as in the local event sources


_TEMPLATE = {
    "Resources": {"Queue": {"Type": "AWS::SQS::Queue"}},
    "Outputs": {
        "FunctionName": {"Value": "preagg-refresh-fn"},
        "DebounceTableName": {"Value": "preagg-refresh-debounce"},
        "TrailingQueueUrl": {"Value": {"Ref": "Queue"}},
        "DeadLetterBucketName": {"Value": "preagg-refresh-dlq"},
    },
}


@mock_aws
def test_stack_outputs_reads_the_cloudformation_outputs():
    cfn = boto3.client("cloudformation", region_name="us-east-1")
    cfn.create_stack(StackName="preagg", TemplateBody=json.dumps(_TEMPLATE))
    outputs = cli.stack_outputs("preagg", cfn)
    assert outputs["FunctionName"] == "preagg-refresh-fn"
    assert outputs["DeadLetterBucketName"] == "preagg-refresh-dlq"
    assert outputs["TrailingQueueUrl"].startswith("http")


@mock_aws
def test_stack_target_invokes_the_function_named_by_the_outputs(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("cloudformation").create_stack(StackName="preagg", TemplateBody=json.dumps(_TEMPLATE))
    target = cli.resolve_target(cli.build_parser().parse_args(["stats", "--stack", "preagg"]))
    assert "preagg-refresh-fn" in target.name
    assert target.dead_letter_bucket == "preagg-refresh-dlq"


@mock_aws
def test_stack_that_does_not_exist_exits_2_with_a_hint(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    code, _, err = run(["stats", "--stack", "missing"])
    assert code == 2
    assert "stack 'missing' not found in us-east-1" in err


@mock_aws
def test_stack_without_function_output_exits_2():
    cfn = boto3.client("cloudformation", region_name="us-east-1")
    cfn.create_stack(StackName="other", TemplateBody=json.dumps({"Resources": _TEMPLATE["Resources"]}))
    with pytest.raises(cli.UsageError, match="no FunctionName output"):
        cli.stack_outputs("other", cfn)


class FakeLambda:
    def __init__(self, answer: bytes, function_error: str | None = None, error: Exception | None = None):
        self.answer, self.function_error, self.error = answer, function_error, error
        self.calls: list = []

    def invoke(self, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        response = {"StatusCode": 200, "Payload": io.BytesIO(self.answer)}
        if self.function_error:
            response["FunctionError"] = self.function_error
        return response


def test_lambda_invoker_sends_the_payload_synchronously_and_returns_the_answer():
    fake = FakeLambda(b'{"ok": true, "operation": "stats", "keys": []}')
    answer = cli.lambda_invoker(fake, "fn")({"operation": "stats"})
    assert answer["ok"] is True
    assert fake.calls[0]["InvocationType"] == "RequestResponse"
    assert json.loads(fake.calls[0]["Payload"]) == {"operation": "stats"}


def test_lambda_invoker_function_error_is_an_operation_failure_pointing_at_the_logs():
    fake = FakeLambda(
        b'{"errorMessage": "invalid configuration: CUBE_API_URL", "errorType": "ConfigurationError"}', "Unhandled"
    )
    with pytest.raises(cli.OperationFailed, match=r"CUBE_API_URL.*aws logs tail /aws/lambda/fn"):
        cli.lambda_invoker(fake, "fn")({"operation": "stats"})


def test_lambda_invoker_access_denied_says_which_permission_is_missing():
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "Invoke")
    with pytest.raises(cli.UsageError, match="lambda:InvokeFunction"):
        cli.lambda_invoker(FakeLambda(b"", error=denied), "fn")({"operation": "stats"})


def test_main_maps_an_operation_failure_to_exit_1():
    fake = FakeLambda(b'{"errorMessage": "boom"}', "Unhandled")
    target = cli.Target("stack x", cli.lambda_invoker(fake, "fn"), lambda: None, lambda: None)
    code, _, err = run(["stats"], target)
    assert code == 1
    assert "boom" in err


# -- progress ------------------------------------------------------------------------------------
def test_progress_bar_draws_only_on_a_terminal():
    piped, tty = io.StringIO(), Tty()
    for stream in (piped, tty):
        bar = cli.ProgressBar("reading", stream)
        bar(1, 2)
        bar(2, 2)
    assert piped.getvalue() == ""
    assert "2/2" in tty.getvalue()
    assert tty.getvalue().endswith("\n")


@mock_aws
def test_local_target_runs_operations_in_process_against_the_stack_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    settings = load_settings()
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    ddb.create_table(
        TableName=settings.debounce_table_name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"AWS_DEFAULT_REGION": "us-east-1"}))
    app._service.cache_clear()
    log_handler = logger.registered_handler
    stream = log_handler.stream
    try:
        code, out, _ = run(["stats", "--json", "--env-file", str(env_file)])
        rejected, _, err = run(["refresh", "--tenant", "t1", "--entity-type", "Nope", "--env-file", str(env_file)])
    finally:
        app._service.cache_clear()
        log_handler.setStream(stream)
    assert code == 0
    assert json.loads(out)["keys"] == []
    assert rejected == 2
    assert "maps to no cube" in err
    assert "operation rejected" not in capsys.readouterr().out  # the function's logs went to stderr


# -- build outcomes and live jobs ----------------------------------------------------------------
def _verified(rig: Rig, status: str) -> None:
    rig.jobs.default = status
    [(due, message)] = rig.build_queue.messages
    rig.clock.now = due
    rig.build_queue.due(due)
    rig.service.process_verify([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline)


def test_stats_shows_the_last_build_and_its_freshness_lag():
    rig = Rig(verify=True)
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)
    _verified(rig, "done")
    code, out, _ = run(["stats", "--tenant", "tenant-1"], target)
    assert code == 0
    assert "LAST BUILD" in out and "last built" in out and "(freshness lag 2.0 s)" in out


def test_stats_shows_a_failed_build_and_its_next_retrigger():
    rig = Rig(verify=True)
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)
    _verified(rig, "failure: permission denied for table users")
    _, out, _ = run(["stats", "--tenant", "tenant-1"], target)
    assert "build failed: failure: permission denied for table users (re-trigger 1/5 due" in out


def test_stats_shows_a_key_cube_had_nothing_to_build_for():
    rig = Rig(verify=True)
    target = in_process(rig)
    real = rig.cube.trigger
    rig.cube.trigger = lambda tenant, selectors, *, deadline_ms: [
        [] for _ in real(tenant, selectors, deadline_ms=deadline_ms)
    ]  # type: ignore[method-assign]
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)
    assert rig.build_queue.messages == [], "no job: nothing to verify"
    _, out, _ = run(["stats", "--tenant", "tenant-1"], target)
    assert "nothing to build" in out


def test_jobs_shows_live_cube_job_states_of_the_latest_refresh():
    rig = Rig(verify=True)
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users", "--cube", "Groups"], target)
    rig.jobs.statuses["job-tenant-1-Groups-1"] = "processing"
    rig.jobs.tenants["job-tenant-1-Users-1"] = "tenant-2"
    code, out, _ = run(["jobs", "--tenant", "tenant-1"], target)
    assert code == 0
    assert "job-tenant-1-Groups-1" in out and "processing" in out
    assert "(another tenant's job)" in out
    assert rig.jobs.requests == [("tenant-1", ["job-tenant-1-Groups-1", "job-tenant-1-Users-1"])]


def test_jobs_when_cube_refuses_exits_1_with_the_reason():
    rig = Rig(verify=True)
    target = in_process(rig)
    run(["refresh", "--tenant", "tenant-1", "--cube", "Users"], target)
    rig.jobs.failures.append(CubeRejected("Cube rejected the request (403): Invalid token", status=403))
    code, _, err = run(["jobs", "--tenant", "tenant-1"], target)
    assert code == 1 and "Invalid token" in err
