"""The pre-deploy guard against changing Kafka mapping settings that are fixed at creation."""

import io
import json
from pathlib import Path

import yaml

from preagg_cli import predeploy

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = (
    "arn:aws:kafka:eu-west-1:111111111111:cluster/REPLACE-ME-dev-core-events/00000000-0000-0000-0000-000000000000-1"
)


class FakeCfn:
    def __init__(self, parameters=None, outputs=None):
        self.stack = None if parameters is None else {"Parameters": parameters, "Outputs": outputs or []}

    def describe_stacks(self, *, StackName):
        if self.stack is None:
            raise RuntimeError(f"An error occurred (ValidationError): Stack with id {StackName} does not exist")
        return {"Stacks": [self.stack]}


class FakeLambda:
    def __init__(self, mapping):
        self.mapping = mapping

    def get_event_source_mapping(self, *, UUID):
        return self.mapping


def params(**values):
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in values.items()]


DEPLOYED = params(
    KafkaTopic="core.entities.lifecycle.mutated",
    StartingPosition="LATEST",
    ConsumerGroupId="preagg-refresh-dev",
    MskClusterArn=CLUSTER,
)
MAPPING = {
    "Topics": ["core.entities.lifecycle.mutated"],
    "StartingPosition": "LATEST",
    "AmazonManagedKafkaEventSourceConfig": {"ConsumerGroupId": "preagg-refresh-dev"},
    "EventSourceArn": CLUSTER,
}
OUTPUTS = [{"OutputKey": "KafkaEventSourceMappingId", "OutputValue": "uuid-1"}]


def run(argv, cfn, lam):
    out = io.StringIO()
    argv = ["--config-file", str(ROOT / "samconfig.toml"), "--template", str(ROOT / "template.yaml"), *argv]
    code = predeploy.main(argv, cfn=cfn, lam=lam, out=out)
    return code, out.getvalue()


def test_predeploy_unchanged_settings_pass():
    code, out = run(["--config-env", "dev"], FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(MAPPING))
    assert code == 0, out
    assert "no setting fixed at creation changes" in out


def test_predeploy_first_deploy_passes():
    code, _ = run(["--config-env", "dev"], FakeCfn(None), FakeLambda(MAPPING))
    assert code == 0


def test_predeploy_changed_topic_fails_naming_the_procedure():
    code, out = run(["--config-env", "dev", "KafkaTopic=other.topic"], FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(MAPPING))
    assert code == 1
    (line,) = out.splitlines()
    assert "KafkaTopic: the stack has 'core.entities.lifecycle.mutated', this deploy sets 'other.topic'" in line
    assert "docs/deploy.md section 7" in line


def test_predeploy_changed_group_and_position_each_reported():
    code, out = run(
        ["--config-env", "dev", "ConsumerGroupId=new-group", "StartingPosition=TRIM_HORIZON"],
        FakeCfn(DEPLOYED, OUTPUTS),
        FakeLambda(MAPPING),
    )
    assert code == 1
    assert [line.split(": ")[2] for line in out.splitlines()] == ["StartingPosition", "ConsumerGroupId"]


def test_predeploy_mapping_that_kept_an_old_topic_fails():
    # A topic change an earlier deploy reported as done while the mapping kept its old topic.
    stale = {**MAPPING, "Topics": ["old.topic"]}
    code, out = run(["--config-env", "dev"], FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(stale))
    assert code == 1
    assert "KafkaTopic: the mapping uuid-1 has 'old.topic'" in out


def test_predeploy_unknown_environment_is_a_usage_error():
    code, out = run(["--config-env", "nope"], FakeCfn(DEPLOYED), FakeLambda(MAPPING))
    assert code == 2
    assert "[nope.deploy.parameters]" in out


# -- parameter combinations no template constraint can refuse (issue 19, item 16) --------------------------------
def test_predeploy_minimum_pollers_above_maximum_refused_before_any_aws_call():
    code, out = run(["--config-env", "dev", "MinimumPollers=5", "MaximumPollers=2"], None, None)
    assert code == 1
    assert "MinimumPollers=5 is above MaximumPollers=2" in out


def test_predeploy_dead_letter_topic_equal_to_source_refused_by_the_templates_rule():
    topic = "core.entities.lifecycle.mutated"
    code, out = run(["--config-env", "dev", f"DeadLetterTopic={topic}"], None, None)
    assert code == 1
    assert "DeadLetterTopicIsNotTheSource" in out


def test_predeploy_dead_letter_topic_rule_applies_only_to_a_kafka_target():
    topic = "core.entities.lifecycle.mutated"
    code, out = run(
        ["--config-env", "dev", f"DeadLetterTopic={topic}", "DeadLetterTarget=s3"], FakeCfn(None), FakeLambda(MAPPING)
    )
    assert code == 0, out


def test_predeploy_given_function_digest_is_ignored_and_computed_instead(tmp_path):
    calls = []
    argv = deploy_argv(tmp_path, "FunctionDigest=" + "a" * 64)
    code, out = run_deploy(argv, FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(MAPPING), calls)
    assert code == 0
    assert "FunctionDigest given is ignored" in out
    sent = json.loads(Path(calls[0][calls[0].index("--parameter-overrides") + 1].removeprefix("file://")).read_text())
    assert sent["FunctionDigest"] != "a" * 64


# -- docs/deploy.md section 7's procedure (issue 19, item 15) ---------------------------------------------------
def test_predeploy_procedure_step_removing_the_mapping_passes_whatever_else_changes():
    code, out = run(
        ["--config-env", "dev", "KafkaMappingEnabled=false", "KafkaTopic=core.entities.v2"],
        FakeCfn(DEPLOYED, OUTPUTS),
        FakeLambda(MAPPING),
    )
    assert code == 0, out


def test_predeploy_procedure_step_adding_the_mapping_back_with_a_new_topic_passes():
    without_mapping = [*DEPLOYED, *params(KafkaMappingEnabled="false")]
    code, out = run(
        ["--config-env", "dev", "KafkaMappingEnabled=true", "KafkaTopic=core.entities.v2"],
        FakeCfn(without_mapping, []),
        FakeLambda(MAPPING),
    )
    assert code == 0, out


def test_predeploy_changed_topic_names_the_mapping_parameter_in_the_procedure():
    code, out = run(
        ["--config-env", "dev", "KafkaTopic=core.entities.v2"], FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(MAPPING)
    )
    assert code == 1
    assert "KafkaMappingEnabled=false" in out


# -- the function digest and `make deploy` (issue 19, item 14) --------------------------------------------------
def package(tmp_path, body="print('v1')\n"):
    root = tmp_path / "build" / "RefreshFunction"
    (root / "handler").mkdir(parents=True, exist_ok=True)
    (root / "handler" / "app.py").write_text(body)
    return root


def template():
    return predeploy.load_template(ROOT / "template.yaml")


def test_function_parameters_are_what_a_published_version_freezes():
    frozen = predeploy.function_parameters(template(), "RefreshFunction")
    expected = {
        "RefreshEnabled", "DebounceMs", "CubeTimeoutMs", "CubeRetryAttempts", "CubeApiUrl", "CubeApiSecretArn",
        "BuildTimeoutMs", "EntityCubeMap", "CubeTimezones", "CubeMaxSelectors", "SnapStart", "SubnetIds",
        "SecurityGroupIds", "FunctionTimeoutSeconds", "FunctionMemoryMb", "LogLevel", "TracingEnabled",
    }  # fmt: skip
    assert expected <= frozen
    # Mapping, alarm and role settings are not part of a version; the digest itself must not feed itself.
    assert not frozen & {"FunctionDigest", "KafkaTopic", "OffsetLagAlarmThreshold", "KafkaSource", "DeadLetterTarget"}


def test_function_digest_changes_with_every_frozen_parameter_and_nothing_else(tmp_path):
    tpl, pkg = template(), package(tmp_path)
    base = {"CubeApiUrl": "https://cube.example/cubejs-api", "CubeApiSecretArn": "arn:x"}
    digest = predeploy.function_digest(tpl, base, pkg)
    assert digest == predeploy.function_digest(tpl, dict(base), pkg)
    for name, value in {
        "RefreshEnabled": "false", "DebounceMs": "5000", "FunctionMemoryMb": "1024", "SnapStart": "on",
        "CubeApiUrl": "https://other.example/cubejs-api", "SubnetIds": "subnet-1,subnet-2", "CubeMaxSelectors": "3",
    }.items():  # fmt: skip
        assert predeploy.function_digest(tpl, {**base, name: value}, pkg) != digest, name
    assert predeploy.function_digest(tpl, {**base, "OffsetLagAlarmThreshold": "5"}, pkg) == digest
    assert predeploy.function_digest(tpl, base, package(tmp_path, "print('v2')\n")) != digest


def test_make_deploy_passes_every_parameter_and_the_digest_to_sam(tmp_path):
    pkg, calls = package(tmp_path), []
    argv = ["--config-env", "dev", "--deploy", "--build-dir", str(pkg.parent), "--sam", "sam", "DebounceMs=5000"]
    code, out = run_deploy(argv, FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(MAPPING), calls)
    assert code == 0, out
    (command,) = calls
    assert command[:2] == ["sam", "deploy"]
    assert command[command.index("--config-env") + 1] == "dev"
    sent = json.loads(Path(command[command.index("--parameter-overrides") + 1].removeprefix("file://")).read_text())
    assert sent["DebounceMs"] == "5000"
    assert sent["MskClusterArn"] == CLUSTER
    config = predeploy.read_config(ROOT / "samconfig.toml", "dev", ["DebounceMs=5000"])
    assert sent["FunctionDigest"] == predeploy.function_digest(template(), config.parameters, pkg)


def test_make_deploy_without_a_build_says_to_build_first(tmp_path):
    calls = []
    argv = ["--config-env", "dev", "--deploy", "--build-dir", str(tmp_path / "nothing")]
    code, out = run_deploy(argv, FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(MAPPING), calls)
    assert code == 2
    assert "run `sam build` first" in out
    assert calls == []


def test_make_deploy_refused_by_a_check_runs_nothing(tmp_path):
    calls = []
    argv = ["--config-env", "dev", "--deploy", "--build-dir", str(package(tmp_path).parent), "KafkaTopic=other"]
    code, _ = run_deploy(argv, FakeCfn(DEPLOYED, OUTPUTS), FakeLambda(MAPPING), calls)
    assert code == 1
    assert calls == []


def deploy_argv(tmp_path, *overrides):
    return ["--config-env", "dev", "--deploy", "--build-dir", str(package(tmp_path).parent), *overrides]


def run_deploy(argv, cfn, lam, calls):
    out = io.StringIO()

    def fake_sam(command):
        calls.append(list(command))
        return 0

    code = predeploy.main(
        ["--config-file", str(ROOT / "samconfig.toml"), "--template", str(ROOT / "template.yaml"), *argv],
        cfn=cfn,
        lam=lam,
        out=out,
        run=fake_sam,
    )
    return code, out.getvalue()


def test_make_deploy_parameter_file_is_yaml_sam_reads_back_as_strings(tmp_path):
    # SAM CLI reads `file://` overrides as YAML or TOML (observed with SAM CLI 1.170: a .json file is refused
    # with "uses an unsupported extension"); values with quotes and spaces must come back unchanged.
    calls = []
    cube_map = '{"User": ["Users", "Users.main"]}'
    argv = deploy_argv(tmp_path, f"EntityCubeMap={cube_map}")
    assert run_deploy(argv, FakeCfn(None), FakeLambda(MAPPING), calls)[0] == 0
    path = Path(calls[0][calls[0].index("--parameter-overrides") + 1].removeprefix("file://"))
    assert path.suffix == ".yaml"
    read = yaml.safe_load(path.read_text())
    assert read["EntityCubeMap"] == cube_map
    assert read["MaximumRetryAttempts"] == "10"  # a string, not the number 10
    assert all(isinstance(v, str) for v in read.values())
