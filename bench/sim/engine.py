"""The event-driven design, simulated with the real domain code.

Per simulated hour slice: a fresh `InMemoryDebounceStore` (wrapped to count writes and reads), the
service built by `build_service` from a `Settings` object exactly as `handler.wiring.build_service`
builds it (the real `Debouncer`, `BuildVerifier` and `RefreshService`, routes and time zones from the
settings), a simulated clock, a heap of SQS deliveries (trailing, verify and retrigger messages on the
refresh queue), and a Cube stand-in (`SimCube`) that answers job POSTs with tokens and `get` polls with
statuses from the build queue (`bench/sim/queue.py`), whose backlog carries over from slice to slice.

MSK batches come from `workload.slice_batches`; each batch is one `RefreshService.process_mutations`
call with one record per (key, batch), or, with partition-precise routes, one record per partition
the key's records touch (each with a `timeHints.createdAt` in that month). Counts are weighted:
tenant weight x (3600 / slice)."""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import numpy as np

from bench.sim.queue import CubeQueue
from bench.sim.workload import HOUR_S, KeyBatch, Plan, Scenario, make_plan, msk_invocations, slice_batches, tenant_rates
from handler.adapters.memory import CountingTelemetry, InMemoryDebounceStore
from handler.domain.debounce import Debouncer
from handler.domain.errors import CubeServerError
from handler.domain.model import EntityMutation, RecordRef, RefreshKey, Selector
from handler.domain.partitions import DateRange, partition_of
from handler.domain.ports import (
    BuildMessage,
    BuildRecord,
    Clock,
    CubeAnswer,
    JobStatus,
    KeyState,
    Telemetry,
    TrailingMessage,
    WriteResult,
)
from handler.domain.service import RefreshService
from handler.domain.verify import BuildVerifier, RetriggerMessage, VerifyMessage
from handler.settings import Settings, load_settings

SQS_MAX_DELAY_S = 900
SQS_DELIVERY_LAG_MS = 500  # a delayed message becomes visible, then a long poll picks it up
SQS_BATCH = 10  # the Trailing event's BatchSize in template.yaml
SQS_VISIBILITY_MS = 360_000  # template.yaml, 60 s function timeout
MSK_RETRY_MS = 1_000  # a batch with failed records comes back (bisected) about a second later
# After a slice: deliver what is still queued, create no new mutations. Long enough for a build that
# times out in a backlog to go through its 5 re-triggers (6 x the 30-minute build deadline).
DRAIN_S = 3.5 * 3_600
DAY0 = datetime(2026, 11, 29, tzinfo=UTC)  # the simulated day
DAY0_MS = int(DAY0.timestamp() * 1000)
ZONES = ("UTC", "America/New_York", "Europe/Paris", "Asia/Tokyo", "Australia/Sydney", "America/Los_Angeles")


class SimClock:
    def __init__(self) -> None:
        self.ms = 0

    def now_ms(self) -> int:
        return self.ms


@dataclass
class Meter:
    """Weighted counters. What happens at a time is counted when that time is inside the measured
    slice (`scale`, 0 in the warm-up and the drain). What a build verification or a re-trigger does
    is counted by where its refresh (or mutation) started (`origin`): it can go on for the 30 minutes
    of the build deadline and more, long after the slice, and a short warm-up could not stand in for
    the verifications of earlier refreshes that reach into the slice."""

    tenant_weight: dict[str, float]
    scale: float = 0.0
    counts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    hot_key_writes: dict[RefreshKey, list[int]] = field(default_factory=dict)  # key -> [second, n, max]
    window: tuple[float, float] = (0.0, 0.0)  # the measured slice, seconds since DAY0
    measure_scale: float = 0.0
    origin: float | None = None  # set while a verify or retrigger message is processed

    def add(self, name: str, tenant: str, n: float = 1.0, origin: float | None = None) -> None:
        origin = self.origin if origin is None else origin
        if origin is None:
            scale = self.scale
        else:
            scale = self.measure_scale if self.window[0] <= origin < self.window[1] else 0.0
        if scale:
            self.counts[name] += n * self.tenant_weight[tenant] * scale

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
    conditions included (DynamoDB bills a failed conditional write like a successful one), and reads."""

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

    def record_build(self, key: RefreshKey, record: BuildRecord) -> bool:
        origin = (record.started_at - DAY0_MS) / 1000
        self.meter.add("ddb_writes", key.tenant_id, origin=origin)
        self.meter.add("verify_writes", key.tenant_id, origin=origin)
        self.meter.key_write(key, self.clock.ms)
        return super().record_build(key, record)

    def record_jobs(
        self, key: RefreshKey, *, started_at: int, tokens: Sequence[str], inflight_until: int | None = None
    ) -> bool:
        self._write(key)
        self.meter.add("verify_writes", key.tenant_id)
        return super().record_jobs(key, started_at=started_at, tokens=tokens, inflight_until=inflight_until)

    # Load-aware refresh's writes (docs/load-aware.md): the polls' gate renewals and the gate's removal
    # belong to verification; a re-sent trailing refresh and a deferral to the debounce.
    def observe_pending(self, key: RefreshKey, **kw: object) -> bool:  # type: ignore[override]
        self._write(key)
        self.meter.add("verify_writes", key.tenant_id)
        return super().observe_pending(key, **kw)  # type: ignore[arg-type]

    def clear_inflight(self, key: RefreshKey, **kw: object) -> bool:  # type: ignore[override]
        self._write(key)
        self.meter.add("verify_writes", key.tenant_id)
        return super().clear_inflight(key, **kw)  # type: ignore[arg-type]

    def reschedule_trailing(self, key: RefreshKey, **kw: object) -> bool:  # type: ignore[override]
        self._write(key)
        return super().reschedule_trailing(key, **kw)  # type: ignore[arg-type]

    def requeue_trailing(self, key: RefreshKey, **kw: object) -> bool:  # type: ignore[override]
        self._write(key)
        return super().requeue_trailing(key, **kw)  # type: ignore[arg-type]

    def record_part(self, key: RefreshKey, *, started_at: int, part: int) -> frozenset[int]:
        origin = (started_at - DAY0_MS) / 1000
        self.meter.add("ddb_writes", key.tenant_id, origin=origin)
        self.meter.add("verify_writes", key.tenant_id, origin=origin)
        self.meter.key_write(key, self.clock.ms)
        return super().record_part(key, started_at=started_at, part=part)

    def get(self, key: RefreshKey) -> KeyState | None:
        self.meter.add("ddb_reads", key.tenant_id)
        return super().get(key)


Event = tuple[int, int, str, object]


class HeapScheduler:
    """SQS with DelaySeconds: whole seconds, at most 900, then a delivery lag. Trailing messages."""

    def __init__(self, meter: Meter, events: list[Event], seq: itertools.count[int]) -> None:
        self.meter = meter
        self.events = events
        self.seq = seq

    def push(self, message: object, tenant: str, due_at: int, now: int) -> None:
        self.meter.add("sqs_sends", tenant)
        delay_s = min(SQS_MAX_DELAY_S, max(0, math.ceil((due_at - now) / 1000)))
        heapq.heappush(self.events, (now + delay_s * 1000 + SQS_DELIVERY_LAG_MS, next(self.seq), "sqs", message))

    def schedule(self, message: TrailingMessage, *, now: int) -> None:
        self.push(message, message.tenant_id, message.due_at, now)


class SimBuildQueue:
    """The refresh queue carrying verify and retrigger messages (the same SQS queue), and the build
    dead-letter queue."""

    def __init__(self, sqs: HeapScheduler) -> None:
        self.sqs = sqs

    def send(self, message: BuildMessage, *, due_at: int, now: int) -> None:
        tenant = _tenant_of(message)
        kind = "verify_sends" if isinstance(message, VerifyMessage) else "retrigger_sends"
        self.sqs.meter.add(kind, tenant)
        self.sqs.push(message, tenant, due_at, now)

    def dead_letter(self, message: BuildMessage) -> None:
        self.sqs.meter.add("dead_letters", _tenant_of(message))
        self.sqs.meter.add("sqs_sends", _tenant_of(message))


def _tenant_of(message: object) -> str:
    tenant = getattr(message, "tenant_id", None)
    assert isinstance(tenant, str)
    return tenant


@dataclass(frozen=True)
class Layout:
    """The data model the simulation's Cube holds: per cube (one per entity type) `unpartitioned`
    rollups without a time dimension and `partitioned` rollups of `partitions` monthly partitions
    (the newest is the simulated day's month), built in each of `zones`."""

    cubes: tuple[str, ...]
    unpartitioned: int
    partitioned: int
    partitions: int
    zones: tuple[str, ...]

    def months(self) -> list[DateRange]:
        """Newest first."""
        return _months(self.partitions)

    def rollup_ids(self, cube: str) -> tuple[list[str], list[str]]:
        return [f"{cube}.main{i}" for i in range(self.unpartitioned)], [
            f"{cube}.rollup{j}" for j in range(self.partitioned)
        ]

    def builds(self, body: Mapping[str, object]) -> int:
        """Partition builds one selector asks for."""
        z = len(self.zones)
        total = 0
        total += len(_names(body, "cubes")) * (self.unpartitioned + self.partitioned * self.partitions * z)
        date_range = body.get("dateRange")
        months = self.partitions
        if isinstance(date_range, list) and len(date_range) == 2:
            first, last = date.fromisoformat(str(date_range[0])[:10]), date.fromisoformat(str(date_range[1])[:10])
            months = sum(1 for m in self.months() if m.start <= last and m.end >= first)
        for name in _names(body, "preAggregations"):
            total += 1 if ".main" in name else months * z
        return total


@functools.cache
def _months(partitions: int) -> list[DateRange]:
    out = []
    day = DAY0.date()
    for _ in range(partitions):
        part = partition_of(day, "month")
        out.append(part)
        day = part.start - timedelta(days=1)
    return out


def _names(body: Mapping[str, object], field_name: str) -> list[str]:
    names = body.get(field_name) or []
    assert isinstance(names, list)
    return [str(n) for n in names]


class SimCube:
    """Cube's jobs API: a POST queues its builds in the build queue and answers one token per build,
    the token carrying when the job is done; a `get` answers each token's status at the time asked.
    A share of POSTs fails with a 5xx."""

    def __init__(self, sc: Scenario, layout: Layout, meter: Meter, rng: np.random.Generator, clock: Clock) -> None:
        self.sc = sc
        self.layout = layout
        self.meter = meter
        self.rng = rng
        self.clock = clock
        self.queue = CubeQueue(sc.cube_concurrency, sc.build_s)
        self.load = False  # warm-up posts see the queue but add no work (the gap's load stands in)

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        answers: list[CubeAnswer] = []
        now_s = (self.clock.now_ms() - DAY0_MS) / 1000
        weight = self.meter.tenant_weight[tenant_id]
        for selector in selectors:  # one POST per selector, as the HTTP adapter does
            self.meter.add("cube_posts", tenant_id)
            if self.sc.cube_fail_rate and self.rng.random() < self.sc.cube_fail_rate:
                self.meter.add("cube_failures", tenant_id)
                answers.append(CubeServerError("simulated 5xx", status=503))
                continue
            builds = self.layout.builds(selector.body)
            done_s = self.queue.post(now_s, builds, weight, load=self.load)
            self.meter.add("partitions_built", tenant_id, builds)
            if self.meter.origin is None:  # not a re-trigger of a build that failed or timed out
                self.meter.add("first_builds", tenant_id, builds)
            done_ms = DAY0_MS + math.ceil(done_s * 1000)
            answers.append([f"{done_ms}-{i}" for i in range(builds)])
        return answers

    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> dict[str, JobStatus]:
        self.meter.add("cube_gets", tenant_id)
        now = self.clock.now_ms()
        done, pending = JobStatus("done", (tenant_id,)), JobStatus("processing", (tenant_id,))
        return {t: done if now >= int(t[:13]) else pending for t in tokens}


def done_at(token: str) -> int:
    """A simulated job token starts with the epoch milliseconds its build is done (13 digits)."""
    return int(token[:13])


# --------------------------------------------------------------------------- the service


@dataclass
class SimPorts:
    store: CountingStore
    scheduler: HeapScheduler
    build_queue: SimBuildQueue
    cube: SimCube
    telemetry: Telemetry
    clock: SimClock
    new_token: Callable[[], str]


def build_service(settings: Settings, ports: SimPorts, *, verify: bool = True) -> RefreshService:
    """The service under simulation, built from settings as `handler.wiring.build_service` builds the
    deployed one, with in-memory ports and the simulated clock."""
    debouncer = Debouncer(ports.store, ports.scheduler, ports.clock, settings.debounce_ms, new_token=ports.new_token)
    verifier = None
    if verify:
        verifier = BuildVerifier(
            ports.store, ports.cube, ports.build_queue, ports.telemetry, ports.clock, settings.build_timeout_ms
        )
    return RefreshService(
        settings.entity_cube_map,
        debouncer,
        ports.cube,
        ports.telemetry,
        ports.clock,
        settings.cube_timezones,
        verifier=verifier,
        max_selectors=settings.max_selectors,
    )


def target_names(sc: Scenario) -> list[str]:
    if sc.entity_types <= 3:
        return ["Users", "Tenants", "Groups"][: sc.entity_types]
    return [f"Cube{i}" for i in range(sc.entity_types)]


def entity_names(sc: Scenario) -> list[str]:
    if sc.entity_types <= 3:
        return ["User", "Tenant", "Group"][: sc.entity_types]
    return [f"Entity{i}" for i in range(sc.entity_types)]


def layout_of(sc: Scenario) -> Layout:
    return Layout(
        tuple(target_names(sc)), sc.unpartitioned_rollups, sc.partitioned_rollups, sc.preagg_partitions,
        ZONES[: sc.timezones],
    )  # fmt: skip


def sim_settings(sc: Scenario) -> Settings:
    """The settings a deployment of this scenario would have (the AWS names are never used here)."""
    layout = layout_of(sc)
    routes: dict[str, list[object]] = {}
    for entity, cube in zip(entity_names(sc), layout.cubes, strict=True):
        if not sc.partition_precise:
            routes[entity] = [cube]
            continue
        mains, rollups = layout.rollup_ids(cube)
        routes[entity] = [
            *({"target": r, "partitionBy": "timeHints.createdAt", "granularity": "month"} for r in rollups),
            *mains,
        ]
    return load_settings(
        CUBE_PREAGG_DEBOUNCE_MS=int(sc.window_s * 1000),
        CUBE_PREAGG_BUILD_TIMEOUT_MS=int(sc.build_timeout_s * 1000),
        CUBE_API_URL="http://simulated.invalid/cubejs-api",
        CUBE_API_SECRET_ARN="arn:aws:secretsmanager:us-east-1:000000000000:secret:simulated",
        DEBOUNCE_TABLE_NAME="simulated",
        REFRESH_QUEUE_URL="simulated",
        BUILD_DEAD_LETTER_QUEUE_URL="simulated",
        ENTITY_CUBE_MAP=json.dumps(routes),
        CUBE_TIMEZONES=",".join(layout.zones),
        CUBE_PREAGG_MAX_SELECTORS=10,
    )


# --------------------------------------------------------------------------- coverage


@dataclass
class Coverage:
    """Per (tenant, entity type, month) the records in arrival order; a refresh claimed at t covers the
    records before t of the months it rebuilds, and they are fresh when its builds are done."""

    entries: dict[tuple[int, int, int], list[tuple[float, float]]] = field(default_factory=dict)  # (oldest, n)
    ptr: dict[tuple[int, int, int], int] = field(default_factory=dict)
    # per covered record group: oldest_s, claim lag s, done lag s, weight
    rows: list[tuple[float, float, float, float]] = field(default_factory=list)

    def add(self, tenant: int, etype: int, month: int, oldest_s: float, n: float) -> None:
        self.entries.setdefault((tenant, etype, month), []).append((oldest_s, n))

    def cover(
        self,
        slot: tuple[int, int, int],
        claim_s: float,
        done_s: float,
        weight: float,
        start: float,
        end: float,
    ) -> None:
        entries = self.entries.get(slot)
        if not entries:
            return
        i = self.ptr.get(slot, 0)
        while i < len(entries) and entries[i][0] <= claim_s:
            oldest, n = entries[i]
            if start <= oldest < end:
                self.rows.append((oldest, claim_s - oldest, done_s - oldest, n * weight))
            i += 1
        self.ptr[slot] = i

    def uncovered(self, weight_of: Mapping[int, float], start: float, end: float) -> float:
        total = 0.0
        for slot, entries in self.entries.items():
            for oldest, n in entries[self.ptr.get(slot, 0) :]:
                if start <= oldest < end:
                    total += n * weight_of[slot[0]]
        return total


@dataclass
class OursResult:
    counts: dict[str, float]
    rows: np.ndarray  # (oldest_s, claim lag, done lag, weight) per covered record group
    builds_per_hour: list[float]
    posts_per_hour: list[float]
    first_builds_per_hour: list[float]  # without the re-triggers: the load before any feedback
    uncovered: float
    hot_key_max_wcu: int
    msk_invocations: float
    records: float
    plan: Plan
    wall_s: float
    key_batches: dict[int, list[KeyBatch]]  # per hour, for the seed model
    slices: dict[int, tuple[float, float]]
    backlog: list[tuple[float, float]]  # (t, queue wait s) over the day


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
    settings: Settings | None = None
    layout: Layout | None = None  # what Cube holds (default: the scenario's, `layout_of`)
    queue: CubeQueue | None = None  # the build queue at the slice's start (default: an empty one)
    verify: bool = True
    on_end: Callable[[CubeQueue], None] | None = None  # the queue as the measured slice ends


def _months_touched(kb: KeyBatch, sc: Scenario, rng: random.Random) -> dict[int, int]:
    """Which partitions (0 = newest) a key-batch's records lie in, and how many records each."""
    if not sc.partition_precise or sc.preagg_partitions <= 1:
        return {0: kb.count}
    out: dict[int, int] = {}
    for _ in range(kb.count):
        month = 0 if rng.random() < sc.newest_share else rng.randrange(1, sc.preagg_partitions)
        out[month] = out.get(month, 0) + 1
    return out


def play_slice(setup: SliceSetup, batches: list[KeyBatch], start: float, end: float, hour: int) -> Coverage:
    """Run MSK batches (seconds since DAY0) through the real RefreshService on a fresh store, with the
    SQS deliveries and MSK retries they cause, until nothing is left (or DRAIN_S after `end`)."""
    sc, meter = setup.sc, setup.meter
    name = setup.tenant_name or tenant_id
    settings = setup.settings or sim_settings(sc)
    layout = setup.layout or layout_of(sc)
    etypes = entity_names(sc)
    cube_index = {c: i for i, c in enumerate(layout.cubes)}
    month_of_label = {m.label: i for i, m in enumerate(layout.months())}
    hint_ms = [int(datetime.combine(m.start + timedelta(days=1), datetime.min.time(), UTC).timestamp() * 1000)
               for m in layout.months()]  # fmt: skip
    tenant_of = {name(i): i for i in {kb.tenant for kb in batches}}
    clock = SimClock()
    events: list[Event] = []
    seq = itertools.count()
    store = CountingStore(meter, clock)
    scheduler = HeapScheduler(meter, events, seq)
    cube = SimCube(sc, layout, meter, setup.cube_rng, clock)
    if setup.queue is not None:
        cube.queue = setup.queue
    tokens = itertools.count()
    ports = SimPorts(store, scheduler, SimBuildQueue(scheduler), cube, CountingTelemetry(), clock,
                     lambda: str(next(tokens)))  # fmt: skip
    svc = build_service(settings, ports, verify=setup.verify)
    coverage = Coverage()
    month_rng = random.Random(sc.seed * 1000 + hour)
    touched: dict[int, dict[int, int]] = {}
    for kb in sorted(batches, key=lambda b: b.oldest_s):
        months = _months_touched(kb, sc, month_rng)
        touched[id(kb)] = months
        for month, count in months.items():
            coverage.add(kb.tenant, kb.etype, month, kb.oldest_s, count)

    def refreshed(outcome: object, t_ms: int) -> None:
        for ko in outcome.keys:  # type: ignore[attr-defined]
            if ko.status != "refreshed":
                continue
            key: RefreshKey = ko.key
            tenant = tenant_of.get(key.tenant_id)
            if tenant is None:
                continue
            etype = cube_index[key.cube]
            if key.partition:
                months = [month_of_label[key.partition]] if key.partition in month_of_label else []
            elif "." in key.target and ".main" in key.target:
                continue  # an unpartitioned rollup: coverage follows the partitioned ones
            else:
                months = list(range(layout.partitions)) if sc.partition_precise else [0]
            claim_s = (t_ms - DAY0_MS) / 1000
            finished = max((done_at(t) for t in ko.job_tokens), default=t_ms)
            done_s = (finished - DAY0_MS) / 1000
            for month in months:
                coverage.cover((tenant, etype, month), claim_s, done_s, setup.weight_of[tenant], start, end)

    ended = False

    meter.window = (start, end)
    meter.measure_scale = setup.measure_scale

    def measure(t_ms: int) -> None:
        nonlocal ended
        t_s = (t_ms - DAY0_MS) / 1000
        inside = start <= t_s < end
        meter.scale = setup.measure_scale if inside else 0.0
        if t_s >= start and not cube.load:
            cube.load = True
            cube.queue.set_background(0.0)  # from here the slice's own jobs are the load
        if t_s >= end and not ended:
            ended = True
            if setup.on_end is not None:
                setup.on_end(cube.queue)
            # The rest of the population goes on mutating while the slice's messages drain.
            cube.queue.set_background(cube.queue.posted / max(end - start, 1.0))

    def mutations(at: int, records: list[tuple[RecordRef, EntityMutation]]) -> None:
        outcome = svc.process_mutations(records, deadline_ms=at + 60_000)
        refreshed(outcome, at)
        failed = [r for r in records if r[0] in outcome.failed]
        if failed:  # the event source retries the failed records (bisected) about a second later
            heapq.heappush(events, (at + MSK_RETRY_MS, next(seq), "msk", failed))

    def deliver(at: int, batch: list[object]) -> None:
        """One SQS invocation: the handler splits the batch by message kind (handler.app)."""
        for m in batch:
            meter.add("sqs_received", _tenant_of(m), origin=_message_origin(m))
        meter.add("sqs_invocations", _tenant_of(batch[0]), origin=_message_origin(batch[0]))
        refs = [(RecordRef("sqs", i), m) for i, m in enumerate(batch)]
        trailing = [(r, m) for r, m in refs if isinstance(m, TrailingMessage)]
        verify = [(r, m) for r, m in refs if isinstance(m, VerifyMessage)]
        retrigger = [(r, m) for r, m in refs if isinstance(m, RetriggerMessage)]
        failed: set[RecordRef] = set()
        for items, process, origin in (
            (trailing, svc.process_trailing, None),
            (retrigger, svc.process_retrigger, _origin(retrigger, "oldest_ms")),
            (verify, svc.process_verify, _origin(verify, "started_at")),
        ):
            if items:
                meter.origin = origin
                outcome = process(items, deadline_ms=at + 60_000)  # type: ignore[arg-type]
                meter.origin = None
                refreshed(outcome, at)
                failed |= outcome.failed
        for ref, m in refs:
            if ref in failed:  # back after the visibility timeout
                heapq.heappush(events, (at + SQS_VISIBILITY_MS, next(seq), "sqs", m))

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
            batch: list[object] = [payload]
            while events and events[0][2] == "sqs" and events[0][0] // 1000 == at // 1000 and len(batch) < SQS_BATCH:
                batch.append(heapq.heappop(events)[3])
            deliver(at, batch)
            continue
        assert pending is not None
        (flush_s, partition), members = pending
        pending = next(groups, None)
        at = DAY0_MS + math.ceil(flush_s * 1000)  # batches closing after the slice carry its last records
        clock.ms = at
        measure(at)
        records = []
        for kb in members:
            meter.add("decisions", name(kb.tenant))
            meter.add("records", name(kb.tenant), kb.count)
            for month in touched[id(kb)]:
                offset += 1
                fields: dict[str, object] = {
                    "eventType": "ENTITY_UPDATED",
                    "entityType": etypes[kb.etype],
                    "entityId": "e",
                    "tenantId": name(kb.tenant),
                    "timestamp": DAY0_MS + int(kb.oldest_s * 1000),
                }
                if sc.partition_precise:  # whole-target routes read no hint
                    fields["timeHints"] = {"createdAt": {"old": hint_ms[month], "new": hint_ms[month]}}
                mutation = EntityMutation.model_validate(fields)
                records.append((RecordRef(f"mutated-{partition}", offset), mutation))
        mutations(at, records)
    if not ended and setup.on_end is not None:
        setup.on_end(cube.queue)
    return coverage


def _message_origin(message: object) -> float | None:
    if isinstance(message, VerifyMessage):
        return (min(t.started_at for t in message.targets) - DAY0_MS) / 1000
    if isinstance(message, RetriggerMessage):
        return (min(t.oldest_ms for t in message.targets) - DAY0_MS) / 1000
    return None


def _origin(items: Sequence[tuple[RecordRef, object]], attribute: str) -> float | None:
    """Seconds since DAY0 of the earliest refresh (or mutation) the messages belong to."""
    times = [getattr(t, attribute) for _, m in items for t in m.targets]  # type: ignore[attr-defined]
    return (min(times) - DAY0_MS) / 1000 if times else None


def run_ours(sc: Scenario, *, keep_batches: bool = True) -> OursResult:
    """A day of `sc` through the real code: 24 hour slices, each on a fresh store (see workload.Plan),
    one build queue whose backlog carries from slice to slice (between sampled slices it takes the
    last slice's load)."""
    wall0 = time.perf_counter()
    logging.getLogger("handler").setLevel(logging.CRITICAL)  # simulated 5xx and dead letters log lines
    rates = tenant_rates(sc)
    plan = make_plan(sc, rates)
    weight_of = {int(t): float(w) * plan.hour_scale for t, w in zip(plan.tenants, plan.weights, strict=True)}
    meter = Meter({tenant_id(t): w / plan.hour_scale for t, w in weight_of.items()})
    settings = sim_settings(sc)
    rng = np.random.default_rng(sc.seed)
    cube_rng = np.random.default_rng(sc.seed + 3)
    rows: list[np.ndarray] = []
    builds_per_hour = [0.0] * 24
    posts_per_hour = [0.0] * 24
    first_per_hour = [0.0] * 24
    uncovered = 0.0
    all_batches: dict[int, list[KeyBatch]] = {}
    slices: dict[int, tuple[float, float]] = {}
    backlog: list[tuple[float, float]] = []
    hot_max = 0
    day = CubeQueue(sc.cube_concurrency, sc.build_s)
    rate = 0.0  # slot-seconds per second of the last slice
    for hour in range(24):
        batches, start, end = slice_batches(sc, rates, plan, hour, rng)
        slices[hour] = (start, end)
        if keep_batches:
            all_batches[hour] = batches
        # The gap since the last slice carries that slice's load.
        day.set_background(rate)
        gen0 = start - plan.warmup_s
        while day.t + 300 < gen0:
            day.advance(day.t + 300)
            backlog.append((day.t, day.work / day.slots))
        day.advance(gen0)
        fork = day.copy()
        snapshot: list[CubeQueue] = []
        built_before = meter.counts["partitions_built"]
        first_before = meter.counts["first_builds"]
        posts_before = meter.counts["cube_posts"]
        setup = SliceSetup(
            sc, meter, weight_of, plan.hour_scale, cube_rng, settings=settings, queue=fork, verify=sc.verify,
            on_end=lambda q, keep=snapshot: keep.append(q.copy()),
        )  # fmt: skip
        coverage = play_slice(setup, batches, start, end, hour)
        builds_per_hour[hour] = meter.counts["partitions_built"] - built_before
        backlog.extend((t, w) for t, w in fork.samples if start <= t < end)
        day = snapshot[0] if snapshot else fork
        posts_per_hour[hour] = meter.counts["cube_posts"] - posts_before
        first_per_hour[hour] = meter.counts["first_builds"] - first_before
        rate = builds_per_hour[hour] / HOUR_S * sc.build_s
        if coverage.rows:
            rows.append(np.array(coverage.rows))
        uncovered += coverage.uncovered(weight_of, start, end)
        hot_max = max(hot_max, max((v[2] for v in meter.hot_key_writes.values()), default=0))
        meter.hot_key_writes.clear()

    invocations, records_day = msk_invocations(sc, rates)
    return OursResult(
        dict(meter.counts),
        np.concatenate(rows) if rows else np.zeros((0, 4)),
        builds_per_hour,
        posts_per_hour,
        first_per_hour,
        uncovered,
        hot_max,
        invocations,
        records_day,
        plan,
        time.perf_counter() - wall0,
        all_batches,
        slices,
        backlog,
    )
