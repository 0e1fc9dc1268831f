"""What a newcomer runs in the first hour (README): make-event into a git-ignored folder, local invoke
errors as one line with the fix, per-key decisions, what an SQS event skipped and why, the CLI without
abbreviations, `replay --s3 dlq` locally, and `devstack status/stop` on a stopped stack."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import devstack
import devstack.__main__ as devstack_main
from preagg_cli import cli, local
from tests.builders import EVENTS, mutation, sample_events

ROOT = Path(__file__).resolve().parents[2]


def run_local(argv, monkeypatch, capsys, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = local.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- 7: make-event -----------------------------------------------------------------------------------
# -- 7: make-event -----------------------------------------------------------------------------------
def test_user_event_file_in_events_is_not_a_test_input():
    mine = EVENTS / "zz-first-hour-mine.json"
    mine.write_text("{}")  # what `make-event ... > events/mine.json` (or a failed one) leaves behind
    try:
        samples = sample_events()
    finally:
        mine.unlink()
    assert mine not in samples
    assert EVENTS / "user-updated.json" in samples


def test_make_event_output_under_events_local_is_not_a_sample_event(monkeypatch, capsys):
    target = EVENTS / "local" / "zz-first-hour-test.json"
    try:
        code, _, err = run_local(["make-event", "-o", str(target)], monkeypatch, capsys, json.dumps(mutation()) + "\n")
        assert code == 0 and target.is_file()
        assert "wrote" in err
        assert target not in sample_events()  # what the sample-event tests collect
        ignored = subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=ROOT, check=False)
        assert ignored.returncode == 0
    finally:
        target.unlink(missing_ok=True)


def test_make_event_bad_input_exits_2_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "mine.json"
    code, _, err = run_local(["make-event", "-o", str(target)], monkeypatch, capsys, "{not json\n")
    assert code == 2
    assert not target.exists()
    assert err.count("\n") == 1 and "stdin line 1: not JSON" in err
    code, _, err = run_local(["make-event", "-o", str(target)], monkeypatch, capsys, "")
    assert code == 2 and not target.exists()
    assert "no mutations on stdin" in err


# -- 9: one-line errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file; the sample events are in events/"),
        ("{}", "this is an empty object, not an event this function takes"),
        ('{"Records": [{"eventSource": "aws:kinesis"}]}', "an event from aws:kinesis, which does not invoke"),
        ('{"httpMethod": "GET", "requestContext": {}}', "an API Gateway event"),
        ("[1, 2", "not JSON"),
    ],
)
def test_local_invoke_bad_event_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, content, expected):
    path = tmp_path / "event.json"
    if content is not None:
        path.write_text(content)
    code, out, err = run_local(["invoke", str(path)], monkeypatch, capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err


def test_local_invoke_bad_setting_is_one_line_naming_the_variable():
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "CUBE_PREAGG_DEBOUNCE_MS": "abc"}
    result = subprocess.run(
        [sys.executable, "-m", "preagg_cli.local", "invoke", str(EVENTS / "user-updated.json")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "CUBE_PREAGG_DEBOUNCE_MS" in result.stderr and "fix or unset the variable" in result.stderr


def test_local_invoke_stack_when_the_stack_is_down_says_so(tmp_path, monkeypatch, capsys):
    real = devstack.Stack
    monkeypatch.setattr(devstack, "Stack", lambda: real(tmp_path))
    code, _, err = run_local(["invoke", str(EVENTS / "user-updated.json"), "--stack"], monkeypatch, capsys)
    assert code == 2
    assert "the local stack is not running: start it with `make stack-start`" in err


# -- 8 and 10: what was decided, what was skipped -------------------------------------------------------
def test_local_invoke_prints_decisions_per_key(monkeypatch, capsys):
    code, out, _ = run_local(["invoke", str(EVENTS / "burst-3-tenants.json")], monkeypatch, capsys)
    assert code == 0
    assert "Decisions per key (9):" in out
    assert "tenant-2#Users" in out and "refreshed" in out


def test_local_invoke_sample_trailing_event_says_what_it_skipped_and_why(monkeypatch, capsys):
    code, out, _ = run_local(["invoke", str(EVENTS / "trailing-refresh-sqs.json")], monkeypatch, capsys)
    assert code == 0
    assert "tenant-1#Users" in out and "skipped" in out
    assert "a trailing refresh fires only for a key whose debounce item holds its token" in out
    assert "skipped, trailing message body is not JSON" in out


def test_local_invoke_generic_sqs_message_is_named_not_a_trailing_refresh(tmp_path, monkeypatch, capsys):
    event = {"Records": [{"messageId": "m-1", "body": '{"hello": "world"}', "eventSource": "aws:sqs"}]}
    path = tmp_path / "sqs.json"
    path.write_text(json.dumps(event))
    code, out, _ = run_local(["invoke", str(path)], monkeypatch, capsys)
    assert code == 0
    assert "message m-1: skipped, not a trailing-refresh message" in out
    lines = out.splitlines()
    assert lines[0] == "Lambda response:"  # human output first; the function's JSON logs come after
    if "Function log" in out:
        assert lines.index(next(x for x in lines if x.startswith("Function log"))) > 3


# -- 11: the CLI --------------------------------------------------------------------------------------
def test_cli_rejects_abbreviated_options(capsys):
    code = cli.main(["refresh", "--tenant", "t1", "--entity", "User"], stdout=io.StringIO(), stderr=io.StringIO())
    assert code == cli.EXIT_USAGE


def test_cli_replay_s3_dlq_on_the_local_stack_points_at_the_dead_letter_topic(tmp_path):
    env_file = tmp_path / ".stack" / "env.json"
    env_file.parent.mkdir()
    env_file.write_text(json.dumps({"KAFKA_BOOTSTRAP_SERVERS": ""}))
    err = io.StringIO()
    code = cli.main(["replay", "--s3", "dlq", "--dry-run", "--env-file", str(env_file)], stderr=err)
    assert code == cli.EXIT_USAGE
    assert "use `preagg-refresh replay --dlt --dry-run`" in err.getvalue()
    err = io.StringIO()
    assert cli.main(["replay", "--dlt", "--dry-run", "--env-file", str(env_file)], stderr=err) == cli.EXIT_USAGE
    assert "the local Kafka endpoint is not running" in err.getvalue()


def test_devstack_status_and_stop_on_a_stopped_stack_exit_0_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devstack_main, "Stack", lambda: devstack.Stack(tmp_path))
    assert devstack_main.main(["status"]) == 0
    assert "the local stack is not running; start it with `make stack-start`" in capsys.readouterr().out
    assert devstack_main.main(["stop"]) == 0
    assert "nothing was running" in capsys.readouterr().out


def test_devstack_reseeds_when_seed_sql_changed_since_the_data_was_seeded(tmp_path, monkeypatch, capsys):
    (tmp_path / "cube").mkdir()
    seed = tmp_path / "cube" / "seed.sql"
    seed.write_text("SELECT 1;\n")
    stack = devstack.Stack(tmp_path)
    stack.pg_dir = tmp_path / "pg"
    stack.pg_dir.mkdir()
    ran: list[list[str]] = []
    monkeypatch.setattr(stack, "_psql", lambda args, database: ran.append(args) or "1")
    stack._seed_once()
    assert [a for a in ran if "-f" in a], "first start: seeded"
    ran.clear()
    stack._seed_once()
    assert ran == [], "same seed: left alone"
    seed.write_text("SELECT 2;\n")  # a `git pull` changed the seed
    stack._seed_once()
    assert [a for a in ran if "-f" in a], "changed seed: seeded again"
    assert "cube/seed.sql changed since the data was seeded: reseeding" in capsys.readouterr().err
