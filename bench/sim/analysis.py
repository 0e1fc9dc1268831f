"""From simulated counts to the figures docs/scale.md shows: Cube's build queue and freshness over the
day, costs under each pricing option, and the alternatives (Cube's refresh worker as calibrated in
bench/sim/cube_worker.py, the seed's in-memory debounce), computed on the same workload.

Prices and pricing options come from the scenario file (bench/sim/config.py `Pricing`); sources and
what is assumed are listed there and in docs/scale.md."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from bench.sim.config import Pricing, WarehousePricing
from bench.sim.cube_worker import Population, worker_hourly
from bench.sim.engine import Coverage, OursResult, target_names, tenant_id
from bench.sim.workload import DAY_S, HOUR_S, Scenario, hour_factor, tenant_rates
from handler.domain.model import RefreshKey

DAYS_PER_MONTH = 730 / 24

# Lambda (modelled from bench/bench_handler.py on this machine, see bench/README.md)
CPU_US_PER_RECORD = 5.0  # 200,000 records/s of CPU time through the whole handler
CPU_MS_PER_INVOCATION = 3.0  # decorators, metrics flush, answer: assumed
FULL_VCPU_MB = 1769  # Lambda gives one vCPU at 1,769 MB; less memory, proportionally less CPU
MEMORY_MB = 512  # template.yaml FunctionMemoryMb
IO_THREADS = 8  # wiring.IO_THREADS: a batch's remote calls run side by side
DDB_WRITE_MS = 5.0  # assumed in-region conditional write
SQS_SEND_MS = 8.0  # assumed
CUBE_POST_MS = 20.0  # Cube answers a jobs POST in 8-30 ms warm (measured on the local stack)
SQS_IDLE_RECEIVES_PER_DAY = 5 * DAY_S / 20  # 5 long polls of 20 s while idle (Lambda's SQS pollers): assumed
TARGET_UTILISATION = 0.8  # "enough queue slots": the peak hour at 80 % busy
QUEUE_DT_S = 1.0  # step of the time-stepped queue of the modelled designs
FRESHNESS_SAMPLES = 40_000


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if values.size == 0:
        return math.nan
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][min(len(cum) - 1, np.searchsorted(cum, q / 100 * cum[-1]))])


@dataclass
class Design:
    """One design's day: the figures of the comparison tables."""

    name: str
    lambda_invocations: float = 0.0
    lambda_gb_s: float = 0.0
    ddb_wcu: float = 0.0
    ddb_rcu: float = 0.0
    sqs_requests: float = 0.0
    cube_posts: float = 0.0
    cube_gets: float = 0.0
    partitions_built: float = 0.0
    key_queries: float = 0.0  # refresh-key and partition-range queries
    busy_per_hour: list[float] = field(default_factory=lambda: [0.0] * 24)  # slot-seconds
    jobs_per_hour: list[float] = field(default_factory=lambda: [0.0] * 24)  # arrivals waking the warehouse
    peak_utilisation: float = 0.0  # of the configured slots, peak hour
    onset_load: float = 0.0  # peak-hour slot-seconds per second before any re-trigger feedback
    slots_needed: int = 0
    lag_p50: float = math.nan  # with the configured slots (queue simulated over the day)
    lag_p99: float = math.nan
    sized_p50: float = math.nan  # with enough slots (no queueing)
    sized_p99: float = math.nan
    max_wait_s: float = 0.0  # the longest queue wait of the day (configured slots)
    stale_share: float = 0.0  # share of mutations no refresh covers
    fixed_per_day: float = 0.0  # pollers, worker task
    worker: bool = False  # Cube's refresh worker: no Lambda, no poller
    timeline: tuple[np.ndarray, np.ndarray] | None = None  # (t of mutation, lag) samples, configured slots
    backlog: tuple[np.ndarray, np.ndarray] | None = None  # (t, wait s)
    notes: list[str] = field(default_factory=list)

    @property
    def warehouse_queries(self) -> float:
        return self.partitions_built + self.key_queries

    @property
    def warehouse_busy_s(self) -> float:
        return sum(self.busy_per_hour)

    def aws_per_day(self, p: Pricing) -> dict[str, float]:
        fixed = self.fixed_per_day if self.worker else p.poller_usd_per_day()
        return {
            "lambda": self.lambda_invocations * p.lambda_request + self.lambda_gb_s * p.lambda_gb_s_arm,
            "dynamodb": self.ddb_wcu * p.ddb_wru + self.ddb_rcu * p.ddb_rru,
            "sqs": self.sqs_requests * p.sqs_request,
            "fixed": fixed,
        }

    def aws_monthly(self, p: Pricing) -> float:
        return sum(self.aws_per_day(p).values()) * DAYS_PER_MONTH

    def warehouse_monthly(self, w: WarehousePricing, slots: int) -> dict[str, float]:
        """$ per month under each warehouse pricing model."""
        busy_h = self.warehouse_busy_s / 3600
        billed_s = 0.0
        for busy, jobs in zip(self.busy_per_hour, self.jobs_per_hour, strict=True):
            on = 1 - math.exp(-busy / 3600)  # share of the hour with at least one query running
            rate = jobs / 3600
            awake = 3600 * (1 - (1 - on) * math.exp(-rate * w.auto_suspend_s))
            # One warehouse runs `slots` queries at once; more work than that needs more clusters.
            billed_s += max(awake, busy / slots)
        tib = (self.partitions_built * w.bytes_per_build + self.key_queries * w.bytes_per_key_query) / 2**40
        return {
            "busy_hour": busy_h * w.busy_hour_usd * DAYS_PER_MONTH,
            "per_second": billed_s / 3600 * w.per_second_usd_per_hour * DAYS_PER_MONTH,
            "bytes_scanned": tib * w.usd_per_tib * DAYS_PER_MONTH,
            "provisioned": 24 * w.provisioned_usd_per_hour * DAYS_PER_MONTH,
        }


def _vcpu_factor() -> float:
    return max(1.0, FULL_VCPU_MB / MEMORY_MB)


def slots_for(peak_load: float, configured: int) -> int:
    """Queue slots that keep the peak load (busy slots on average) at TARGET_UTILISATION."""
    return max(configured, math.ceil(peak_load / TARGET_UTILISATION))


def _hour_of(t: np.ndarray) -> np.ndarray:
    return np.clip((t // HOUR_S).astype(int), 0, 23)


def ours(sc: Scenario, r: OursResult, name: str = "event-driven (this project)") -> Design:
    c = defaultdict(float, r.counts)
    d = Design(name)
    sqs_inv = c["sqs_invocations"]
    d.lambda_invocations = r.msk_invocations + sqs_inv + c["msk_retries"]
    vf = _vcpu_factor()
    msk_cpu_ms = r.msk_invocations * CPU_MS_PER_INVOCATION + r.records * CPU_US_PER_RECORD / 1000
    par = min(IO_THREADS, max(1.0, c["decisions"] / max(r.msk_invocations, 1)))
    remote_ms = (
        c["ddb_writes"] * DDB_WRITE_MS
        + (c["cube_posts"] + c["cube_gets"]) * CUBE_POST_MS
        + c["sqs_sends"] * SQS_SEND_MS
    ) / par
    sqs_cpu_ms = sqs_inv * CPU_MS_PER_INVOCATION
    d.lambda_gb_s = ((msk_cpu_ms + sqs_cpu_ms) * vf + remote_ms) / 1000 * MEMORY_MB / 1024
    d.ddb_wcu = c["ddb_writes"]
    d.ddb_rcu = c["ddb_reads"] / 2  # eventually consistent reads of items under 4 KB: half a unit
    # send + (receive + delete-batch) per SQS invocation + idle long polls
    d.sqs_requests = c["sqs_sends"] + 2 * sqs_inv + SQS_IDLE_RECEIVES_PER_DAY
    d.cube_posts = c["cube_posts"]
    d.cube_gets = c["cube_gets"]
    d.partitions_built = c["partitions_built"]
    d.busy_per_hour = [b * sc.build_s for b in r.builds_per_hour]
    d.jobs_per_hour = list(r.posts_per_hour)
    peak = max(d.busy_per_hour) / HOUR_S
    d.peak_utilisation = peak / sc.cube_concurrency
    d.slots_needed = slots_for(peak, sc.cube_concurrency)
    d.onset_load = max(r.first_builds_per_hour) * sc.build_s / HOUR_S
    rows = r.rows
    never = r.uncovered
    total = float(rows[:, 3].sum()) + never if rows.size else never
    d.stale_share = never / total if total else 0.0
    if rows.size:
        done, weights = rows[:, 2], rows[:, 3]
        sized = rows[:, 1] + CUBE_POST_MS / 1000 + sc.build_s
        d.lag_p50, d.lag_p99 = _percentiles(done, weights, never)
        d.sized_p50, d.sized_p99 = _percentiles(sized, weights, never)
        d.timeline = (rows[:, 0], done)
    if r.backlog:
        arr = np.array(r.backlog)
        d.backlog = (arr[:, 0], arr[:, 1])
        d.max_wait_s = float(arr[:, 1].max())
    c_fail = c["dead_letters"]
    if c_fail:
        d.notes.append(f"{c_fail:,.0f} builds dead-lettered a day")
    return d


def _percentiles(values: np.ndarray, weights: np.ndarray, never: float = 0.0) -> tuple[float, float]:
    if never:  # mutations no refresh covered count as never fresh
        values = np.append(values, math.inf)
        weights = np.append(weights, never)
    return weighted_percentile(values, weights, 50), weighted_percentile(values, weights, 99)


def seed_design(sc: Scenario, r: OursResult, instances: int) -> Design:
    """The seed's design: each Lambda instance keeps its own last-refresh time per key in memory and
    refreshes on a mutation if its own window is over; a mutation inside the window is dropped (no
    trailing refresh, no shared state, no verification). `instances` concurrent instances (the MSK
    pollers) share the partitions. Fed with the same key-batches as the real-code run (whole-target)."""
    d = Design(f"seed in-memory debounce, K={instances}")
    weight_of = {int(t): float(w) * r.plan.hour_scale for t, w in zip(r.plan.tenants, r.plan.weights, strict=True)}
    targets = target_names(sc)
    posts_per_hour = [0.0] * 24
    claims: list[tuple[float, float, float, float]] = []
    uncovered = 0.0
    for hour, batches in r.key_batches.items():
        start, end = r.slices[hour]
        last: list[dict[RefreshKey, float]] = [{} for _ in range(instances)]
        coverage = Coverage()
        for kb in sorted(batches, key=lambda b: b.oldest_s):
            coverage.add(kb.tenant, kb.etype, 0, kb.oldest_s, kb.count)
        for kb in batches:
            key = RefreshKey(tenant_id(kb.tenant), targets[kb.etype])
            mine = last[kb.partition % instances]
            t = kb.flush_s
            if t - mine.get(key, -math.inf) >= sc.window_s:
                mine[key] = t
                if start <= t < end:
                    posts_per_hour[hour] += weight_of[kb.tenant]
                coverage.cover((kb.tenant, kb.etype, 0), t, t, weight_of[kb.tenant], start, end)
        claims.extend(coverage.rows)
        uncovered += coverage.uncovered(weight_of, start, end)
    tables = sc.tables_per_cube
    d.lambda_invocations = r.msk_invocations
    vf = _vcpu_factor()
    cpu_ms = r.msk_invocations * CPU_MS_PER_INVOCATION + r.records * CPU_US_PER_RECORD / 1000
    posts = sum(posts_per_hour)
    d.lambda_gb_s = (cpu_ms * vf + posts * CUBE_POST_MS / IO_THREADS) / 1000 * MEMORY_MB / 1024
    d.cube_posts = posts
    d.partitions_built = posts * tables
    d.busy_per_hour = [p * tables * sc.build_s for p in posts_per_hour]
    d.jobs_per_hour = posts_per_hour
    peak = max(d.busy_per_hour) / HOUR_S
    d.peak_utilisation = peak / sc.cube_concurrency
    d.slots_needed = slots_for(peak, sc.cube_concurrency)
    d.onset_load = peak
    rows = np.array(claims) if claims else np.zeros((0, 4))
    _queue_freshness(d, sc, rows[:, 0], rows[:, 1], rows[:, 3], [p / HOUR_S for p in posts_per_hour], tables, uncovered)
    d.stale_share = uncovered / (float(rows[:, 3].sum()) + uncovered) if rows.size or uncovered else 0.0
    d.notes.append("stale share: mutations left unrefreshed until the end of their hour's slice")
    return d


def _queue_freshness(
    d: Design,
    sc: Scenario,
    times: np.ndarray,
    claim_lags: np.ndarray,
    weights: np.ndarray,
    jobs_per_s_by_hour: list[float],
    builds_per_job: float,
    never: float = 0.0,
    *,
    bursts: tuple[np.ndarray, float] | None = None,
) -> None:
    """Freshness of a modelled design: each mutation (at `times`, covered after `claim_lags`) waits
    in the day's build queue, simulated step by step from the hourly job rates (Poisson), or, with
    `bursts=(start times, builds)`, from a burst of builds at each time (an `every` key rebuilds
    everything at once). Fills the lags with the configured slots and with enough slots."""
    rng = np.random.default_rng(sc.seed + 11)
    steps = int(DAY_S / QUEUE_DT_S)
    t_steps = np.arange(steps) * QUEUE_DT_S
    work = builds_per_job * sc.build_s
    if bursts is None:
        rate = np.repeat(np.array(jobs_per_s_by_hour), int(HOUR_S / QUEUE_DT_S))
        jobs = rng.poisson(np.maximum(rate, 0) * QUEUE_DT_S).astype(float)
    else:
        burst_starts, per_burst = bursts
        jobs = np.zeros(steps)
        idx = (burst_starts[burst_starts < DAY_S] / QUEUE_DT_S).astype(int)
        np.add.at(jobs, idx, per_burst / max(builds_per_job, 1e-9))
        jobs += rng.poisson(np.repeat(np.array(jobs_per_s_by_hour), int(HOUR_S / QUEUE_DT_S)) * QUEUE_DT_S)
    waits = _lindley(jobs * work, sc.cube_concurrency)
    d.backlog = (t_steps, waits / sc.cube_concurrency)
    d.max_wait_s = float(waits.max() / sc.cube_concurrency)
    if times.size == 0:
        return
    at = np.clip(((times + claim_lags) / QUEUE_DT_S).astype(int), 0, steps - 1)
    position = rng.random(at.size) * jobs[at] * work  # where in its step's arrivals this build is
    own = math.ceil(builds_per_job / sc.cube_concurrency) * sc.build_s
    lags = claim_lags + (waits[at] + position) / sc.cube_concurrency + own
    d.lag_p50, d.lag_p99 = _percentiles(lags, weights, never)
    d.sized_p50, d.sized_p99 = _percentiles(claim_lags + sc.build_s, weights, never)
    d.timeline = (times, lags)


def _lindley(arrivals: np.ndarray, slots: int) -> np.ndarray:
    """Work waiting at the start of each step (before its arrivals)."""
    net = arrivals - slots * QUEUE_DT_S
    cumulative = np.concatenate([[0.0], np.cumsum(net)])
    floor = np.minimum.accumulate(np.minimum(cumulative, 0.0))
    return (cumulative - floor)[:-1]


# --------------------------------------------------------------------------- Cube's refresh worker

WORKER_KINDS = {
    "every": "`every` key",
    "sql": "`sql` key",
    "filter": "`sql` key with FILTER_PARAMS (one per partition)",
    "incremental": "`every` + `incremental` + `update_window`",
}


def population(sc: Scenario) -> Population:
    rates = tenant_rates(sc) / sc.entity_types
    key_rates = np.repeat(rates, sc.entity_types)  # one key per tenant and cube
    return Population(
        key_rates=key_rates,
        cubes=1,  # key_rates already lists every (tenant, cube)
        unpartitioned=sc.unpartitioned_rollups,
        partitioned=sc.partitioned_rollups,
        partitions=sc.preagg_partitions,
        timezones=sc.timezones,
        newest_share=sc.newest_share,
        partitions_in_window=1,
    )


def cube_worker(sc: Scenario, kind: str, every_s: float, p: Pricing, pop: Population | None = None) -> Design:
    """Cube's refresh worker on the same workload, by the calibrated tick rules (bench/sim/cube_worker.py,
    checked against the real worker by cube_worker_check.py), hour by hour.

    Unlike this project's function, the worker cannot flood its own queue: a tick that has not finished
    makes the scheduler skip the next ones ("Previous interval was not finished"), and it runs the
    tenants one after another (`scheduledRefreshBatchSize` 1). So when an hour's work exceeds the slots
    (utilisation u > 1), its cycle stretches by u: it reads keys and rebuilds u times less often, the
    slots are busy all the time, and a change waits for a cycle u times longer."""
    label = f"Cube refresh worker, {WORKER_KINDS[kind]}, every {_fmt_s(every_s)}"
    d = Design(label, worker=True)
    pop = pop or population(sc)
    nominal = [worker_hourly(pop, kind, every_s, sc.worker_timer_s, hour_factor(sc, h, h * HOUR_S, (h + 1) * HOUR_S))
               for h in range(24)]  # fmt: skip
    n = sc.cube_concurrency
    work = [h.builds * sc.build_s + (h.key_queries + h.range_queries) * sc.key_query_s for h in nominal]
    stretch = [max(1.0, w / HOUR_S / n) for w in work]
    d.peak_utilisation = max(work) / HOUR_S / n  # the load it would bring; it runs at most n slots busy
    d.onset_load = max(work) / HOUR_S
    d.slots_needed = slots_for(max(work) / HOUR_S, n)
    d.key_queries = sum((h.key_queries + h.range_queries) / f for h, f in zip(nominal, stretch, strict=True))
    d.partitions_built = sum(h.builds / f for h, f in zip(nominal, stretch, strict=True))
    d.busy_per_hour = [w / f for w, f in zip(work, stretch, strict=True)]
    d.jobs_per_hour = [(h.key_queries + h.range_queries + h.builds) / f for h, f in zip(nominal, stretch, strict=True)]
    period = nominal[0].detect_period_s
    cycle = max(every_s, period) if kind in ("every", "incremental") else period
    # Mutations sampled over the day by the hourly profile; each waits for the next cycle that looks.
    rng = np.random.default_rng(sc.seed + 13)
    profile = np.array([hour_factor(sc, h, h * HOUR_S, (h + 1) * HOUR_S) for h in range(24)])
    hours_of = rng.choice(24, FRESHNESS_SAMPLES, p=profile / profile.sum())
    times = hours_of * HOUR_S + rng.random(FRESHNESS_SAMPLES) * HOUR_S
    weights = np.ones(FRESHNESS_SAMPLES)
    never_share = nominal[0].never_share
    never = never_share / (1 - never_share) * FRESHNESS_SAMPLES if never_share < 1 else math.inf
    query_jobs = [(h.key_queries + h.range_queries) / f * sc.key_query_s / sc.build_s / HOUR_S
                  for h, f in zip(nominal, stretch, strict=True)]  # fmt: skip
    if kind in ("every", "incremental"):  # each cycle rebuilds every table in the window, all at once
        starts = [0.0]
        while starts[-1] < DAY_S:
            starts.append(starts[-1] + cycle * stretch[min(23, int(starts[-1] // HOUR_S))])
        cycle_starts = np.array(starts)
        detect = cycle_starts[np.searchsorted(cycle_starts, times)] - times
        per_cycle = nominal[0].builds * max(every_s, period) / HOUR_S
        _queue_freshness(d, sc, times, detect, weights, query_jobs, 1.0, never, bursts=(cycle_starts, per_cycle))
    else:  # seen at the tenant's next key read, one cycle apart
        detect = rng.random(FRESHNESS_SAMPLES) * cycle * np.array(stretch)[hours_of]
        jobs = [h.builds / f / HOUR_S + q for h, f, q in zip(nominal, stretch, query_jobs, strict=True)]
        _queue_freshness(d, sc, times, detect, weights, jobs, 1.0, never)
    # With enough slots the cycle keeps its nominal length.
    nominal_detect = np.ceil(times / cycle) * cycle - times if kind in ("every", "incremental") else (
        rng.random(FRESHNESS_SAMPLES) * cycle)  # fmt: skip
    d.sized_p50, d.sized_p99 = _percentiles(nominal_detect + sc.build_s, weights, never)
    d.stale_share = never_share
    d.fixed_per_day = 24 * (p.fargate_vcpu_h_arm * 1 + p.fargate_gb_h_arm * 2)  # one worker task, 1 vCPU / 2 GB
    if max(stretch) > 1:
        d.notes.append(f"the worker cannot keep up: its cycle stretches up to {max(stretch):.1f}x at the peak")
    return d


def _fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.0f} h"
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"
