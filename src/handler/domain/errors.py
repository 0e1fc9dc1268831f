"""Domain exceptions. Adapters translate SDK and HTTP errors into these; nothing routes on message text."""

from __future__ import annotations

import re

# Token-looking text: a JWT (base64url of `{"...` starts with `eyJ`) and anything after `Bearer`.
_TOKENS = (
    (re.compile(r"(?i)\bbearer\s+[^\s\"',;]+"), "Bearer [redacted]"),
    (re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"), "[redacted]"),
)


# Values a database error may quote: text in single quotes (not an apostrophe inside a word, as in
# Cube's "user's selector doesn't match"), text in double quotes (PostgreSQL quotes values and
# names alike: both are masked, so no value leaks), and `Key (col)=(value)` details.
_VALUES = (
    (re.compile(r"(?<![A-Za-z0-9])'(?:[^']|'')*'"), "'?'"),
    (re.compile(r'"(?:[^"]|"")*"'), '"?"'),
    (re.compile(r"\)=\([^)]*\)"), ")=(?)"),
)


def redact_tokens(text: str) -> str:
    """Cube's error text goes into logs and operation results; should Cube ever echo the
    Authorization header, the tenant's JWT must not follow it there."""
    for pattern, replacement in _TOKENS:
        text = pattern.sub(replacement, text)
    return text


def redact_values(text: str) -> str:
    """Cube's error text without the values a database error quotes (see _VALUES): logs, the
    table's buildError and dead letters carry no row data."""
    for pattern, replacement in _VALUES:
        text = pattern.sub(replacement, text)
    return text


class CubeError(Exception):
    """Cube did not queue the jobs. `error_class` is one of client, server, throttled, timeout,
    connection, secret. The message is redacted of token-looking text and quoted values whoever
    builds it."""

    error_class = "server"
    retryable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(redact_values(redact_tokens(message)))
        self.status = status


class CubeRejected(CubeError):
    """Cube answered 4xx: retrying the same request cannot help (bad token, scope, selector)."""

    error_class = "client"
    retryable = False


class CubeServerError(CubeError):
    error_class = "server"


class CubeThrottled(CubeError):
    """Cube answered 429 (too many requests): retried like a 5xx, not sooner than its Retry-After."""

    error_class = "throttled"

    def __init__(self, message: str, *, status: int | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after_ms = retry_after_ms


class CubeTimeout(CubeError):
    error_class = "timeout"


class CubeUnreachable(CubeError):
    error_class = "connection"


class CubeNotSent(CubeTimeout):
    """The request was not sent: the function's deadline is near (its claim is released)."""


class CubeSecretUnavailable(CubeError):
    """The Cube API secret could not be read (Secrets Manager denied, throttled or unreachable):
    no request was sent. The message names the cause, never the secret."""

    error_class = "secret"


class OutOfTime(Exception):
    """The function's deadline is near: this work was not started, its records are reported so
    that the source retries them."""


class StoreUnavailable(Exception):
    """The debounce store failed (throttled, unreachable): the records must be retried."""


class SchedulerUnavailable(Exception):
    """The trailing refresh could not be scheduled: the records must be retried."""
