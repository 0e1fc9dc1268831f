"""Fixtures for the integration suite: the real local stack (PostgreSQL, Cube, dynalite, moto server),
the Lambda's real service built by `handler.wiring.build_service` against it, and helpers to look at
Cube, PostgreSQL, DynamoDB and SQS from the outside.

The stack is started once per session and stopped at the end only if this session started it. If it
cannot start, every test fails with the reason: these tests are never skipped."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities import parameters

from devstack import SERVICES, Stack, StackEnv, StackError
from devstack.cubeapi import CubeApi, Spacer
from devstack.observe import ObservedService, build_observed_service
from handler.adapters.dynamodb import DynamoDBDebounceStore
from handler.adapters.memory import CountingTelemetry
from handler.app import handle
from handler.domain.model import RefreshKey
from handler.domain.ports import KeyState
from handler.settings import Settings, load_settings
from preagg_cli.local import build_msk_event

# Every tenant and cube of cube/seed.sql and cube/model.
TENANTS = ("tenant-a", "tenant-b", "tenant-1", "tenant-2", "tenant-3", "tenant-h")
CUBES = ("Users", "Tenants", "Groups")
# The function reads its Cube secret from Secrets Manager: the raw value and the DSN stay out of its env.
NOT_FOR_THE_FUNCTION = {"CUBE_API_SECRET", "PG_DSN"}


@dataclass
class StartRecord:
    seconds: float = 0.0
    kind: str = ""  # "cold" (this session started services) or "warm" (all were running)
    started: tuple[str, ...] = ()
    warmup_seconds: float = 0.0


START = StartRecord()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if START.kind:
        started = f" (started: {', '.join(START.started)})" if START.started else ""
        terminalreporter.write_line(
            f"devstack: {START.kind} start {START.seconds:.1f} s{started}; "
            f"tenant warm-up builds {START.warmup_seconds:.1f} s"
        )


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    stack = Stack()
    before = stack.status()
    down = tuple(name for name in SERVICES if not before[name].up)  # the event sources start on demand
    began = time.monotonic()
    try:
        stack.start()
    except StackError as error:
        pytest.fail(f"the local stack could not start (integration tests need it):\n{error}", pytrace=False)
    START.seconds = time.monotonic() - began
    START.kind = "cold" if down else "warm"
    START.started = down
    # Most tests deliver trailing refreshes themselves: a running local SQS event source (a developer's
    # `make stack-start`) would take their messages. It is paused for the session (test_event_sources.py
    # starts its own) and resumed at the end.
    esm_was_up = before["esm"].up
    if esm_was_up:
        stack.stop_service("esm")
    try:
        yield stack
    finally:
        # Leave whatever the developer had running; stop what this session started.
        if len(down) == len(SERVICES):
            stack.stop()
        elif esm_was_up:
            stack.start_service("esm")
        else:
            for name in down:
                stack.stop_service(name)


@pytest.fixture(scope="session")
def stack_env(stack: Stack) -> StackEnv:
    return stack.env()


@pytest.fixture(scope="session")
def cube_api(stack: Stack, stack_env: StackEnv) -> CubeApi:
    return CubeApi(stack, stack_env)


@pytest.fixture(scope="session")
def spacer() -> Spacer:
    """Shared by every build of the session: a tenant's rebuilds stay >1 s apart (docs/cube-jobs-api.md, hazard c)."""
    return Spacer()


@pytest.fixture(scope="session")
def warm_tenants(cube_api: CubeApi, spacer: Spacer) -> None:
    """Build every tenant's pre-aggregations once. The first build into a new tenant schema can race in
    Cube (docs/cube-jobs-api.md, hazard d: 400 duplicate key pg_namespace_nspname_index); `build` retries that error
    only, so the tests afterwards see the steady state. Any other error fails the session."""
    began = time.monotonic()
    for tenant in TENANTS:
        cube_api.build(tenant, CUBES, spacer=spacer)
    START.warmup_seconds = time.monotonic() - began


@pytest.fixture(autouse=True)
def function_environ(stack_env: StackEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The function's environment for one test (restored after it, so unit tests are unaffected)."""
    for name, value in stack_env.as_environ().items():
        if name not in NOT_FOR_THE_FUNCTION:
            monkeypatch.setenv(name, value)
    for name in NOT_FOR_THE_FUNCTION:
        monkeypatch.delenv(name, raising=False)
    # Powertools keeps one Secrets Manager client (and cached values) per process: start clean.
    parameters.clear_caches()
    yield
    parameters.clear_caches()


# --------------------------------------------------------------------------- the function


@dataclass
class Function:
    """The real service over the stack, and `handle` as Lambda would call it."""

    settings: Settings
    service: ObservedService
    telemetry: CountingTelemetry
    store: DynamoDBDebounceStore

    def handle(self, event: dict[str, Any]) -> dict[str, Any]:
        return handle(event, None, service=self.service, settings=self.settings)

    @property
    def posts(self) -> int:
        """Cube job requests the service made (successful or not)."""
        return self.service.recorder.attempts

    def tokens(self, tenant_id: str, since: int = 0) -> list[str]:
        return self.service.recorder.tokens_for(tenant_id, since)

    def state(self, tenant_id: str, target: str) -> KeyState | None:
        return self.store.get(RefreshKey(tenant_id, target))

    def reset(self, tenant_id: str, *targets: str) -> None:
        """Forget a key's debounce history (earlier tests and runs share the dynalite table)."""
        for target in targets or CUBES:
            self.store.delete(RefreshKey(tenant_id, target))


@pytest.fixture
def make_function(function_environ: None, spacer: Spacer, warm_tenants: None) -> Callable[..., Function]:
    """`make_function(CUBE_PREAGG_DEBOUNCE_MS="2000", ...)`: settings from the stack env plus overrides."""

    def make(**overrides: str) -> Function:
        overrides.setdefault("CUBE_PREAGG_DEBOUNCE_MS", "2000")
        # Most tests do not deliver their verify messages: their builds would hold the shared build
        # budget for its lease (5 min) and starve the next test. Admission is tested where the
        # verifications are delivered (test_load_aware.py, the race).
        overrides.setdefault("CUBE_PREAGG_BUILD_BUDGET", "0")
        settings = load_settings(**overrides)
        telemetry = CountingTelemetry()
        service = build_observed_service(settings, telemetry, spacer)
        store = service.debouncer.store
        assert isinstance(store, DynamoDBDebounceStore)
        return Function(settings, service, telemetry, store)

    return make


# --------------------------------------------------------------------------- builds held in PostgreSQL


# A PostgreSQL event trigger makes Cube's CREATE TABLE in one tenant's pre-aggregation schema fail
# (a real database error in the build, not at POST time), or stall `stall_s` seconds a given number of
# times. The superuser Cube connects as is subject to event triggers, unlike to GRANTs.
BLOCK_SQL = """
CREATE TABLE IF NOT EXISTS it_build_sabotage (schema_name text PRIMARY KEY, mode text, times int, stall_s int);
CREATE SEQUENCE IF NOT EXISTS it_build_sabotage_hits;
CREATE OR REPLACE FUNCTION it_build_sabotage() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record; s record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    SELECT * INTO s FROM it_build_sabotage WHERE schema_name = r.schema_name;
    -- A sequence counts the hits: unlike a table update, nextval survives the failed transaction.
    IF FOUND AND nextval('it_build_sabotage_hits') <= s.times THEN
      IF s.mode = 'fail' THEN
        RAISE EXCEPTION 'permission denied for schema % (integration test sabotage)', r.schema_name;
      END IF;
      PERFORM pg_sleep(s.stall_s);
    END IF;
  END LOOP;
END $$;
DROP EVENT TRIGGER IF EXISTS it_build_sabotage;
CREATE EVENT TRIGGER it_build_sabotage ON ddl_command_end EXECUTE FUNCTION it_build_sabotage();
"""


@pytest.fixture
def sabotage(stack: Stack) -> Iterator[Callable[[str, str, int, int], None]]:
    stack.psql(BLOCK_SQL)

    def arm(tenant: str, mode: str, times: int, stall_s: int = 0) -> None:
        schema = "pre_aggregations_" + tenant.replace("-", "_")
        stack.psql(
            "INSERT INTO it_build_sabotage VALUES "
            f"('{schema}', '{mode}', {times}, {stall_s}) ON CONFLICT (schema_name) DO UPDATE "
            "SET mode = EXCLUDED.mode, times = EXCLUDED.times, stall_s = EXCLUDED.stall_s; "
            "ALTER SEQUENCE it_build_sabotage_hits RESTART WITH 1"
        )

    yield arm
    stack.psql("DROP EVENT TRIGGER IF EXISTS it_build_sabotage; DROP TABLE it_build_sabotage")


# --------------------------------------------------------------------------- data and AWS helpers


@dataclass
class Rows:
    stack: Stack
    ids: list[str] = field(default_factory=list)

    def add_user(self, tenant_id: str, status: str = "active") -> str:
        user_id = f"it-{tenant_id}-{uuid.uuid4().hex[:10]}"
        self.stack.psql(
            "INSERT INTO users (id, tenant_id, status, created_at) "
            f"VALUES ('{user_id}', '{tenant_id}', '{status}', now()::timestamp)"
        )
        self.ids.append(user_id)
        return user_id

    def source_count(self, tenant_id: str) -> int:
        return int(self.stack.psql(f"SELECT count(*) FROM users WHERE tenant_id = '{tenant_id}'")[0][0] or 0)


@pytest.fixture
def rows(stack: Stack) -> Iterator[Rows]:
    """Insert users; they are deleted again after the test (the rollups keep whatever they built)."""
    made = Rows(stack)
    yield made
    if made.ids:
        stack.psql("DELETE FROM users WHERE id IN ({})".format(", ".join(f"'{i}'" for i in made.ids)))


def aws(service: str, env: StackEnv) -> Any:
    endpoints = {
        "sqs": env.aws_endpoint_url_sqs,
        "secretsmanager": env.aws_endpoint_url_secrets_manager,
        "dynamodb": env.aws_endpoint_url_dynamodb,
    }
    return boto3.client(
        service,
        endpoint_url=endpoints[service],
        region_name=env.aws_default_region,
        aws_access_key_id=env.aws_access_key_id,
        aws_secret_access_key=env.aws_secret_access_key,
    )


def mutation(tenant_id: str, entity_type: str = "User", entity_id: str | None = None) -> dict[str, Any]:
    return {
        "eventType": "ENTITY_UPDATED",
        "entityType": entity_type,
        "entityId": entity_id or f"e-{uuid.uuid4().hex[:8]}",
        "tenantId": tenant_id,
        "timestamp": int(time.time() * 1000),
    }


def msk(*values: Any, start_offset: int | None = None) -> dict[str, Any]:
    """An MSK event (preagg_cli.local.build_msk_event) with fresh offsets and current timestamps."""
    offset = start_offset if start_offset is not None else int(time.time() * 1000) % 10**9
    return build_msk_event(list(values), start_offset=offset, timestamp_ms=int(time.time() * 1000))


def all_refs(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record of an MSK event as a batchItemFailures entry, in (partition, offset) order."""
    refs = [
        {"itemIdentifier": {"partition": f"{r['topic']}-{r['partition']}", "offset": r["offset"]}}
        for records in event["records"].values()
        for r in records
    ]
    return sorted(refs, key=lambda f: (f["itemIdentifier"]["partition"], f["itemIdentifier"]["offset"]))


class LogCapture(logging.Handler):
    """Records of the service's logger (Powertools sets propagate=False on it, so caplog sees nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        lines = []
        for r in self.records:
            extra = {k: v for k, v in r.__dict__.items() if k in {"error", "status", "error_class", "tenant_id"}}
            lines.append(f"{r.levelname} {r.getMessage()} {extra}")
        return "\n".join(lines)


@pytest.fixture
def service_logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    target = logging.getLogger("handler.domain.service")
    target.addHandler(capture)
    yield capture
    target.removeHandler(capture)


def settle_builds(fn: Function, env: StackEnv, tenant_id: str, target: str = "Users", timeout_s: float = 60) -> None:
    """Deliver the tenant's verify messages, as the event source mapping would, until the key's build
    is settled and its in-flight gate is down: no refresh of a key is posted while its previous build
    is in Cube (docs/load-aware.md)."""
    from devstack.observe import deliver_queue_messages  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while (state := fn.state(tenant_id, target)) is not None and state.inflight_until is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{tenant_id}#{target}: its build was not settled in {timeout_s:.0f} s: {state}")
        deliver_queue_messages(env, fn.handle, tenant_id, kinds=("verify",))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
