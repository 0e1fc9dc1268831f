"""Read the debounce table's key schema from the SAM template, so the local table cannot drift
from the deployed one. Falls back to the contract in docs/architecture.md when the template (or the
table resource) is absent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml  # type: ignore[import-untyped,unused-ignore]  # no types-PyYAML in the venv

DEBOUNCE_RESOURCE = "DebounceTable"
_TABLE_TYPE = "AWS::DynamoDB::Table"


def _cfn_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    """`!Ref X` -> {"Ref": X}, `!GetAtt A.B` -> {"Fn::GetAtt": "A.B"}, `!Sub ...` -> {"Fn::Sub": ...}."""
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(cast(yaml.MappingNode, node), deep=True)
    name = tag_suffix.lstrip("!")
    return {name if name == "Ref" else f"Fn::{name}": value}


# A SafeLoader that keeps CloudFormation short-form tags as their long-form dicts.
CfnLoader: type[yaml.SafeLoader] = type("CfnLoader", (yaml.SafeLoader,), {})
CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_template(path: Path) -> dict[str, Any]:
    with path.open() as stream:
        data = yaml.load(stream, Loader=CfnLoader)  # noqa: S506 - CfnLoader is a SafeLoader
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a CloudFormation template")
    return data


@dataclass(frozen=True)
class TableSpec:
    """The CreateTable arguments that matter locally (billing is always on-demand here)."""

    key_schema: list[dict[str, str]]
    attribute_definitions: list[dict[str, str]]
    global_secondary_indexes: list[dict[str, Any]] = field(default_factory=list)
    ttl_attribute: str | None = None
    source: str = "docs/architecture.md"


FALLBACK_SPEC = TableSpec(
    key_schema=[{"AttributeName": "pk", "KeyType": "HASH"}],
    attribute_definitions=[{"AttributeName": "pk", "AttributeType": "S"}],
    ttl_attribute="expiresAt",
)


def _literal(value: Any, where: str) -> Any:
    """Key schemas must be literal: an intrinsic (a dict like {"Ref": ...}) cannot be resolved here."""
    if isinstance(value, dict):
        (first,) = value if len(value) == 1 else ("",)
        if first in ("Ref", "Condition") or first.startswith("Fn::"):
            raise ValueError(f"template.yaml {where}: intrinsic functions are not supported in key schemas")
        return {key: _literal(item, where) for key, item in value.items()}
    if isinstance(value, list):
        return [_literal(item, where) for item in value]
    return value


def debounce_table_spec(template_path: Path) -> TableSpec:
    if not template_path.is_file():
        return FALLBACK_SPEC
    resources = load_template(template_path).get("Resources") or {}
    resource = resources.get(DEBOUNCE_RESOURCE)
    if not isinstance(resource, dict) or resource.get("Type") != _TABLE_TYPE:
        tables = [r for r in resources.values() if isinstance(r, dict) and r.get("Type") == _TABLE_TYPE]
        if len(tables) != 1:
            return FALLBACK_SPEC
        resource = tables[0]
    props = resource.get("Properties") or {}
    if "KeySchema" not in props or "AttributeDefinitions" not in props:
        return FALLBACK_SPEC
    gsis = [
        {
            "IndexName": _literal(gsi["IndexName"], "IndexName"),
            "KeySchema": _literal(gsi["KeySchema"], "GlobalSecondaryIndexes.KeySchema"),
            "Projection": _literal(gsi.get("Projection") or {"ProjectionType": "ALL"}, "Projection"),
        }
        for gsi in props.get("GlobalSecondaryIndexes") or []
    ]
    ttl = props.get("TimeToLiveSpecification") or {}
    ttl_attribute = ttl.get("AttributeName") if ttl.get("Enabled") in (True, "true", "True") else None
    return TableSpec(
        key_schema=_literal(props["KeySchema"], "KeySchema"),
        attribute_definitions=_literal(props["AttributeDefinitions"], "AttributeDefinitions"),
        global_secondary_indexes=gsis,
        ttl_attribute=ttl_attribute if isinstance(ttl_attribute, str) else None,
        source=str(template_path.name),
    )


@dataclass(frozen=True)
class EventSources:
    """What the two event source mappings and the trailing queue are set to in template.yaml (parameter
    defaults resolved), so the local event sources behave as the deployed ones."""

    topic: str
    dead_letter_topic: str
    consumer_group: str
    starting_position: str
    batch_size: int
    batching_window_s: float
    maximum_retry_attempts: int
    bisect_on_function_error: bool
    sqs_batch_size: int
    visibility_timeout_s: int
    max_receive_count: int


def _resolve(value: Any, parameters: dict[str, Any], where: str) -> Any:
    """A literal, or `!Ref Param` resolved to the parameter's default."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        default = (parameters.get(value["Ref"]) or {}).get("Default")
        if default is None:
            raise ValueError(f"template.yaml {where}: parameter {value['Ref']} has no default")
        return default
    return value


def event_sources(template_path: Path) -> EventSources:
    """Read the MSK and SQS events of the function, the trailing queue and the TimeoutSettings mapping."""
    template = load_template(template_path)
    parameters = template.get("Parameters") or {}
    resources = template.get("Resources") or {}
    function = next(
        r for r in resources.values() if isinstance(r, dict) and r.get("Type") == "AWS::Serverless::Function"
    )
    events = function["Properties"]["Events"]
    sqs = next(e["Properties"] for e in events.values() if e.get("Type") == "SQS")
    # The Kafka trigger: a SAM MSK / SelfManagedKafka event, or a plain mapping with Topics.
    kafka_events = [e["Properties"] for e in events.values() if e.get("Type") in ("MSK", "SelfManagedKafka")]
    mappings = [
        r["Properties"]
        for r in resources.values()
        if isinstance(r, dict) and r.get("Type") == "AWS::Lambda::EventSourceMapping" and "Topics" in r["Properties"]
    ]
    kafka = (kafka_events or mappings)[0]

    def ref(props: dict[str, Any], key: str, default: Any = None) -> Any:
        return _resolve(props.get(key, default), parameters, key)

    dead_letter = parameters.get("DeadLetterTopic", {}).get("Default", f"{ref(kafka, 'Topics')[0]}.dlt")
    timeout = str(parameters["FunctionTimeoutSeconds"]["Default"])
    timeouts = template["Mappings"]["TimeoutSettings"][timeout]
    return EventSources(
        topic=str(_resolve(kafka["Topics"][0], parameters, "Topics")),
        dead_letter_topic=str(dead_letter),
        consumer_group=str(parameters.get("ConsumerGroupId", {}).get("Default", "preagg-refresh")),
        starting_position=str(ref(kafka, "StartingPosition")),
        batch_size=int(ref(kafka, "BatchSize", 100)),
        batching_window_s=float(ref(kafka, "MaximumBatchingWindowInSeconds", 0.5)),
        maximum_retry_attempts=int(ref(kafka, "MaximumRetryAttempts", -1)),
        bisect_on_function_error=bool(ref(kafka, "BisectBatchOnFunctionError", False)),
        sqs_batch_size=int(ref(sqs, "BatchSize", 10)),
        visibility_timeout_s=int(timeouts["VisibilityTimeout"]),
        max_receive_count=int(timeouts["MaxReceiveCount"]),
    )
