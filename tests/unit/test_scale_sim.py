"""The scale simulation's own logic (bench/sim): batching, sampling, the build queue, the Cube worker
model, the scenario file, and slices played through the real domain code on a simulated clock. No
network; the whole file runs in a few seconds."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from bench.sim import analysis as A
from bench.sim.config import ConfigError, load
from bench.sim.cube_worker import (
    Partition,
    Population,
    Rollup,
    TickModel,
    WorkerSetup,
    naive_counts,
    play,
    renewal_period,
    worker_hourly,
)
from bench.sim.engine import Meter, SliceSetup, play_slice, run_ours
from bench.sim.queue import CubeQueue, day_queue, exact_fifo_waits
from bench.sim.report import _crossing
from bench.sim.workload import FLAT, KeyBatch, Scenario, flush_interval, make_plan, msk_invocations, tenant_rates


def _setup(sc: Scenario) -> tuple[SliceSetup, Meter]:
    meter = Meter({"t000000": 1.0})
    return SliceSetup(sc, meter, {0: 1.0}, 1.0, np.random.default_rng(0), verify=sc.verify), meter


# --------------------------------------------------------------------------- workload


def test_flush_interval_batch_closes_a_window_after_its_first_record_or_when_full() -> None:
    sc = Scenario(batch_size=100, batch_window_s=1.0)
    assert flush_interval(sc, 50.0) == pytest.approx(1.02)  # the window, then the next record
    assert flush_interval(sc, 0.5) == pytest.approx(3.0)
    assert flush_interval(sc, 1_000.0) == pytest.approx(0.1)  # 100 records fill the batch first
    assert flush_interval(sc, 0.0) == math.inf


def test_msk_invocations_quiet_topic_one_batch_per_first_record() -> None:
    sc = Scenario(tenants=10, mutations_per_tenant_day=8.64, profile=FLAT, partitions=1)  # 0.001 records/s
    invocations, records = msk_invocations(sc, tenant_rates(sc))
    assert records == pytest.approx(86.4)
    assert invocations == pytest.approx(records, rel=0.01)


def test_tenant_rates_zipf_sum_to_the_scenario_total() -> None:
    sc = Scenario(tenants=1_000, mutations_per_tenant_day=50)
    rates = tenant_rates(sc)
    assert rates.sum() * 86_400 == pytest.approx(50_000)
    assert rates[0] / rates[1] == pytest.approx(2.0)  # s = 1


def test_make_plan_large_scenario_samples_within_budget_and_weights_the_tail() -> None:
    sc = Scenario(tenants=100_000, budget=200_000)
    plan = make_plan(sc, tenant_rates(sc))
    assert plan.slice_s < 3_600
    assert plan.estimated_decisions <= 1.2 * sc.budget
    assert plan.weights[0] == 1.0  # the busiest tenant runs in full
    assert plan.weights.max() > 1.0  # the tail is sampled
    assert len(plan.tenants) < sc.tenants


# --------------------------------------------------------------------------- the real code on a simulated clock


def test_play_slice_mutation_inside_window_gets_one_trailing_refresh_and_each_refresh_is_verified() -> None:
    sc = Scenario(tenants=1, entity_types=1, window_s=30)
    setup, meter = _setup(sc)
    batches = [KeyBatch(1.0, 0, 0, 0, 0.5, 1), KeyBatch(11.0, 0, 0, 0, 10.5, 3)]
    coverage = play_slice(setup, batches, 0.0, 100.0, 0)
    assert meter.counts["cube_posts"] == 2  # leading at 1 s, trailing at the window's end
    assert meter.counts["verify_sends"] == 2  # one verify message per accepted refresh
    assert meter.counts["sqs_sends"] == 3  # the trailing message and the two verify messages
    assert meter.counts["cube_gets"] == 2  # the builds are done by the first poll (2 s)
    assert meter.counts["records"] == 4
    claim_lags = sorted(row[1] for row in coverage.rows)
    assert claim_lags[0] == pytest.approx(0.5, abs=0.01)
    assert claim_lags[1] == pytest.approx(31.0 + 0.5 - 10.5, abs=0.01)  # due at 31 s, +0.5 s SQS delivery
    assert all(row[2] >= row[1] for row in coverage.rows)  # done after the claim: the build takes time
    assert coverage.uncovered({0: 1.0}, 0.0, 100.0) == 0


def test_play_slice_verification_costs_writes_messages_and_polls() -> None:
    batches = [KeyBatch(float(t) + 1, 0, 0, 0, float(t), 1) for t in range(0, 300, 40)]
    counts = {}
    for verify in (False, True):
        sc = Scenario(tenants=1, entity_types=1, window_s=5, verify=verify)
        setup, meter = _setup(sc)
        play_slice(setup, batches, 0.0, 400.0, 0)
        counts[verify] = dict(meter.counts)
    refreshes = counts[True]["cube_posts"]
    assert refreshes == counts[False]["cube_posts"] == len(batches)
    # record_jobs (the in-flight gate up), record_build, and the gate's removal (docs/load-aware.md),
    # besides the build budget's slot writes (admission control, counted apart)
    writes = {v: c["ddb_writes"] - c["budget_writes"] for v, c in counts.items()}
    assert writes[True] - writes[False] == 3 * refreshes
    assert counts[True]["sqs_sends"] - counts[False].get("sqs_sends", 0) == refreshes
    assert counts[True]["cube_gets"] == refreshes
    assert "cube_gets" not in counts[False]


def test_play_slice_builds_waiting_in_a_full_queue_are_polled_until_done() -> None:
    # 1 slot, 100 s a build: the second refresh waits for the first one's build
    sc = Scenario(tenants=1, entity_types=1, window_s=5, cube_concurrency=1, build_s=100.0, preagg_partitions=1)
    setup, meter = _setup(sc)
    coverage = play_slice(setup, [KeyBatch(1.0, 0, 0, 0, 0.5, 1), KeyBatch(21.0, 0, 0, 0, 20.5, 1)], 0.0, 50.0, 0)
    rows = sorted(coverage.rows)
    assert rows[0][2] == pytest.approx(100.5, abs=1)
    # One build of a key at a time (docs/load-aware.md): the second refresh is posted only once the
    # first build was seen done, and its build ends after it.
    assert rows[1][0] + rows[1][1] >= 101.0
    assert rows[1][2] > rows[0][2]
    assert meter.counts["cube_gets"] > 2 * 2  # polled 2, 4, 8, ... s until done


def test_play_slice_partition_precise_rebuilds_only_the_touched_partition() -> None:
    base = Scenario(tenants=1, entity_types=1, preagg_partitions=12, timezones=2, newest_share=1.0)
    built = {}
    for precise in (False, True):
        setup, meter = _setup(base.with_(partition_precise=precise))
        play_slice(setup, [KeyBatch(1.0, 0, 0, 0, 0.5, 1)], 0.0, 50.0, 0)
        built[precise] = meter.counts["partitions_built"]
    assert built[False] == 12 * 2  # every partition in both zones
    assert built[True] == 1 * 2  # the newest partition in both zones


def test_play_slice_cube_failures_are_retried_and_nothing_is_left_uncovered() -> None:
    sc = Scenario(tenants=1, entity_types=1, window_s=5, cube_fail_rate=0.5)
    setup, meter = _setup(sc)
    batches = [KeyBatch(float(t) + 1, 0, 0, 0, float(t), 1) for t in range(0, 60, 2)]
    coverage = play_slice(setup, batches, 0.0, 100.0, 0)
    assert meter.counts["cube_failures"] > 0
    assert coverage.uncovered({0: 1.0}, 0.0, 100.0) == 0
    assert max(row[1] for row in coverage.rows) < 60


def test_seed_design_drops_a_mutation_inside_its_own_window() -> None:
    sc = Scenario(tenants=1, entity_types=1, window_s=30, partitions=1, mutations_per_tenant_day=5_000, budget=20_000)
    result = run_ours(sc)
    seed = A.seed_design(sc, result, instances=1)
    ours = A.ours(sc, result)
    assert ours.stale_share == 0.0
    assert seed.stale_share > 0.0
    assert seed.cube_posts <= ours.cube_posts


# --------------------------------------------------------------------------- the build queue


def test_cube_queue_fluid_wait_matches_an_exact_fifo_queue_when_saturated() -> None:
    rng = np.random.default_rng(1)
    slots, build = 4, 1.0
    arrivals = np.sort(rng.random(7_200) * 1_200)  # 6 builds/s on 4 slots of 1 s: load 1.5
    exact = exact_fifo_waits(arrivals, build, slots)
    queue = CubeQueue(slots, build)
    fluid = np.array([queue.post(t, 1) - t - build for t in arrivals])
    assert exact[-1] == pytest.approx((6 - slots) * 1_200 / slots, rel=0.1)  # the excess, queued, over the slots
    assert fluid.mean() == pytest.approx(exact.mean(), rel=0.1)
    assert fluid[-1] == pytest.approx(exact[-1], rel=0.1)


def test_cube_queue_below_saturation_waits_stay_short() -> None:
    rng = np.random.default_rng(2)
    arrivals = np.sort(rng.random(2_000) * 1_000)  # 2 builds/s on 4 slots: load 0.5
    queue = CubeQueue(4, 1.0)
    fluid = np.array([queue.post(t, 1) - t - 1.0 for t in arrivals])
    exact = exact_fifo_waits(arrivals, 1.0, 4)
    assert fluid.mean() < 0.5
    assert exact.mean() < 0.5
    assert queue.wait(2_000) == 0.0  # drained after the arrivals stop


def test_cube_queue_spreads_a_sampled_tenants_weight_instead_of_one_lump() -> None:
    queue = CubeQueue(10, 1.0)
    queue.post(0.0, 10, weight=30.0)  # a job of 10 builds standing for 30 tenants' jobs
    assert queue.wait(0.0) == pytest.approx(1.0)  # only its own copy is queued at once
    assert queue.posted == pytest.approx(300.0)  # but all 30 copies' work is on its way
    queue.advance(61.0)
    assert queue.busy_s == pytest.approx(300.0)


def test_day_queue_is_lindleys_recursion() -> None:
    rng = np.random.default_rng(3)
    rates = np.full(5_000, 9.0)
    waits = day_queue(rates, 1.0, 10, 1.0, np.random.default_rng(4))
    jobs = np.random.default_rng(4).poisson(rates)
    w, expected = 0.0, []
    for j in jobs:
        expected.append(w)
        w = max(0.0, w + j - 10)
    assert np.allclose(waits, expected)
    del rng


# --------------------------------------------------------------------------- Cube's refresh worker model

MONTH = 30 * 86_400.0
PARTS = [Partition(i * MONTH, (i + 1) * MONTH) for i in range(4)]  # the newest is the last


def _tick_model(kind: str, rows: dict[tuple[str, str], list[tuple[float, float]]] | None = None) -> TickModel:
    setup = WorkerSetup(kind, every_s=10, timer_s=5, tz_offsets=(0,), rollups=(
        Rollup("Users", "users", partitioned=False), Rollup("Users", "users", partitioned=True)))  # fmt: skip
    return TickModel(setup, {"a": [PARTS], "b": [PARTS]}, rows or {})


def _ticks(start: float, n: int) -> list[tuple[float, str]]:
    return [(start + 5 * i + 0.1 * j, tenant) for i in range(n) for j, tenant in enumerate(("a", "b"))]


def test_worker_every_key_is_one_query_for_all_tenants_and_rebuilds_everything_each_interval() -> None:
    now = 4 * MONTH - 1_000
    counts = play(_tick_model("every"), _ticks(now, 12), since=now + 10)
    # one shared key query per tick (threshold 1 s), 10 ticks; an `every: 10 second` key is Cube's default key
    assert counts["key"] + counts["default-key"] == 10
    assert counts["build"] == 5 * 2 * (1 + 4)  # 5 interval changes x 2 tenants x 5 tables


def test_worker_sql_key_is_one_query_per_tenant_and_rebuilds_only_the_changed_tenant() -> None:
    now = 4 * MONTH - 1_000
    rows = {("a", "users"): [(now + 22.0, now + 22.0)]}
    counts = play(_tick_model("sql", rows), _ticks(now, 12), since=now + 10)
    assert renewal_period(10, 5) == 15
    assert counts["build"] == 1 + 4  # tenant a's unpartitioned table and its 4 partitions, once
    assert 2 * 3 <= counts["key"] <= 2 * 4 + 4  # each tenant's key every 15 s (+ the default key)


def test_worker_filter_params_key_rebuilds_only_the_partition_that_changed() -> None:
    now = 4 * MONTH - 1_000
    rows = {("a", "users"): [(now + 22.0, PARTS[1].start + 5)]}  # a row of an older month
    counts = play(_tick_model("filter", rows), _ticks(now, 12), since=now + 10)
    assert counts["build"] == 1 + 1  # the unpartitioned table and partition 1 only
    assert counts["key"] >= 2 * 4 * 3  # a key per tenant and partition, each read every 15 s


def test_worker_incremental_rebuilds_the_window_every_interval_and_never_the_rest() -> None:
    now = 4 * MONTH - 1_000  # inside the newest partition's window only
    counts = play(_tick_model("incremental"), _ticks(now, 12), since=now + 10)
    assert counts["build"] == 5 * 2 * (1 + 1)  # every change: the unpartitioned table and the newest partition


def test_worker_the_old_model_overcounts_key_queries() -> None:
    now = 4 * MONTH - 1_000
    ticks = _ticks(now, 12)
    model = _tick_model("every")
    right = play(model, ticks, since=now + 10)
    naive = naive_counts(model.setup, model.partitions, {}, ticks, now + 10)
    assert naive["key"] > 2 * right["key"]


def test_worker_hourly_model_agrees_with_the_tick_model_on_a_population() -> None:
    rng = random.Random(5)
    tenants = [f"t{i}" for i in range(20)]
    rates = [0.002 * (i + 1) / 20 for i in range(20)]  # mutations per second per tenant
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    start = 4 * MONTH - 4 * 3_600
    for tenant, rate in zip(tenants, rates, strict=True):
        t = start
        while (t := t + rng.expovariate(rate)) < start + 2 * 3_600:
            month = PARTS[3] if rng.random() < 0.8 else PARTS[rng.randrange(0, 3)]
            rows.setdefault((tenant, "users"), []).append((t, month.start + 10))
    pop = Population(np.array(rates), 1, 1, 1, 4, 1, newest_share=0.8)
    ticks = [(start + 5 * i + 0.01 * j, tenant) for i in range(1_440) for j, tenant in enumerate(tenants)]
    for kind in ("sql", "filter"):
        setup = WorkerSetup(kind, every_s=10, timer_s=5, tz_offsets=(0,), rollups=(
            Rollup("Users", "users", partitioned=False), Rollup("Users", "users", partitioned=True)))  # fmt: skip
        model = TickModel(setup, {t: [PARTS] for t in tenants}, rows)
        counts = play(model, ticks, since=start + 3_600)  # the second hour
        hourly = worker_hourly(pop, kind, 10, 5)
        assert counts["key"] == pytest.approx(hourly.key_queries, rel=0.05)
        assert counts["build"] == pytest.approx(hourly.builds, rel=0.25)


# --------------------------------------------------------------------------- the scenario file and the report


def test_config_default_and_example_files_load() -> None:
    default = load()
    assert default.scenario.tenants == 100_000
    assert default.scenario.build_s == pytest.approx(0.06)
    assert len(default.run.seeds) >= 3
    example = load(Path("bench/sim/scenarios/example.yaml"))
    assert example.scenario.timezones == 2
    assert example.pricing.poller_group_mappings == 10


def test_config_unknown_key_and_too_few_seeds_are_errors_that_name_them(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: 10\ncube:\n  buildtime: 3\n")
    with pytest.raises(ConfigError, match="buildtime"):
        load(bad)
    bad.write_text("run:\n  seeds: [1, 2]\n")
    with pytest.raises(ConfigError, match="at least 3 seeds"):
        load(bad)
    bad.write_text("aws:\n  poller_group_mappings: 101\n")
    with pytest.raises(ConfigError, match="up to 100"):
        load(bad)


def test_breaking_point_interpolates_between_simulated_sizes_and_never_extrapolates() -> None:
    sizes = [10, 100, 1_000]
    assert _crossing(sizes, [0.1, 0.5, 2.0]) == pytest.approx(100 * 10 ** (math.log(2) / math.log(4)))
    assert _crossing(sizes, [0.1, 0.2, 0.9]) == math.inf  # past the largest size run: unknown, not a guess
    assert _crossing(sizes, [1.5, 3.0, 9.0]) == 0.0  # already full at the smallest size


def test_warehouse_per_second_pricing_keeps_a_busy_warehouse_on_all_day() -> None:
    d = A.Design("x", busy_per_hour=[600.0] * 24, jobs_per_hour=[3_600.0] * 24, partitions_built=1.0)
    w = load().pricing.warehouse
    prices = d.warehouse_monthly(w, 10)
    assert prices["per_second"] == pytest.approx(24 * w.per_second_usd_per_hour * A.DAYS_PER_MONTH, rel=0.01)
    quiet = A.Design("y", busy_per_hour=[1.0] * 24, jobs_per_hour=[1.0] * 24)
    assert quiet.warehouse_monthly(w, 10)["per_second"] < prices["per_second"] / 4


# --------------------------------------------------------------------------- load-aware refresh in the simulation


def test_sim_cube_reports_scheduled_until_the_build_starts_then_processing_then_done() -> None:
    from bench.sim.engine import DAY0_MS, SimClock, SimCube, layout_of  # noqa: PLC0415
    from handler.domain.model import Selector  # noqa: PLC0415

    sc = Scenario(tenants=1, entity_types=1, cube_concurrency=1, build_s=10.0, preagg_partitions=1)
    meter = Meter({"t000000": 1.0})
    clock = SimClock()
    cube = SimCube(sc, layout_of(sc), meter, np.random.default_rng(0), clock)
    cube.load = True
    clock.ms = DAY0_MS
    [first] = cube.trigger("t000000", [Selector({"cubes": ["Users"]}, ())], deadline_ms=0)
    [second] = cube.trigger("t000000", [Selector({"cubes": ["Users"]}, ())], deadline_ms=0)  # behind the first
    assert isinstance(first, list) and isinstance(second, list)

    def status(at_s: float) -> tuple[str, str]:
        clock.ms = DAY0_MS + int(at_s * 1000)
        got = cube.job_statuses("t000000", [first[0], second[0]], deadline_ms=0)
        return got[first[0]].status, got[second[0]].status

    assert status(0.0) == ("processing", "scheduled")
    assert status(9.9) == ("processing", "scheduled")
    assert status(10.0) == ("done", "processing")
    assert status(20.0) == ("done", "done")


def test_cube_queue_drops_a_job_that_would_wait_past_the_orphan_timeout() -> None:
    queue = CubeQueue(1, 10.0, orphan_s=25.0)
    assert queue.post(0.0, 2) == pytest.approx(20.0)  # waits 0 s
    assert queue.post(0.0, 1) == pytest.approx(30.0)  # waits 20 s
    assert queue.post(0.0, 1) == math.inf  # would wait 30 s: dropped, adds no work
    assert queue.post(1.0, 1) == math.inf  # would wait 29 s: dropped too
    assert queue.post(6.0, 1) == pytest.approx(40.0)  # waits 24 s: queued behind the first two only


def test_play_slice_admission_keeps_at_most_the_budget_of_jobs_in_cubes_queue() -> None:
    # 1 slot of 20 s, 30 keys mutated within a second (partition-precise: one job a key); budget 3
    from bench.sim.overload import queue_depth  # noqa: PLC0415

    sc = Scenario(tenants=10, entity_types=3, window_s=5, cube_concurrency=1, build_s=20.0, partition_precise=True,
                  preagg_partitions=1, build_budget=3)  # fmt: skip
    batches = [KeyBatch(1.0 + t / 10, 0, t, e, 0.5 + t / 10, 1) for t in range(10) for e in range(3)]
    depth = {}
    for budget in (3, 0):
        meter = Meter({f"t{i:06d}": 1.0 for i in range(10)})
        builds: list[tuple[str, str, int, float, float, float]] = []
        setup = SliceSetup(sc.with_(build_budget=budget), meter, dict.fromkeys(range(10), 1.0), 1.0,
                           np.random.default_rng(0), builds=builds)  # fmt: skip
        coverage = play_slice(setup, batches, 0.0, 2_000.0, 0)
        depth[budget] = max(queue_depth(builds))
        assert coverage.uncovered(dict.fromkeys(range(10), 1.0), 0.0, 2_000.0) == 0
        assert meter.counts["partitions_built"] == 30  # every key built once, budget or not
    assert depth[3] == 3  # admission control: never more than the budget in Cube's queue
    assert depth[0] == 30  # without it every job is queued at once


def test_overload_freshness_counts_only_builds_that_started_after_the_mutation_reached_the_function() -> None:
    from bench.sim.overload import freshness  # noqa: PLC0415

    arrivals = [(0, 0, 0, 10.0, 11.0, 2), (0, 0, 1, 30.0, 31.0, 1)]
    builds = [
        ("t000000", "Users", 0, 5.0, 10.5, 12.0),  # started before the batch reached the function
        ("t000000", "Users", 0, 11.0, math.inf, 3_611.0),  # dropped by Cube: covers nothing
        ("t000000", "Users", 0, 11.0, 20.0, 25.0),
        ("t000000", "Users", 0, 12.0, 22.0, 40.0),
    ]
    fresh = freshness(arrivals, builds, ["Users"])
    assert fresh["uncovered"] == 1  # month 1 was never built
    assert fresh["p50"] == fresh["max"] == pytest.approx(15.0)  # 25 - 10, for both records


def test_overload_runs_todays_code_from_its_commit_unmodified(tmp_path: Path) -> None:
    from bench.sim.overload import Case, Shape, code_trees, run_in_process  # noqa: PLC0415

    trees = code_trees(tmp_path)
    assert not (trees["today"] / "handler" / "domain" / "admission.py").exists()  # before issue 16
    shape = Shape(before_s=60.0, peak_s=240.0, after_s=60.0)
    results = {code: run_in_process(Case(code, 3.0, 1, 4, 1, shape), trees[code]) for code in ("today", "new")}
    assert results["today"]["handler"] == str(trees["today"] / "handler")
    assert results["today"]["mutations"] == results["new"]["mutations"] > 0  # the same schedule
    assert "budget_writes" not in results["today"]["counts"]  # no admission control in today's code
    assert results["new"]["counts"]["budget_writes"] > 0
    assert results["today"]["fresh"]["uncovered"] == results["new"]["fresh"]["uncovered"] == 0


def test_play_slice_a_mutation_that_rides_along_with_a_queued_build_is_covered_by_it() -> None:
    from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415

    # 1 slot of 100 s with 300 s of other work queued: the key's build waits until 301 s
    sc = Scenario(tenants=1, entity_types=1, window_s=5, cube_concurrency=1, build_s=100.0, preagg_partitions=1,
                  build_budget=0)  # fmt: skip
    queue = CubeQueue(1, 100.0, work=300.0)
    telemetry = CountingTelemetry()
    meter = Meter({"t000000": 1.0})
    setup = SliceSetup(sc, meter, {0: 1.0}, 1.0, np.random.default_rng(0), queue=queue, telemetry=telemetry)
    coverage = play_slice(setup, [KeyBatch(1.0, 0, 0, 0, 0.5, 1), KeyBatch(11.0, 0, 0, 0, 10.5, 1)], 0.0, 50.0, 0)
    assert meter.counts["cube_posts"] == 1  # no second POST: the second mutation rode along
    assert telemetry.counts["RideAlongs"] == 1
    assert coverage.uncovered({0: 1.0}, 0.0, 50.0) == 0
    rows = sorted(coverage.rows)
    assert [round(r[0] + r[2]) for r in rows] == [400, 400]  # both fresh when the one build is done
