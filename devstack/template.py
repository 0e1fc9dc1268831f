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
