"""The simulated day: tenants, their mutation rates, the MSK batches that carry them, and the plan that
decides which tenants and which part of each hour go through the real code.

Everything is generated from a seeded numpy generator, so a scenario gives the same day every run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

DAY_S = 86_400
HOUR_S = 3_600

# Share of a day's mutations per hour (UTC), business-day shaped: quiet night, a morning peak and an
# afternoon peak at about 2x the mean. Normalised to mean 1 below.
_DIURNAL = (
    0.25, 0.2, 0.2, 0.2, 0.25, 0.35, 0.6, 1.0, 1.6, 1.9, 2.0, 1.9,
    1.6, 1.7, 1.9, 1.9, 1.7, 1.4, 1.1, 0.8, 0.6, 0.45, 0.35, 0.3,
)  # fmt: skip
DIURNAL = tuple(v * 24 / sum(_DIURNAL) for v in _DIURNAL)
FLAT = (1.0,) * 24


@dataclass(frozen=True)
class Scenario:
    """One simulated day. Defaults follow template.yaml (batch size 100, window 1 s, W 30 s) and the
    measured build time; bench/sim/scenarios/*.yaml override them (bench/sim/config.py)."""

    name: str = "default"
    tenants: int = 1_000
    mutations_per_tenant_day: float = 50.0  # mean over tenants; Zipf decides who gets them
    zipf_s: float = 1.0  # tenant i (1-based) gets a share proportional to 1 / i**s
    entity_types: int = 3  # per tenant, each mapped to one cube (one refresh key per tenant and type)
    profile: tuple[float, ...] = DIURNAL  # hourly multipliers, mean 1
    burst: tuple[int, int, float] | None = None  # (hour, minutes, factor): a bulk import on top
    window_s: float = 30.0  # CUBE_PREAGG_DEBOUNCE_MS / 1000
    partitions: int = 6  # topic partitions
    batch_size: int = 100  # BatchSize
    batch_window_s: float = 1.0  # MaximumBatchingWindowInSeconds
    kafka_key: str = "entity"  # how producers key records: "entity" spreads a tenant over partitions
    timezones: int = 1  # CUBE_TIMEZONES
    unpartitioned_rollups: int = 0  # per cube: rollups without a time dimension (one table each)
    partitioned_rollups: int = 1  # per cube: rollups partitioned by month
    preagg_partitions: int = 12  # partitions of each partitioned rollup (monthly over a year)
    newest_share: float = 0.8  # share of mutations whose row lies in the newest partition
    partition_precise: bool = False  # routes with partitionBy: a refresh rebuilds the touched partitions
    build_s: float = 0.06  # Cube build slot time per partition (measured: bench/sim/build_time.py)
    key_query_s: float = 0.015  # slot time of a refresh-key or range query: assumed, a quarter of a build
    cube_concurrency: int = 10  # Cube's queue concurrency for the data source (10 for most warehouses)
    cube_fail_rate: float = 0.0  # share of job POSTs answered 5xx
    build_timeout_s: float = 1_800.0  # CUBE_PREAGG_BUILD_TIMEOUT_MS / 1000
    max_window_s: float = 300.0  # CUBE_PREAGG_MAX_DEBOUNCE_MS / 1000 (the adaptive window's maximum)
    build_budget: int | None = None  # CUBE_PREAGG_BUILD_BUDGET (None: 4 x cube_concurrency; 0: off)
    verify: bool = True  # the service verifies builds (BuildVerifier), as deployed
    worker_timer_s: float = 30.0  # Cube's scheduledRefreshTimer (its default)
    budget: int = 250_000  # key decisions the real code may make (time slices, tenant sample)
    seed: int = 7
    extra: dict[str, float] = field(default_factory=dict, compare=False)

    def with_(self, **changes: object) -> Scenario:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def tables_per_cube(self) -> int:
        """Tables a whole-cube refresh rebuilds (per tenant)."""
        return self.unpartitioned_rollups + self.partitioned_rollups * self.preagg_partitions * self.timezones


def tenant_rates(sc: Scenario) -> np.ndarray:
    """Mean mutations per second of each tenant (index 0 is the busiest), before the daily profile."""
    ranks = np.arange(1, sc.tenants + 1, dtype=float)
    weights = ranks**-sc.zipf_s
    weights /= weights.sum()
    return weights * (sc.tenants * sc.mutations_per_tenant_day / DAY_S)


def tenant_partition(sc: Scenario) -> np.ndarray:
    """Partition of each tenant when records are keyed by tenant (Kafka's hash, modelled as uniform)."""
    return np.random.default_rng(sc.seed + 1).integers(0, sc.partitions, sc.tenants)


def hour_factor(sc: Scenario, hour: int, t0: float, t1: float) -> float:
    """Mean rate multiplier over [t0, t1) inside `hour`: the profile plus the burst, if it overlaps."""
    factor = sc.profile[hour % 24]
    if sc.burst is not None:
        b_hour, minutes, mult = sc.burst
        b0 = b_hour * HOUR_S
        b1 = b0 + minutes * 60
        overlap = max(0.0, min(t1, b1) - max(t0, b0))
        if overlap and t1 > t0:
            factor *= 1 + (mult - 1) * overlap / (t1 - t0)
    return factor


def partition_rates(sc: Scenario, rates: np.ndarray) -> np.ndarray:
    """Mean records per second on each partition, before the daily profile."""
    if sc.kafka_key == "tenant":
        return np.bincount(tenant_partition(sc), weights=rates, minlength=sc.partitions)
    return np.full(sc.partitions, rates.sum() / sc.partitions)


def flush_interval(sc: Scenario, rate: float) -> float:
    """Mean seconds between two batches of a partition receiving `rate` records/s: a batch opens with
    its first record and closes a batching window later, or when BatchSize records are in; the next
    one opens with the next record (on average 1 / rate later)."""
    if rate <= 0:
        return math.inf
    return min(sc.batch_window_s + 1 / rate, sc.batch_size / rate)


@dataclass
class Plan:
    """Which tenants and which seconds of each hour the real code sees, and the weights that scale
    their counts back to the whole population and the whole hour."""

    tenants: np.ndarray  # indices of simulated tenants
    weights: np.ndarray  # tenant weight (1 / inclusion probability)
    slice_s: int  # simulated seconds per hour
    warmup_s: int
    estimated_decisions: float
    full_decisions: float

    @property
    def hour_scale(self) -> float:
        return HOUR_S / self.slice_s


def _decisions_per_day(sc: Scenario, rates: np.ndarray, part_rates: np.ndarray) -> np.ndarray:
    """Expected (key, batch) pairs per tenant per day: a key is decided at most once per batch."""
    key_rates = rates / sc.entity_types
    out = np.zeros(sc.tenants)
    parts = tenant_partition(sc) if sc.kafka_key == "tenant" else None
    for hour in range(24):
        f = sc.profile[hour]
        intervals = np.array([flush_interval(sc, r * f) for r in part_rates])
        if parts is None:
            batch_rate = float(np.sum(1 / intervals))
            lam_per_batch = key_rates * f / batch_rate
            out += sc.entity_types * batch_rate * HOUR_S * -np.expm1(-lam_per_batch)
        else:
            batch_rate_t = 1 / intervals[parts]
            out += sc.entity_types * batch_rate_t * HOUR_S * -np.expm1(-(key_rates * f) / batch_rate_t)
    return out


def make_plan(sc: Scenario, rates: np.ndarray) -> Plan:
    warmup = int(2 * sc.window_s + 60)
    per_tenant = _decisions_per_day(sc, rates, partition_rates(sc, rates))
    full = float(per_tenant.sum())
    slice_s = HOUR_S
    for candidate in (3_600, 1_800, 1_200, 600, 300):
        slice_s = candidate
        if full * (candidate + warmup) / HOUR_S <= sc.budget:
            break
    cost = per_tenant * (slice_s + warmup) / HOUR_S
    if cost.sum() <= sc.budget:
        return Plan(np.arange(sc.tenants), np.ones(sc.tenants), slice_s, warmup, float(cost.sum()), full)
    # The busiest tenants always run in full (they dominate every count); the tail is sampled.
    cumulative = np.cumsum(cost)
    top = max(10, int(np.searchsorted(cumulative, sc.budget / 2)))
    top = min(top, sc.tenants)
    rest_cost = float(cost[top:].sum())
    room = max(sc.budget - float(cumulative[top - 1]), sc.budget * 0.1)
    p = min(1.0, room / rest_cost) if rest_cost else 1.0
    rng = np.random.default_rng(sc.seed + 2)
    tail = np.arange(top, sc.tenants)
    picked = tail[rng.random(tail.size) < p]
    if picked.size < min(30, tail.size):  # keep enough of the tail to estimate it
        picked = np.sort(rng.choice(tail, min(30, tail.size), replace=False))
        p = picked.size / tail.size
    chosen = np.concatenate([np.arange(top), picked])
    weights = np.concatenate([np.ones(top), np.full(picked.size, 1 / p)])
    return Plan(chosen, weights, slice_s, warmup, float(cost[chosen].sum()), full)


@dataclass
class KeyBatch:
    """The records of one refresh key in one MSK batch, as the real code would coalesce them."""

    flush_s: float
    partition: int
    tenant: int
    etype: int
    oldest_s: float
    count: int


def _batch_ids(times: np.ndarray, rate: float, sc: Scenario, rng: np.random.Generator, t0: float) -> np.ndarray:
    """Flush time of the batch that carries each arrival (times sorted). A busy partition closes a batch
    every window (or when BatchSize fills it); a quiet one opens a batch at its first record and
    closes it one window later."""
    iv = flush_interval(sc, rate)
    if rate * sc.batch_window_s >= 1:
        phase = t0 + rng.random() * iv
        k = np.ceil((times - phase) / iv)
        return phase + k * iv
    flushes = np.empty_like(times)
    close = -math.inf
    for i, t in enumerate(times):
        if t > close:
            close = t + sc.batch_window_s
        flushes[i] = close
    return flushes


def slice_batches(
    sc: Scenario, rates: np.ndarray, plan: Plan, hour: int, rng: np.random.Generator
) -> tuple[list[KeyBatch], float, float]:
    """Arrivals of the simulated tenants in the hour's slice (with warm-up before it), each assigned to
    the batch of its partition that closes after it. Returns the key-batches sorted by flush time, and
    the slice's start and end (seconds since midnight). The slice sees the hour's mean rate (a burst
    inside the hour is spread over it)."""
    start = hour * HOUR_S + (HOUR_S - plan.slice_s) // 2
    end = start + plan.slice_s
    gen0 = start - plan.warmup_s
    factor = hour_factor(sc, hour, hour * HOUR_S, (hour + 1) * HOUR_S)
    part_rates = partition_rates(sc, rates) * factor
    tparts = tenant_partition(sc)
    duration = end - gen0
    lam = np.repeat(rates[plan.tenants] * factor / sc.entity_types, sc.entity_types)
    key_tenant = np.repeat(plan.tenants, sc.entity_types)
    key_etype = np.tile(np.arange(sc.entity_types), plan.tenants.size)
    return (
        key_batches(sc, lam, key_tenant, key_etype, gen0, duration, part_rates, tparts, rng),
        float(start),
        float(end),
    )


def key_batches(
    sc: Scenario,
    lam: np.ndarray,
    key_tenant: np.ndarray,
    key_etype: np.ndarray,
    gen0: float,
    duration: float,
    part_rates: np.ndarray,
    tparts: np.ndarray,
    rng: np.random.Generator,
) -> list[KeyBatch]:
    """Poisson arrivals at `lam[i]` records/s on key i (tenant `key_tenant[i]`, entity type
    `key_etype[i]`) over [gen0, gen0 + duration), each assigned to the batch of its partition that
    closes after it; the key-batches sorted by flush time."""
    n = rng.poisson(lam * duration)
    key_of = np.repeat(np.arange(lam.size), n)
    times = gen0 + rng.random(key_of.size) * duration
    by_tenant = sc.kafka_key == "tenant"
    parts = tparts[key_tenant[key_of]] if by_tenant else rng.integers(0, sc.partitions, key_of.size)
    flush = np.empty_like(times)
    for p in range(sc.partitions):
        idx = np.flatnonzero(parts == p)
        if idx.size == 0:
            continue
        idx = idx[np.argsort(times[idx], kind="stable")]
        flush[idx] = _batch_ids(times[idx], float(part_rates[p]), sc, rng, gen0)
    order = np.lexsort((times, key_of, parts, flush))
    f_s, k_s, p_s, t_s = flush[order], key_of[order], parts[order], times[order]
    boundary = np.ones(order.size, dtype=bool)
    boundary[1:] = (f_s[1:] != f_s[:-1]) | (k_s[1:] != k_s[:-1]) | (p_s[1:] != p_s[:-1])
    firsts = np.flatnonzero(boundary)
    counts = np.diff(np.append(firsts, order.size))
    return [
        KeyBatch(float(f_s[i]), int(p_s[i]), int(key_tenant[k_s[i]]), int(key_etype[k_s[i]]), float(t_s[i]), int(c))
        for i, c in zip(firsts, counts, strict=True)
    ]


def msk_invocations(sc: Scenario, rates: np.ndarray) -> tuple[float, float]:
    """MSK batches (Lambda invocations) per day over all tenants, and records per day."""
    part_rates = partition_rates(sc, rates)
    invocations = 0.0
    records = 0.0
    for hour in range(24):
        f = hour_factor(sc, hour, hour * HOUR_S, (hour + 1) * HOUR_S)
        for r in part_rates:
            rate = float(r * f)
            if rate <= 0:
                continue
            records += rate * HOUR_S
            invocations += HOUR_S / flush_interval(sc, rate)
    return invocations, records
