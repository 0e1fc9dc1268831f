"""The local stack as a system (`make stack-start`): mutations produced to the local Kafka topic by
another process reach Cube through the local event source mapping; a debounced mutation is refreshed
by a trailing refresh that the local SQS event source delivers; a record that keeps failing lands on
the dead-letter topic with its payload and `preagg-refresh replay --dlt` brings it back.

The event sources run as the stack's `kafka` and `esm` processes; this module starts them with a
3 s debounce window and no Cube retries inside an invocation (recorded as the function's settings,
as `make stack-start` records them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import Stack, StackEnv
from devstack.cubeapi import CubeApi
from handler.adapters.dynamodb import DynamoDBDebounceStore
from handler.domain.model import RefreshKey
from tests.integration.conftest import CUBES, Rows, aws, wait_until

ROOT = Path(__file__).resolve().parents[2]
WINDOW_MS = 3000
TOPIC = "core.entities.lifecycle.mutated"


@pytest.fixture(scope="module")
def event_sources(stack: Stack, warm_tenants: None) -> Iterator[StackEnv]:
    before = stack.status()
    stack.stop_service("esm")
    stack.stop_service("kafka")  # fresh topics: nothing left on the dead-letter topic from earlier runs
    # Fresh keys, as the other modules' Function.reset gives them: an earlier test (or a stopped event
    # source) whose verifications did not run left its builds' in-flight gates up (they lapse after 5 min).
    env = stack.env()
    store = DynamoDBDebounceStore(aws("dynamodb", env), env.debounce_table_name)
    for tenant in ("tenant-2", "tenant-3"):
        for cube in CUBES:
            store.delete(RefreshKey(tenant, cube))
    # The function's settings for these tests (recorded for the esm, as `make stack-start` does): a short
    # window, and no retries inside an invocation (the mapping's 10 retries of a Cube-down record then
    # take seconds, not 30). A developer's own settings are recorded again afterwards. No build budget:
    # with the budget spent by builds in flight when Cube is stopped, the Cube-down mutation would wait
    # for budget (acknowledged, its trailing refresh in flight) instead of failing to the dead-letter
    # topic this module checks; admission is tested in test_load_aware.py.
    previous = stack.function_settings().get("environ", {})
    settings = {
        "CUBE_PREAGG_DEBOUNCE_MS": str(WINDOW_MS),
        "CUBE_PREAGG_RETRY_ATTEMPTS": "0",
        "CUBE_PREAGG_BUILD_BUDGET": "0",
    }
    stack.start_service("kafka")
    stack.start_service("esm", settings=settings)
    try:
        yield stack.env()
    finally:
        stack.stop_service("esm")
        stack.set_function_settings(previous)
        if not before["kafka"].up:
            stack.stop_service("kafka")
        # The session's `stack` fixture resumes a developer's esm (with their settings) at the end.


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`preagg-refresh ...` in another process, from the repository (it finds .stack/env.json there)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-m", "preagg_cli.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if check:
        assert result.returncode == 0, f"preagg-refresh {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def invocations(stack: Stack) -> list[dict[str, Any]]:
    path = stack.state / "logs" / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_mutation_produced_to_local_kafka_reaches_cube(
    event_sources: StackEnv, stack: Stack, cube_api: CubeApi, rows: Rows
) -> None:
    rows.add_user("tenant-3")
    expected = rows.source_count("tenant-3")
    assert cube_api.count("tenant-3").value == expected - 1

    produced = cli("produce", "--tenant", "tenant-3", "--entity-type", "User")

    assert f"produced 1 record(s) to {TOPIC}" in produced.stdout
    wait_until(lambda: cube_api.count("tenant-3").value == expected, 40, "Cube to serve tenant-3's new row")


def test_debounced_mutation_fires_as_a_trailing_refresh_from_the_local_queue(
    event_sources: StackEnv, stack: Stack, cube_api: CubeApi, rows: Rows
) -> None:
    seen = len(invocations(stack))
    cli("produce", "--tenant", "tenant-2", "--entity-type", "User")
    wait_until(
        lambda: any(k["key"] == "tenant-2#Users" for e in invocations(stack)[seen:] for k in e["keys"]),
        20,
        "the first mutation to be handled",
    )
    rows.add_user("tenant-2")
    expected = rows.source_count("tenant-2")
    seen = len(invocations(stack))
    cli("produce", "--tenant", "tenant-2", "--entity-type", "User")  # inside the 3 s window: debounced

    def trailing_refreshed() -> bool:
        return any(
            e["source"] == "sqs" and {"key": "tenant-2#Users", "status": "refreshed"}.items() <= k.items()
            for e in invocations(stack)[seen:]
            for k in e["keys"]
        )

    wait_until(trailing_refreshed, 30, "the local SQS event source to deliver tenant-2's trailing refresh")
    kafka_keys = [
        (k["key"], k["status"]) for e in invocations(stack)[seen:] if e["source"] == "kafka" for k in e["keys"]
    ]
    assert ("tenant-2#Users", "debounced") in kafka_keys
    wait_until(lambda: cube_api.count("tenant-2").value == expected, 30, "Cube to serve the trailing rebuild")


def test_failing_record_goes_to_the_dead_letter_topic_and_replay_brings_it_back(
    event_sources: StackEnv, stack: Stack, cube_api: CubeApi, rows: Rows, tmp_path: Path
) -> None:
    # A poison record (not JSON) and a good one that fails while Cube is down. tenant-3: the tenants the
    # other modules compare rollups of (A and B) stay out of it.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"%%% not json"\n')
    cli("produce", "--file", str(bad))
    rows.add_user("tenant-3")
    expected = rows.source_count("tenant-3")
    stack.stop_service("cube")
    try:
        cli("produce", "--tenant", "tenant-3", "--entity-type", "User")

        def dead_letters() -> list[dict[str, Any]]:
            plan = json.loads(cli("replay", "--dlt", "--dry-run", "--json").stdout)
            return [plan] if plan["records"] >= 2 else []

        wait_until(lambda: bool(dead_letters()), 90, "both records on the dead-letter topic", interval_s=2)
    finally:
        stack.start_service("cube")
    plan = json.loads(cli("replay", "--dlt", "--dry-run", "--json").stdout)
    assert [bad["reason"] for bad in plan["invalid"]] == ["not_json"]  # the payload came back as it was
    assert plan["invalid"][0]["partition"].startswith(f"{TOPIC}-")  # with its original partition
    assert "tenant-3" in plan["byTenant"]

    replayed = cli("replay", "--dlt", "--skip-invalid")

    assert "replayed 1 record(s)" in replayed.stdout
    wait_until(lambda: cube_api.count("tenant-3").value == expected, 40, "Cube to serve tenant-3's new row")
