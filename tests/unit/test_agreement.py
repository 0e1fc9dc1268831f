"""The agreement check's model side (bench/sim/agreement.py): the local Cube's layout, the function
settings the live run and the model share, the comparison, and wrong models that the counts tell apart.
The live side needs the local stack: `make bench-sim`."""

import pytest

from bench.sim.agreement import (
    BUDGET,
    LocalLayout,
    Model,
    agrees,
    function_settings,
    make_schedule,
    scenario,
    simulate,
    table,
    with_requests,
    wrong_models,
)

LOCAL = {"Users": 5, "Tenants": 1, "Groups": 1}


@pytest.fixture(scope="module")
def schedule():
    sc = scenario(3.0)
    return sc, *make_schedule(sc, 20)


def run(sc, batches, start, end, jobs=LOCAL, budget=BUDGET):
    return with_requests(simulate(sc, batches, start, end, LocalLayout.of(jobs), budget=budget))


def test_local_layout_counts_the_jobs_of_each_cube_a_selector_names():
    layout = LocalLayout.of(LOCAL)
    assert layout.builds({"cubes": ["Users"]}) == 5
    assert layout.builds({"cubes": ["Users", "Tenants", "Groups"]}) == 7
    with pytest.raises(ValueError, match="whole-cube routes"):
        layout.builds({"preAggregations": ["Users.dailyStatusCounts"]})


def test_the_model_queues_the_local_cubes_jobs_not_the_scenarios_twelve_partitions(schedule):
    sc, batches, start, end = schedule
    local = run(sc, batches, start, end)
    single = run(sc, batches, start, end, jobs=dict.fromkeys(LOCAL, 1))  # one job per cube a POST names
    uniform = with_requests(simulate(sc, batches, start, end, budget=BUDGET))  # the scenario's layout
    assert local["cube_posts"] == single["cube_posts"] == uniform["cube_posts"]
    assert single["cube_posts"] <= single["cube_jobs"] < local["cube_jobs"] < 5 * single["cube_jobs"]
    assert uniform["cube_jobs"] == sc.tables_per_cube * single["cube_jobs"] == 12 * single["cube_jobs"]


def test_the_live_run_and_the_model_take_the_same_window_and_budget():
    settings = function_settings(scenario(3.0))
    assert settings == {"CUBE_PREAGG_DEBOUNCE_MS": "3000", "CUBE_PREAGG_BUILD_BUDGET": str(BUDGET)}


def test_each_wrong_model_changes_what_the_check_compares(schedule):
    sc, batches, start, end = schedule
    right = run(sc, batches, start, end)
    for wrong in wrong_models(3.0):
        counts = run(sc.with_(window_s=wrong.window_s), batches, start, end, budget=wrong.budget)
        _, ok = table("", right, counts)
        assert not ok, wrong.name


def test_the_wrong_models_are_a_longer_window_and_no_build_budget():
    longer, unbudgeted = wrong_models(3.0)
    assert (longer.window_s, longer.budget) == (9.0, BUDGET)
    assert (unbudgeted.window_s, unbudgeted.budget) == (3.0, 0)
    assert Model("m", 3.0).budget == BUDGET


def test_agreement_allows_two_or_ten_percent_whichever_is_larger():
    assert agrees(10, 12) and not agrees(10, 13)
    assert agrees(100, 110) and not agrees(100, 111)
    text, ok = table("t", {"cube_posts": 100.0}, {"cube_posts": 120.0}, ("cube_posts",))
    assert not ok and "| cube_posts | 100 | 120 | NO |" in text
