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

import bisect
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
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # load-aware refresh's (bench/sim/overload.py also runs the code before it)
    from handler.domain.ports import Slot, Waiter

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
    retriggering: bool = False  # set while a retrigger message is processed (its builds are not first builds)

    def add(self, name: str, tenant: str, n: float = 1.0, origin: float | None = None) -> None:
        origin = self.origin if origin is None else origin
        if origin is None:
            scale = self.scale
        else:
            scale = self.measure_scale if self.window[0] <= origin < self.window[1] else 0.0
        if scale:  # "" : an item of no tenant (a build budget slot)
            self.counts[name] += n * self.tenant_weight.get(tenant, 1.0) * scale

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
        if inflight_until is None:  # the code before the in-flight gate (bench/sim/overload.py) has no such argument
            return super().record_jobs(key, started_at=started_at, tokens=tokens)
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

    # Admission's build budget (docs/load-aware.md): slot items of no tenant, a BatchGetItem of the
    # slots and a Query of the `waiting` index per admission.
    def budget_slots(self, scope: str, count: int) -> list[Slot]:
        self.meter.add("ddb_reads", "")
        return super().budget_slots(scope, count)  # type: ignore[no-any-return, misc]

    def waiters(self, scope: str, *, now: int, limit: int) -> list[Waiter]:
        self.meter.add("ddb_reads", "")
        return super().waiters(scope, now=now, limit=limit)  # type: ignore[no-any-return, misc]

    def take_slot(self, scope: str, index: int, **kw: object) -> bool:
        self.meter.add("ddb_writes", "")
        self.meter.add("budget_writes", "")
        return super().take_slot(scope, index, **kw)  # type: ignore[no-any-return, misc]

    def renew_slot(self, scope: str, index: int, **kw: object) -> bool:
        self.meter.add("ddb_writes", "")
        self.meter.add("budget_writes", "")
        return super().renew_slot(scope, index, **kw)  # type: ignore[no-any-return, misc]

    def free_slot(self, scope: str, index: int, **kw: object) -> bool:
        self.meter.add("ddb_writes", "")
        self.meter.add("budget_writes", "")
        return super().free_slot(scope, index, **kw)  # type: ignore[no-any-return, misc]


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

    def built_months(self, body: Mapping[str, object]) -> list[tuple[str, int]]:
        """(cube, month index, 0 = newest) of the partitioned rollups one selector rebuilds."""
        out = [(cube, m) for cube in _names(body, "cubes") for m in range(self.partitions)]
        date_range = body.get("dateRange")
        months = list(range(self.partitions))
        if isinstance(date_range, list) and len(date_range) == 2:
            first, last = date.fromisoformat(str(date_range[0])[:10]), date.fromisoformat(str(date_range[1])[:10])
            months = [i for i, m in enumerate(self.months()) if m.start <= last and m.end >= first]
        for name in _names(body, "preAggregations"):
            if ".main" not in name:
                out += [(name.split(".")[0], m) for m in months]
        return out


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
    the token carrying when its build starts and when the job is done; a `get` answers each token's
    status at the time asked: `scheduled` before its build starts, `processing` until the job is done,
    then `done` (a job the queue drops after `orphan_s` waiting: `scheduled`, then `missing_partition`,
    as Cube drops a job an hour after it was posted). A share of POSTs fails with a 5xx.
    `builds`, when set, gets (tenant, cube, month, posted s, start s, done s) of every partition build
    queued (a dropped one: start inf, done when dropped)."""

    def __init__(self, sc: Scenario, layout: Layout, meter: Meter, rng: np.random.Generator, clock: Clock) -> None:
        self.sc = sc
        self.layout = layout
        self.meter = meter
        self.rng = rng
        self.clock = clock
        self.queue = CubeQueue(sc.cube_concurrency, sc.build_s)
        self.load = False  # warm-up posts see the queue but add no work (the gap's load stands in)
        self.builds: list[tuple[str, str, int, float, float, float]] | None = None
        self.seq = itertools.count()

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
            start_s = self.queue.last_start
            self.meter.add("partitions_built", tenant_id, builds)
            # Not a re-trigger of a build that failed or timed out (a trailing refresh the verifier fires
            # when it settles a build, load-aware refresh's wake, is a first build).
            if not self.meter.retriggering:
                self.meter.add("first_builds", tenant_id, builds)
            if math.isinf(done_s):  # dropped before it started
                self.meter.add("cube_dropped", tenant_id, builds)
                drop_s = now_s + (self.queue.orphan_s or 0.0)
                drop_ms = DAY0_MS + math.ceil(drop_s * 1000)
                if self.builds is not None:  # in Cube's queue until dropped; never started
                    self.builds += [
                        (tenant_id, c, m, now_s, math.inf, drop_s) for c, m in self.layout.built_months(selector.body)
                    ]
                answers.append([f"{NEVER_MS}-{drop_ms}-d{next(self.seq)}" for _ in range(builds)])
                continue
            if self.builds is not None:
                self.builds += [
                    (tenant_id, c, m, now_s, start_s, done_s) for c, m in self.layout.built_months(selector.body)
                ]
            done_ms = DAY0_MS + math.ceil(done_s * 1000)
            slots = self.queue.slots
            answers.append(
                [f"{done_ms}-{DAY0_MS + math.ceil((start_s + (i // slots) * self.queue.build_s) * 1000)}-"
                 f"{next(self.seq)}" for i in range(builds)]
            )  # fmt: skip
        return answers

    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> dict[str, JobStatus]:
        self.meter.add("cube_gets", tenant_id)
        now = self.clock.now_ms()
        out = {}
        for t in tokens:
            done, start, tag = t.split("-", 2)
            if now >= int(start) and tag.startswith("d"):
                status = "missing_partition"
            elif now < int(start):
                status = "scheduled"
            else:
                status = "done" if now >= int(done) else "processing"
            out[t] = JobStatus(status, (tenant_id,))
        return out


NEVER_MS = 9_999_999_999_999  # the done time of a dropped job (13 digits, as every token's)


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
    deployed one (admission control with the settings' build budget, the adaptive windows), with
    in-memory ports and the simulated clock. The code before load-aware refresh (commit 8feeac0, run by
    bench/sim/overload.py) has neither: it is built as its own wiring built it."""
    debounce_kw: dict[str, object] = {}
    verify_kw: dict[str, object] = {}
    service_kw: dict[str, object] = {}
    try:
        from handler.domain.admission import Admission  # noqa: PLC0415
    except ImportError:  # the code before issue 16
        pass
    else:
        windows = settings.windows
        admission = Admission(
            ports.store, ports.clock, ports.telemetry, settings.effective_build_budget, new_token=ports.new_token,
            rng=random.Random(0),
        )  # fmt: skip
        debounce_kw = {"windows": windows}
        verify_kw = {"admission": admission, "windows": windows}
        service_kw = {"admission": admission}
    debouncer = Debouncer(
        ports.store, ports.scheduler, ports.clock, settings.debounce_ms, new_token=ports.new_token, **debounce_kw
    )  # type: ignore[arg-type]
    verifier = None
    if verify:
        verifier = BuildVerifier(
            ports.store, ports.cube, ports.build_queue, ports.telemetry, ports.clock, settings.build_timeout_ms,
            **verify_kw,  # type: ignore[arg-type]
        )  # fmt: skip
    return RefreshService(
        settings.entity_cube_map,
        debouncer,
        ports.cube,
        ports.telemetry,
        ports.clock,
        settings.cube_timezones,
        verifier=verifier,
        max_selectors=settings.max_selectors,
        **service_kw,  # type: ignore[arg-type]
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


def sim_settings(sc: Scenario, *, budget: int | None = None) -> Settings:
    """The settings a deployment of this scenario would have (the AWS names are never used here):
    Cube's build concurrency is the queue's slots, the build budget its default (4 jobs a slot) unless
    `budget` (or the scenario's `build_budget`) says otherwise; 0 turns admission control off."""
    budget = sc.build_budget if budget is None else budget
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
        CUBE_BUILD_CONCURRENCY=min(sc.cube_concurrency, 100),  # the setting's range
        CUBE_PREAGG_BUILD_BUDGET="" if budget is None else budget,
        CUBE_PREAGG_MAX_DEBOUNCE_MS=int(max(sc.max_window_s, sc.window_s) * 1000),
    )


# --------------------------------------------------------------------------- coverage


class BuildIndex:
    """Partition builds Cube queued, per (tenant, cube, month), to find the one covering a mutation:
    the first that started at or after it reached the function, and (of those) the earliest done."""

    def __init__(self, builds: Sequence[tuple[str, str, int, float, float, float]]) -> None:
        by_slot: dict[tuple[str, str, int], list[tuple[float, float, float]]] = defaultdict(list)
        for tenant, cube, month, posted, start, done in builds:
            if not math.isinf(start):  # dropped by Cube before it started: covers nothing
                by_slot[(tenant, cube, month)].append((start, done, posted))
        self.slots: dict[tuple[str, str, int], tuple[list[float], list[tuple[float, float]]]] = {}
        for slot, items in by_slot.items():
            items.sort()
            best = [(posted, done) for _, done, posted in items]
            for i in range(len(best) - 2, -1, -1):  # the earliest done from here on (and its post)
                if best[i + 1][1] < best[i][1]:
                    best[i] = best[i + 1]
            self.slots[slot] = ([start for start, _, _ in items], best)

    def covering(self, slot: tuple[str, str, int], received: float) -> tuple[float, float] | None:
        """(posted, done) of the build covering a mutation of `slot` received at `received`."""
        entry = self.slots.get(slot)
        if entry is None:
            return None
        i = bisect.bisect_left(entry[0], received)
        return entry[1][i] if i < len(entry[0]) else None


@dataclass
class Coverage:
    """Per (tenant, entity type, month) the records in arrival order; a refresh claimed at t covers the
    records before t of the months it rebuilds, and they are fresh when its builds are done."""

    entries: dict[tuple[int, int, int], list[tuple[float, float]]] = field(default_factory=dict)  # (oldest, n)
    ptr: dict[tuple[int, int, int], int] = field(default_factory=dict)
    # per covered record group: oldest_s, claim lag s, done lag s, weight
    rows: list[tuple[float, float, float, float]] = field(default_factory=list)
    # per key-batch and month: tenant, entity type, month, oldest record s, batch flush s, records
    arrivals: list[tuple[int, int, int, float, float, int]] = field(default_factory=list)
    never: list[tuple[int, float, int]] | None = None  # set by from_builds: (tenant, oldest, records)

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

    def from_builds(
        self,
        builds: Sequence[tuple[str, str, int, float, float, float]],
        slot_of: Callable[[int, int], tuple[str, str]],
        weight_of: Mapping[int, float],
        start: float,
        end: float,
    ) -> None:
        """Coverage from Cube's side (what the code claims does not count): the records of a
        key-batch's month are covered by the first build of that partition that started after the
        batch reached the function, fresh when it is done; without one they are uncovered. Rows:
        (oldest record, lag to the covering build's post, lag to its end, weight) inside [start, end)."""
        index = BuildIndex(builds)
        self.rows, self.never = [], []
        for tenant, etype, month, oldest, flush, n in self.arrivals:
            if not start <= oldest < end:
                continue
            found = index.covering((*slot_of(tenant, etype), month), flush)
            if found is None:
                self.never.append((tenant, oldest, n))
            else:
                # A build posted before the mutation (it rode along) would, with enough build slots,
                # have started at once and not covered it: a refresh of its own then, at lag 0 or more.
                post_lag = max(0.0, found[0] - oldest)
                self.rows.append((oldest, post_lag, found[1] - oldest, n * weight_of[tenant]))

    def uncovered(self, weight_of: Mapping[int, float], start: float, end: float) -> float:
        if self.never is not None:
            return sum(n * weight_of[t] for t, oldest, n in self.never if start <= oldest < end)
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
    # When set, gets every partition build Cube queued: (tenant, cube, month, posted s, start s, done s).
    builds: list[tuple[str, str, int, float, float, float]] | None = None
    telemetry: CountingTelemetry | None = None  # the domain's metrics (default: a fresh one, not kept)


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
    hint_ms = [int(datetime.combine(m.start + timedelta(days=1), datetime.min.time(), UTC).timestamp() * 1000)
               for m in layout.months()]  # fmt: skip
    clock = SimClock()
    events: list[Event] = []
    seq = itertools.count()
    store = CountingStore(meter, clock)
    scheduler = HeapScheduler(meter, events, seq)
    cube = SimCube(sc, layout, meter, setup.cube_rng, clock)
    if setup.queue is not None:
        cube.queue = setup.queue
    builds = setup.builds if setup.builds is not None else []
    cube.builds = builds
    tokens = itertools.count()
    ports = SimPorts(store, scheduler, SimBuildQueue(scheduler), cube, setup.telemetry or CountingTelemetry(), clock,
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
            coverage.arrivals.append((kb.tenant, kb.etype, month, kb.oldest_s, kb.flush_s, count))

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
                meter.retriggering = process == svc.process_retrigger
                outcome = process(items, deadline_ms=at + 60_000)  # type: ignore[arg-type]
                meter.origin, meter.retriggering = None, False
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
    coverage.from_builds(builds, lambda t, e: (name(t), layout.cubes[e]), setup.weight_of, start, end)
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
    # A sampled tenant's job stands for many (its weight, spread over the queue): a budget of jobs in
    # Cube cannot be modelled on such a day, so admission control is off there unless every tenant
    # runs in full for the whole hour (bench/sim/overload.py runs it as deployed).
    faithful = plan.hour_scale == 1 and bool(np.all(plan.weights == 1))
    settings = sim_settings(sc, budget=None if faithful else 0)
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
