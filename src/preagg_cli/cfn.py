"""What CloudFormation would make of a template for given parameter values, offline.

A small evaluator of the parts of a template (SAM's translator output, or template.yaml itself) that
decide what a deploy creates: parameter values with their defaults, conditions, `Fn::If` with
`AWS::NoValue`, and the intrinsic functions CloudFormation resolves at deploy time (`Ref`, `Fn::GetAtt`,
`Fn::Sub`, `Fn::Join`, `Fn::Select`, `Fn::Split`, `Fn::FindInMap`). Resources' runtime values (an ARN,
a queue URL) become placeholders such as `<DeadLetterBucket.Arn>`. It records what CloudFormation would
refuse: a reference to a resource that a condition removed, or an `Fn::Select` out of range.

Also: the parameters a resource's properties depend on (through conditions and mappings too), which
the function digest (preagg_cli.predeploy) hashes. Runs on the Python of SAM's venv (3.11) as well.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

NO_VALUE = object()  # AWS::NoValue: the property or list item disappears
PSEUDO: dict[str, Any] = {
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": "111111111111",
    "AWS::Partition": "aws",
    "AWS::StackName": "preagg-refresh-test",
    "AWS::StackId": "arn:aws:cloudformation:eu-west-1:111111111111:stack/preagg-refresh-test/id",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::NotificationARNs": [],
}
_SUB_VAR = re.compile(r"\$\{([^}!][^}]*)\}")


class EvaluationError(ValueError):
    """The template cannot be evaluated as CloudFormation would (a problem CloudFormation would refuse)."""


def parameter_values(template: Mapping[str, Any], overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each parameter's value for a deploy: the override, else the Default (None when it has neither).
    A CommaDelimitedList is a list of strings, as `Ref` returns it."""
    values: dict[str, Any] = {}
    for name, spec in template.get("Parameters", {}).items():
        raw = (overrides or {}).get(name, spec.get("Default"))
        if raw is not None and spec.get("Type") == "CommaDelimitedList" and isinstance(raw, str):
            raw = raw.split(",")
        values[name] = None if raw is None else raw if isinstance(raw, list) else str(raw)
    return values


def _getatt(node: Any) -> tuple[str, str]:
    if isinstance(node, str):
        resource, _, attribute = node.partition(".")
        return resource, attribute
    return str(node[0]), str(node[1])


class Evaluator:
    """The template as CloudFormation sees it for one set of parameter values."""

    def __init__(self, template: Mapping[str, Any], overrides: Mapping[str, str] | None = None) -> None:
        self.template = template
        self.params = parameter_values(template, overrides)
        self.problems: list[str] = []
        self._conditions: dict[str, bool] = {}
        self._where = ""
        resources = template.get("Resources", {})
        self.active = {name for name, res in resources.items() if self.condition(res.get("Condition"))}

    # -- conditions ------------------------------------------------------------------------
    def condition(self, name: str | None) -> bool:
        if name is None:
            return True
        if name not in self._conditions:
            expression = self.template.get("Conditions", {}).get(name)
            if expression is None:
                raise EvaluationError(f"unknown condition {name!r}")
            self._conditions[name] = bool(self.value(expression))
        return self._conditions[name]

    # -- values ----------------------------------------------------------------------------
    def value(self, node: Any) -> Any:
        """`node` resolved; NO_VALUE where AWS::NoValue removes it."""
        if isinstance(node, list):
            return [v for v in (self.value(item) for item in node) if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Fn::GetAtt":
                resource, attribute = _getatt(arg)
                self._check_resource(resource, f"Fn::GetAtt {resource}.{attribute}")
                return f"<{resource}.{attribute}>"
            if key == "Fn::If":
                name, yes, no = arg
                return self.value(yes if self.condition(name) else no)
            if key == "Condition" and isinstance(arg, str):  # not an IAM statement's Condition block
                return self.condition(arg)
            if key == "Fn::Equals":
                left, right = (self.value(v) for v in arg)
                return str(left) == str(right)
            if key == "Fn::Not":
                return not self.value(arg[0])
            if key == "Fn::And":
                return all(self.value(v) for v in arg)
            if key == "Fn::Or":
                return any(self.value(v) for v in arg)
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::Join":
                separator, items = arg
                return str(separator).join(str(v) for v in self.value(items))
            if key == "Fn::Split":
                separator, text = arg
                return str(self.value(text)).split(str(separator))
            if key == "Fn::Select":
                return self._select(arg)
            if key == "Fn::FindInMap":
                mapping, top, second = (self.value(v) for v in arg)
                try:
                    return self.template["Mappings"][mapping][str(top)][str(second)]
                except KeyError:
                    raise EvaluationError(f"Fn::FindInMap {mapping}/{top}/{second}: no such entry") from None
            if key == "Fn::Base64":
                return self.value(arg)
            if key == "Fn::EachMemberEquals":  # Rules only
                items, expected = (self.value(v) for v in arg)
                return all(str(v) == str(expected) for v in items)
        return {k: v for k, v in ((k, self.value(v)) for k, v in node.items()) if v is not NO_VALUE}

    def _select(self, arg: Any) -> Any:
        index, items = arg
        resolved = self.value(items)
        position = int(self.value(index))
        if not 0 <= position < len(resolved):
            raise EvaluationError(f"Fn::Select cannot select index {position} of {resolved!r}")
        return resolved[position]

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.params:
            return self.params[name]
        self._check_resource(name, f"Ref {name}")
        return f"<{name}>"

    def _check_resource(self, name: str, what: str) -> None:
        if name not in self.template.get("Resources", {}):
            self.problems.append(f"{self._where}: {what}: no such resource or parameter")
        elif name not in self.active:
            self.problems.append(f"{self._where}: {what}: the resource's condition is false")

    def _sub(self, arg: Any) -> str:
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
        local = {k: self.value(v) for k, v in variables.items()}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in local:
                return str(local[name])
            if "." in name and name.split(".", 1)[0] not in self.params:
                return str(self.value({"Fn::GetAtt": name}))
            found = self._ref(name)
            return ",".join(found) if isinstance(found, list) else str(found)

        return _SUB_VAR.sub(replace, text).replace("${!", "${")

    # -- the deploy ------------------------------------------------------------------------
    def resources(self) -> dict[str, Any]:
        """Every resource the deploy creates, its properties resolved (records dangling references)."""
        out = {}
        for name in sorted(self.active):
            self._where = name
            out[name] = self.value(self.template["Resources"][name])
        return out

    def outputs(self) -> dict[str, Any]:
        out = {}
        for name, spec in self.template.get("Outputs", {}).items():
            if self.condition(spec.get("Condition")):
                self._where = f"Outputs.{name}"
                out[name] = self.value(spec["Value"])
        return out

    def failed_rules(self) -> list[str]:
        """The AssertDescription of every Rules assertion that refuses these parameter values."""
        failed = []
        for name, rule in self.template.get("Rules", {}).items():
            if "RuleCondition" in rule and not self.value(rule["RuleCondition"]):
                continue
            for assertion in rule["Assertions"]:
                if not self.value(assertion["Assert"]):
                    failed.append(f"{name}: {assertion.get('AssertDescription', '')}")
        return failed

    def unsafe_selects(self) -> list[str]:
        """Every Fn::Select in the resources, in the Fn::If branches not taken too (CloudFormation evaluates
        those), that would select outside its list for these parameter values."""
        found = []
        for name, resource in self.template.get("Resources", {}).items():
            for node in _walk(resource):
                if isinstance(node, dict) and set(node) == {"Fn::Select"}:
                    probe = Evaluator(self.template, _as_overrides(self.params))
                    try:
                        probe.value(node)
                    except EvaluationError as exc:
                        found.append(f"{name}: {exc}")
        return found


def _as_overrides(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in params.items() if v is not None}


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


# -- what a resource depends on ---------------------------------------------------------------
def parameters_used(template: Mapping[str, Any], node: Any) -> set[str]:
    """The parameters `node` refers to, directly, in Fn::Sub text, or through the conditions of its
    Fn::If and the keys of its Fn::FindInMap."""
    params = set(template.get("Parameters", {}))
    conditions = template.get("Conditions", {})
    found: set[str] = set()
    seen_conditions: set[str] = set()

    def visit(item: Any) -> None:
        for sub in _walk(item):
            if not isinstance(sub, dict) or len(sub) != 1:
                continue
            ((key, arg),) = sub.items()
            if key == "Ref" and arg in params:
                found.add(arg)
            elif key == "Fn::Sub":
                text = arg if isinstance(arg, str) else arg[0]
                local = set() if isinstance(arg, str) else set(arg[1])
                found.update(n for n in _SUB_VAR.findall(text) if n in params and n not in local)
            elif key == "Fn::If" or (key == "Condition" and isinstance(arg, str)):
                name = arg[0] if key == "Fn::If" else arg
                if name not in seen_conditions and name in conditions:
                    seen_conditions.add(name)
                    visit(conditions[name])

    visit(node)
    return found


# Properties of AWS::Serverless::Function that are not part of a published version's configuration.
NOT_VERSIONED = frozenset({"Events", "AutoPublishCodeSha256", "AutoPublishAlias", "DeploymentPreference"})


def function_parameters(template: Mapping[str, Any], function: str = "RefreshFunction") -> set[str]:
    """The parameters a published version of `function` freezes: those its properties (and the SAM
    Globals for functions) refer to, except its event sources and its publishing settings."""
    resource = template["Resources"][function]
    properties = {k: v for k, v in resource.get("Properties", {}).items() if k not in NOT_VERSIONED}
    found = parameters_used(template, properties)
    found |= parameters_used(template, template.get("Globals", {}).get("Function", {}))
    if "Condition" in resource:
        found |= parameters_used(template, {"Condition": resource["Condition"]})
    return found
