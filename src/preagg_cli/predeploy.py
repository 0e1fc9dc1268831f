"""Pre-deploy guard: refuse a deploy that would change a Kafka mapping setting Lambda fixes at creation.

`StartingPosition`, `Topics`, the consumer group and the cluster of a Kafka event source mapping can
be set only on create (Lambda docs: msk-esm-parameters). Changed through CloudFormation, the update
either fails with 409 (the replacement collides with the existing mapping) or reports success while
the mapping keeps its old topic. docs/deploy.md section 7 has the procedure that works.

    python -m preagg_cli.predeploy --config-env prod [Name=Value ...]

reads the environment's stack name, region and parameter_overrides from samconfig.toml (plus any
`Name=Value` given, as for `sam deploy --parameter-overrides`), then compares them with
1. the deployed stack's parameters, and
2. the deployed mapping itself (`KafkaEventSourceMappingId` output): its topics, starting position,
   consumer group and cluster, which also catches a topic change an earlier deploy "applied" without
   effect.
A stack that does not exist yet passes (first deploy). Exit 0: safe; 1: a fixed setting would change
(one line per setting, naming the procedure); 2: usage or AWS error.

What it does not catch: an edit of the Kafka event in template.yaml itself (a value written there
instead of a parameter), or parameters passed to `sam deploy` but not to this command.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

EXIT_OK, EXIT_CHANGED, EXIT_USAGE = 0, 1, 2
PROCEDURE = "docs/deploy.md section 7 (remove the Kafka event, deploy, add it back, deploy)"
# template parameter -> how to read the same setting from get_event_source_mapping's answer
FIXED_PARAMETERS = ("KafkaSource", "KafkaTopic", "StartingPosition", "ConsumerGroupId", "MskClusterArn")


class CloudFormation(Protocol):
    def describe_stacks(self, *, StackName: str) -> Mapping[str, Any]: ...


class Lambda(Protocol):
    def get_event_source_mapping(self, *, UUID: str) -> Mapping[str, Any]: ...


class ConfigError(Exception):
    """samconfig.toml or the overrides cannot be used: exit 2 with the message."""


@dataclass(frozen=True)
class DeployConfig:
    stack: str
    region: str | None
    parameters: dict[str, str]


def read_config(path: Path, env: str, extra: Sequence[str] = ()) -> DeployConfig:
    """The deploy settings of `env` in samconfig.toml, with `Name=Value` overrides applied."""
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc})") from None
    deploy = config.get(env, {}).get("deploy", {}).get("parameters")
    if not isinstance(deploy, dict) or "stack_name" not in deploy:
        raise ConfigError(f"{path} has no [{env}.deploy.parameters] with a stack_name: pass an existing --config-env")
    overrides = deploy.get("parameter_overrides", [])
    if isinstance(overrides, str):
        overrides = overrides.split()
    parameters = {}
    for item in [*overrides, *extra]:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"parameter override {item!r} is not Name=Value")
        parameters[name] = value.strip('"')
    return DeployConfig(str(deploy["stack_name"]), deploy.get("region"), parameters)


def _deployed_stack(cfn: CloudFormation, stack: str) -> Mapping[str, Any] | None:
    try:
        stacks = cfn.describe_stacks(StackName=stack)["Stacks"]
    except Exception as exc:  # botocore ClientError; the fake in tests raises its own
        if "does not exist" in str(exc):
            return None
        raise
    return stacks[0] if stacks else None


def _mapping_settings(mapping: Mapping[str, Any]) -> dict[str, str]:
    """The fixed settings of a deployed mapping, under the template's parameter names."""
    group = (
        mapping.get("AmazonManagedKafkaEventSourceConfig") or mapping.get("SelfManagedKafkaEventSourceConfig") or {}
    ).get("ConsumerGroupId")
    found = {
        "KafkaTopic": ",".join(mapping.get("Topics", [])),
        "StartingPosition": mapping.get("StartingPosition"),
        "ConsumerGroupId": group,
        "MskClusterArn": mapping.get("EventSourceArn"),
    }
    return {k: str(v) for k, v in found.items() if v}


def changed_settings(config: DeployConfig, cfn: CloudFormation, lam: Lambda) -> list[str]:
    """One line per fixed setting the deploy would change; empty when the deploy is safe."""
    stack = _deployed_stack(cfn, config.stack)
    if stack is None:
        return []
    deployed = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    problems = []
    for name in FIXED_PARAMETERS:
        want, have = config.parameters.get(name), deployed.get(name)
        if want is not None and have is not None and want != have:
            problems.append(f"{name}: the stack has {have!r}, this deploy sets {want!r}")
    mapping_id = outputs.get("KafkaEventSourceMappingId")
    if mapping_id:
        actual = _mapping_settings(lam.get_event_source_mapping(UUID=mapping_id))
        for name, have in actual.items():
            want = config.parameters.get(name, deployed.get(name))
            if want is not None and want != have and not any(p.startswith(name + ":") for p in problems):
                problems.append(f"{name}: the mapping {mapping_id} has {have!r}, this deploy sets {want!r}")
    return [f"{p}; it is fixed at creation, see {PROCEDURE}" for p in problems]


def main(argv: Sequence[str] | None = None, *, cfn: Any = None, lam: Any = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preagg_cli.predeploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-env", required=True, help="samconfig.toml environment, e.g. dev or prod")
    parser.add_argument("--config-file", default="samconfig.toml", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="Name=Value", help="extra parameter overrides")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        config = read_config(args.config_file, args.config_env, args.overrides)
    except ConfigError as exc:
        print(f"predeploy: {exc}", file=out)
        return EXIT_USAGE
    if cfn is None or lam is None:
        import boto3  # noqa: PLC0415 - only this command needs it

        session = boto3.session.Session(region_name=config.region)
        cfn = cfn or session.client("cloudformation")
        lam = lam or session.client("lambda")
    try:
        problems = changed_settings(config, cfn, lam)
    except Exception as exc:  # an AWS error: one line, not a traceback
        print(f"predeploy: cannot read stack {config.stack} ({exc}); check credentials and region", file=out)
        return EXIT_USAGE
    for line in problems:
        print(f"predeploy: {config.stack}: {line}", file=out)
    if not problems:
        print(f"predeploy: {config.stack}: no setting fixed at creation changes", file=out)
    return EXIT_CHANGED if problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
