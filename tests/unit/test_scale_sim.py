"""The scale simulation's own logic (bench/sim): batching, sampling, the queue model, and a slice played
through the real domain code on a simulated clock. No network; the whole file runs in a few seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.sim import analysis as A
from bench.sim.engine import Meter, SliceSetup, play_slice, run_ours
from bench.sim.workload import FLAT, KeyBatch, Scenario, flush_interval, make_plan, msk_invocations, tenant_rates


def _setup(sc: Scenario) -> tuple[SliceSetup, Meter]:
    meter = Meter({"t000000": 1.0})
    return SliceSetup(sc, meter, {0: 1.0}, 1.0, np.random.default_rng(0)), meter


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


def test_play_slice_mutation_inside_window_gets_one_trailing_refresh() -> None:
    sc = Scenario(tenants=1, entity_types=1, window_s=30)
    setup, meter = _setup(sc)
    batches = [KeyBatch(1.0, 0, 0, 0, 0.5, 1), KeyBatch(11.0, 0, 0, 0, 10.5, 3)]
    coverage = play_slice(setup, batches, 0.0, 100.0, 0)
    assert meter.counts["cube_posts"] == 2  # leading at 1 s, trailing at the window's end
    assert meter.counts["sqs_sends"] == 1
    assert meter.counts["records"] == 4
    lags = sorted(lag for lag, _, _ in coverage.lags)
    assert lags[0] == pytest.approx(0.5, abs=0.01)
    assert lags[1] == pytest.approx(31.0 + 0.5 - 10.5, abs=0.01)  # due at 31 s, +0.5 s SQS delivery
    assert coverage.uncovered({0: 1.0}, 0.0, 100.0) == 0


def test_play_slice_cube_failures_are_retried_and_nothing_is_left_uncovered() -> None:
    sc = Scenario(tenants=1, entity_types=1, window_s=5, cube_fail_rate=0.5)
    setup, meter = _setup(sc)
    batches = [KeyBatch(float(t) + 1, 0, 0, 0, float(t), 1) for t in range(0, 60, 2)]
    coverage = play_slice(setup, batches, 0.0, 100.0, 0)
    assert meter.counts["cube_failures"] > 0
    assert coverage.uncovered({0: 1.0}, 0.0, 100.0) == 0
    assert max(lag for lag, _, _ in coverage.lags) < 60


def test_erlang_wait_grows_with_load_and_saturates_at_one() -> None:
    assert A.erlang_c_wait(0.0, 1.0, 4) == (0.0, 0.0)
    low, rho_low = A.erlang_c_wait(1.0, 1.0, 4)
    high, rho_high = A.erlang_c_wait(3.5, 1.0, 4)
    assert 0 < low < high
    assert rho_low == 0.25
    assert rho_high == 0.875
    assert A.erlang_c_wait(5.0, 1.0, 4)[1] >= 1


def test_seed_design_drops_a_mutation_inside_its_own_window() -> None:
    sc = Scenario(tenants=1, entity_types=1, window_s=30, partitions=1, mutations_per_tenant_day=5_000, budget=20_000)
    result = run_ours(sc)
    seed = A.seed_design(sc, result, instances=1)
    ours = A.ours(sc, result)
    assert ours.stale_share == 0.0
    assert seed.stale_share > 0.0
    assert seed.cube_posts <= ours.cube_posts


def test_cube_worker_polls_whatever_the_traffic() -> None:
    quiet = A.cube_worker(Scenario(tenants=100, mutations_per_tenant_day=0.001), 60, incremental=False)
    assert quiet.warehouse_queries >= 100 * 3 * 12 * 1_440  # keys x partitions x checks per day
    assert quiet.partitions_built < 100
