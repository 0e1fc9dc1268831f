"""Cube's pre-aggregation jobs API over httpx: JWT per tenant, bounded retries, typed errors."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
import jwt

from handler.domain.errors import (
    CubeError,
    CubeRejected,
    CubeSecretUnavailable,
    CubeServerError,
    CubeThrottled,
    CubeTimeout,
    CubeUnreachable,
)
from handler.domain.model import Selector
from handler.domain.ports import CubeAnswer, JobStatus

TOKEN_TTL_S = 300
# Cube's 400 for a selector that matches no pre-aggregation. For a selector with a `dateRange` it is
# also the answer when the range holds none of the pre-aggregation's partitions (outside its build
# range), observed on Cube 1.7.43: nothing to build, which `trigger` answers as an empty job list.
NO_MATCH = "doesn't match any of the pre-aggregations"
_Answer = TypeVar("_Answer")
_MAX_ERROR_TEXT = 300


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class CubeJobsClient:
    """`POST {base_url}/v1/pre-aggregations/jobs` with the tenant's security context."""

    def __init__(
        self,
        base_url: str,
        secret: Callable[[], str],
        *,
        timeout_ms: int,
        retries: int,
        backoff_ms: int = 200,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        now_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.url = base_url.rstrip("/") + "/v1/pre-aggregations/jobs"
        self._secret = secret
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.backoff_ms = backoff_ms
        self._http = http or httpx.Client()
        self._sleep = sleep
        self._now_ms = now_ms

    def token_for(self, tenant_id: str) -> str:
        now = int(self._now_ms() / 1000)
        claims = {"tenantId": tenant_id, "scopes": ["jobs"], "iat": now, "exp": now + TOKEN_TTL_S}
        return jwt.encode(claims, self._secret(), algorithm="HS256")

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        """One POST per selector; a selector's failure is its own answer and never costs the jobs
        Cube already queued for the others. A date range Cube has no partition in is answered with
        no jobs (see NO_MATCH), not an error: there is nothing stale to rebuild."""
        try:
            token = self.token_for(tenant_id)
        except Exception as exc:  # the secret provider's own errors (Secrets Manager, Powertools)
            error = CubeSecretUnavailable(f"the Cube API secret could not be read ({type(exc).__name__})")
            error.__cause__ = exc
            return [error for _ in selectors]
        answers: list[CubeAnswer] = []
        for selector in selectors:
            try:
                answers.append(
                    self._post(token, {"action": "post", "selector": selector.body}, deadline_ms, parse=_job_tokens)
                )
            except CubeError as exc:
                out_of_range = exc.status == 400 and "dateRange" in selector.body and NO_MATCH in str(exc)
                answers.append([] if out_of_range else exc)
        return answers

    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> dict[str, JobStatus]:
        """`{"action": "get", "resType": "object", "tokens": [...]}` with the tenant's token: Cube
        answers token -> {table, status, selector} (cube-js/cube,
        packages/cubejs-api-gateway/src/gateway.ts); a token it does not know comes back `not_found`."""
        try:
            token = self.token_for(tenant_id)
        except Exception as exc:  # the secret provider's own errors (Secrets Manager, Powertools)
            raise CubeSecretUnavailable(f"the Cube API secret could not be read ({type(exc).__name__})") from exc
        body = {"action": "get", "resType": "object", "tokens": list(tokens)}
        return self._post(token, body, deadline_ms, parse=_job_states)

    def _post(
        self,
        token: str,
        body: dict[str, Any],
        deadline_ms: int,
        parse: Callable[[httpx.Response], _Answer],
    ) -> _Answer:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        payload = json.dumps(body, separators=(",", ":")).encode()
        attempt = 0
        while True:
            remaining = deadline_ms - self._now_ms()
            if remaining <= 0:
                raise CubeTimeout("no time left before the function's deadline")
            timeout = min(self.timeout_ms, remaining) / 1000
            try:
                response = self._http.post(self.url, content=payload, headers=headers, timeout=timeout)
                error = self._error_for(response)
                if error is None:
                    return parse(response)
            except httpx.TimeoutException as exc:
                error = CubeTimeout(f"Cube did not answer within {timeout:.1f}s ({type(exc).__name__})")
            except httpx.TransportError as exc:
                error = CubeUnreachable(f"Cube unreachable ({type(exc).__name__})")
            except httpx.HTTPError as exc:  # e.g. DecodingError: a body that is not what its headers say
                error = CubeServerError(f"Cube's answer could not be read ({type(exc).__name__})")
            except CubeServerError as exc:  # 2xx whose body is not what the action answers
                error = exc
            if not error.retryable or attempt >= self.retries:
                raise error
            # Exponential backoff with full jitter, never sleeping past the deadline; after a 429 not
            # sooner than Cube's Retry-After.
            delay_ms = random.uniform(0, self.backoff_ms * (2**attempt))  # noqa: S311 (jitter, not crypto)
            if isinstance(error, CubeThrottled) and error.retry_after_ms is not None:
                delay_ms = max(delay_ms, error.retry_after_ms)
            if self._now_ms() + delay_ms >= deadline_ms:
                raise error
            self._sleep(delay_ms / 1000)
            attempt += 1

    def _error_for(self, response: httpx.Response) -> CubeError | None:
        status = response.status_code
        if status < 400:
            return None
        text = _cube_error_text(response)
        if status == httpx.codes.TOO_MANY_REQUESTS:  # transient: Cube (or a proxy) sheds load
            retry_after = _retry_after_ms(response.headers.get("retry-after"), self._now_ms())
            return CubeThrottled(f"Cube is throttling ({status}): {text}", status=status, retry_after_ms=retry_after)
        if status == httpx.codes.REQUEST_TIMEOUT:  # transient: the server gave up waiting for the request
            return CubeTimeout(f"Cube timed out the request ({status}): {text}", status=status)
        if status < 500:
            return CubeRejected(f"Cube rejected the request ({status}): {text}", status=status)
        return CubeServerError(f"Cube failed ({status}): {text}", status=status)


def _retry_after_ms(value: str | None, now_ms: int) -> int | None:
    """A Retry-After header (seconds, or an HTTP date) in milliseconds from now; None if absent or
    unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return int(text[:9]) * 1000
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, int(when.timestamp() * 1000) - now_ms)


def _json(response: httpx.Response) -> Any:
    """The body as JSON, or a server error: not JSON, or nested too deeply for the parser."""
    status = response.status_code
    try:
        return response.json()
    except RecursionError:
        raise CubeServerError(f"Cube answered {status} with JSON nested too deeply", status=status) from None
    except ValueError:
        raise CubeServerError(f"Cube answered {status} with a non-JSON body", status=status) from None


def _job_states(response: httpx.Response) -> dict[str, JobStatus]:
    """A `get` answer: an object of token -> job; anything else counts as a server error."""
    status = response.status_code
    body = _json(response)
    if not isinstance(body, dict):
        raise CubeServerError(f"Cube answered a jobs `get` with {type(body).__name__}, not an object", status=status)
    return {
        str(token): JobStatus(
            str(job.get("status", "")), _selector_tenants(job.get("selector")), str(job.get("table") or "")
        )
        for token, job in body.items()
        if isinstance(job, dict)
    }


def _selector_tenants(selector: Any) -> tuple[str, ...]:
    """The tenant ids of a job's `selector.contexts[].securityContext`, in order."""
    contexts = selector.get("contexts") if isinstance(selector, dict) else None
    tenants: list[str] = []
    for context in contexts if isinstance(contexts, list) else []:
        security = context.get("securityContext") if isinstance(context, dict) else None
        tenant = security.get("tenantId") if isinstance(security, dict) else None
        tenants.append(str(tenant) if tenant is not None else "")
    return tuple(tenants)


def _job_tokens(response: httpx.Response) -> list[str]:
    """Cube answers a queued `post` with a JSON array of job tokens; anything else means Cube did
    not (or not visibly) queue the jobs, so it counts as a server error: claims released, records
    reported, retried like a 5xx."""
    status = response.status_code
    body = _json(response)
    if not isinstance(body, list) or not all(isinstance(t, str) for t in body):
        raise CubeServerError(
            f"Cube answered {status} with {type(body).__name__} instead of a JSON array of job tokens", status=status
        )
    return body


def _cube_error_text(response: httpx.Response) -> str:
    try:
        body = _json(response)
    except CubeServerError:
        body = None
    text = body.get("error") if isinstance(body, dict) else None
    return str(text or response.text or response.reason_phrase)[:_MAX_ERROR_TEXT]
