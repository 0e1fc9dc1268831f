"""docs/deploy.md is the one page before a deploy (issue 18, item 19): it lists every template parameter and every
alarm, and the template describes and groups every parameter. A parameter or alarm added to template.yaml without
its line in deploy.md fails here."""

import re
from pathlib import Path

from devstack.template import load_template

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(ROOT / "template.yaml")
DEPLOY = (ROOT / "docs" / "deploy.md").read_text()


def section(title_start: str) -> str:
    match = re.search(rf"^## {re.escape(title_start)}.*?(?=^## |\Z)", DEPLOY, flags=re.M | re.S)
    assert match, f"docs/deploy.md has no section '## {title_start}...'"
    return match.group(0)


def first_column(text: str) -> list[str]:
    """The backquoted names in the first column of every table row of `text`."""
    return re.findall(r"^\| `([A-Za-z0-9-]+)` \|", text, flags=re.M)


def test_deploy_md_lists_every_template_parameter_once():
    listed = first_column(section("11. Every parameter"))
    parameters = set(TEMPLATE["Parameters"])
    assert sorted(parameters - set(listed)) == [], "template parameters missing from docs/deploy.md section 11"
    assert sorted(set(listed) - parameters) == [], "docs/deploy.md section 11 lists parameters the template lacks"
    assert len(listed) == len(set(listed)), "a parameter is listed twice"


def test_deploy_md_defaults_match_the_template():
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section("11. Every parameter"), flags=re.M)
    for name, shown in rows:
        default = TEMPLATE["Parameters"][name].get("Default")
        if default is None:
            assert shown.strip() == "required", name
        elif str(default) == "":
            assert shown.strip().startswith("("), name  # (empty), (computed), (empty: the built-in map)
        else:
            assert shown.strip() == f"`{default}`", name


def test_every_template_parameter_has_a_description_and_a_group():
    undescribed = [n for n, spec in TEMPLATE["Parameters"].items() if not str(spec.get("Description", "")).strip()]
    assert undescribed == []
    groups = TEMPLATE["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    grouped = [name for group in groups for name in group["Parameters"]]
    assert sorted(grouped) == sorted(TEMPLATE["Parameters"]), "ParameterGroups must list every parameter once"


def test_deploy_md_lists_every_alarm():
    suffixes = []
    for resource in TEMPLATE["Resources"].values():
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            name = resource["Properties"]["AlarmName"]["Fn::Sub"]
            suffixes.append(name.removeprefix("${AWS::StackName}-"))
    table = section("8. Alarms").split("\n### ")[0]  # the list, not the sub-section on the mapping's alarms
    assert sorted(first_column(table)) == sorted(suffixes)


def test_deploy_md_carries_no_runtime_deprecation_aside():
    assert "python3.11" not in DEPLOY
