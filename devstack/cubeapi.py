"""Talking to the local Cube the way a developer checks on the refresh Lambda (tests and `make demo`):
poll pre-aggregation jobs until they finish, read what `/v1/load` serves, list the rollup tables a
tenant has in PostgreSQL, and a wrapper around the Lambda's Cube client that records the job tokens
it got back and keeps rebuilds of one tenant at least a second apart (docs/cube-jobs-api.md, hazard c).

Standard library only (plus the stack): no handler imports, so mypy and the tests stay decoupled.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from devstack.stack import Stack, StackEnv
from handler.domain.errors import CubeError
from handler.domain.model import Selector
from handler.domain.ports import CubeAnswer

# Cube names pre-aggregation tables with a one-second timestamp suffix: two builds of one partition
# within the same second collide ("relation ... already exists", docs/cube-jobs-api.md, hazard c).
MIN_REBUILD_GAP_S = 1.2
# The first build into a new tenant schema can race inside Cube (docs/cube-jobs-api.md, hazard d); it succeeds on retry.
SCHEMA_RACE = "pg_namespace_nspname_index"
_SAFE_SCHEMA = re.compile(r"[a-z0-9_]+")  # fullmatch: `$` would also match before a trailing newline


class CubeApiError(RuntimeError):
    """Cube answered with an error status (or a job failed); `status` is the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def schema_race(self) -> bool:
        return SCHEMA_RACE in str(self)


class JobsFailed(CubeApiError):
    """At least one job ended in `failure: ...` (or `not_found`); `statuses` maps token -> status."""

    def __init__(self, message: str, statuses: Mapping[str, str]) -> None:
        super().__init__(message)
        self.statuses = dict(statuses)


def tenant_schema(tenant_id: str) -> str:
    """`preAggregationsSchema` of cube/cube.js: `pre_aggregations_<tenant, lowercased, [^a-z0-9_] -> _>`."""
    return "pre_aggregations_" + re.sub(r"[^a-z0-9_]", "_", tenant_id.lower())


@dataclass(frozen=True)
class JobsResult:
    """Final statuses of a set of jobs and how long they took to get there."""

    statuses: dict[str, str]
    tables: dict[str, str]
    seconds: float
    seen: tuple[str, ...]  # every distinct status observed while polling, in order


class CubeApi:
    """The local Cube's HTTP API with tokens signed by the stack's secret."""

    def __init__(self, stack: Stack, env: StackEnv, *, timeout_s: float = 30.0) -> None:
        self.stack = stack
        self.base = env.cube_api_url.rstrip("/")
        self.timeout_s = timeout_s

    # ------------------------------------------------------------------ raw calls

    def _request(self, path: str, token: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": token}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if not self.base.startswith(("http://", "https://")):
            raise CubeApiError(f"not an http(s) URL: {self.base}")
        method = "GET" if data is None else "POST"
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")[:500]
            raise CubeApiError(f"{path}: {error.code} {text}", status=error.code) from None

    def jobs(self, tenant_id: str, body: Mapping[str, Any]) -> Any:
        token = self.stack.cube_token({"tenantId": tenant_id, "scopes": ["jobs"]})
        return self._request("/v1/pre-aggregations/jobs", token, body)

    # ------------------------------------------------------------------ jobs

    def post_jobs(self, tenant_id: str, cubes: Sequence[str]) -> list[str]:
        """Queue builds of the tenant's pre-aggregations of `cubes` (what the Lambda does)."""
        selector = {
            "contexts": [{"securityContext": {"tenantId": tenant_id}}],
            "timezones": ["UTC"],
            "cubes": list(cubes),
        }
        tokens = self.jobs(tenant_id, {"action": "post", "selector": selector})
        if not isinstance(tokens, list):
            raise CubeApiError(f"unexpected answer to a jobs POST: {tokens!r}")
        return [str(t) for t in tokens]

    def job_statuses(self, tenant_id: str, tokens: Sequence[str]) -> dict[str, dict[str, Any]]:
        answer = self.jobs(tenant_id, {"action": "get", "resType": "object", "tokens": list(tokens)})
        if not isinstance(answer, dict):
            raise CubeApiError(f"unexpected answer to a jobs GET: {answer!r}")
        return {str(k): v for k, v in answer.items() if isinstance(v, dict)}

    def wait_for_jobs(
        self,
        tenant_id: str,
        tokens: Sequence[str],
        *,
        timeout_s: float = 60.0,
        interval_s: float = 0.15,
        on_change: Callable[[dict[str, str]], None] | None = None,
    ) -> JobsResult:
        """Poll `{"action": "get", "resType": "object"}` until every job is `done`. Raises JobsFailed on
        a `failure: ...` or `not_found` status, CubeApiError on timeout."""
        if not tokens:
            raise CubeApiError("no job tokens to wait for")
        began = time.monotonic()
        seen: list[str] = []
        last: dict[str, str] = {}
        while True:
            answer = self.job_statuses(tenant_id, tokens)
            statuses = {t: str(answer.get(t, {}).get("status", "not_found")) for t in tokens}
            tables = {t: str(answer.get(t, {}).get("table", "")) for t in tokens}
            for status in statuses.values():
                if status not in seen:
                    seen.append(status)
            if statuses != last and on_change is not None:
                on_change(statuses)
            last = statuses
            bad = {t: s for t, s in statuses.items() if s.startswith("failure") or s == "not_found"}
            if bad:
                raise JobsFailed(f"{len(bad)} of {len(tokens)} jobs failed: {sorted(set(bad.values()))}", statuses)
            if all(s == "done" for s in statuses.values()):
                return JobsResult(statuses, tables, time.monotonic() - began, tuple(seen))
            if time.monotonic() - began > timeout_s:
                raise CubeApiError(f"jobs not done after {timeout_s:.0f} s: {sorted(set(statuses.values()))}")
            time.sleep(interval_s)

    def build(
        self, tenant_id: str, cubes: Sequence[str], *, spacer: Spacer | None = None, attempts: int = 5
    ) -> JobsResult:
        """POST jobs and wait until done, retrying only Cube's first-build schema race
        (docs/cube-jobs-api.md, hazard d): a 400 naming pg_namespace_nspname_index, or a job failing with it."""
        spacer = spacer or Spacer()
        for attempt in range(1, attempts + 1):
            spacer.wait(tenant_id)
            try:
                tokens = self.post_jobs(tenant_id, cubes)
                spacer.mark(tenant_id)
                return self.wait_for_jobs(tenant_id, tokens)
            except CubeApiError as error:
                spacer.mark(tenant_id)
                if not error.schema_race or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ queries

    def load(self, tenant_id: str, query: Mapping[str, Any], *, timeout_s: float = 60.0) -> dict[str, Any]:
        """`GET /v1/load`, waiting out Cube's "Continue wait" answers."""
        token = self.stack.cube_token({"tenantId": tenant_id})
        path = "/v1/load?query=" + urllib.parse.quote(json.dumps(query, separators=(",", ":")))
        began = time.monotonic()
        while True:
            answer = self._request(path, token)
            if not (isinstance(answer, dict) and answer.get("error") == "Continue wait"):
                break
            if time.monotonic() - began > timeout_s:
                raise CubeApiError(f"/v1/load still waiting after {timeout_s:.0f} s")
            time.sleep(0.2)
        if not isinstance(answer, dict) or "data" not in answer:
            raise CubeApiError(f"/v1/load: unexpected answer {answer!r}"[:500])
        return answer

    def count(self, tenant_id: str, measure: str = "Users.count") -> Served:
        """One measure as Cube serves it, with the pre-aggregation that answered."""
        answer = self.load(tenant_id, {"measures": [measure]})
        rows = answer["data"]
        value = int(rows[0][measure]) if rows and rows[0].get(measure) is not None else 0
        used = answer.get("usedPreAggregations") or {}
        preaggs = {
            str(info.get("preAggregationId", table)): int(info.get("lastUpdatedAt") or 0)
            for table, info in used.items()
            if isinstance(info, dict)
        }
        return Served(value, preaggs)

    # ------------------------------------------------------------------ PostgreSQL side

    def tables(self, tenant_id: str) -> set[str]:
        """The pre-aggregation tables of a tenant's schema (empty if the schema does not exist yet)."""
        schema = tenant_schema(tenant_id)
        rows = self.stack.psql(f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}'")  # noqa: S608
        return {str(r[0]) for r in rows if r and r[0]}

    def partition_tables(self, tenant_id: str, preagg_table: str) -> dict[str, set[RollupTable]]:
        """The tables of one partitioned pre-aggregation (`users_daily_status_counts`), by partition
        start (`20250301`); a partition has one table per time zone and per build still kept."""
        found: dict[str, set[RollupTable]] = {}
        for name in self.tables(tenant_id):
            table = RollupTable.parse(name)
            if table is not None and table.preagg == preagg_table and table.partition:
                found.setdefault(table.partition, set()).add(table)
        return found

    def rollup_count(self, tenant_id: str, table: str, column: str = "users__count") -> int:
        schema = tenant_schema(tenant_id)
        if not (_SAFE_SCHEMA.fullmatch(table) and _SAFE_SCHEMA.fullmatch(column)):
            raise ValueError(f"unexpected table/column name {table!r}/{column!r}")
        rows = self.stack.psql(f'SELECT coalesce(sum({column}), 0) FROM "{schema}"."{table}"')  # noqa: S608
        return int(rows[0][0] or 0)


# Cube's pre-aggregation table names: `<preagg>[<partition yyyymmdd>]_<content>_<structure>_<built>`,
# `built` being the build time in epoch seconds written in base 32 (as observed on Cube 1.7.43; the
# one-second resolution is why two builds of one partition within a second collide).
_ROLLUP_TABLE = re.compile(
    r"(?P<preagg>[a-z0-9_]+?)(?P<partition>\d{8})?_(?P<content>[a-z0-9]+)_(?P<structure>[a-z0-9]+)_(?P<built>[a-z0-9]+)"
)


@dataclass(frozen=True, order=True)
class RollupTable:
    """One pre-aggregation table in PostgreSQL, its parts read from its name."""

    name: str
    preagg: str
    partition: str  # "" for an unpartitioned pre-aggregation
    content: str
    built_at_s: int

    @classmethod
    def parse(cls, name: str) -> RollupTable | None:
        match = _ROLLUP_TABLE.fullmatch(name)
        if match is None:
            return None
        return cls(name, match["preagg"], match["partition"] or "", match["content"], int(match["built"], 32))


@dataclass(frozen=True)
class Served:
    value: int
    preaggs: dict[str, int]  # pre-aggregation id -> lastUpdatedAt (epoch ms)


class _Trigger(Protocol):
    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]: ...


@dataclass
class Triggered:
    tenant_id: str
    selectors: list[dict[str, object]]
    tokens: list[str]


class Spacer:
    """Remembers when each tenant was last rebuilt and waits until MIN_REBUILD_GAP_S has passed."""

    def __init__(self, gap_s: float = MIN_REBUILD_GAP_S) -> None:
        self.gap_s = gap_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, tenant_id: str) -> None:
        """Note a build of this tenant (a jobs POST, a warm-up, a /v1/load that built a rollup)."""
        with self._lock:
            self._last[tenant_id] = time.monotonic()

    def wait(self, tenant_id: str) -> None:
        with self._lock:
            last = self._last.get(tenant_id)
        if last is not None:
            time.sleep(max(0.0, last + self.gap_s - time.monotonic()))


@dataclass
class RecordingCube:
    """Wraps the Lambda's real Cube client (same `trigger` signature): records each request and the
    job tokens Cube returned, and keeps a tenant's rebuilds MIN_REBUILD_GAP_S apart
    (docs/cube-jobs-api.md, hazard c)."""

    inner: _Trigger
    spacer: Spacer = field(default_factory=Spacer)
    calls: list[Triggered] = field(default_factory=list)
    attempts: int = 0

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        # May run on several threads at once (the service can spread tenants over a pool).
        self.spacer.wait(tenant_id)
        with self._lock:
            self.attempts += 1
        try:
            answers = self.inner.trigger(tenant_id, selectors, deadline_ms=deadline_ms)
        finally:
            self.spacer.mark(tenant_id)
        accepted = [(s, a) for s, a in zip(selectors, answers, strict=True) if not isinstance(a, CubeError)]
        if accepted:  # only what Cube queued: the selectors it accepted and their job tokens
            with self._lock:
                self.calls.append(
                    Triggered(tenant_id, [dict(s.body) for s, _ in accepted], [t for _, a in accepted for t in a])
                )
        return answers

    def tokens_for(self, tenant_id: str, since: int = 0) -> list[str]:
        """Job tokens Cube returned for a tenant, from call number `since` on."""
        return [t for call in self.calls[since:] if call.tenant_id == tenant_id for t in call.tokens]
