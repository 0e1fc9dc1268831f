"""Pre-deploy checks and `make deploy`: refuse what CloudFormation or Lambda would refuse late, then deploy
with the function digest.

    python -m preagg_cli.predeploy --config-env prod [Name=Value ...]            # the checks only
    python -m preagg_cli.predeploy --config-env prod --deploy [Name=Value ...]   # `make deploy ENV=prod`

reads the environment's stack name, region and parameter_overrides from samconfig.toml (plus any
`Name=Value` given, as for `sam deploy --parameter-overrides`; template defaults for the rest), then:

1. Parameter combinations no template constraint can refuse: `MinimumPollers` above `MaximumPollers`
   (Lambda refuses the mapping only during the deploy, which then rolls back), and the `Rules` of
   template.yaml (e.g. a dead-letter topic equal to the source topic), evaluated here too.
2. Settings Lambda fixes at creation. `StartingPosition`, `Topics`, the consumer group and the cluster
   of a Kafka event source mapping can be set only on create (Lambda docs: msk-esm-parameters).
   Changed through CloudFormation, the update either fails with 409 (the replacement collides with the
   existing mapping) or reports success while the mapping keeps its old topic. The deploy's values are
   compared with the deployed stack's parameters and with the deployed mapping itself
   (`KafkaEventSourceMappingId` output), which also catches a topic change an earlier deploy "applied"
   without effect. A stack that does not exist yet, or has no mapping (`KafkaMappingEnabled=false`),
   or a deploy that removes the mapping, passes: that is docs/deploy.md section 7's procedure.
3. With `--deploy`: the function digest (`FunctionDigest`), SHA-256 of the built package
   (`sam build`'s output) and of the value of every parameter the function's published versions
   freeze (read from template.yaml: whatever the function's properties refer to). SAM names the
   published version after it (`AutoPublishCodeSha256`), so a parameter-only change publishes a new
   version and reaches the alias both mappings invoke. Then `sam deploy` with every parameter,
   through a parameter file (values may hold spaces and quotes).

Exit 0: safe (deployed with --deploy); 1: refused (one line per problem, naming the fix); 2: usage or
AWS error; with --deploy, otherwise `sam deploy`'s exit code.

What it does not catch: an edit of the Kafka mapping in template.yaml itself (a value written there
instead of a parameter), or parameters passed to `sam deploy` but not to this command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from preagg_cli.cfn import Evaluator, function_parameters

EXIT_OK, EXIT_CHANGED, EXIT_USAGE = 0, 1, 2
PROCEDURE = (
    "docs/deploy.md section 7 (deploy with KafkaMappingEnabled=false, then with the new value and"
    " KafkaMappingEnabled=true)"
)
FUNCTION = "RefreshFunction"
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


def load_template(path: Path) -> dict[str, Any]:
    from devstack.template import load_template as load  # noqa: PLC0415 - PyYAML with CloudFormation's tags

    try:
        return load(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc})") from None


def parameter_problems(config: DeployConfig, template: Mapping[str, Any]) -> list[str]:
    """What CloudFormation's parameter constraints cannot refuse: the template's Rules (CloudFormation
    checks them too, but only once the change set is created) and MinimumPollers <= MaximumPollers."""
    # FunctionDigest is not given yet: this command computes it (with --deploy) after these checks.
    evaluator = Evaluator(template, {**config.parameters, "FunctionDigest": "0" * 64})
    problems = [f"rule {line}" for line in evaluator.failed_rules()]
    low, high = evaluator.params.get("MinimumPollers"), evaluator.params.get("MaximumPollers")
    if low is not None and high is not None and int(low) > int(high):
        problems.append(
            f"MinimumPollers={low} is above MaximumPollers={high}: Lambda refuses the mapping during the deploy;"
            " lower MinimumPollers or raise MaximumPollers"
        )
    return problems


def changed_settings(config: DeployConfig, cfn: CloudFormation, lam: Lambda) -> list[str]:
    """One line per fixed setting the deploy would change; empty when the deploy is safe."""
    stack = _deployed_stack(cfn, config.stack)
    if stack is None:
        return []
    deployed = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    # No mapping now, or none after this deploy: nothing fixed at creation can collide (section 7's procedure).
    if deployed.get("KafkaMappingEnabled") == "false" or config.parameters.get("KafkaMappingEnabled") == "false":
        return []
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


def package_digest(package: Path) -> str:
    """SHA-256 over every file of the built function (its path and its bytes). The build is
    reproducible (src/Makefile), so the same tree gives the same digest."""
    if not package.is_dir():
        raise ConfigError(f"{package} does not exist: run `sam build` first (`make deploy` does)")
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def function_digest(template: Mapping[str, Any], parameters: Mapping[str, str], package: Path) -> str:
    """The FunctionDigest of a deploy: the package, and each parameter the function's versions freeze."""
    values = Evaluator(template, parameters).params
    digest = hashlib.sha256(b"package\0" + package_digest(package).encode())
    for name in sorted(function_parameters(template, FUNCTION)):
        value = values.get(name)
        text = ",".join(value) if isinstance(value, list) else "" if value is None else value
        digest.update(f"\0{name}={text}".encode())
    return digest.hexdigest()


Runner = Callable[[Sequence[str]], int]


def _run(command: Sequence[str]) -> int:
    return subprocess.run(command, check=False).returncode  # noqa: S603 - our own sam, fixed arguments


def deploy(config: DeployConfig, env: str, args: argparse.Namespace, template: Mapping[str, Any], run: Runner) -> int:
    """`sam deploy` of `env` with every parameter of this deploy plus FunctionDigest."""
    parameters = dict(config.parameters)
    parameters["FunctionDigest"] = function_digest(template, parameters, args.build_dir / FUNCTION)
    # SAM CLI reads `file://` parameter files as YAML or TOML only (its JSON reader is disabled); JSON is
    # YAML, and json.dumps quotes every value, so each stays the string it is.
    path = args.build_dir.parent / f"deploy-{env}-parameters.yaml"
    path.write_text(json.dumps(parameters, indent=2) + "\n", encoding="utf-8")
    command = [args.sam, "deploy", "--config-file", str(args.config_file.resolve()), "--config-env", env]
    command += ["--parameter-overrides", f"file://{path.resolve()}"]
    command += ["--guided"] if args.guided else []
    return run(command)


def main(
    argv: Sequence[str] | None = None,
    *,
    cfn: Any = None,
    lam: Any = None,
    out: TextIO | None = None,
    run: Runner = _run,
) -> int:
    parser = argparse.ArgumentParser(prog="python -m preagg_cli.predeploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-env", required=True, help="samconfig.toml environment, e.g. dev or prod")
    parser.add_argument("--config-file", default="samconfig.toml", type=Path)
    parser.add_argument("--template", default="template.yaml", type=Path)
    parser.add_argument("--deploy", action="store_true", help="after the checks, run sam deploy with FunctionDigest")
    parser.add_argument("--guided", action="store_true", help="with --deploy: sam deploy --guided")
    parser.add_argument("--build-dir", default=Path(".aws-sam/build"), type=Path, help="sam build's output")
    parser.add_argument("--sam", default=".venv-sam/bin/sam", help="the SAM CLI to deploy with")
    parser.add_argument("overrides", nargs="*", metavar="Name=Value", help="extra parameter overrides")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        config = read_config(args.config_file, args.config_env, args.overrides)
        if config.parameters.pop("FunctionDigest", None) is not None:  # e.g. saved by `sam deploy --guided`
            print("predeploy: FunctionDigest given is ignored: it is computed for every deploy", file=out)
        template = load_template(args.template)
    except ConfigError as exc:
        print(f"predeploy: {exc}", file=out)
        return EXIT_USAGE
    invalid = parameter_problems(config, template)
    for line in invalid:
        print(f"predeploy: {config.stack}: {line}", file=out)
    if invalid:
        return EXIT_CHANGED
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
    if problems:
        return EXIT_CHANGED
    print(f"predeploy: {config.stack}: no setting fixed at creation changes", file=out)
    if not args.deploy:
        return EXIT_OK
    try:
        return deploy(config, args.config_env, args, template, run)
    except ConfigError as exc:
        print(f"predeploy: {exc}", file=out)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
