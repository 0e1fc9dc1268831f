"""Local stack for integration tests and `make demo` (not deployed): PostgreSQL, a real Cube
server, dynalite and moto. CLI: `python -m devstack start|stop|status|env|psql`.

    from devstack import Stack
    stack = Stack()
    env = stack.start()            # idempotent; returns StackEnv
    os.environ.update(env.as_environ())
    stack.stop_service("cube"); stack.start_service("cube")
    stack.psql("SELECT count(*) FROM users")  # -> [("160",)]
"""

from __future__ import annotations

from devstack.stack import SERVICES, ServiceStatus, Stack, StackEnv, StackError, sign_hs256

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "Stack",
    "StackEnv",
    "StackError",
    "psql",
    "sign_hs256",
    "start",
    "status",
    "stop",
]


def start(timeout: float = 180.0) -> StackEnv:
    return Stack().start(timeout=timeout)


def stop(purge: bool = False) -> None:
    Stack().stop(purge=purge)


def status() -> dict[str, ServiceStatus]:
    return Stack().status()


def psql(sql: str) -> list[tuple[str | None, ...]]:
    return Stack().psql(sql)
