"""The Grafana dashboard as code (issue 18, item 20): generated, and checked against what the function and the
template emit, the way `make grafana` checks it."""

import copy
import json
import re
from pathlib import Path

import pytest

from devstack.template import load_template
from preagg_cli import grafana

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"


@pytest.fixture(scope="module")
def catalogue():
    return grafana.Catalogue.of(load_template(TEMPLATE), TEMPLATE.read_text(), ROOT / "src" / "handler")


@pytest.fixture
def board(catalogue):
    return grafana.build(catalogue.names)


def panel(board, title):
    (found,) = [p for p in board["panels"] if p["title"] == title]
    return found


def test_grafana_dashboard_is_valid(board, catalogue):
    assert grafana.validate(board, catalogue) == []


def test_grafana_dashboard_has_the_panels_the_issue_asks_for(board):
    assert {p["title"] for p in board["panels"]} >= {
        "Refresh rate by entity type",
        "Debounce efficiency",
        "Refresh latency p95",
        "Freshness lag",
        "Builds by outcome",
        "Kafka offset lag",
        "Trailing queue age",
        "Load: backlog age",
        "Load: builds in flight vs budget",
        "Load: deferrals, ride-alongs, window",
    }
    latency = panel(board, "Refresh latency p95")
    assert {t["statistic"] for t in latency["targets"]} == {"p95"}
    by_type = panel(board, "Refresh rate by entity type")["targets"][0]["expression"]
    assert "RefreshesByEntityType" in by_type and "EntityType" in by_type


def test_grafana_namespace_and_service_come_from_template_globals(catalogue):
    assert catalogue.names == grafana.Names("PreaggRefresh", "preagg-refresh")


def test_emitted_metrics_are_read_from_the_function_code():
    emitted = grafana.emitted_metrics(ROOT / "src" / "handler")
    assert emitted["EventsByEntityType"] == {"EntityType"}
    assert emitted["RefreshesByEntityType"] == {"EntityType"}
    assert emitted["CubeErrorsByClass"] == {"ErrorClass"}
    assert emitted["FreshnessLag"] == frozenset()
    assert "UnmappedEvents" in emitted  # counted in a loop over (name, value) pairs


def test_every_own_metric_of_the_cloudwatch_dashboard_is_emitted_by_the_function(catalogue):
    # The template's dashboard (widgets and SEARCH expressions) goes through the same catalogue check.
    text = TEMPLATE.read_text()
    names, namespace = set(), None
    for ns, metric in re.findall(r'\[\s*"([A-Za-z/.]+)", "(\w+)"', text):
        namespace = namespace if ns == "." else ns  # "." repeats the previous row's namespace
        if namespace == "PreaggRefresh":
            names.add(metric)
    names |= set(re.findall(r'MetricName=\\"(\w+)\\" service', text))
    assert {"RefreshesByCube", "BuildsFailed", "FreshnessLag", "EventsReceived"} <= names
    missing = [n for n in sorted(names) if catalogue.check("PreaggRefresh", n, ["service"])]
    assert missing == []


# -- the checks can fail --------------------------------------------------------------------------------------
def test_validation_refuses_a_metric_nobody_emits(board, catalogue):
    bad = copy.deepcopy(board)
    panel(bad, "Freshness lag")["targets"][0]["metricName"] = "FreshnesLag"
    assert grafana.validate(bad, catalogue) == [
        "Freshness lag: PreaggRefresh/FreshnesLag: nothing emits this metric (not in src/handler, template.yaml or"
        " AWS_METRICS)"
    ]


def test_validation_refuses_a_dimension_the_metric_does_not_have(board, catalogue):
    bad = copy.deepcopy(board)
    target = panel(bad, "Freshness lag")["targets"][0]
    target["dimensions"]["EntityType"] = "User"
    (problem,) = grafana.validate(bad, catalogue)
    assert "not published with dimension(s) ['EntityType']" in problem


def test_validation_refuses_a_search_over_an_unknown_metric_or_another_service(board, catalogue):
    bad = copy.deepcopy(board)
    target = panel(bad, "Refresh rate by entity type")["targets"][0]
    target["expression"] = target["expression"].replace("RefreshesByEntityType", "RefreshesByTenant")
    assert "RefreshesByTenant: nothing emits this metric" in " ".join(grafana.validate(bad, catalogue))
    bad = copy.deepcopy(board)
    target = panel(bad, "Builds by outcome")["targets"][0]
    target["dimensions"]["service"] = "other-service"
    assert grafana.validate(bad, catalogue) == [
        "Builds by outcome: service='other-service' is not template.yaml's 'preagg-refresh'"
    ]


def test_validation_refuses_an_aws_metric_the_template_does_not_use(board, catalogue):
    bad = copy.deepcopy(board)
    panel(bad, "Trailing queue age")["targets"][0]["metricName"] = "NumberOfMessagesSent"
    assert "AWS/SQS/NumberOfMessagesSent: nothing emits" in " ".join(grafana.validate(bad, catalogue))


def test_validation_refuses_layout_and_reference_mistakes(board, catalogue):
    bad = copy.deepcopy(board)
    bad["panels"][1]["gridPos"] = dict(bad["panels"][0]["gridPos"])
    bad["panels"][2]["targets"][-1]["expression"] = "d / x"
    bad["panels"][3]["targets"][0]["region"] = "$regoin"
    bad["panels"][4]["id"] = bad["panels"][5]["id"]
    problems = " | ".join(grafana.validate(bad, catalogue))
    assert "overlaps panel 1" in problems
    assert "math names unknown query ids ['x']" in problems
    assert "$regoin is used but not a dashboard variable" in problems
    assert "panel ids must be unique" in problems


def test_validation_refuses_what_the_sdk_model_does_not_know(board, catalogue):
    bad = copy.deepcopy(board)
    bad["panels"][0]["gridPos"]["w"] = "twelve"
    assert grafana.validate(bad, catalogue)


def test_make_grafana_writes_the_json_model(tmp_path, capsys):
    out = tmp_path / "dash.json"
    assert grafana.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["uid"] == "preagg-refresh"
    assert "11 panels, valid" in capsys.readouterr().out


def test_grafana_load_panels_show_the_same_metrics_as_the_cloudwatch_dashboard_load_row(board):
    """Issue 16's load row (template.yaml's dashboard) has its Grafana counterpart, metric for metric."""
    text = TEMPLATE.read_text()
    load_row = {
        "BacklogAge",
        "QueuedBuildAge",
        "BuildsInFlight",
        "BuildBudget",
        "KeysDeferred",
        "RideAlongs",
        "BuildCollisions",
        "EffectiveWindow",
    }
    assert all(f'"{m}"' in text for m in load_row)
    shown = {t.get("metricName") for p in board["panels"] if p["title"].startswith("Load:") for t in p["targets"]}
    assert shown >= load_row
