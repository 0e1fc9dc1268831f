"""Cube's pre-aggregation jobs API over httpx: JWT per tenant, bounded retries, typed errors."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import jwt

from handler.domain.errors import (
    CubeError,
    CubeRejected,
    CubeSecretUnavailable,
    CubeServerError,
    CubeTimeout,
    CubeUnreachable,
)
from handler.domain.ports import JobStatus

TOKEN_TTL_S = 300
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

    def trigger(self, tenant_id: str, selectors: Sequence[Mapping[str, object]], *, deadline_ms: int) -> list[str]:
        tokens: list[str] = []
        for selector in selectors:
            tokens.extend(self._post(tenant_id, {"action": "post", "selector": dict(selector)}, deadline_ms))
        return tokens

    def job_statuses(self, tenant_id: str, tokens: Sequence[str], *, deadline_ms: int) -> dict[str, JobStatus]:
        """`{"action": "get", "resType": "object", "tokens": [...]}`: token -> {table, status, selector}
        (cube-js/cube, packages/cubejs-api-gateway/src/gateway.ts). Unknown tokens come back
        `not_found`; an answer that is not an object of objects is a server error."""
        answer = self._post(tenant_id, {"action": "get", "resType": "object", "tokens": list(tokens)}, deadline_ms)
        if not isinstance(answer, dict):
            raise CubeServerError("Cube answered a jobs `get` with something other than an object")
        jobs: dict[str, JobStatus] = {}
        for token, job in answer.items():
            if isinstance(job, dict):
                jobs[str(token)] = JobStatus(
                    str(job.get("status", "")), _selector_tenants(job.get("selector")), str(job.get("table") or "")
                )
        return jobs

    def _post(self, tenant_id: str, body: dict[str, Any], deadline_ms: int) -> Any:
        try:
            token = self.token_for(tenant_id)
        except Exception as exc:  # the secret provider's own errors (Secrets Manager, Powertools)
            raise CubeSecretUnavailable(f"the Cube API secret could not be read ({type(exc).__name__})") from exc
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
                    return response.json()
            except httpx.TimeoutException as exc:
                error = CubeTimeout(f"Cube did not answer within {timeout:.1f}s ({type(exc).__name__})")
            except httpx.TransportError as exc:
                error = CubeUnreachable(f"Cube unreachable ({type(exc).__name__})")
            except ValueError as exc:  # 2xx with a body that is not JSON
                error = CubeServerError(
                    f"Cube answered {response.status_code} with a non-JSON body", status=response.status_code
                )
                error.__cause__ = exc
            if not error.retryable or attempt >= self.retries:
                raise error
            # Exponential backoff with full jitter, never sleeping past the deadline.
            delay_ms = random.uniform(0, self.backoff_ms * (2**attempt))  # noqa: S311 (jitter, not crypto)
            if self._now_ms() + delay_ms >= deadline_ms:
                raise error
            self._sleep(delay_ms / 1000)
            attempt += 1

    @staticmethod
    def _error_for(response: httpx.Response) -> CubeError | None:
        status = response.status_code
        if status < 400:
            return None
        text = _cube_error_text(response)
        if status < 500:
            return CubeRejected(f"Cube rejected the request ({status}): {text}", status=status)
        return CubeServerError(f"Cube failed ({status}): {text}", status=status)


def _selector_tenants(selector: Any) -> tuple[str, ...]:
    """The tenant ids of a job's `selector.contexts[].securityContext`, in order."""
    contexts = selector.get("contexts") if isinstance(selector, dict) else None
    tenants: list[str] = []
    for context in contexts if isinstance(contexts, list) else []:
        security = context.get("securityContext") if isinstance(context, dict) else None
        tenant = security.get("tenantId") if isinstance(security, dict) else None
        tenants.append(str(tenant) if tenant is not None else "")
    return tuple(tenants)


def _cube_error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        text = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        text = None
    return str(text or response.text or response.reason_phrase)[:_MAX_ERROR_TEXT]
