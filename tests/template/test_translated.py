"""template.yaml as CloudFormation receives it: SAM's translator output (aws-sam-translator, the version the
pinned SAM CLI uses), evaluated for each value of the parameters that switch branches, and for parameter-only
changes (issue 19, items 13-16).

These run on .venv-sam's Python, where the translator is installed (scripts/check-template.sh, `make template`):
its pydantic pin conflicts with the function's, so it cannot live in .venv. No network, no credentials.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path

import pytest
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

from preagg_cli import predeploy
from preagg_cli.cfn import Evaluator

os.environ.setdefault("AWS_DEFAULT_REGION", "eu-west-1")  # the translator builds ARNs for a region
ROOT = Path(__file__).resolve().parents[2]
SOURCE = yaml_parse((ROOT / "template.yaml").read_text())
# What `sam package` leaves in the template it uploads: the code as an S3 object named by its checksum.
SOURCE["Resources"]["RefreshFunction"]["Properties"]["CodeUri"] = "s3://sam-artifacts/preagg-refresh/5d41402abc4b2a76"

CLUSTER = "arn:aws:kafka:eu-west-1:111111111111:cluster/core-events/0f1e2d3c-aaaa-bbbb-cccc-000000000000-1"
REQUIRED = {
    "CubeApiUrl": "https://cube.internal.example/cubejs-api",
    "CubeApiSecretArn": "arn:aws:secretsmanager:eu-west-1:111111111111:secret:cube-api-secret-AbCdEf",
    "MskClusterArn": CLUSTER,
}
SOURCES = {
    "msk": {},
    "self-managed": {
        "KafkaSource": "self-managed",
        "MskClusterArn": "",
        "KafkaBootstrapServers": "b-1.kafka.example:9096,b-2.kafka.example:9096",
        "KafkaAuthSecretArn": "arn:aws:secretsmanager:eu-west-1:111111111111:secret:kafka-creds-AbCdEf",
    },
}
# Every parameter that switches a branch of the template, with each of its values.
BRANCHES = {
    "KafkaSource": list(SOURCES),
    "DeadLetterTarget": ["kafka", "s3"],
    "SnapStart": ["off", "on"],
    "KafkaMappingEnabled": ["true", "false"],
    "StalledMappingAlarmMinutes": ["60", "0"],
}
COMBINATIONS = [dict(zip(BRANCHES, values, strict=True)) for values in itertools.product(*BRANCHES.values())]
MORE = [  # the remaining switches, once each
    {"TracingEnabled": "false"},
    {"SubnetIds": "subnet-0aaa,subnet-0bbb", "SecurityGroupIds": "sg-0aaa"},
    {"AlarmTopicArn": "arn:aws:sns:eu-west-1:111111111111:alarms"},
    {"EntityCubeMap": '{"User": ["Users"]}'},
    {"CubeApiSecretKmsKeyArn": "arn:aws:kms:eu-west-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab"},
]


class NoManagedPolicies:
    def load(self) -> dict[str, str]:
        raise AssertionError("the template names no managed policy: nothing to look up")


def parameters(**overrides: str) -> dict[str, str]:
    values = {**REQUIRED, "FunctionDigest": "0" * 64, **SOURCES[overrides.get("KafkaSource", "msk")], **overrides}
    return {k: v for k, v in values.items() if v is not None}


def translate(values: dict[str, str]) -> Evaluator:
    """SAM's translation for these parameter values, as an evaluator of what CloudFormation would create."""
    translated = transform(copy.deepcopy(SOURCE), dict(values), NoManagedPolicies())
    return Evaluator(translated, values)


def label(combination: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in combination.items())


def of_type(resources: dict, kind: str) -> dict:
    return {name: r for name, r in resources.items() if r["Type"] == kind}


# -- every branch ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combination", COMBINATIONS + MORE, ids=label)
def test_every_branch_translates_to_a_template_cloudformation_accepts(combination):
    evaluator = translate(parameters(**combination))
    resources = evaluator.resources()
    outputs = evaluator.outputs()
    assert evaluator.problems == [], "dangling references"
    assert evaluator.unsafe_selects() == []
    assert evaluator.failed_rules() == []
    # IAM refuses an inline policy whose statement list is empty (MalformedPolicyDocument): item 13.
    for name, role in of_type(resources, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            statements = policy["PolicyDocument"]["Statement"]
            assert isinstance(statements, list), name
            assert statements, f"{name}: policy {policy['PolicyName']} has no statement"
    # The dashboard body is JSON only once CloudFormation substitutes it; its alarm widget shows every alarm.
    alarms = set(of_type(resources, "AWS::CloudWatch::Alarm"))
    body = json.loads(resources["Dashboard"]["Properties"]["DashboardBody"])
    (widget,) = [w for w in body["widgets"] if w["type"] == "alarm"]
    assert set(widget["properties"]["alarms"]) == {f"<{a}.Arn>" for a in alarms}
    assert set(outputs["AlarmNames"].split(",")) == {f"<{a}>" for a in alarms}
    mapping = combination.get("KafkaMappingEnabled", "true") == "true"
    stalled = mapping and combination.get("StalledMappingAlarmMinutes", "60") != "0"
    assert ("MappingStalledAlarm" in alarms) == stalled
    watching_the_mapping = {a for a in alarms if "RefreshFunctionKafka" in json.dumps(SOURCE["Resources"][a])}
    assert bool(watching_the_mapping) == mapping  # the seven error/lag alarms (and stalled) exist only with it
    assert ("KafkaEventSourceMappingId" in outputs) == mapping


def test_alarm_texts_name_kafka_not_msk_on_a_self_managed_stack():
    resources = translate(parameters(KafkaSource="self-managed")).resources()
    texts = [r["Properties"]["AlarmDescription"] for r in of_type(resources, "AWS::CloudWatch::Alarm").values()]
    assert texts
    assert not [t for t in texts if "MSK" in t]


# -- item 13: the dead-letter policy -----------------------------------------------------------------------------
def role_policies(evaluator: Evaluator) -> dict[str, list[dict]]:
    (role,) = of_type(evaluator.resources(), "AWS::IAM::Role").values()
    return {p["PolicyName"]: p["PolicyDocument"]["Statement"] for p in role["Properties"]["Policies"]}


def test_self_managed_kafka_dead_letter_has_no_iam_policy_at_all():
    # The mapping writes the dead-letter topic with its own Kafka credentials; before the fix every statement
    # resolved to AWS::NoValue and the empty policy failed the first deploy.
    policies = role_policies(translate(parameters(KafkaSource="self-managed", DeadLetterTarget="kafka")))
    assert "dead-letter" not in policies
    assert "self-managed-kafka-credentials" in policies


def test_msk_kafka_dead_letter_policy_grants_writes_on_the_dead_letter_topic():
    statements = role_policies(translate(parameters(DeadLetterTarget="kafka")))["dead-letter"]
    topic = next(s for s in statements if s["Sid"] == "KafkaDeadLetterTopic")
    assert "kafka-cluster:WriteData" in topic["Action"]
    assert topic["Resource"] == (
        "arn:aws:kafka:eu-west-1:111111111111:topic/core-events/0f1e2d3c-aaaa-bbbb-cccc-000000000000-1/"
        "core.entities.lifecycle.mutated.dlt"
    )


@pytest.mark.parametrize("source", list(SOURCES))
def test_s3_dead_letter_policy_grants_put_and_list_on_the_bucket(source):
    statements = role_policies(translate(parameters(KafkaSource=source, DeadLetterTarget="s3")))["dead-letter"]
    assert {s["Sid"] for s in statements} == {"S3DeadLetterObjects", "S3DeadLetterBucket"}


# -- item 14: a parameter-only change publishes a new version ------------------------------------------------------
def build(tmp_path: Path, code: str = "VERSION = 1\n") -> Path:
    package = tmp_path / "build" / "RefreshFunction"
    (package / "handler").mkdir(parents=True, exist_ok=True)
    (package / "handler" / "app.py").write_text(code)
    return package


def deployed(values: dict[str, str], package: Path) -> tuple[str, dict]:
    """What `make deploy` sends (FunctionDigest computed), translated: the version's logical ID and resources."""
    template = predeploy.load_template(ROOT / "template.yaml")
    values = {**values, "FunctionDigest": predeploy.function_digest(template, values, package)}
    resources = translate(values).resources()
    (version,) = of_type(resources, "AWS::Lambda::Version")
    return version, resources


PARAMETER_ONLY_CHANGES = [
    {"RefreshEnabled": "false"},
    {"DebounceMs": "5000"},
    {"CubeApiUrl": "https://cube-2.internal.example/cubejs-api"},
    {"FunctionMemoryMb": "1024"},
    {"SnapStart": "on"},
    {"CubeMaxSelectors": "3"},
]


@pytest.mark.parametrize("change", PARAMETER_ONLY_CHANGES, ids=label)
@pytest.mark.parametrize("source", list(SOURCES))
def test_parameter_only_change_publishes_a_new_version_behind_the_alias_both_mappings_invoke(source, change, tmp_path):
    package = build(tmp_path)
    before, _ = deployed(parameters(KafkaSource=source), package)
    after, resources = deployed(parameters(KafkaSource=source, **change), package)
    assert after != before
    (alias,) = of_type(resources, "AWS::Lambda::Alias").values()
    assert alias["Properties"]["FunctionVersion"] == f"<{after}.Version>"
    (alias_id,) = of_type(resources, "AWS::Lambda::Alias")
    mappings = of_type(resources, "AWS::Lambda::EventSourceMapping")
    assert len(mappings) == 2  # the Kafka mapping and the trailing queue's
    assert {m["Properties"]["FunctionName"] for m in mappings.values()} == {f"<{alias_id}>"}


@pytest.mark.parametrize("source", list(SOURCES))
def test_same_build_and_parameters_publish_no_new_version(source, tmp_path):
    package = build(tmp_path)
    first, _ = deployed(parameters(KafkaSource=source), package)
    again, _ = deployed(parameters(KafkaSource=source, OffsetLagAlarmThreshold="5"), package)  # not the function's
    assert again == first


def test_code_change_publishes_a_new_version(tmp_path):
    before, _ = deployed(parameters(), build(tmp_path / "a"))
    after, _ = deployed(parameters(), build(tmp_path / "b", "VERSION = 2\n"))
    assert after != before


def test_without_the_digest_sam_publishes_nothing_for_a_parameter_only_change():
    # Why FunctionDigest exists (and why the template's rule refuses a deploy without it): SAM's own version name
    # hashes the code location and the properties unresolved. If SAM ever resolves them, this test says so.
    def version(**change: str) -> str:
        (name,) = of_type(translate(parameters(FunctionDigest="", **change)).resources(), "AWS::Lambda::Version")
        return name

    assert version() == version(RefreshEnabled="false") == version(DebounceMs="5000")


# -- item 15: docs/deploy.md section 7's procedure, step by step -------------------------------------------------
PROCEDURE = [
    ("deployed", {}),
    ("mapping removed", {"KafkaMappingEnabled": "false"}),
    ("mapping back with new values", {"KafkaTopic": "core.entities.v2", "StartingPosition": "TRIM_HORIZON"}),
]


@pytest.mark.parametrize("source", list(SOURCES))
def test_changing_a_fixed_setting_by_removing_and_adding_back_the_mapping(source):
    kafka_mappings = []
    for step, change in PROCEDURE:
        evaluator = translate(parameters(KafkaSource=source, **change))
        resources = evaluator.resources()
        outputs = evaluator.outputs()
        assert evaluator.problems == [], step
        assert evaluator.failed_rules() == [], step
        mappings = of_type(resources, "AWS::Lambda::EventSourceMapping")
        topics = {name: m["Properties"].get("Topics") for name, m in mappings.items()}
        kafka_mappings.append({name: t for name, t in topics.items() if t})
        assert "RefreshFunctionTrailing" in mappings, step  # the trailing queue keeps being consumed
        assert ("KafkaEventSourceMappingId" in outputs) == (step != "mapping removed")
    assert kafka_mappings == [
        {"RefreshFunctionKafka": ["core.entities.lifecycle.mutated"]},
        {},
        {"RefreshFunctionKafka": ["core.entities.v2"]},
    ]


# -- item 16 -------------------------------------------------------------------------------------------------------
KMS_KEY = "arn:aws:kms:eu-west-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_self_managed_secret_under_a_customer_managed_key_can_be_decrypted_via_secrets_manager_only():
    values = parameters(KafkaSource="self-managed", KafkaAuthSecretKmsKeyArn=KMS_KEY)
    statements = role_policies(translate(values))["self-managed-kafka-credentials"]
    (decrypt,) = [s for s in statements if s["Action"] == "kms:Decrypt"]
    assert decrypt["Resource"] == KMS_KEY
    assert decrypt["Condition"] == {"StringEquals": {"kms:ViaService": "secretsmanager.eu-west-1.amazonaws.com"}}
    without = role_policies(translate(parameters(KafkaSource="self-managed")))["self-managed-kafka-credentials"]
    assert [s["Sid"] for s in without] == ["KafkaAuthSecret"]


def test_dead_letter_topic_equal_to_the_source_topic_is_refused_by_a_rule():
    topic = {"DeadLetterTopic": "core.entities.lifecycle.mutated"}
    assert [r for r in translate(parameters(**topic)).failed_rules() if r.startswith("DeadLetterTopicIsNotTheSource")]
    assert translate(parameters(DeadLetterTarget="s3", **topic)).failed_rules() == []


def test_max_selectors_reaches_the_function():
    resources = translate(parameters(CubeMaxSelectors="7")).resources()
    variables = resources["RefreshFunction"]["Properties"]["Environment"]["Variables"]
    assert variables["CUBE_PREAGG_MAX_SELECTORS"] == "7"


def test_deploy_without_a_function_digest_is_refused_by_a_rule():
    failed = translate(parameters(FunctionDigest="")).failed_rules()
    assert [r for r in failed if "make deploy" in r]


# -- the checks above can fail -------------------------------------------------------------------------------------
MINI = """
Parameters:
  Arn: {Type: String, Default: ""}
  Enabled: {Type: String, Default: "false"}
Conditions:
  HasArn: !Not [!Equals [!Ref Arn, ""]]
  IsOn: !Equals [!Ref Enabled, "true"]
Resources:
  Topic:
    Type: AWS::SNS::Topic
    Condition: IsOn
  Queue:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: !If [HasArn, !Select [1, !Split [":cluster/", !Ref Arn]], plain]
      Tags: [{Key: topic, Value: !Ref Topic}]
"""


def test_evaluator_reports_a_select_in_an_untaken_branch_and_a_reference_to_a_removed_resource():
    evaluator = Evaluator(yaml_parse(MINI))
    evaluator.resources()
    assert evaluator.problems == ["Queue: Ref Topic: the resource's condition is false"]
    assert evaluator.unsafe_selects() == ["Queue: Fn::Select cannot select index 1 of ['']"]


def test_msk_read_policy_names_the_topic_and_group_arns_derived_from_the_cluster():
    statements = {s["Sid"]: s for s in role_policies(translate(parameters()))["msk-source"]}
    prefix = "arn:aws:kafka:eu-west-1:111111111111"
    path = "core-events/0f1e2d3c-aaaa-bbbb-cccc-000000000000-1"
    assert statements["MskIamAuthTopic"]["Resource"] == f"{prefix}:topic/{path}/core.entities.lifecycle.mutated"
    assert statements["MskIamAuthGroup"]["Resource"] == f"{prefix}:group/{path}/preagg-refresh"
