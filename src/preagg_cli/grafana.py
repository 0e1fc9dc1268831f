"""A Grafana dashboard of the stack, as code (Grafana's foundation SDK), over a CloudWatch data source: for
Amazon Managed Grafana or any Grafana with the CloudWatch plugin. It sits beside the CloudWatch dashboard of
template.yaml and shows what that one does not: refreshes and events by entity type, debounce efficiency,
refresh latency p95.

    python -m preagg_cli.grafana [--out build/grafana/preagg-refresh.json]      # `make grafana`

builds the dashboard, validates it and writes its JSON model (generated, never committed). `validate()`
is what CI runs (tests/unit/test_grafana.py): the JSON reads back through the SDK's typed dashboard model,
the grid, ids, variables and query references are consistent, and every query names a metric, namespace
and dimensions that exist: the function's own metrics are found in its code (every `telemetry.count` /
`telemetry.timing` call in src/handler, with its dimension), namespace and `service` value in template.yaml's
Globals; AWS metrics must be used by template.yaml too (dashboard or alarms) or be listed in AWS_METRICS
with their documentation. A metric added to the code is found automatically; a panel over a metric nobody
emits fails the check.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import cloudwatch, dashboard, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import cloudwatch as cw
from grafana_foundation_sdk.models import dashboard as model

ROOT = Path(__file__).resolve().parents[2]
UID = "preagg-refresh"
DATASOURCE = model.DataSourceRef(type_val="cloudwatch", uid="${datasource}")
# AWS metrics the dashboard may use although template.yaml does not: (namespace, metric) -> dimensions, source.
AWS_METRICS: dict[tuple[str, str], tuple[frozenset[str], str]] = {
    ("AWS/SQS", "ApproximateAgeOfOldestMessage"): (
        frozenset({"QueueName"}),
        "Amazon SQS developer guide: sqs-available-cloudwatch-metrics",
    ),
}


@dataclass(frozen=True)
class Names:
    """Where the stack's metrics live: namespace and service dimension (template.yaml's Globals)."""

    namespace: str
    service: str

    @classmethod
    def from_template(cls, template: Mapping[str, Any]) -> Names:
        variables = template["Globals"]["Function"]["Environment"]["Variables"]
        return cls(str(variables["POWERTOOLS_METRICS_NAMESPACE"]), str(variables["POWERTOOLS_SERVICE_NAME"]))


# -- the dashboard -----------------------------------------------------------------------------------------------
def _query(ref: str, **fields: Any) -> cloudwatch.CloudWatchMetricsQuery:
    query = (
        cloudwatch.CloudWatchMetricsQuery()
        .ref_id(ref)
        .id(ref.lower())
        .datasource(DATASOURCE)
        .region("$region")
        .query_mode(cw.CloudWatchQueryMode.METRICS)
        .metric_query_type(cw.MetricQueryType.SEARCH)
    )
    if "expression" in fields:
        query = query.metric_editor_mode(cw.MetricEditorMode.CODE).expression(fields["expression"])
    else:
        query = (
            query.metric_editor_mode(cw.MetricEditorMode.BUILDER)
            .namespace(fields["namespace"])
            .metric_name(fields["metric"])
            .dimensions(fields["dimensions"])
            .match_exact(True)
            .statistic(fields["statistic"])
            .period(fields.get("period", ""))
        )
    if "label" in fields:
        query = query.label(fields["label"])
    if fields.get("hide"):
        query = query.hide(True)
    return query


@dataclass
class _Panel:
    names: Names
    title: str
    description: str
    unit: str
    queries: list[cloudwatch.CloudWatchMetricsQuery] = field(default_factory=list)

    def own(self, ref: str, metric: str, statistic: str, label: str, *, hide: bool = False) -> _Panel:
        dims = {"service": self.names.service}
        self.queries.append(
            _query(ref, namespace=self.names.namespace, metric=metric, dimensions=dims, statistic=statistic,
                   label=label, hide=hide)
        )  # fmt: skip
        return self

    def percentiles(self, metric: str, *statistics: str) -> _Panel:
        for ref, statistic in zip("ABCDEFGH", statistics, strict=False):
            self.own(ref, metric, statistic, statistic)
        return self

    def by(self, ref: str, metric: str, dimension: str, statistic: str) -> _Panel:
        """One series per value of `dimension` (a CloudWatch SEARCH: new values appear by themselves)."""
        n = self.names
        search = f'{{{n.namespace},{dimension},service}} MetricName="{metric}" service="{n.service}"'
        self.queries.append(_query(ref, expression=f"SEARCH('{search}', '{statistic}', $__period_auto)"))
        return self

    def math(self, ref: str, expression: str, label: str) -> _Panel:
        self.queries.append(_query(ref, expression=expression, label=label))
        return self

    def aws(self, ref: str, metric: tuple[str, str], dimensions: dict[str, str], statistic: str, label: str) -> _Panel:
        namespace, name = metric
        self.queries.append(
            _query(ref, namespace=namespace, metric=name, dimensions=dimensions, statistic=statistic, label=label)
        )
        return self

    def build(self, x: int, y: int, width: int = 12, height: int = 8) -> timeseries.Panel:
        return (
            timeseries.Panel()
            .title(self.title)
            .description(self.description)
            .datasource(DATASOURCE)
            .unit(self.unit)
            .grid_pos(model.GridPos(h=height, w=width, x=x, y=y))
            .targets(list(self.queries))
        )


def _variables() -> list[Any]:
    def cw_query(name: str, label: str, metric: tuple[str, str, str] = ("", "", ""), regex: str = "") -> Any:
        namespace, metric_name, key = metric
        query: dict[str, object] = {
            "refId": f"{name}-variable",
            "queryType": "dimensionValues" if key else "regions",
            "region": "$region" if key else "",
            "namespace": namespace,
            "metricName": metric_name,
            "dimensionKey": key,
            "instanceID": "",
            "attributeName": "",
            "resourceType": "",
        }
        variable = (
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(DATASOURCE)
            .query(query)
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
        return variable.regex(regex) if regex else variable

    return [
        dashboard.DatasourceVariable("datasource").label("CloudWatch data source").type("cloudwatch"),
        cw_query("region", "Region"),
        cw_query("trailing_queue", "Trailing queue", ("AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName"),
                 ".*TrailingRefreshQueue.*"),
        cw_query("mapping", "Kafka mapping (output KafkaEventSourceMappingId)",
                 ("AWS/Lambda", "MaxOffsetLag", "EventSourceMappingUUID")),
    ]  # fmt: skip


def panels(names: Names) -> list[_Panel]:
    def panel(title: str, description: str, unit: str) -> _Panel:
        return _Panel(names, title, description, unit)

    return [
        panel(
            "Refresh rate by entity type",
            "Refreshes started by each entity type's mutations (RefreshesByEntityType, one key counts once per "
            "entity type that touched it). Trailing refreshes carry no entity type: they are the separate series.",
            "short",
        )
        .by("A", "RefreshesByEntityType", "EntityType", "Sum")
        .own("B", "TrailingFired", "Sum", "trailing (all entity types)"),
        panel(
            "Events by entity type",
            "Mapped mutations received per entity type (EventsByEntityType); unmapped ones are UnmappedEvents.",
            "short",
        )
        .by("A", "EventsByEntityType", "EntityType", "Sum")
        .own("B", "UnmappedEvents", "Sum", "unmapped"),
        panel(
            "Debounce efficiency",
            "Debounced keys per event received (higher: the window absorbs more) and refreshes per event (lower: "
            "fewer rebuilds per mutation; a per-event worker would sit at 1 or more).",
            "percentunit",
        )
        .own("E", "EventsReceived", "Sum", "events", hide=True)
        .own("D", "Debounced", "Sum", "debounced", hide=True)
        .own("R", "RefreshesTriggered", "Sum", "refreshes", hide=True)
        .math("A", "d / e", "debounce hits / events")
        .math("B", "r / e", "refreshes / events"),
        panel(
            "Refresh latency p95",
            "Mutation to refresh start (RefreshStaleness), one Cube request (CubeLatency), refresh start to build seen "
            "done (BuildDuration).",
            "ms",
        )
        .own("A", "RefreshStaleness", "p95", "mutation -> refresh started")
        .own("B", "CubeLatency", "p95", "Cube request")
        .own("C", "BuildDuration", "p95", "refresh -> build done"),
        panel(
            "Freshness lag",
            "Build seen done minus the oldest mutation it covers (FreshnessLag); the freshness alarm watches p99.",
            "ms",
        ).percentiles("FreshnessLag", "p50", "p95", "p99"),
        panel(
            "Builds by outcome",
            "Verified builds: succeeded, failed by class, re-triggered, dead-lettered (the build-failed alarm).",
            "short",
        )
        .own("A", "BuildsSucceeded", "Sum", "succeeded")
        .own("B", "BuildsRetriggered", "Sum", "re-triggered")
        .own("C", "BuildsDeadLettered", "Sum", "dead-lettered")
        .by("D", "BuildsFailed", "FailureClass", "Sum"),
        panel(
            "Kafka offset lag",
            "Records behind on the topic (MaxOffsetLag of the Kafka event source mapping; the offset-lag alarm).",
            "short",
        ).aws("A", ("AWS/Lambda", "MaxOffsetLag"), {"EventSourceMappingUUID": "$mapping"}, "Maximum", "MaxOffsetLag"),
        panel(
            "Trailing queue age",
            "Age of the oldest message in the trailing-refresh queue. Trailing refreshes are delayed by up to the "
            "debounce window on purpose; an age well past it means they are not being consumed.",
            "s",
        ).aws("A", ("AWS/SQS", "ApproximateAgeOfOldestMessage"), {"QueueName": "$trailing_queue"}, "Maximum", "oldest"),
        panel(
            "Load: backlog age",
            "The oldest mutation still waiting for a build (BacklogAge: for the build budget, or in a build Cube has "
            "not finished; the backlog-age alarm compares its maximum with FreshnessObjectiveMs) and the oldest build "
            "waiting in Cube's queue (QueuedBuildAge).",
            "ms",
        )
        .own("A", "BacklogAge", "Maximum", "oldest waiting mutation (alarm)")
        .own("B", "QueuedBuildAge", "Maximum", "oldest build waiting in Cube's queue"),
        panel(
            "Load: builds in flight vs budget",
            "Jobs of ours in Cube (budget slots held, BuildsInFlight) against CUBE_PREAGG_BUILD_BUDGET (BuildBudget), "
            "sampled at each admission.",
            "short",
        )
        .own("A", "BuildsInFlight", "Maximum", "jobs in flight (budget slots held)")
        .own("B", "BuildBudget", "Maximum", "budget"),
        panel(
            "Load: deferrals, ride-alongs, window",
            "Keys deferred over budget (KeysDeferred), mutations covered by a build still queued in Cube (RideAlongs), "
            "collisions with another build of the same table (BuildCollisions), waiters woken (Wakes), and the "
            "adaptive window's p50 (EffectiveWindow, ms).",
            "short",
        )
        .own("A", "KeysDeferred", "Sum", "keys deferred (over budget)")
        .own("B", "RideAlongs", "Sum", "ride-alongs (covered by a queued build)")
        .own("C", "BuildCollisions", "Sum", "build collisions")
        .own("D", "Wakes", "Sum", "waiters woken")
        .own("E", "EffectiveWindow", "p50", "effective window p50 (ms)"),
    ]


def build(names: Names) -> dict[str, Any]:
    """The dashboard's JSON model."""
    board = (
        dashboard.Dashboard("preagg-refresh")
        .uid(UID)
        .description("Event-driven Cube pre-aggregation refresh (preagg-refresh), from CloudWatch.")
        .tags(["preagg-refresh", "cube", "lambda"])
        .time("now-6h", "now")
        .refresh("1m")
        .timezone("browser")
        .variables(_variables())
    )
    for index, panel in enumerate(panels(names)):
        board = board.with_panel(panel.build(x=12 * (index % 2), y=8 * (index // 2)))
    data: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for index, item in enumerate(data["panels"], start=1):
        item["id"] = index
    return data


# -- what the function and the template emit -------------------------------------------------------------------
def emitted_metrics(source: Path) -> dict[str, frozenset[str]]:
    """Metric name -> its dimension names besides `service`, from every `.count("Name", ...)` and
    `.timing("Name", ...)` call with a literal name under `source` (the function's Telemetry port)."""
    found: dict[str, set[str]] = {}
    for path in sorted(source.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for looped in _looped_names(tree):  # for name, value in (("UnmappedEvents", n), ...): count(name, ...)
            found.setdefault(looped, set())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("count", "timing") or not node.args:
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value[:1].isupper()):
                continue
            dims = found.setdefault(first.value, set())
            for keyword in node.keywords:
                if keyword.arg == "dimension" and isinstance(keyword.value, ast.Tuple) and keyword.value.elts:
                    dim = keyword.value.elts[0]
                    if isinstance(dim, ast.Constant) and isinstance(dim.value, str):
                        dims.add(dim.value)
    return {name: frozenset(dims) for name, dims in found.items()}


def _looped_names(tree: ast.AST) -> Iterable[str]:
    """Metric names of a loop over literal (name, value) pairs whose body counts `name`."""
    for loop in ast.walk(tree):
        if not (isinstance(loop, ast.For) and isinstance(loop.target, ast.Tuple) and loop.target.elts):
            continue
        variable = loop.target.elts[0]
        if not isinstance(variable, ast.Name) or not isinstance(loop.iter, (ast.Tuple, ast.List)):
            continue
        counted = any(
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr in ("count", "timing")
            and call.args
            and isinstance(call.args[0], ast.Name)
            and call.args[0].id == variable.id
            for statement in loop.body
            for call in ast.walk(statement)
        )
        if counted:
            for item in loop.iter.elts:
                if isinstance(item, ast.Tuple) and item.elts and isinstance(item.elts[0], ast.Constant):
                    yield str(item.elts[0].value)


_AWS_METRIC = re.compile(r'"(AWS/[A-Za-z]+)", "([A-Za-z]+)", "([A-Za-z]+)"')
_INSIGHTS = re.compile(r'SELECT \w+\((\w+)\) FROM "(AWS/\w+)"\s+WHERE (\w+) =')
_SEARCH_AWS = re.compile(r'Namespace=\\?"(AWS/\w+)\\?" MetricName=\\?"(\w+)\\?" (\w+)=')


def template_aws_metrics(template_text: str) -> dict[tuple[str, str], frozenset[str]]:
    """(namespace, metric) -> dimension names, for the AWS metrics template.yaml's dashboard and alarms use."""
    found: dict[tuple[str, str], set[str]] = {}
    for namespace, metric, dimension in _AWS_METRIC.findall(template_text):
        found.setdefault((namespace, metric), set()).add(dimension)
    for metric, namespace, dimension in _INSIGHTS.findall(template_text):
        found.setdefault((namespace, metric), set()).add(dimension)
    for namespace, metric, dimension in _SEARCH_AWS.findall(template_text):
        found.setdefault((namespace, metric), set()).add(dimension)
    # Classic alarms: Namespace / MetricName / Dimensions[].Name in YAML.
    for block in re.split(r"\n  [A-Za-z0-9]+:\n    Type: ", template_text):
        ns = re.search(r"\n      Namespace: (AWS/\w+)\n", block)
        metric = re.search(r"\n      MetricName: (\w+)\n", block)
        if ns and metric:
            found.setdefault((ns.group(1), metric.group(1)), set()).update(re.findall(r"- Name: (\w+)", block))
    return {k: frozenset(v) for k, v in found.items()}


# -- validation ----------------------------------------------------------------------------------------------------
_SEARCH = re.compile(r"SEARCH\('\{([^}]*)\} MetricName=\"(\w+)\"((?: \w+=\"[^\"]*\")*)'")
_VARIABLE = re.compile(r"\$\{?(\w+)")
_BUILTIN_VARIABLES = {"__period_auto", "__interval", "__interval_ms", "__range", "__rate_interval"}


@dataclass(frozen=True)
class Catalogue:
    """Every metric a query may name: (namespace, metric) -> the dimension names it is published with."""

    names: Names
    metrics: Mapping[tuple[str, str], frozenset[str]]

    @classmethod
    def of(cls, template: Mapping[str, Any], template_text: str, source: Path) -> Catalogue:
        names = Names.from_template(template)
        metrics: dict[tuple[str, str], frozenset[str]] = {
            (names.namespace, name): frozenset({"service"}) | dims for name, dims in emitted_metrics(source).items()
        }
        metrics.update(template_aws_metrics(template_text))
        metrics.update({k: dims for k, (dims, _) in AWS_METRICS.items()})
        return cls(names, metrics)

    def check(self, namespace: str, metric: str, dimensions: Iterable[str]) -> str | None:
        known = self.metrics.get((namespace, metric))
        if known is None:
            return f"{namespace}/{metric}: nothing emits this metric (not in src/handler, template.yaml or AWS_METRICS)"
        extra = set(dimensions) - known
        if extra:
            return f"{namespace}/{metric}: not published with dimension(s) {sorted(extra)} (it has {sorted(known)})"
        return None


def validate(data: Mapping[str, Any], catalogue: Catalogue) -> list[str]:
    """Every problem of the dashboard's JSON model (empty: valid)."""
    problems: list[str] = []
    try:
        round_trip = json.loads(json.dumps(model.Dashboard.from_json(dict(data)), cls=JSONEncoder))
    except (KeyError, TypeError, ValueError) as exc:
        return [f"the SDK's dashboard model cannot read it: {exc!r}"]
    if round_trip != data:
        problems.append("reading it back through the SDK's dashboard model changes it (unknown or mistyped fields)")
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if not data.get(key):
            problems.append(f"no {key}")
    variables = {v["name"] for v in data.get("templating", {}).get("list", [])}
    cells: dict[tuple[int, int], int] = {}
    ids = [p.get("id") for p in data.get("panels", [])]
    if len(set(ids)) != len(ids) or None in ids:
        problems.append(f"panel ids must be unique and set: {ids}")
    for panel in data.get("panels", []):
        title = panel.get("title", "?")
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"{title}: gridPos {grid} needs integer x, y, w, h")
            continue
        if grid["x"] + grid["w"] > 24 or grid["w"] <= 0 or grid["h"] <= 0:
            problems.append(f"{title}: gridPos {grid} outside the 24-column grid")
        for dx in range(grid.get("w", 0)):
            for dy in range(grid.get("h", 0)):
                cell = (grid.get("x", 0) + dx, grid.get("y", 0) + dy)
                if cell in cells:
                    problems.append(f"{title}: overlaps panel {cells[cell]}")
                    break
                cells[cell] = panel.get("id", 0)
            else:
                continue
            break
        if panel.get("datasource", {}).get("type") != "cloudwatch":
            problems.append(f"{title}: not on the CloudWatch data source")
        problems += [f"{title}: {p}" for p in _check_targets(panel.get("targets", []), catalogue, variables)]
    text = json.dumps(data)
    for name in sorted(set(_VARIABLE.findall(text)) - variables - _BUILTIN_VARIABLES):
        problems.append(f"${name} is used but not a dashboard variable")
    return problems


def _check_targets(targets: Sequence[Mapping[str, Any]], catalogue: Catalogue, variables: set[str]) -> list[str]:
    problems = []
    refs = [t.get("refId") for t in targets]
    if not targets:
        problems.append("no query")
    if len(set(refs)) != len(refs):
        problems.append(f"refIds not unique: {refs}")
    ids = {t.get("id") for t in targets}
    for target in targets:
        expression = target.get("expression") or ""
        if expression.startswith("SEARCH("):
            match = _SEARCH.match(expression)
            if not match:
                problems.append(f"{target['refId']}: SEARCH expression not understood: {expression}")
                continue
            schema = [s.strip() for s in match.group(1).split(",")]
            filters = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3)))
            problem = catalogue.check(schema[0], match.group(2), schema[1:])
            if filters.get("service", catalogue.names.service) != catalogue.names.service:
                problem = f"service={filters['service']!r} is not template.yaml's {catalogue.names.service!r}"
        elif expression:
            unknown = set(re.findall(r"\b([a-z]\w*)\b", expression)) - ids
            problem = f"{target['refId']}: math names unknown query ids {sorted(unknown)}" if unknown else None
        else:
            dimensions = target.get("dimensions") or {}
            problem = catalogue.check(target.get("namespace", ""), target.get("metricName", ""), dimensions)
            service = dimensions.get("service")
            if service is not None and service != catalogue.names.service:
                problem = f"service={service!r} is not template.yaml's {catalogue.names.service!r}"
        if problem:
            problems.append(problem)
    return problems


# -- the command ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preagg_cli.grafana", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "grafana" / "preagg-refresh.json")
    parser.add_argument("--template", type=Path, default=ROOT / "template.yaml")
    args = parser.parse_args(argv)
    from devstack.template import load_template  # noqa: PLC0415 - PyYAML with CloudFormation's tags

    template = load_template(args.template)
    catalogue = Catalogue.of(template, args.template.read_text(encoding="utf-8"), ROOT / "src" / "handler")
    data = build(catalogue.names)
    problems = validate(data, catalogue)
    if problems:
        print("\n".join(f"grafana: {p}" for p in problems), file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"grafana: {args.out} ({len(data['panels'])} panels, valid); import it into Grafana (README, Operate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
