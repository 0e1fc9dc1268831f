"""Process, port and HTTP helpers for the dev stack: spawn detached services, find them again by
PID and start time (so a recycled PID is never mistaken for ours), stop them.

Why the start time and not the command line: between the moment Popen returns (the kernel has
released the parent from execve) and the moment the new program's arguments are set up,
/proc/<pid>/cmdline reads empty. A check made right after a spawn (the start's own readiness loop, or
`status` from another process) took a live service for dead there, failed the start and left the
process running, untracked. The start time (field 22 of /proc/<pid>/stat) is set at fork, readable
at once, and never changes (tests/unit/test_devstack_proc.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

# Popen objects of services this process started, so a stopped child is reaped instead of being
# left as a zombie that still "exists" (matters when a test stops and restarts Cube many times).
_children: dict[int, subprocess.Popen[bytes]] = {}
# How reaped children ended (a negative code is the signal that ended them), for error messages.
_exit_codes: dict[int, int] = {}


def exit_code(pid: int) -> int | None:
    """The exit status of a child this process started and has seen end, else None."""
    return _exit_codes.get(pid)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _exit_codes[pid] = child.returncode
        del _children[pid]


def pid_alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses): state is field 3.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def write_pid(pid_file: Path, pid: int) -> None:
    """Record `pid` and its start time; written whole (a reader never sees a half-written file)."""
    started = start_time(pid)
    tmp = pid_file.with_name(f".{pid_file.name}.tmp")
    tmp.write_text(f"{pid} {started}\n" if started is not None else f"{pid}\n")
    tmp.replace(pid_file)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(pid_file: Path, marker: str) -> int | None:
    """The PID in `pid_file` if that very process is alive: same PID and same start time. A file
    written by an older devstack holds only the PID: then its command line must contain `marker`."""
    try:
        fields = pid_file.read_text().split()
        pid = int(fields[0])
        started = int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    if not pid_alive(pid):
        return None
    if started is not None:
        return pid if start_time(pid) == started else None
    return pid if marker in cmdline(pid) else None


def spawn(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    user: tuple[int, int] | None = None,
) -> int:
    """Start a service in its own session (it outlives the CLI), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user[0] if user else None,
            group=user[1] if user else None,
            extra_groups=[] if user else None,
        )
    _children[proc.pid] = proc
    return proc.pid


def wait_for_http(url: str, *, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200; a RuntimeError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)


def terminate(pid: int, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal `pid`, wait for it to exit, SIGKILL it after `timeout`."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while pid_alive(pid):
        time.sleep(0.05)


def http_status(
    url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None, timeout: float = 2.0
) -> int | None:
    """HTTP status of a request without a body, or None when nothing answers."""
    # Only ever called with http://127.0.0.1:<port>/... URLs built by this package.
    request = urllib.request.Request(url, headers=dict(headers or {}), method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of the latest run in `path` (spawn() starts each run with a `=== ` header)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    latest = text.rsplit("\n=== ", 1)[-1]
    return "\n".join(f"  {line[:1000]}" for line in latest.splitlines()[-lines:])
