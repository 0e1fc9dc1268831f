"""From simulated counts to the figures docs/scale.md shows: Cube's queue, freshness, costs, and the two
alternatives (Cube's refresh worker, the seed's in-memory debounce), computed on the same workload.

Prices: us-east-1, read 2026-12-02 (sources in PRICES). Modelled, not measured: everything here."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from bench.sim.engine import Coverage, OursResult, target_names, tenant_id
from bench.sim.workload import DAY_S, HOUR_S, Scenario, hour_factor, tenant_rates
from handler.domain.model import RefreshKey

DAYS_PER_MONTH = 730 / 24

# (price, unit, source). us-east-1.
PRICES: dict[str, tuple[float, str, str]] = {
    "lambda_request": (0.20 / 1e6, "per request", "aws.amazon.com/lambda/pricing"),
    "lambda_gb_s_arm": (0.0000133334, "per GB-second, arm64, first 7.5 billion GB-s", "aws.amazon.com/lambda/pricing"),
    "ddb_wru": (
        0.625 / 1e6,
        "per write request unit, on-demand",
        "airbyte.com DynamoDB pricing (the Nov 2024 on-demand price cut, AWS News Blog)",
    ),
    "ddb_rru": (0.125 / 1e6, "per read request unit, on-demand", "same"),
    "sqs_request": (0.40 / 1e6, "per request (64 KB chunk), standard queue", "cloudburn.io SQS pricing, March 2026"),
    "fargate_vcpu_h_arm": (0.03238, "per vCPU-hour, Linux/ARM", "vantage.sh Fargate pricing"),
    "fargate_gb_h_arm": (0.00356, "per GB-hour, Linux/ARM", "vantage.sh Fargate pricing"),
}
# Assumptions (no published price found, or a choice that depends on the deployment): say so.
EPU_HOUR_ASSUMED = 0.20  # provisioned Kafka event poller, $ per hour: NOT a published figure
WAREHOUSE_HOUR_ASSUMED = 3.00  # $ per busy warehouse hour (e.g. a small serverless warehouse): an assumption

# Lambda (modelled from bench/bench_handler.py on this machine, see bench/README.md)
CPU_US_PER_RECORD = 5.0  # 200,000 records/s of CPU time through the whole handler
CPU_MS_PER_INVOCATION = 3.0  # decorators, metrics flush, answer: assumed
FULL_VCPU_MB = 1769  # Lambda gives one vCPU at 1,769 MB; less memory, proportionally less CPU
MEMORY_MB = 512  # template.yaml FunctionMemoryMb
IO_THREADS = 8  # wiring.IO_THREADS: a batch's remote calls run side by side
DDB_WRITE_MS = 5.0  # assumed in-region conditional write
SQS_SEND_MS = 8.0  # assumed
CUBE_POST_MS = 20.0  # Cube answers a jobs POST in 8-30 ms warm (measured on the local stack)
REFRESH_KEY_QUERY_S = 0.05  # a refresh_key query (SELECT MAX(updated_at) ...) on the warehouse: assumed
QUERIES_PER_BUILD = 2  # the build (CREATE TABLE AS SELECT) and the refresh_key it is versioned by
SQS_IDLE_RECEIVES_PER_DAY = 5 * DAY_S / 20  # 5 long polls of 20 s while idle (Lambda's SQS pollers): assumed
CUBE_WORKER_TICK_S = 30  # Cube's refresh worker runs its scheduler every 30 s by default


def erlang_c_wait(arrival_per_s: float, service_s: float, servers: int) -> tuple[float, float]:
    """Mean queueing delay of M/D/c (half the M/M/c delay) and the utilisation. Utilisation >= 1:
    the queue grows for the whole hour; returned delay is the hour's mean backlog wait."""
    a = arrival_per_s * service_s
    rho = a / servers if servers else math.inf
    if a == 0:
        return 0.0, 0.0
    if rho >= 1:
        return (rho - 1) / rho * HOUR_S / 2, rho
    term = 1.0
    total = 1.0
    for k in range(1, servers):
        term *= a / k
        total += term
    last = term * a / servers / (1 - rho)
    p_wait = last / (total + last)
    return 0.5 * p_wait * service_s / (servers - a), rho


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if values.size == 0:
        return math.nan
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q / 100 * cum[-1])])


@dataclass
class Design:
    """One design's day: the figures of the comparison table."""

    name: str
    lambda_invocations: float = 0.0
    lambda_gb_s: float = 0.0
    ddb_wcu: float = 0.0
    ddb_rcu: float = 0.0
    sqs_requests: float = 0.0
    cube_posts: float = 0.0
    partitions_built: float = 0.0
    warehouse_queries: float = 0.0
    warehouse_busy_s: float = 0.0
    peak_utilisation: float = 0.0
    lag_p50: float = math.nan  # with the configured queue concurrency
    lag_p99: float = math.nan
    sized_p50: float = math.nan  # with slots_needed queue slots
    sized_p99: float = math.nan
    slots_needed: int = 0
    stale_share: float = 0.0  # share of mutations not refreshed within the day (or never)
    fixed_per_day: float = 0.0  # pollers, worker instances
    notes: list[str] = field(default_factory=list)

    def cost_per_day(self) -> dict[str, float]:
        p = {k: v[0] for k, v in PRICES.items()}
        return {
            "lambda": self.lambda_invocations * p["lambda_request"] + self.lambda_gb_s * p["lambda_gb_s_arm"],
            "dynamodb": self.ddb_wcu * p["ddb_wru"] + self.ddb_rcu * p["ddb_rru"],
            "sqs": self.sqs_requests * p["sqs_request"],
            "fixed": self.fixed_per_day,
            "warehouse": self.warehouse_busy_s / 3600 * WAREHOUSE_HOUR_ASSUMED,
        }

    def monthly(self) -> dict[str, float]:
        return {k: v * DAYS_PER_MONTH for k, v in self.cost_per_day().items()}

    def aws_monthly(self) -> float:
        m = self.monthly()
        return m["lambda"] + m["dynamodb"] + m["sqs"] + m["fixed"]


def _vcpu_factor() -> float:
    return max(1.0, FULL_VCPU_MB / MEMORY_MB)


TARGET_UTILISATION = 0.8  # "enough queue slots": the peak hour at 80 % busy


def slots_for(load: float, configured: int) -> int:
    """Queue slots that keep the peak load (busy slots on average) at TARGET_UTILISATION."""
    return max(configured, math.ceil(load / TARGET_UTILISATION))


def _lags(
    sc: Scenario, lags: list[tuple[float, float, int]], builds_per_hour: list[float], never: float = 0.0
) -> tuple[tuple[float, float], tuple[float, float], float, int]:
    """p50, p99 of mutation -> rebuilt partition: the simulated wait for a claim, plus Cube's POST,
    its queue (M/D/c per hour from the partitions built that hour) and the job's builds. Returned
    with the configured queue concurrency and with enough slots, then the peak utilisation and the
    slots needed."""
    loads = [b / HOUR_S * sc.build_s for b in builds_per_hour]
    slots = slots_for(max(loads), sc.cube_concurrency)
    out = []
    peak = max(loads) / sc.cube_concurrency
    for servers in (sc.cube_concurrency, slots):
        waits = [erlang_c_wait(b / HOUR_S, sc.build_s, servers)[0] for b in builds_per_hour]
        job_s = math.ceil(sc.parts_per_job * sc.timezones / servers) * sc.build_s
        if not lags:
            out.append((math.nan, math.nan))
            continue
        arr = np.array(lags)
        values = arr[:, 0] + CUBE_POST_MS / 1000 + np.array(waits)[arr[:, 2].astype(int)] + job_s
        weights = arr[:, 1]
        if never:  # mutations no refresh covered count as never fresh
            values = np.append(values, math.inf)
            weights = np.append(weights, never)
        out.append((weighted_percentile(values, weights, 50), weighted_percentile(values, weights, 99)))
    return out[0], out[1], peak, slots


def _apply_lags(d: Design, result: tuple[tuple[float, float], tuple[float, float], float, int]) -> None:
    (d.lag_p50, d.lag_p99), (d.sized_p50, d.sized_p99), d.peak_utilisation, d.slots_needed = result


def ours(sc: Scenario, r: OursResult) -> Design:
    c = defaultdict(float, r.counts)
    d = Design("event-driven (this project)")
    sqs_inv = c["sqs_invocations"]
    d.lambda_invocations = r.msk_invocations + sqs_inv + c["msk_retries"]
    vf = _vcpu_factor()
    msk_cpu_ms = r.msk_invocations * CPU_MS_PER_INVOCATION + r.records * CPU_US_PER_RECORD / 1000
    par = min(IO_THREADS, max(1.0, c["decisions"] / max(r.msk_invocations, 1)))
    remote_ms = (c["ddb_writes"] * DDB_WRITE_MS + c["cube_posts"] * CUBE_POST_MS + c["sqs_sends"] * SQS_SEND_MS) / par
    sqs_cpu_ms = sqs_inv * CPU_MS_PER_INVOCATION
    d.lambda_gb_s = ((msk_cpu_ms + sqs_cpu_ms) * vf + remote_ms) / 1000 * MEMORY_MB / 1024
    d.ddb_wcu = c["ddb_writes"]
    d.ddb_rcu = c["ddb_reads"]
    # send + (receive + delete-batch) per SQS invocation + idle long polls
    d.sqs_requests = c["sqs_sends"] + 2 * sqs_inv + SQS_IDLE_RECEIVES_PER_DAY
    d.cube_posts = c["cube_posts"]
    d.partitions_built = c["partitions_built"]
    d.warehouse_queries = c["partitions_built"] * QUERIES_PER_BUILD
    d.warehouse_busy_s = c["partitions_built"] * (sc.build_s + REFRESH_KEY_QUERY_S)
    _apply_lags(d, _lags(sc, r.lags, r.builds_per_hour, r.uncovered))
    total = sum(w for _, w, _ in r.lags) + r.uncovered
    d.stale_share = r.uncovered / total if total else 0.0
    d.fixed_per_day = 24 * EPU_HOUR_ASSUMED  # MinimumPollers = 1
    return d


def seed_design(sc: Scenario, r: OursResult, instances: int) -> Design:
    """The seed's design: each Lambda instance keeps its own last-refresh time per key in memory and
    refreshes on a mutation if its own window is over; a mutation inside the window is dropped (no
    trailing refresh, no shared state). `instances` concurrent instances (the MSK pollers) share the
    partitions. Fed with the same key-batches as the real-code run."""
    d = Design(f"seed in-memory debounce, K={instances}")
    weight_of = {int(t): float(w) * r.plan.hour_scale for t, w in zip(r.plan.tenants, r.plan.weights, strict=True)}
    targets = target_names(sc)
    posts = 0.0
    lags: list[tuple[float, float, int]] = []
    builds_per_hour = [0.0] * 24
    uncovered = 0.0
    covered_w = 0.0
    for hour, batches in r.key_batches.items():
        start, end = r.slices[hour]
        last: list[dict[RefreshKey, float]] = [{} for _ in range(instances)]
        coverage = Coverage()
        for kb in sorted(batches, key=lambda b: b.oldest_s):
            coverage.entries.setdefault(RefreshKey(tenant_id(kb.tenant), targets[kb.etype]), []).append(kb)
        for kb in batches:
            key = RefreshKey(tenant_id(kb.tenant), targets[kb.etype])
            mine = last[kb.partition % instances]
            t = kb.flush_s
            if t - mine.get(key, -math.inf) >= sc.window_s:
                mine[key] = t
                if start <= t < end:
                    w = weight_of[kb.tenant]
                    posts += w
                    builds_per_hour[hour] += w * sc.parts_per_job * sc.timezones
                coverage.cover(key, t, hour, weight_of, start, end)
        lags.extend(coverage.lags)
        covered_w += sum(w for _, w, _ in coverage.lags)
        uncovered += coverage.uncovered(weight_of, start, end)
    d.lambda_invocations = r.msk_invocations
    vf = _vcpu_factor()
    cpu_ms = r.msk_invocations * CPU_MS_PER_INVOCATION + r.records * CPU_US_PER_RECORD / 1000
    d.lambda_gb_s = (cpu_ms * vf + posts * CUBE_POST_MS / IO_THREADS) / 1000 * MEMORY_MB / 1024
    d.cube_posts = posts
    d.partitions_built = sum(builds_per_hour)
    d.warehouse_queries = d.partitions_built * QUERIES_PER_BUILD
    d.warehouse_busy_s = d.partitions_built * (sc.build_s + REFRESH_KEY_QUERY_S)
    _apply_lags(d, _lags(sc, lags, builds_per_hour, uncovered))
    d.stale_share = uncovered / (covered_w + uncovered) if covered_w + uncovered else 0.0
    d.fixed_per_day = 24 * EPU_HOUR_ASSUMED
    d.notes.append("stale share: mutations left unrefreshed until the end of their hour's slice")
    return d


def cube_worker(sc: Scenario, every_s: float, *, incremental: bool, update_window_partitions: int = 1) -> Design:
    """Cube's refresh worker (a model, computed for every tenant): every `every_s` it evaluates the
    `refresh_key` SQL of each partition x tenant x timezone (with `incremental` + `update_window`,
    only the partitions inside the window), and rebuilds when the key changed. A change is a mutation
    of that tenant's cube since the last check. Mutations to rows outside the update window are never
    rebuilt (stale share)."""
    label = f"Cube refresh worker, every {_fmt_s(every_s)}" + (", incremental" if incremental else "")
    d = Design(label)
    rates = tenant_rates(sc) / sc.entity_types  # per key
    keys = sc.tenants * sc.entity_types
    checked = update_window_partitions if incremental else sc.preagg_partitions
    rebuilt = update_window_partitions if incremental else sc.preagg_partitions
    interval = max(every_s, CUBE_WORKER_TICK_S) if every_s < CUBE_WORKER_TICK_S else every_s
    checks_per_day = keys * sc.timezones * checked * DAY_S / interval
    q = keys * sc.timezones * checked / interval  # refresh_key queries per second
    hourly_builds = []
    for hour in range(24):
        f = hour_factor(sc, hour, hour * HOUR_S, (hour + 1) * HOUR_S)
        p_change = -np.expm1(-rates * f * interval)
        hourly_builds.append(float(p_change.sum()) * (HOUR_S / interval) * rebuilt * sc.timezones)
    builds = sum(hourly_builds)
    loads = [q * REFRESH_KEY_QUERY_S + b / HOUR_S * sc.build_s for b in hourly_builds]
    d.peak_utilisation = max(loads) / sc.cube_concurrency
    d.slots_needed = slots_for(max(loads), sc.cube_concurrency)
    for servers, attr in ((sc.cube_concurrency, "lag"), (d.slots_needed, "sized")):
        waits = []
        for load, b in zip(loads, hourly_builds, strict=True):
            # the checks occupy part of the queue: builds see what is left
            free = servers - q * REFRESH_KEY_QUERY_S
            if load >= servers or free <= 0:
                waits.append((load / servers - 1) / (load / servers) * HOUR_S / 2 if load else 0.0)
            else:
                waits.append(erlang_c_wait(b / HOUR_S, sc.build_s, max(1, math.floor(free)))[0])
        job_s = math.ceil(rebuilt * sc.timezones / servers) * sc.build_s
        # Detection waits for the next check: uniform over the interval.
        setattr(d, f"{attr}_p50", 0.5 * interval + float(np.mean(waits)) + job_s)
        setattr(d, f"{attr}_p99", 0.99 * interval + max(waits) + job_s)
    d.partitions_built = builds
    d.warehouse_queries = checks_per_day + builds
    d.warehouse_busy_s = checks_per_day * REFRESH_KEY_QUERY_S + builds * sc.build_s
    d.stale_share = sc.extra.get("old_row_share", 0.1) if incremental else 0.0
    worker = 24 * (PRICES["fargate_vcpu_h_arm"][0] * 1 + PRICES["fargate_gb_h_arm"][0] * 2)
    d.fixed_per_day = worker  # one refresh worker task, 1 vCPU / 2 GB
    if every_s < CUBE_WORKER_TICK_S:
        d.notes.append(f"a {every_s:.0f} s refresh_key is checked at the worker's {CUBE_WORKER_TICK_S} s tick")
    return d


def _fmt_s(s: float) -> str:
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"
