"""The local tools as a newcomer meets them, second round: one source of the function's settings for
every local tool, shown where the stack is shown; one line and exit 2 for a bad setting or a stopped
stack; arguments that name the bad flag; typos that do not pass silently; log lines that say what a
verification found; the CLI from any folder; sample events that count freshness from now."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import devstack
import devstack.__main__ as devstack_main
from devstack import ServiceStatus, function
from devstack.esm import Function
from handler import app
from handler.domain.decode import decode_msk_event
from handler.domain.model import RecordRef
from handler.observability import logger
from handler.settings import load_settings
from preagg_cli import cli, local
from preagg_cli.localstack import LocalStack
from tests.builders import EVENTS, ROOT, T0, Rig, mutation

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}


def run_cli(argv: list[str], target: cli.Target | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, target=target, stdin=io.StringIO(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- one source of the function's settings ----------------------------------------------------------------
def test_settings_given_to_a_start_are_validated_summarised_and_applied_by_every_local_tool(tmp_path):
    given = function.from_environ({"CUBE_PREAGG_DEBOUNCE_MS": "5000", "UNRELATED": "x"}, ROOT, precise=True)
    assert set(given) == {"CUBE_PREAGG_DEBOUNCE_MS", "ENTITY_CUBE_MAP"}
    summary = function.validate(given, ROOT)
    assert "debounce window 5000 ms (CUBE_PREAGG_DEBOUNCE_MS)" in summary
    assert "entity map cube/entity-cube-map.precise.json" in summary
    assert "Users.dailyStatusCounts by timeHints.createdAt per month" in summary
    function.record(tmp_path, given, summary)

    # What the CLI's local target, `invoke --stack` and the esm apply: the record, nothing from the shell.
    shell = {"CUBE_PREAGG_DEBOUNCE_MS": "30000", "CUBE_TIMEZONES": "Europe/Paris", "PATH": "/bin"}
    function.apply(tmp_path, shell)
    assert shell["CUBE_PREAGG_DEBOUNCE_MS"] == "5000"
    assert "CUBE_TIMEZONES" not in shell and shell["PATH"] == "/bin"
    settings = load_settings(**{k: v for k, v in shell.items() if k != "PATH"})
    assert settings.debounce_ms == 5000
    assert settings.entity_cube_map.targets_for("User") == ("Users.main", "Users.dailyStatusCounts")


def test_a_later_start_keeps_the_recorded_settings_unless_given_again():
    recorded = function.from_environ({"CUBE_PREAGG_DEBOUNCE_MS": "5000"}, ROOT, precise=True)
    assert function.from_environ({}, ROOT, recorded=recorded) == recorded  # restarting Cube keeps them
    changed = function.from_environ({"CUBE_PREAGG_DEBOUNCE_MS": "7000"}, ROOT, recorded=recorded)
    assert changed["CUBE_PREAGG_DEBOUNCE_MS"] == "7000" and "ENTITY_CUBE_MAP" in changed
    # An empty value, and PRECISE=0, go back to the function's defaults.
    reset = function.from_environ({"CUBE_PREAGG_DEBOUNCE_MS": ""}, ROOT, recorded=recorded, precise=False)
    assert reset == {}
    assert "debounce window 30000 ms (default), entity map default" in function.validate(reset, ROOT)


def test_a_start_with_other_settings_restarts_a_running_esm(tmp_path, monkeypatch, capsys):
    stack = devstack.Stack(tmp_path)
    stack.state.mkdir()
    esm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "devstack.esm"])
    try:
        stack.pids.mkdir()
        devstack._proc.write_pid(stack._pid_file("esm"), esm.pid)
        (stack.state / "esm.json").write_text(json.dumps({"pid": esm.pid, "environ": {}}))
        stack._record_settings({}, "defaults")
        assert stack._pid("esm") == esm.pid, "same settings: left running"
        stack._record_settings({"CUBE_PREAGG_DEBOUNCE_MS": "5000"}, "window 5000 ms")
        assert stack._pid("esm") is None, "other settings: stopped, to be started with them"
        assert "restarting esm: the function's settings changed" in capsys.readouterr().err
        assert stack.function_settings()["environ"] == {"CUBE_PREAGG_DEBOUNCE_MS": "5000"}
    finally:
        esm.kill()
        esm.wait()


def test_status_shows_the_function_settings_in_effect(tmp_path, monkeypatch, capsys):
    stack = devstack.Stack(tmp_path)
    stack.state.mkdir()
    function.record(
        stack.state, {"CUBE_PREAGG_DEBOUNCE_MS": "5000"}, "debounce window 5000 ms (CUBE_PREAGG_DEBOUNCE_MS)"
    )
    up = {name: ServiceStatus(name, True, 1, "url") for name in devstack.stack.ALL_SERVICES}
    monkeypatch.setattr(stack, "status", lambda: up)
    monkeypatch.setattr(devstack_main, "Stack", lambda: stack)
    assert devstack_main.main(["status"]) == 0
    assert "function  debounce window 5000 ms (CUBE_PREAGG_DEBOUNCE_MS)" in capsys.readouterr().out


# -- a bad setting: one line ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CUBE_PREAGG_DEBOUNCE_MS", "abc", "CUBE_PREAGG_DEBOUNCE_MS: Input should be a valid integer"),
        ("ENTITY_CUBE_MAP", "{not json", "ENTITY_CUBE_MAP"),
        ("CUBE_PREAGG_DEBOUNCE", "5000", "unknown setting CUBE_PREAGG_DEBOUNCE"),
    ],
)
def test_stack_start_with_a_bad_setting_is_one_line_exit_2_and_starts_nothing(tmp_path, variable, value, expected):
    result = subprocess.run(
        [sys.executable, "-m", "devstack", "start"],
        env={**ENV, variable: value},
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("devstack: ") and expected in result.stderr


def test_make_invoke_with_a_misspelt_variable_names_it(tmp_path):
    result = subprocess.run(
        ["make", "-n", "invoke", "EVENTS=events/user-updated.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "make invoke takes EVENT STACK, not EVENTS" in result.stderr


# -- a stopped stack: one line, exit 2, everywhere -----------------------------------------------------
@pytest.fixture
def stopped_stack(tmp_path: Path) -> Path:
    """A local stack's state folder whose services are not running (ports on nothing)."""
    state = tmp_path / ".stack"
    state.mkdir()
    (state / "ports.json").write_text(json.dumps({"postgres": 1, "moto": 2, "dynalite": 3, "cube": 4}))
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "AWS_DEFAULT_REGION": "us-east-1"}
    (state / "env.json").write_text(json.dumps(env))
    return state / "env.json"


@pytest.mark.parametrize(
    "argv",
    [
        ["stats"],
        ["jobs", "--tenant", "tenant-1"],
        ["refresh", "--tenant", "tenant-1", "--entity-type", "User"],
        ["clear", "--tenant", "tenant-1", "--yes"],
        ["produce", "--tenant", "tenant-1"],
        ["replay", "--dlt", "--dry-run"],
        ["query", "--tenant", "tenant-1"],
    ],
)
def test_every_command_on_a_stopped_stack_is_one_line_and_exit_2(stopped_stack, monkeypatch, argv):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    code, out, err = run_cli([*argv, "--env-file", str(stopped_stack)])
    assert code == cli.EXIT_USAGE
    assert out == ""
    assert err == "error: the local stack is not running: start it with `make stack-start`\n"


def test_a_half_running_stack_names_what_is_down(stopped_stack, monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    statuses = {name: ServiceStatus(name, name != "cube", 1, "") for name in devstack.stack.ALL_SERVICES}
    monkeypatch.setattr(devstack.Stack, "status", lambda self: statuses)
    code, _, err = run_cli(["stats", "--env-file", str(stopped_stack)])
    assert code == cli.EXIT_USAGE
    assert (
        err == "error: the local stack is only partly running (cube down): `make stack-start` starts what is missing\n"
    )


@pytest.mark.parametrize(
    ("up", "code", "says"),
    [
        ((), 0, "the local stack is not running; start it with `make stack-start`"),
        (devstack.stack.ALL_SERVICES, 0, "esm       up"),
        (devstack.stack.SERVICES, 1, "kafka, esm down; `make stack-start` starts what is missing"),
        (("postgres", "moto", "dynalite", "kafka", "esm"), 1, "cube down"),
    ],
)
def test_stack_status_is_0_all_up_or_all_stopped_and_1_partly_up(tmp_path, monkeypatch, capsys, up, code, says):
    stack = devstack.Stack(tmp_path)
    statuses = {name: ServiceStatus(name, name in up, 1, "url") for name in devstack.stack.ALL_SERVICES}
    monkeypatch.setattr(stack, "status", lambda: statuses)
    monkeypatch.setattr(devstack_main, "Stack", lambda: stack)
    assert devstack_main.main(["status"]) == code
    assert says in capsys.readouterr().out


# -- arguments that name the bad flag ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["stats", "--tenant-id", "t1"], "preagg-refresh stats has no option --tenant-id; did you mean --tenant?"),
        (
            ["refresh", "--tenant", "t1", "--cubes", "Users"],
            "preagg-refresh refresh has no option --cubes; did you mean --cube?",
        ),
        (["jobs", "--ten", "t1"], "preagg-refresh jobs has no option --ten; did you mean --tenant?"),
        (["produce", "--tenant=t1", "--entity", "User"], "preagg-refresh produce has no option --entity"),
    ],
)
def test_an_unknown_option_is_named_with_a_suggestion_in_one_line(argv, expected):
    code, out, err = run_cli(argv, target=cli.Target("test", dict, lambda: None, lambda: None))  # type: ignore[arg-type,return-value]
    assert code == cli.EXIT_USAGE
    assert out == ""
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_option_values_that_look_like_options_are_values():
    parser = cli.build_parser()
    assert cli._unknown_option(parser, ["produce", "--tenant", "t1", "--entity-id", "--odd-id"]) is None


def test_a_misnamed_cube_lists_the_cubes_cube_knows_and_the_closest(monkeypatch):
    result = {
        "tenantId": "tenant-1",
        "keys": [
            {
                "target": "users",
                "status": "failed",
                "detail": "client: Cube rejected the request (400): A user's selector doesn't match any of the "
                "pre-aggregations defined in the data model.",
            }
        ],
    }
    out = io.StringIO()
    cli.print_refresh(result, out, lambda: ["Groups", "Groups.main", "Users", "Users.main"])
    text = out.getvalue()
    assert "no cube or pre-aggregation named 'users' (names are case-sensitive): did you mean 'Users'?" in text
    assert "Cube has Groups, Groups.main, Users, Users.main" in text
    assert "CUBE_API_SECRET_ARN" not in text  # not a secret problem


def test_a_first_build_that_raced_in_cube_says_to_run_it_again():
    detail = (
        "client: Cube rejected the request (400): duplicate key value violates unique constraint "
        '"pg_namespace_nspname_index"'
    )
    assert "run the same command again" in cli._hint_for(detail, "Users")


# -- typos that used to pass silently -------------------------------------------------------------------------
def test_producing_an_unmapped_entity_type_says_so():
    settings = load_settings()
    target = cli.Target("test", dict, lambda: settings.entity_cube_map, lambda: None)  # type: ignore[arg-type,return-value]
    err = io.StringIO()
    values = [
        (b"t1", json.dumps(mutation(entity_type="Userz")).encode(), []),
        (b"t1", json.dumps(mutation()).encode(), []),
    ]
    cli._warn_unmapped(values, target, err)
    assert err.getvalue() == (
        "note: entity type 'Userz' maps to no cube (known: Group, Tenant, User): the function acknowledges it "
        "and refreshes nothing\n"
    )


def test_produce_time_hints_follow_the_event_type():
    assert cli._time_hints(["createdAt=2025-10-15T12:00:00Z"], "ENTITY_CREATED") == {
        "createdAt": {"new": "2025-10-15T12:00:00Z"}
    }
    assert cli._time_hints(["createdAt=2025-10-15T12:00:00Z"], "ENTITY_UPDATED") == {
        "createdAt": {"old": "2025-10-15T12:00:00Z", "new": "2025-10-15T12:00:00Z"}
    }
    with pytest.raises(cli.UsageError, match="not an ISO-8601 time"):
        cli._time_hints(["createdAt=yesterday"], "ENTITY_UPDATED")


def test_make_event_uses_a_json_string_line_as_the_raw_record_value(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO('"%%% not json"\n'))
    assert local.main(["make-event"]) == 0
    batch = decode_msk_event(json.loads(capsys.readouterr().out), now_ms=T0)
    assert [bad.reason for bad in batch.invalid] == ["not_json"]  # as `produce --file` publishes it


# -- log lines that say what happened ------------------------------------------------------------------------
def test_a_verification_is_logged_as_one_batch_handled_line():
    rig = Rig(verify=True)
    rig.service.refresh_now("tenant-1", ["Users"], force=False, deadline_ms=rig.deadline)
    [(due, message)] = rig.build_queue.messages
    rig.clock.now = due
    event = {"Records": [{"messageId": "m-1", "body": json.dumps(message.as_body()), "eventSource": "aws:sqs"}]}
    handler, level = logger.registered_handler, logger.log_level
    stream, handler.stream = handler.stream, io.StringIO()  # type: ignore[attr-defined]
    logger.setLevel("INFO")
    try:
        app.handle(event, service=rig.service, settings=load_settings())
        lines = handler.stream.getvalue().splitlines()  # type: ignore[attr-defined]
    finally:
        handler.stream = stream  # type: ignore[attr-defined]
        logger.setLevel(level)
    assert sum('"batch handled"' in line for line in lines) == 1


def test_the_esm_log_line_of_a_verification_says_what_the_build_became():
    rig = Rig(verify=True)
    rig.service.refresh_now("tenant-1", ["Users"], force=False, deadline_ms=rig.deadline)
    [(due, message)] = rig.build_queue.messages
    function_ = Function.__new__(Function)
    function_.service = rig.service  # type: ignore[assignment]
    (target,) = message.targets
    assert function_._verified(target) == "verify tenant-1#Users: not built yet, checked again later"
    rig.clock.now = due
    rig.service.process_verify([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline)
    assert function_._verified(target).startswith("verify tenant-1#Users: build done (freshness lag")


# -- the CLI from another folder ----------------------------------------------------------------------------
def test_the_cli_finds_the_stack_of_its_checkout_from_any_folder(tmp_path, monkeypatch):
    checkout, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    (checkout / ".stack").mkdir(parents=True)
    (checkout / ".stack" / "env.json").write_text("{}")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(cli, "INSTALLED_ROOT", checkout)
    assert cli.find_env_file() == checkout / ".stack" / "env.json"


# -- sample events and times ---------------------------------------------------------------------------------
def test_local_invoke_counts_freshness_from_now_not_from_the_samples_fixed_day():
    event = json.loads((EVENTS / "burst-3-tenants.json").read_text())
    now = T0 + 10 * 86_400_000
    assert local.restamp(event, now) == 36
    batch = decode_msk_event(event, now_ms=now)
    assert {m.timestamp for _, m in batch.mutations} == {now}
    bad = json.loads((EVENTS / "mixed-bad-records.json").read_text())
    local.restamp(bad, now)
    reasons = sorted(b.reason for b in decode_msk_event(bad, now_ms=now).invalid)
    assert reasons.count("invalid_fields") == 4  # bad records stay bad ("yesterday" is no time)


def test_stats_says_just_now_for_a_time_within_a_second():
    now = datetime(2026, 12, 7, 3, 11, 27, 600_000, tzinfo=UTC)
    assert cli._when((now - timedelta(milliseconds=400)).isoformat(), now).endswith("(just now)")
    assert cli._when((now - timedelta(seconds=5)).isoformat(), now).endswith("(5s ago)")
    assert cli._when((now + timedelta(seconds=5)).isoformat(), now).endswith("(in 5s)")


def test_query_is_local_only():
    code, _, err = run_cli(["query", "--tenant", "t1"], target=cli.Target("stack x", dict, lambda: None, lambda: None))  # type: ignore[arg-type,return-value]
    assert code == cli.EXIT_USAGE
    assert "local stack only" in err


def test_query_prints_the_value_and_the_rollup_that_answered():
    answer: dict[str, Any] = {
        "data": [{"Users.count": "22"}],
        "usedPreAggregations": {"t": {"preAggregationId": "Users.main", "lastUpdatedAt": T0}},
    }
    out = io.StringIO()
    cli.print_served("tenant-1", answer, out, datetime.fromtimestamp(T0 / 1000 + 40, tz=UTC))
    assert out.getvalue().splitlines() == [
        "tenant-1: Users.count = 22",
        "served from Users.main, built 2026-11-29 12:00:00Z (40s ago)",
    ]


def test_local_stack_outside_a_devstack_state_folder_is_taken_as_it_is(tmp_path):
    LocalStack(tmp_path, {}).require(["kafka", "cube"])  # no ports.json: nothing to check, nothing raised


def test_jobs_wait_tells_the_partitions_of_one_target_apart():
    done = [{"token": "t", "status": "done", "table": "x"}]
    october, november = "2025-10-01..2025-10-31", "2025-11-01..2025-11-30"
    answers = {
        "jobs": {
            "ok": True,
            "keys": [
                {"target": "Users.daily", "partition": october, "refreshStartedAt": "A", "jobs": done},
                {"target": "Users.daily", "partition": november, "refreshStartedAt": "B", "jobs": done},
            ],
        },
        "stats": {
            "ok": True,
            "keys": [
                {"target": "Users.daily", "partition": october, "lastBuild": {"refreshStartedAt": "A"}},
                {"target": "Users.daily", "partition": november, "lastBuild": {"refreshStartedAt": "B"}},
            ],
        },
    }
    target = cli.Target("test", lambda payload: answers[payload["operation"]], lambda: None, lambda: None)  # type: ignore[arg-type,return-value]
    assert cli._unfinished(target, {"operation": "jobs", "tenantId": "tenant-h"}) == []
    answers["stats"]["keys"][0]["lastBuild"] = {"refreshStartedAt": "older"}
    assert cli._unfinished(target, {"operation": "jobs", "tenantId": "tenant-h"}) == [
        f"Users.daily {october}: jobs finished, the function has not verified them yet"
    ]
