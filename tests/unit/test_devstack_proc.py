"""devstack's process identity (README, "The local stack"): a PID file names exactly one process.

The check it replaces compared /proc/<pid>/cmdline with a marker. Between the moment Popen returns
(the kernel has released the parent from execve) and the moment the new program's argument area is
set up, /proc/<pid>/cmdline reads empty: right after a spawn the old check took a live service for
dead (measured here: 293 of 300 immediate reads of a just-spawned node were empty; the window is tens
of microseconds idle, up to ~17 ms on a loaded machine), the start then failed with "exited during
start" and left the live process running, untracked. The PID file now records the process's start
time (field 22 of /proc/<pid>/stat, set at fork), which is readable at once and never changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack import Stack, _proc

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)", "devstack.esm"]


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stack:
    stack = Stack(tmp_path)
    stack.pids.mkdir(parents=True)
    monkeypatch.setattr(stack, "_launch", lambda name, port: (SLEEPER, tmp_path, dict(os.environ)))
    return stack


def _forget_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """What another process (`make stack-status`, a second test worker) sees: no Popen objects."""
    monkeypatch.setattr(_proc, "_children", {})


def _started(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Wait until the process's exec has finished (its command line is readable)."""
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes():
        time.sleep(0.001)
    return process


def _kill(pid: int | None) -> None:
    if pid:
        os.kill(pid, signal.SIGKILL)


def test_a_service_checked_while_its_exec_is_unfinished_is_not_taken_for_dead(stack, monkeypatch):
    # /proc/<pid>/cmdline reads empty until the new program's arguments are set up.
    monkeypatch.setattr(_proc, "cmdline", lambda pid: "")
    stack._spawn("esm")
    _forget_children(monkeypatch)
    found = stack._pid("esm")
    try:
        assert found is not None, "a live service taken for dead"
    finally:
        _kill(found or int(stack._pid_file("esm").read_text().split()[0]))


def test_services_checked_right_after_they_were_spawned_are_all_found(stack, monkeypatch):
    """The real race, not a fake: spawn and check at once, as `_spawn` then `_wait_ready` do, from a
    process that keeps no Popen objects (the check another process makes)."""

    class Forgetful(dict):
        def __setitem__(self, key, value) -> None:
            pass

    monkeypatch.setattr(_proc, "_children", Forgetful())
    missed = 0
    for _ in range(100):
        stack._spawn("esm")
        found = stack._pid("esm")
        pid = int(stack._pid_file("esm").read_text().split()[0])
        missed += found != pid
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # gone before the next spawn, which must not find it alive
    assert missed == 0, f"{missed} of 100 live services taken for dead"


def test_a_recycled_pid_is_not_ours(stack, tmp_path):
    other = subprocess.Popen(SLEEPER)  # a live process with the marker, started by someone else
    try:
        # A PID file naming that PID but another start time: the PID was recycled.
        (stack._pid_file("esm")).write_text(f"{other.pid} 1\n")
        assert stack._pid("esm") is None
        _proc.write_pid(stack._pid_file("esm"), other.pid)
        assert stack._pid("esm") == other.pid
    finally:
        other.kill()
        other.wait()


def test_a_pid_file_of_an_older_devstack_is_checked_by_command_line(stack):
    other = _started(subprocess.Popen(SLEEPER))
    try:
        stack._pid_file("esm").write_text(f"{other.pid}\n")
        assert stack._pid("esm") == other.pid  # the marker is in its command line
        assert stack._pid("kafka") is None
        stack._pid_file("kafka").write_text(f"{other.pid}\n")
        assert stack._pid("kafka") is None  # alive, but not a kafka process
    finally:
        other.kill()
        other.wait()


def test_a_dead_service_is_dead(stack):
    stack._spawn("esm")
    pid = stack._pid("esm")
    assert pid is not None
    stack._stop("esm")
    assert stack._pid("esm") is None
    assert not stack._pid_file("esm").exists()
