"""The pre-deploy guard against changing Kafka mapping settings that are fixed at creation."""

import io
from pathlib import Path

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
    code = predeploy.main(["--config-file", str(ROOT / "samconfig.toml"), *argv], cfn=cfn, lam=lam, out=out)
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
