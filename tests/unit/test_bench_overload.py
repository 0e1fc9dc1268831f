"""The overload benchmark's own logic (bench/bench_overload.py): the ground-truth coverage of a mutation,
percentiles with never-served mutations, the schedule, the behaviour switch and Cube's queue listing.
No stack, no network."""

from __future__ import annotations

import pytest

from bench.bench_overload import (
    Behaviour,
    DeadLetter,
    LagParts,
    Mutation,
    Phase,
    Sample,
    SeenTable,
    coverage,
    due_batches,
    lag_cells,
    lag_floor,
    lag_parts,
    oracle_lags,
    percentile,
    queue_counts,
    schedule,
    served_at,
    tenant_names,
    throughput,
)

MONTH = "20261201"


def _m(tenant: str = "bench-ovl-000", committed: int = 10_000, count_after: int = 4) -> Mutation:
    return Mutation(tenant, "row", committed, count_after)


def _t(rollup: str, seen: int, count: int, tenant: str = "bench-ovl-000", partition: str = "") -> SeenTable:
    if rollup == "users_daily_status_counts" and not partition:
        partition = MONTH
    return SeenTable(tenant, rollup, partition, seen, count)


def test_served_at_both_rollups_hold_the_row_latest_first_sighting() -> None:
    seen = [
        _t("users_main", 12_000, 3),  # built before the row: too few rows
        _t("users_main", 14_000, 4),
        _t("users_daily_status_counts", 13_000, 4),
        _t("users_main", 20_000, 9),  # later tables do not move the first sighting
    ]
    assert served_at(_m(), seen, MONTH) == 14_000


def test_served_at_one_rollup_missing_never_served() -> None:
    assert served_at(_m(), [_t("users_main", 14_000, 4)], MONTH) is None
    assert served_at(_m(), [_t("users_daily_status_counts", 14_000, 4)], MONTH) is None


def test_served_at_ignores_other_tenants_and_other_partitions() -> None:
    seen = [
        _t("users_main", 14_000, 4),
        _t("users_daily_status_counts", 13_000, 50, tenant="bench-ovl-001"),
        _t("users_daily_status_counts", 13_000, 50, partition="20261101"),
    ]
    assert served_at(_m(), seen, MONTH) is None


def test_coverage_dead_letter_after_the_mutation_accounts_for_it_one_before_does_not() -> None:
    mutations = [_m(committed=10_000), _m(tenant="bench-ovl-001", committed=10_000)]
    letters = [
        DeadLetter("bench-ovl-000", ("Users",), 30_000, "retrigger"),  # after: accounts for it
        DeadLetter("bench-ovl-001", ("Users",), 5_000, "retrigger"),  # before the mutation: does not
    ]
    result = coverage(mutations, [], letters, MONTH)
    assert result.dead_lettered == 1
    assert [m.tenant for m in result.uncovered] == ["bench-ovl-001"]
    assert result.lags_ms == [None, None]


def test_coverage_a_dead_letter_of_another_target_does_not_account_for_users() -> None:
    result = coverage([_m()], [], [DeadLetter("bench-ovl-000", ("Groups",), 30_000, "retrigger")], MONTH)
    assert len(result.uncovered) == 1


def test_coverage_served_mutation_lag_is_served_minus_commit() -> None:
    seen = [_t("users_main", 14_000, 4), _t("users_daily_status_counts", 16_500, 4)]
    result = coverage([_m(committed=10_000)], seen, [], MONTH)
    assert result.lags_ms == [6_500]
    assert not result.uncovered


def test_percentile_never_served_ranks_above_every_lag() -> None:
    lags: list[int | None] = [1_000] * 98 + [None, 2_000]
    assert percentile(lags, 0.5) == 1_000
    assert percentile(lags, 0.99) == 2_000
    assert percentile(lags, 1.0) is None
    assert lag_cells(lags) == "1.0 / 2.0 / never"


def test_percentile_nearest_rank() -> None:
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([5], 0.5) == 5
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_schedule_deterministic_sorted_and_within_the_window() -> None:
    tenants = tenant_names(20)
    first = schedule(tenants, 300, 60.0, seed=3)
    assert first == schedule(tenants, 300, 60.0, seed=3)
    assert first != schedule(tenants, 300, 60.0, seed=4)
    assert len(first) == 300
    assert all(0 <= a.offset_s <= 60.0 for a in first)
    assert [a.offset_s for a in first] == sorted(a.offset_s for a in first)
    assert len({a.tenant for a in first}) > 10  # many tenants, not a handful


def test_behaviour_parse_code_and_settings() -> None:
    assert Behaviour.parse("today=src") == Behaviour("today", "src")
    new = Behaviour.parse("new=69807be+CUBE_PREAGG_DEBOUNCE_MS=5000+BENCH_FAULT=lose-tenant:x,ignore-failures")
    assert new.code == "69807be"
    assert new.settings == {"CUBE_PREAGG_DEBOUNCE_MS": "5000", "BENCH_FAULT": "lose-tenant:x,ignore-failures"}


@pytest.mark.parametrize("spec", ["today", "=src", "today=", "new=src+NOEQUALS", "new=src+9X=1", "x=+A=1"])
def test_behaviour_parse_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="behaviour"):
        Behaviour.parse(spec)


def test_queue_counts_active_is_processing_to_process_is_scheduled() -> None:
    items = [{"status": ["toProcess"]}, {"status": ["active"]}, {"status": ["active", "toProcess"]}, {"status": []}]
    assert queue_counts(items) == (1, 2)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_due_batches_groups_arrivals_by_tick_and_skips_empty_ticks() -> None:
    clock = _Clock()
    offsets = [0.0, 0.1, 0.3, 1.2, 1.2]
    batches = [list(r) for r in due_batches(offsets, 0.25, clock=clock, sleep=clock.sleep)]
    assert batches == [[0], [1], [2], [3, 4]]  # 0.0 at once; 0.1 by 0.25; 0.3 by 0.5; 1.2 by 1.25
    assert clock.t == pytest.approx(101.25)


def test_throughput_counts_only_the_time_cubes_queue_held_a_job() -> None:
    phase = Phase(Behaviour("today", "src"))
    phase.samples = [Sample(0, 3, 2, 2, 0, 0), Sample(2_000, 0, 1, 1, 0, 0), Sample(4_000, 0, 0, 0, 0, 0)]
    phase.samples.append(Sample(60_000, 0, 0, 0, 0, 0))  # idle for a minute: not counted
    phase.seen = [_t("users_main", 1_000, 4)] * 8
    assert throughput(phase) == pytest.approx(2.0)  # 8 tables over 4 busy seconds


def test_oracle_lags_one_slot_builds_rollups_one_after_another_oldest_first() -> None:
    # Two tenants committed at 0, one slot, 1 s builds, 2 rollups each: a's two builds, then b's.
    assert oracle_lags([(0, "a"), (0, "b")], 1000, 1) == [2000, 4000]


def test_oracle_lags_a_build_covers_only_mutations_committed_before_it_starts() -> None:
    # The second mutation of `a` arrives while a's builds run: it needs the next ones.
    assert oracle_lags([(0, "a"), (500, "a")], 1000, 2) == [1000, 1500]


def test_oracle_lags_idle_cube_waits_for_the_next_commit() -> None:
    assert oracle_lags([(0, "a"), (10_000, "b")], 1000, 2) == [1000, 1000]


def _table(rollup: str, seen: int, count: int, built_s: int) -> SeenTable:
    partition = MONTH if rollup == "users_daily_status_counts" else ""
    name = f"pre_aggregations_bench_ovl_000.{rollup}{partition}_abc_def_{_base32(built_s)}"
    return SeenTable("bench-ovl-000", rollup, partition, seen, count, name)


def _base32(value: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuv"
    out = ""
    while value:
        value, r = divmod(value, 32)
        out = digits[r] + out
    return out or "0"


def _posted_at_10s(committed: int, tables: list[SeenTable], jobs: dict[str, dict[str, object]]) -> Phase:
    """One mutation of bench-ovl-000, one POST of its two jobs at 10 s (tokens t1, t2)."""
    phase = Phase(Behaviour("new", "src"))
    phase.mutations = [_m(committed=committed)]
    phase.seen = tables
    phase.posts = [(10_000, "bench-ovl-000", 200, 2)]
    phase.tokens = {"t1": (10_000, "bench-ovl-000"), "t2": (10_000, "bench-ovl-000")}
    phase.jobs = jobs
    return phase


def test_lag_parts_cut_at_the_covering_build() -> None:
    main, part = _table("users_main", 20_000, 4, 10), _table("users_daily_status_counts", 21_000, 4, 10)
    phase = _posted_at_10s(9_000, [main, part], {"t1": {"table": main.name, "seen": {"done": 22_000}}})
    phase.jobs["t2"] = {"table": part.name, "seen": {}}
    phase.builds = {main.name: [18_000, 19_500], part.name: [19_000, 20_600]}
    (parts,) = lag_parts(phase, MONTH)
    # The partition's table was seen last: commit 9 s, POST 10 s, started 19 s, ran until 20.6 s, seen 21 s.
    assert parts == LagParts(12_000, 1_000, 9_000, 1_600, 400, rode_along=False, poll_lag_ms=None)


def test_lag_parts_a_mutation_after_the_post_rode_along() -> None:
    main, part = _table("users_main", 20_000, 4, 10), _table("users_daily_status_counts", 20_000, 4, 10)
    phase = _posted_at_10s(12_000, [main, part], {"t1": {"table": main.name, "seen": {"done": 23_000}}})
    phase.builds = {main.name: [18_000, 19_500], part.name: [18_000, 19_500]}
    (parts,) = lag_parts(phase, MONTH)
    assert parts.rode_along and parts.before_post_ms == 0 and parts.queued_ms == 6_000
    assert parts.lag_ms == 8_000 and parts.poll_lag_ms == 3_000


def test_lag_floor_counts_the_builds_every_mutation_needs_against_the_slots():
    assert 2_000 <= lag_floor([(0, "a")], 1000, 1) <= 2_250  # two rollups, one after the other
    assert 4_000 <= lag_floor([(0, "a"), (0, "b")], 1000, 1) <= 4_250
    assert 2_000 <= lag_floor([(0, "a"), (0, "b")], 1000, 1, exempt=1) <= 2_250  # one tenant left out


def test_lag_floor_is_never_above_what_the_oldest_first_scheduler_achieves():
    commits = [(a.offset_s * 1000, a.tenant) for a in schedule(tenant_names(8), 120, 30.0, 3)]
    commits = [(int(t), tenant) for t, tenant in commits]
    achieved = oracle_lags(commits, 1000, 2)
    assert lag_floor(commits, 1000, 2) <= max(achieved)
    assert lag_floor(commits, 1000, 2, exempt=1) <= percentile(achieved, 0.99)  # type: ignore[operator]
