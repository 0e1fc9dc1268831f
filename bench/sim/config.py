"""The scale simulation's inputs: a scenario file (YAML) read into a `Scenario`, the `Pricing` and the
run settings. bench/sim/scenarios/default.yaml is what docs/scale.md is generated from;
bench/sim/scenarios/example.yaml shows a team's own numbers. Every key is documented in those files;
an unknown key is an error that names it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from bench.sim.workload import DIURNAL, FLAT, Scenario

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
DEFAULT = SCENARIOS / "default.yaml"


class ConfigError(ValueError):
    """A scenario file that cannot be used; the message names the key and what it takes."""


# (price, unit, source) of what the AWS bill is made of, us-east-1, read 2026-12-02.
SOURCES: dict[str, tuple[str, str]] = {
    "lambda_request": ("per request", "aws.amazon.com/lambda/pricing"),
    "lambda_gb_s_arm": ("per GB-second, arm64, first 7.5 billion GB-s", "aws.amazon.com/lambda/pricing"),
    "ddb_wru": ("per write request unit, on-demand", "AWS News Blog, DynamoDB on-demand price cut of Nov 2024"),
    "ddb_rru": ("per read request unit, on-demand", "same"),
    "sqs_request": ("per request (64 KB chunk), standard queue", "cloudburn.io SQS pricing, March 2026"),
    "fargate_vcpu_h_arm": ("per vCPU-hour, Linux/ARM", "vantage.sh Fargate pricing"),
    "fargate_gb_h_arm": ("per GB-hour, Linux/ARM", "vantage.sh Fargate pricing"),
}


@dataclass(frozen=True)
class WarehousePricing:
    """Four ways warehouses bill the same work (all four are computed; the table shows each)."""

    busy_hour_usd: float = 3.0  # per hour of build/query time (slot-hours): ASSUMED
    # Snowflake-style: per second while running, 60 s minimum per resume, auto-suspend after idle.
    # X-Small = 1 credit/hour (Snowflake docs, "Overview of warehouses"); $3 per credit: ASSUMED.
    per_second_usd_per_hour: float = 3.0
    auto_suspend_s: float = 600.0  # Snowflake's default auto-suspend (10 minutes)
    # BigQuery-style on-demand: per TiB scanned ($6.25: ASSUMED, not confirmed here), 10 MB minimum
    # per table a query reads.
    usd_per_tib: float = 6.25
    bytes_per_build: float = 1e9  # bytes one partition build scans: ASSUMED, set your own
    bytes_per_key_query: float = 10e6  # a refresh-key or range query: the 10 MB minimum
    provisioned_usd_per_hour: float = 1.086  # a flat provisioned cluster: ASSUMED (one small node)


@dataclass(frozen=True)
class Pricing:
    lambda_request: float = 0.20 / 1e6
    lambda_gb_s_arm: float = 0.0000133334
    ddb_wru: float = 0.625 / 1e6
    ddb_rru: float = 0.125 / 1e6
    sqs_request: float = 0.40 / 1e6
    fargate_vcpu_h_arm: float = 0.03238
    fargate_gb_h_arm: float = 0.00356
    esm_mode: str = "provisioned"  # provisioned | on_demand
    poller_usd_per_hour: float = 0.20  # ASSUMED: no published price per event poller found
    minimum_pollers: int = 1
    poller_group_mappings: int = 1  # mappings sharing one poller group (PollerGroupName, up to 100)
    warehouse: WarehousePricing = field(default_factory=WarehousePricing)

    def poller_usd_per_day(self) -> float:
        if self.esm_mode == "on_demand":
            return 0.0
        return 24 * self.poller_usd_per_hour * self.minimum_pollers / self.poller_group_mappings


@dataclass(frozen=True)
class RunSettings:
    seeds: tuple[int, ...] = (7, 8, 9)
    small_tenants: int = 1_000
    sizes: tuple[int, ...] = (10, 100, 1_000, 3_000, 10_000, 30_000, 100_000)
    rates: tuple[float, ...] = (5, 20, 50, 200, 1_000)
    windows: tuple[float, ...] = (5, 15, 30, 60, 120, 300)
    build_times: tuple[float, ...] = (0.06, 0.5, 5.0, 60.0)
    budget: int = 100_000  # the headline size's runs
    small_budget: int = 25_000  # the second table's runs
    sweep_budget: int = 20_000
    workers: int = 2  # processes (the machine has 2 cores)


@dataclass(frozen=True)
class Config:
    name: str
    scenario: Scenario
    pricing: Pricing
    run: RunSettings
    source: Path


_SCENARIO_KEYS = {
    "tenants": "tenants",
    "mutations_per_tenant_day": "mutations_per_tenant_day",
    "zipf_s": "zipf_s",
    "entity_types": "entity_types",
    "window_s": "window_s",
    "timezones": "timezones",
    "partitions": "preagg_partitions",
    "newest_partition_share": "newest_share",
    "build_timeout_s": "build_timeout_s",
}
_CUBE_KEYS = {
    "build_s": "build_s",
    "key_query_s": "key_query_s",
    "concurrency": "cube_concurrency",
    "worker_timer_s": "worker_timer_s",
    "fail_rate": "cube_fail_rate",
}
_KAFKA_KEYS = {
    "partitions": "partitions",
    "batch_size": "batch_size",
    "batch_window_s": "batch_window_s",
    "key": "kafka_key",
}
_SECTIONS = {"name", "profile", "rollups_per_entity", "cube", "kafka", "aws", "warehouse", "run", *_SCENARIO_KEYS}


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {}) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"`{name}` must be a mapping of keys to values")
    return value


def _known(data: Mapping[str, Any], allowed: set[str] | Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def _number(value: Any, key: str, cast: type[float] | type[int] = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"`{key}` must be a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"`{key}` must not be negative, got {value!r}")
    return cast(value)


def _profile(value: Any) -> tuple[float, ...]:
    if value in (None, "business-day"):
        return DIURNAL
    if value == "flat":
        return FLAT
    if isinstance(value, list) and len(value) == 24 and all(isinstance(v, int | float) for v in value):
        mean = sum(value) / 24
        if mean <= 0:
            raise ConfigError("`profile` must have a positive mean")
        return tuple(float(v) / mean for v in value)
    raise ConfigError("`profile` must be business-day, flat, or a list of 24 hourly multipliers")


def load(path: Path | str | None = None) -> Config:
    source = Path(path) if path else DEFAULT
    try:
        data = yaml.safe_load(source.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no scenario file at {source}; copy bench/sim/scenarios/example.yaml") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {error}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must hold a mapping of keys to values")
    _known(data, _SECTIONS, source.name)
    changes: dict[str, Any] = {}
    for key, attr in _SCENARIO_KEYS.items():
        if key in data:
            changes[attr] = _number(
                data[key], key, int if attr in {"tenants", "entity_types", "timezones", "preagg_partitions"} else float
            )
    changes["profile"] = _profile(data.get("profile"))
    rollups = _section(data, "rollups_per_entity")
    _known(rollups, {"unpartitioned", "partitioned"}, "rollups_per_entity")
    if "unpartitioned" in rollups:
        changes["unpartitioned_rollups"] = _number(rollups["unpartitioned"], "rollups_per_entity.unpartitioned", int)
    if "partitioned" in rollups:
        changes["partitioned_rollups"] = _number(rollups["partitioned"], "rollups_per_entity.partitioned", int)
    for section, keys in (("cube", _CUBE_KEYS), ("kafka", _KAFKA_KEYS)):
        values = _section(data, section)
        _known(values, keys, section)
        for key, attr in keys.items():
            if key in values:
                if attr == "kafka_key":
                    if values[key] not in ("entity", "tenant"):
                        raise ConfigError("`kafka.key` must be entity or tenant")
                    changes[attr] = values[key]
                else:
                    cast = int if attr in {"cube_concurrency", "partitions", "batch_size"} else float
                    changes[attr] = _number(values[key], f"{section}.{key}", cast)
    scenario = replace(Scenario(name=str(data.get("name", source.stem))), **changes)
    if scenario.timezones < 1 or scenario.timezones > 6:
        raise ConfigError("`timezones` must be 1 to 6")
    if not 0 <= scenario.newest_share <= 1:
        raise ConfigError("`newest_partition_share` must be between 0 and 1")
    if scenario.entity_types < 1 or scenario.cube_concurrency < 1 or scenario.preagg_partitions < 1:
        raise ConfigError("`entity_types`, `partitions` and `cube.concurrency` must be at least 1")
    pricing = _pricing(_section(data, "aws"), _section(data, "warehouse"))
    return Config(scenario.name, scenario, pricing, _run(_section(data, "run")), source)


def _pricing(aws: Mapping[str, Any], warehouse: Mapping[str, Any]) -> Pricing:
    names = {f.name for f in fields(Pricing)} - {"warehouse"}
    _known(aws, names, "aws")
    changes: dict[str, Any] = {}
    for key, value in aws.items():
        if key == "esm_mode":
            if value not in ("provisioned", "on_demand"):
                raise ConfigError("`aws.esm_mode` must be provisioned or on_demand")
            changes[key] = value
        else:
            changes[key] = _number(
                value, f"aws.{key}", int if key in {"minimum_pollers", "poller_group_mappings"} else float
            )
    groups = changes.get("poller_group_mappings", 1)
    if not 1 <= groups <= 100:
        raise ConfigError("`aws.poller_group_mappings` must be 1 to 100 (a poller group holds up to 100 mappings)")
    w_names = {f.name for f in fields(WarehousePricing)}
    _known(warehouse, w_names, "warehouse")
    w = WarehousePricing(**{k: _number(v, f"warehouse.{k}") for k, v in warehouse.items()})
    return Pricing(**changes, warehouse=w)


def _run(run: Mapping[str, Any]) -> RunSettings:
    names = {f.name for f in fields(RunSettings)}
    _known(run, names, "run")
    changes: dict[str, Any] = {}
    for key, value in run.items():
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"`run.{key}` must not be empty")
            cast = int if key in {"seeds", "sizes"} else float
            changes[key] = tuple(_number(v, f"run.{key}", cast) for v in value)
        else:
            changes[key] = _number(value, f"run.{key}", int)
    settings = RunSettings(**changes)
    if len(settings.seeds) < 3:
        raise ConfigError("`run.seeds` needs at least 3 seeds (every headline figure is a range over them)")
    return settings
