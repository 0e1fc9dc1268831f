"""Domain exceptions. Adapters translate SDK and HTTP errors into these; nothing routes on message text."""

from __future__ import annotations


class CubeError(Exception):
    """Cube did not queue the jobs. `error_class` is one of client, server, timeout, connection, secret."""

    error_class = "server"
    retryable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CubeRejected(CubeError):
    """Cube answered 4xx: retrying the same request cannot help (bad token, scope, selector)."""

    error_class = "client"
    retryable = False


class CubeServerError(CubeError):
    error_class = "server"


class CubeTimeout(CubeError):
    error_class = "timeout"


class CubeUnreachable(CubeError):
    error_class = "connection"


class CubeSecretUnavailable(CubeError):
    """The Cube API secret could not be read (Secrets Manager denied, throttled or unreachable):
    no request was sent. The message names the cause, never the secret."""

    error_class = "secret"


class StoreUnavailable(Exception):
    """The debounce store failed (throttled, unreachable): the records must be retried."""


class SchedulerUnavailable(Exception):
    """The trailing refresh could not be scheduled: the records must be retried."""
