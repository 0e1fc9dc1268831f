"""Process, port and HTTP helpers for the dev stack: spawn detached services, find them again by
PID (checking the command line, so a recycled PID is never mistaken for ours), stop them."""

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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(pid_file: Path, marker: str) -> int | None:
    """The PID in `pid_file` if that process is alive and its command line contains `marker`."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    child = _children.get(pid)
    if child is not None and child.poll() is None:
        # Our own running child (an unreaped PID cannot be recycled). The checks below once missed a
        # Cube this process had just started: it was taken for dead and left running, untracked.
        return pid
    if pid_alive(pid) and marker in cmdline(pid):
        return pid
    return None


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
