"""Parameter checks that `sam validate` does not do (run by scripts/check-template.sh with .venv-sam's
Python, which has samtranslator to read the template's short-form tags).

1. Every parameter_overrides entry in samconfig.toml names a template parameter and satisfies its
   AllowedValues / AllowedPattern / MinValue / MaxValue, and every parameter's Default satisfies them.
2. The template's constraints agree with the ranges AWS documents for the properties they feed: each
   probe value must be accepted by the template exactly when AWS accepts it. A parameter that lets
   through a value Lambda rejects fails at deploy time, after a change set was created; one that
   rejects a value Lambda accepts hides a real option.
3. The trailing queue's settings per function timeout follow AWS's guidance for SQS event sources:
   visibility timeout >= 6 x function timeout, maxReceiveCount >= 5.
4. Every samconfig.toml environment passes what `make deploy` checks before deploying (the template's
   Rules, MinimumPollers <= MaximumPollers; preagg_cli.predeploy) and sets no FunctionDigest, which
   `make deploy` computes for every deploy.

Usage: PYTHONPATH=src:. python scripts/check_parameters.py template.yaml samconfig.toml
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from samtranslator.yaml_helper import yaml_parse

from preagg_cli.predeploy import ConfigError, parameter_problems, read_config


def violations(spec: dict[str, Any], value: str) -> list[str]:
    """Why CloudFormation would reject `value` for a parameter declared as `spec` (empty: accepted)."""
    values = value.split(",") if spec["Type"] == "CommaDelimitedList" else [value]
    found = []
    for v in values:
        if "AllowedValues" in spec and v not in [str(a) for a in spec["AllowedValues"]]:
            found.append(f"not in {spec['AllowedValues']}")
        if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], v):
            found.append(f"does not match {spec['AllowedPattern']}")
        if spec["Type"] == "Number":
            try:
                n = float(v)
            except ValueError:
                found.append("not a number")
                continue
            if "MinValue" in spec and n < float(spec["MinValue"]):
                found.append(f"below {spec['MinValue']}")
            if "MaxValue" in spec and n > float(spec["MaxValue"]):
                found.append(f"above {spec['MaxValue']}")
    return found


def between(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda v: re.fullmatch(r"-?[0-9]+", v) is not None and lo <= int(v) <= hi


def edges(lo: int, hi: int) -> list[str]:
    return [str(n) for n in (lo - 1, lo, lo + 1, hi - 1, hi, hi + 1)]


# The topic part of Lambda's OnFailure destination pattern kafka://([^.]([a-zA-Z0-9\-_.]{0,248})) and
# Kafka's own topic characters.
_TOPIC = re.compile(r"[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,248}")
_TOPIC_PROBES = ["t", "core.entities.lifecycle.mutated.dlt", "a" * 249, "a" * 250, ".hidden", "", "has space", "x/y"]
# A secret's full ARN ends in -<6 characters> (Secrets Manager docs: "Secret ARN"); the IAM statement
# that grants GetSecretValue on a partial ARN matches no secret.
_SECRET = re.compile(r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+-[A-Za-z0-9]{6}")
_SECRET_PROBES = [
    "arn:aws:secretsmanager:eu-west-1:111111111111:secret:prod/cube-api-secret-AbCdEf",
    "arn:aws:secretsmanager:eu-west-1:111111111111:secret:prod/cube-api-secret",
    "arn:aws:secretsmanager:eu-west-1:111111111111:secret:x",
    "arn:aws:secretsmanager:eu-west-1:1111:secret:name-AbCdEf",
]

# parameter -> (what AWS accepts, probe values, source)
AWS_RANGES: dict[str, tuple[Callable[[str], bool], list[str], str]] = {
    "BatchSize": (between(1, 10000), edges(1, 10000), "1..10000 (Lambda docs: msk-esm-parameters)"),
    "MaximumBatchingWindowInSeconds": (between(0, 300), edges(0, 300), "0..300 (Lambda API: MaximumBatchingWindowInSeconds)"),
    "MinimumPollers": (between(1, 200), edges(1, 200), "1..200 (Lambda API: ProvisionedPollerConfig)"),
    "MaximumPollers": (between(1, 2000), edges(1, 2000), "1..2000 (Lambda API: ProvisionedPollerConfig)"),
    "MaximumRetryAttempts": (between(-1, 10000), edges(-1, 10000), "-1..10000 (Lambda docs: kafka-retry-configurations)"),
    "MaximumRecordAgeInSeconds": (
        lambda v: v == "-1" or between(60, 604800)(v),
        ["-2", "-1", "0", "1", "59", "60", "61", "86400", "604799", "604800", "604801"],
        "-1 or 60..604800 (Lambda docs: kafka-retry-configurations)",
    ),
    "FunctionMemoryMb": (between(128, 10240), edges(128, 10240), "128..10240 MB (Lambda docs: configuration-memory)"),
    "KafkaTopic": (lambda v: _TOPIC.fullmatch(v) is not None, _TOPIC_PROBES, "Kafka topic names (Lambda API: Topics)"),
    "DeadLetterTopic": (lambda v: _TOPIC.fullmatch(v) is not None, _TOPIC_PROBES, "the kafka:// destination pattern (Lambda API: OnFailure)"),
    "CubeApiSecretArn": (lambda v: _SECRET.fullmatch(v) is not None, _SECRET_PROBES, "full secret ARNs, which the IAM statement needs"),
}


def check_overrides(params: dict[str, Any], config: dict[str, Any]) -> tuple[int, list[str]]:
    errors, checked = [], 0
    for env, commands in config.items():
        if not isinstance(commands, dict):
            continue
        overrides = commands.get("deploy", {}).get("parameters", {}).get("parameter_overrides", [])
        if isinstance(overrides, str):
            overrides = re.findall(r'(\S+?=(?:"[^"]*"|\S+))', overrides)
        for item in overrides:
            name, _, value = item.partition("=")
            checked += 1
            spec = params.get(name)
            if spec is None:
                errors.append(f"[{env}] {name}: not a template parameter")
                continue
            errors += [f"[{env}] {name}={value.strip(chr(34))}: {why}" for why in violations(spec, value.strip('"'))]
        for name, spec in params.items():
            if overrides and "Default" not in spec and not any(o.startswith(name + "=") for o in overrides):
                errors.append(f"[{env}] required parameter {name} has no override")
    return checked, errors


def check_defaults(params: dict[str, Any]) -> list[str]:
    return [
        f"{name}: Default {spec['Default']!r} {why}"
        for name, spec in params.items()
        if "Default" in spec and str(spec["Default"]) != ""
        for why in violations(spec, str(spec["Default"]))
    ]


def check_aws_ranges(params: dict[str, Any]) -> tuple[int, list[str]]:
    errors, probes = [], 0
    for name, (aws_accepts, values, source) in AWS_RANGES.items():
        spec = params.get(name)
        if spec is None:
            errors.append(f"{name}: missing from the template (expected by this check)")
            continue
        for value in values:
            probes += 1
            template_accepts = not violations(spec, value)
            if template_accepts and not aws_accepts(value):
                errors.append(f"{name}={value!r}: the template accepts it, but it is outside {source}")
            elif aws_accepts(value) and not template_accepts:
                errors.append(f"{name}={value!r}: the template rejects it, but it is within {source}")
    return probes, errors


def check_trailing_queue(template: dict[str, Any]) -> list[str]:
    errors = []
    rows: Iterable[tuple[str, dict[str, Any]]] = template["Mappings"]["TimeoutSettings"].items()
    for timeout, row in rows:
        if int(row["VisibilityTimeout"]) < 6 * int(timeout):
            errors.append(f"TimeoutSettings[{timeout}]: VisibilityTimeout {row['VisibilityTimeout']} < 6 x {timeout}")
        if int(row["MaxReceiveCount"]) < 5:
            errors.append(f"TimeoutSettings[{timeout}]: MaxReceiveCount {row['MaxReceiveCount']} < 5")
    allowed = {str(v) for v in template["Parameters"]["FunctionTimeoutSeconds"]["AllowedValues"]}
    if missing := allowed - set(template["Mappings"]["TimeoutSettings"]):
        errors.append(f"TimeoutSettings has no row for FunctionTimeoutSeconds {sorted(missing)}")
    return errors


def check_environments(template: dict[str, Any], config_path: str, config: dict[str, Any]) -> list[str]:
    errors = []
    for env, commands in config.items():
        # Only the environments that set parameters ([dev], [prod]); [default] holds shared CLI settings.
        if not isinstance(commands, dict) or "parameter_overrides" not in commands.get("deploy", {}).get("parameters", {}):
            continue
        try:
            deploy = read_config(Path(config_path), env)
        except ConfigError as exc:
            errors.append(f"[{env}] {exc}")
            continue
        if "FunctionDigest" in deploy.parameters:
            errors.append(f"[{env}] FunctionDigest: computed by `make deploy` for every deploy, never set in samconfig.toml")
        errors += [f"[{env}] {line}" for line in parameter_problems(deploy, template)]
    return errors


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        template = yaml_parse(f.read())
    with open(argv[2], "rb") as f:
        config = tomllib.load(f)
    params = template["Parameters"]
    checked, errors = check_overrides(params, config)
    errors += check_defaults(params)
    probes, range_errors = check_aws_ranges(params)
    errors += range_errors + check_trailing_queue(template) + check_environments(template, argv[2], config)
    print(f"{checked} samconfig overrides, {len(params)} defaults, {probes} AWS range probes checked")
    if errors:
        print("\n".join(f"FAIL: {e}" for e in errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
