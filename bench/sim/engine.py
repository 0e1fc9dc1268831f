"""The event-driven design, simulated with the real domain code.

Per simulated hour slice: a fresh `InMemoryDebounceStore` (wrapped to count writes), the real
`Debouncer` and `RefreshService`, a simulated clock, a heap of SQS deliveries, and a Cube stand-in that
counts job requests and partitions. MSK batches come from `workload.slice_batches`; each batch is one
`RefreshService.process_mutations` call with one record per (key, batch) (coalescing makes the other
records of that key in that batch change nothing but the record count, which the cost model adds).
Trailing refreshes are delivered back through `RefreshService.process_trailing`, up to 10 per
invocation, as the SQS event source does. Counts are weighted: tenant weight x (3600 / slice)."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.sim.workload import KeyBatch, Plan, Scenario, make_plan, msk_invocations, slice_batches, tenant_rates
from handler.adapters.memory import CountingTelemetry, InMemoryDebounceStore
from handler.domain.debounce import Debouncer
from handler.domain.errors import CubeServerError
from handler.domain.model import EntityMutation, RecordRef, RefreshKey, Selector
from handler.domain.ports import CubeAnswer, KeyState, TrailingMessage, WriteResult
from handler.domain.routing import EntityCubeMap
from handler.domain.service import Outcome, RefreshService

SQS_MAX_DELAY_S = 900
SQS_DELIVERY_LAG_MS = 500  # a delayed message becomes visible, then a long poll picks it up
SQS_BATCH = 10  # the Trailing event's BatchSize in template.yaml
SQS_VISIBILITY_MS = 360_000  # template.yaml, 60 s function timeout
MSK_RETRY_MS = 1_000  # a batch with failed records comes back (bisected) about a second later
DRAIN_S = 3 * 3_600  # after a slice: deliver what is still queued, create no new mutations
DAY0_MS = 1_795_910_400_000  # a midnight UTC: simulated time 0


class SimClock:
    def __init__(self) -> None:
        self.ms = 0

    def now_ms(self) -> int:
        return self.ms


@dataclass
class Meter:
    """Weighted counters; `scale` is 0 outside the measured slice (warm-up and drain)."""

    tenant_weight: dict[str, float]
    scale: float = 0.0
    counts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    hot_key_writes: dict[RefreshKey, list[int]] = field(default_factory=dict)  # key -> [second, n, max]

    def add(self, name: str, tenant: str, n: float = 1.0) -> None:
        if self.scale:
            self.counts[name] += n * self.tenant_weight[tenant] * self.scale

    def key_write(self, key: RefreshKey, now_ms: int) -> None:
        second = now_ms // 1000
        slot = self.hot_key_writes.get(key)
        if slot is None:
            self.hot_key_writes[key] = [second, 1, 1]
        elif slot[0] == second:
            slot[1] += 1
            slot[2] = max(slot[2], slot[1])
        else:
            slot[0], slot[1] = second, 1


class CountingStore(InMemoryDebounceStore):
    """The in-memory store (same conditional semantics as DynamoDB), counting every write, failed
    conditions included: DynamoDB bills a failed conditional write like a successful one."""

    def __init__(self, meter: Meter, clock: SimClock) -> None:
        super().__init__()
        self.meter = meter
        self.clock = clock

    def _write(self, key: RefreshKey) -> None:
        self.meter.add("ddb_writes", key.tenant_id)
        self.meter.key_write(key, self.clock.ms)

    def claim(self, key: RefreshKey, **kw: object) -> WriteResult:  # type: ignore[override]
        self._write(key)
        return super().claim(key, **kw)  # type: ignore[arg-type]

    def release(self, key: RefreshKey, **kw: object) -> bool:  # type: ignore[override]
        self._write(key)
        return super().release(key, **kw)  # type: ignore[arg-type]

    def join_trailing(self, key: RefreshKey, **kw: object) -> WriteResult:  # type: ignore[override]
        self._write(key)
        return super().join_trailing(key, **kw)  # type: ignore[arg-type]

    def schedule_trailing(self, key: RefreshKey, **kw: object) -> WriteResult:  # type: ignore[override]
        self._write(key)
        return super().schedule_trailing(key, **kw)  # type: ignore[arg-type]

    def finish_trailing(self, key: RefreshKey, **kw: object) -> bool:  # type: ignore[override]
        self._write(key)
        return super().finish_trailing(key, **kw)  # type: ignore[arg-type]

    def drop_trailing(self, key: RefreshKey, **kw: object) -> bool:  # type: ignore[override]
        self._write(key)
        return super().drop_trailing(key, **kw)  # type: ignore[arg-type]

    def get(self, key: RefreshKey) -> KeyState | None:
        self.meter.add("ddb_reads", key.tenant_id)
        return super().get(key)


class HeapScheduler:
    """SQS with DelaySeconds: whole seconds, at most 900, then a delivery lag."""

    def __init__(self, meter: Meter, events: list[tuple[int, int, str, object]], seq: itertools.count[int]) -> None:
        self.meter = meter
        self.events = events
        self.seq = seq

    def schedule(self, message: TrailingMessage, *, now: int) -> None:
        self.meter.add("sqs_sends", message.tenant_id)
        delay_s = min(SQS_MAX_DELAY_S, max(0, math.ceil((message.due_at - now) / 1000)))
        at = now + delay_s * 1000 + SQS_DELIVERY_LAG_MS
        heapq.heappush(self.events, (at, next(self.seq), "sqs", message))


class SimCube:
    """Cube's jobs API as the simulation sees it: one POST per tenant per invocation, jobs per
    target x timezone x partition built; a share of POSTs fails with a 5xx."""

    def __init__(self, sc: Scenario, meter: Meter, rng: np.random.Generator) -> None:
        self.sc = sc
        self.meter = meter
        self.rng = rng

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        answers: list[CubeAnswer] = []
        for selector in selectors:  # one POST per selector, as the HTTP adapter does
            self.meter.add("cube_posts", tenant_id)
            if self.sc.cube_fail_rate and self.rng.random() < self.sc.cube_fail_rate:
                self.meter.add("cube_failures", tenant_id)
                answers.append(CubeServerError("simulated 5xx", status=503))
                continue
            names = [*_names(selector.body, "cubes"), *_names(selector.body, "preAggregations")]
            jobs = self.sc.timezones * self.sc.parts_per_job
            tokens = [f"{tenant_id}-{name}-{i}" for name in names for i in range(jobs)]
            self.meter.add("partitions_built", tenant_id, len(tokens))
            answers.append(tokens)
        return answers


def _names(body: Mapping[str, object], field_name: str) -> list[str]:
    names = body.get(field_name) or []
    assert isinstance(names, list)
    return [str(n) for n in names]


@dataclass
class Coverage:
    """Per key, its key-batches in arrival order; a refresh claimed at t covers every record before t."""

    entries: dict[RefreshKey, list[KeyBatch]] = field(default_factory=dict)
    ptr: dict[RefreshKey, int] = field(default_factory=dict)
    # (lag_s without Cube's queue and build, weight, hour of the claim)
    lags: list[tuple[float, float, int]] = field(default_factory=list)

    def cover(
        self, key: RefreshKey, t_s: float, hour: int, weight_of: dict[int, float], start: float, end: float
    ) -> None:
        entries = self.entries.get(key)
        if not entries:
            return
        i = self.ptr.get(key, 0)
        while i < len(entries) and entries[i].oldest_s <= t_s:
            kb = entries[i]
            if start <= kb.oldest_s < end:
                self.lags.append((t_s - kb.oldest_s, kb.count * weight_of[kb.tenant], hour))
            i += 1
        self.ptr[key] = i

    def uncovered(self, weight_of: dict[int, float], start: float, end: float) -> float:
        total = 0.0
        for key, entries in self.entries.items():
            for kb in entries[self.ptr.get(key, 0) :]:
                if start <= kb.oldest_s < end:
                    total += kb.count * weight_of[kb.tenant]
        return total


def target_names(sc: Scenario) -> list[str]:
    if sc.entity_types <= 3:
        return ["Users", "Tenants", "Groups"][: sc.entity_types]
    return [f"Cube{i}" for i in range(sc.entity_types)]


def entity_names(sc: Scenario) -> list[str]:
    if sc.entity_types <= 3:
        return ["User", "Tenant", "Group"][: sc.entity_types]
    return [f"Entity{i}" for i in range(sc.entity_types)]


@dataclass
class OursResult:
    counts: dict[str, float]
    lags: list[tuple[float, float, int]]  # before queue/build
    builds_per_hour: list[float]
    uncovered: float
    hot_key_max_wcu: int
    msk_invocations: float
    records: float
    plan: Plan
    wall_s: float
    key_batches: dict[int, list[KeyBatch]]  # per hour, for the seed model
    slices: dict[int, tuple[float, float]]


def tenant_id(i: int) -> str:
    return f"t{i:06d}"


@dataclass
class SliceSetup:
    """What one simulated stretch of time needs besides its batches."""

    sc: Scenario
    meter: Meter
    weight_of: dict[int, float]  # tenant index -> weight of its records (lags)
    measure_scale: float  # meter scale inside [start, end)
    cube_rng: np.random.Generator
    tenant_name: Callable[[int], str] | None = None  # default: tenant_id


def play_slice(setup: SliceSetup, batches: list[KeyBatch], start: float, end: float, hour: int) -> Coverage:
    """Run MSK batches (seconds since DAY0) through the real RefreshService on a fresh store, with the
    SQS deliveries and MSK retries they cause, until nothing is left (or DRAIN_S after `end`)."""
    sc, meter = setup.sc, setup.meter
    name = setup.tenant_name or tenant_id
    targets = target_names(sc)
    etypes = entity_names(sc)
    routes = EntityCubeMap({e: [c] for e, c in zip(etypes, targets, strict=True)})
    clock = SimClock()
    events: list[tuple[int, int, str, object]] = []
    seq = itertools.count()
    store = CountingStore(meter, clock)
    scheduler = HeapScheduler(meter, events, seq)
    cube = SimCube(sc, meter, setup.cube_rng)
    tokens = itertools.count()
    debouncer = Debouncer(store, scheduler, clock, int(sc.window_s * 1000), new_token=lambda: str(next(tokens)))
    svc = RefreshService(routes, debouncer, cube, CountingTelemetry(), clock, ["UTC"])
    coverage = Coverage()
    for kb in sorted(batches, key=lambda b: b.oldest_s):
        coverage.entries.setdefault(RefreshKey(name(kb.tenant), targets[kb.etype]), []).append(kb)

    def refreshed(outcome: Outcome, t_ms: int) -> None:
        for ko in outcome.keys:
            if ko.status == "refreshed":
                coverage.cover(ko.key, (t_ms - DAY0_MS) / 1000, hour, setup.weight_of, start, end)

    def measure(t_ms: int) -> None:
        meter.scale = setup.measure_scale if start * 1000 <= t_ms - DAY0_MS < end * 1000 else 0.0

    def mutations(at: int, records: list[tuple[RecordRef, EntityMutation]]) -> None:
        outcome = svc.process_mutations(records, deadline_ms=at + 60_000)
        refreshed(outcome, at)
        failed = [r for r in records if r[0] in outcome.failed]
        if failed:  # the event source retries the failed records (bisected) about a second later
            heapq.heappush(events, (at + MSK_RETRY_MS, next(seq), "msk", failed))

    # MSK batches in flush order, merged with the heap of SQS deliveries and MSK retries.
    groups = ((k, list(g)) for k, g in itertools.groupby(batches, key=lambda b: (b.flush_s, b.partition)))
    pending = next(groups, None)
    offset = 0
    while pending is not None or events:
        next_batch_ms = DAY0_MS + math.ceil(pending[0][0] * 1000) if pending is not None else None
        if events and (next_batch_ms is None or events[0][0] < next_batch_ms):
            at, _, kind, payload = heapq.heappop(events)
            if at - DAY0_MS > (end + DRAIN_S) * 1000:
                break
            clock.ms = at
            measure(at)
            if kind == "msk":
                retry: list[tuple[RecordRef, EntityMutation]] = payload  # type: ignore[assignment]
                meter.add("msk_retries", retry[0][1].tenant_id)
                mutations(at, retry)
                continue
            # An SQS invocation: this message and the others visible in the same second, up to 10.
            batch: list[TrailingMessage] = [payload]  # type: ignore[list-item]
            while events and events[0][2] == "sqs" and events[0][0] // 1000 == at // 1000 and len(batch) < SQS_BATCH:
                batch.append(heapq.heappop(events)[3])  # type: ignore[arg-type]
            for m in batch:
                meter.add("sqs_received", m.tenant_id)
            meter.add("sqs_invocations", batch[0].tenant_id)
            refs = [(RecordRef("sqs", i), m) for i, m in enumerate(batch)]
            outcome = svc.process_trailing(refs, deadline_ms=at + 60_000)
            refreshed(outcome, at)
            for ref, m in refs:
                if ref in outcome.failed:  # back after the visibility timeout
                    heapq.heappush(events, (at + SQS_VISIBILITY_MS, next(seq), "sqs", m))
            continue
        assert pending is not None
        (flush_s, partition), members = pending
        pending = next(groups, None)
        at = DAY0_MS + math.ceil(flush_s * 1000)  # batches closing after the slice carry its last records
        clock.ms = at
        measure(at)
        records = []
        for kb in members:
            offset += 1
            mutation = EntityMutation(
                eventType="updated",
                entityType=etypes[kb.etype],
                entityId="e",
                tenantId=name(kb.tenant),
                timestamp=DAY0_MS + int(kb.oldest_s * 1000),
            )
            records.append((RecordRef(f"mutated-{partition}", offset), mutation))
            meter.add("decisions", mutation.tenant_id)
            meter.add("records", mutation.tenant_id, kb.count)
        mutations(at, records)
    return coverage


def run_ours(sc: Scenario, *, keep_batches: bool = True) -> OursResult:
    """A day of `sc` through the real code: 24 hour slices, each on a fresh store (see workload.Plan)."""
    wall0 = time.perf_counter()
    logging.getLogger("handler").setLevel(logging.ERROR)  # simulated 5xx would log a line each
    rates = tenant_rates(sc)
    plan = make_plan(sc, rates)
    weight_of = {int(t): float(w) * plan.hour_scale for t, w in zip(plan.tenants, plan.weights, strict=True)}
    meter = Meter({tenant_id(t): w / plan.hour_scale for t, w in weight_of.items()})
    setup = SliceSetup(sc, meter, weight_of, plan.hour_scale, np.random.default_rng(sc.seed + 3))
    rng = np.random.default_rng(sc.seed)
    lags: list[tuple[float, float, int]] = []
    builds_per_hour = [0.0] * 24
    uncovered = 0.0
    all_batches: dict[int, list[KeyBatch]] = {}
    slices: dict[int, tuple[float, float]] = {}
    hot_max = 0
    for hour in range(24):
        batches, start, end = slice_batches(sc, rates, plan, hour, rng)
        slices[hour] = (start, end)
        if keep_batches:
            all_batches[hour] = batches
        built_before = meter.counts["partitions_built"]
        coverage = play_slice(setup, batches, start, end, hour)
        builds_per_hour[hour] = meter.counts["partitions_built"] - built_before
        lags.extend(coverage.lags)
        uncovered += coverage.uncovered(weight_of, start, end)
        hot_max = max(hot_max, max((v[2] for v in meter.hot_key_writes.values()), default=0))
        meter.hot_key_writes.clear()

    invocations, records_day = msk_invocations(sc, rates)
    return OursResult(
        dict(meter.counts),
        lags,
        builds_per_hour,
        uncovered,
        hot_max,
        invocations,
        records_day,
        plan,
        time.perf_counter() - wall0,
        all_batches,
        slices,
    )
