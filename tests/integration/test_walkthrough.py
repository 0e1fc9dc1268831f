"""docs/walkthrough.md, run as written: every ```bash block, in order, in one shell, on a fresh copy of
the repository with its own local stack (its own ports, cluster and Kafka endpoint), as a newcomer
would run it from a clean checkout. The checks below are the walkthrough's claims: if the system
changes, this test fails and the walkthrough is updated with it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from devstack import StackEnv, function

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
STEP = re.compile(r"^## (\d+)\. (.+)$", re.MULTILINE)
BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MARK = "@@walkthrough step"


def steps(markdown: str) -> list[tuple[str, str]]:
    """(heading, commands) per `## N. heading` section, its ```bash blocks joined."""
    heads = list(STEP.finditer(markdown))
    out = []
    for head, following in zip(heads, [*heads[1:], None], strict=True):
        body = markdown[head.end() : following.start() if following else len(markdown)]
        commands = "".join(block.group(1) for block in BLOCK.finditer(body))
        if commands:
            out.append((f"{head.group(1)}. {head.group(2)}", commands))
    return out


def fresh_checkout(target: Path) -> Path:
    """The files git tracks or would track (their working tree versions), with this checkout's
    .venv and Cube's node_modules linked in: a clean clone without the installs."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)  # mtimes kept: make sees .venv as up to date
    (target / ".venv").symlink_to(ROOT / ".venv")
    (target / "cube" / "node_modules").symlink_to(ROOT / "cube" / "node_modules")
    return target


def test_steps_are_found_in_the_walkthrough() -> None:
    found = [heading for heading, _ in steps(WALKTHROUGH.read_text())]
    assert len(found) >= 7, found
    assert all(commands.strip() for _, commands in steps(WALKTHROUGH.read_text()))


@pytest.mark.integration
def test_walkthrough_runs_as_written_on_a_fresh_checkout(tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path / "checkout")
    sections = steps((checkout / "docs" / "walkthrough.md").read_text())
    script = "set -euo pipefail\nexec 2>&1\n" + "".join(
        f"echo '{MARK} {heading}'\n{commands}" for heading, commands in sections
    )
    # A newcomer's shell: nothing of the session's stack (the fixtures export its addresses).
    session = {name.upper() for name in StackEnv.__dataclass_fields__} | function.names()
    env = {k: v for k, v in os.environ.items() if k not in session and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MAKEFLAGS"] = "--old-file=.venv/.installed-3.13"  # never reinstall the linked .venv
    secret = ""
    try:
        result = subprocess.run(
            ["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        secret_file = checkout / ".stack" / "cube_api_secret"
        secret = secret_file.read_text().strip() if secret_file.exists() else ""
    finally:
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "devstack", "stop", "--purge"],
            cwd=checkout,
            env=env,
            capture_output=True,
            check=False,
            timeout=120,
        )
    output = result.stdout + result.stderr
    (tmp_path / "transcript.txt").write_text(output)  # the walkthrough as it ran, for its sample outputs
    ran = {heading: text for heading, text in _by_step(result.stdout).items()}
    assert result.returncode == 0, f"the walkthrough stopped in step {list(ran)[-1:]}:\n{output[-6000:]}"
    assert list(ran) == [heading for heading, _ in sections]

    def step(number: int) -> str:
        return next(text for heading, text in ran.items() if heading.startswith(f"{number}. "))

    assert "function  debounce window 15000 ms (CUBE_PREAGG_DEBOUNCE_MS)" in step(1)
    assert "no debounce state (window 15000 ms)" in step(1)
    assert "tenant-1: Users.count = 20" in step(2)
    assert "tenant-1: Users.count = 21" in step(3)  # the row produced by your own client
    assert "verify tenant-1#Users: build done" in step(3)
    assert "tenant-2#Users debounced" in step(4)
    assert "scheduled, due" in step(4)
    assert re.search(r"tenant-2: Users.count = 21\n.*tenant-2: Users.count = 22", step(4), re.DOTALL)
    assert "failure: column users.status does not exist" in step(5)
    assert "build failed: failure: column users.status does not exist (re-trigger 1/5" in step(5)
    assert re.search(r"tenant-3\s+Users .*last built", step(5).split("re-trigger 1/5", 1)[1])
    assert "not_json" in step(6) and "2 record(s): 1 valid, 1 invalid" in step(6)
    assert "replayed 1 record(s)" in step(6)
    assert "tenant-2: Users.count = 23" in step(6)
    assert "entity map cube/entity-cube-map.precise.json" in step(7)
    after_event = step(7).split("handled by the function", 1)[1]
    partition_tables = re.findall(r"users_daily_status_counts(\d{8})_", after_event)
    assert len(set(partition_tables)) == 1, step(7)  # one partition of 31 rebuilt
    assert "Users.dailyStatusCounts 20" in step(7) or "Users.dailyStatusCounts#20" in step(7)
    # The stack's Cube secret never shows up in what the walkthrough prints.
    assert secret and secret not in output


def _by_step(stdout: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    current = None
    for line in stdout.splitlines(keepends=True):
        if line.startswith(MARK):
            current = line[len(MARK) :].strip()
            parts[current] = ""
        elif current is not None:
            parts[current] += line
    return parts
