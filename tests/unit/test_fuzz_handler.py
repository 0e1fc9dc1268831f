"""Property-based fuzzing of `app.handle` with the in-memory adapters (issue 12.11): arbitrary
events, MSK records, SQS bodies and operation payloads, with Cube up, down or failing at random;
and (issue 19) time hints at the calendar's edges, Cube's own answers through the real HTTP client
(garbage, a gzip header on a body that is not gzip, JSON nested 120,000 deep, 408/429 with odd
Retry-After headers, tokens a verify message cannot carry), and forged verify, retrigger and
trailing messages (unmapped targets, huge deadlines, future times, bad tokens and parts, 100 KB
partitions).

Properties: nothing escapes but MalformedEvent (the documented error for an envelope that is not
an MSK batch, SQS trailing refreshes or an operation); every bad record is reported; a record is
reported only when it is bad or its refresh failed; no claim is left standing that Cube did not
accept (or whose jobs will not be verified); every record with a hint is covered by its partitions
or its whole target; Cube is never asked to build a target the map does not cover; no poll outlives
its build deadline; no value of a message reaches the logs. Deterministic (derandomized)."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from handler import app
from handler.adapters.cube import CubeJobsClient
from handler.adapters.memory import RecordingCube
from handler.domain.decode import (
    MalformedEvent,
    decode_queue_message,
    decode_trailing_message,
    decode_value,
    trailing_body,
)
from handler.domain.errors import CubeRejected, CubeServerError, CubeTimeout
from handler.domain.model import InvalidRecord, RecordRef, RefreshKey
from handler.domain.partitions import DateRange
from handler.domain.ports import TrailingMessage
from handler.domain.routing import EntityCubeMap
from handler.domain.service import RefreshService
from handler.domain.verify import QUEUED_BOUND_MS, BuildTarget, VerifyMessage
from preagg_cli.local import build_msk_event
from tests.builders import T0, Rig

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TENANTS = ("tenant-1", "tenant-2", "t3")
ENTITIES = ("User", "Tenant", "Group")
DAY_MS = 86_400_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
any_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


class AcceptingCube(RecordingCube):
    """RecordingCube that remembers which keys Cube accepted (their claims may stand)."""

    def __init__(self, mode: str, failures: list[Any]) -> None:
        super().__init__(failures=failures)
        self.mode = mode
        self.accepted: set[RefreshKey] = set()

    def trigger(self, tenant_id, selectors, *, deadline_ms):  # type: ignore[no-untyped-def]
        if self.mode == "down":
            return [CubeServerError("down", status=503) for _ in selectors]
        answers = super().trigger(tenant_id, selectors, deadline_ms=deadline_ms)
        for selector, answer in zip(selectors, answers, strict=True):
            if isinstance(answer, list):
                self.accepted.update(selector.keys)
        return answers


cube_modes = st.sampled_from(["up", "down", "flaky"])
cube_failures = st.lists(
    st.sampled_from([CubeRejected("no", status=400), CubeServerError("boom", status=500), CubeTimeout("slow")]),
    max_size=4,
)


def rig_for(mode: str, failures: list[Any]) -> Rig:
    return Rig(cube=AcceptingCube(mode, failures if mode == "flaky" else []))


def assert_no_unaccepted_claim(rig: Rig) -> None:
    assert isinstance(rig.cube, AcceptingCube)
    standing = {key for key, state in rig.store.items.items() if state.claim_token is not None}
    assert standing <= rig.cube.accepted, standing - rig.cube.accepted


# -- MSK records ----------------------------------------------------------------------------------
good_mutations = st.fixed_dictionaries(
    {
        "eventType": st.sampled_from(["ENTITY_UPDATED", "created"]),
        "entityType": st.sampled_from(ENTITIES),
        "entityId": st.text(min_size=1, max_size=10),
        "tenantId": st.sampled_from(TENANTS),
        "timestamp": st.integers(0, T0 + DAY_MS),
    }
)
BAD_FIELDS = {
    "tenantId": ["", "a b", "tenant-1\n", "../x", 5, None, "x" * 65],
    "timestamp": [T0 + DAY_MS + 1, T0 * 1000, 2**64, -1, True, "yesterday", 1.5],
    "entityId": ["", 42, None],
    "entityType": ["", [], None],
}


@st.composite
def bad_mutations(draw: st.DrawFn) -> dict[str, Any]:
    value = dict(draw(good_mutations))
    field = draw(st.sampled_from([*BAD_FIELDS, "drop"]))
    if field == "drop":
        del value[draw(st.sampled_from(sorted(value)))]
    else:
        value[field] = draw(st.sampled_from(BAD_FIELDS[field]))
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


bad_raw_values = st.one_of(
    st.none(),
    st.text(max_size=20).map(lambda t: "%" + t),  # never base64
    st.text(min_size=1, max_size=20).map(lambda t: _b64(("{" + t).encode())),  # base64, not JSON
    st.integers(1, 12_000).map(lambda n: _b64(("[" * n + "]" * n).encode())),  # too deep
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: _b64(json.dumps(v).encode())),
)
# (value for build_msk_event, expected: "good" | "bad" | "unknown")
msk_values = st.one_of(
    good_mutations.map(lambda v: (v, "good")),
    bad_mutations().map(lambda v: (v, "bad")),
    bad_raw_values.map(lambda v: (v, "bad")),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6).map(lambda v: (v, "unknown")),
)


@FUZZ
@given(
    st.lists(msk_values, max_size=25),
    st.sampled_from(["aws:kafka", "SelfManagedKafka", "aws:SelfManagedKafka"]),
    cube_modes,
    cube_failures,
)
def test_fuzz_msk_every_bad_record_is_reported_and_no_refused_claim_stands(values, source, mode, failures):
    rig = rig_for(mode, failures)
    event = {**build_msk_event([v for v, _ in values], partitions=3), "eventSource": source}
    response = app.handle(event, None, service=rig.service)
    reported = {RecordRef(**f["itemIdentifier"]) for f in response["batchItemFailures"]}
    records = [r for group in event["records"].values() for r in group]
    by_ref = {RecordRef(f"{r['topic']}-{r['partition']}", r["offset"]): r for r in records}
    assert reported <= set(by_ref)
    for ref, record in by_ref.items():
        kind = _kind_of(values, record)
        if kind == "bad" or isinstance(decode_value(ref, record["value"], now_ms=T0), InvalidRecord):
            assert ref in reported, (kind, record["value"])
        elif kind == "good" and mode == "up":
            assert ref not in reported
    assert_no_unaccepted_claim(rig)


def _kind_of(values: list[tuple[Any, str]], record: dict[str, Any]) -> str:
    """build_msk_event keeps the input order in `timestamp` (timestamp_ms + index)."""
    return values[record["timestamp"] - T0][1]


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["topic", "partition", "offset", "value", "key"]), any_values, max_size=5).map(
        lambda r: {"eventSource": "aws:kafka", "records": {"t-0": [r]}}
    )
    | st.fixed_dictionaries({"eventSource": st.just("aws:kafka"), "records": any_values})
    | any_values
)
def test_fuzz_arbitrary_events_either_answer_or_raise_the_documented_error(event):
    rig = rig_for("up", [])
    try:
        response = app.handle(event, None, service=rig.service)
    except MalformedEvent as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(response, dict)


# -- SQS trailing refreshes -----------------------------------------------------------------------
trailing_fields = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["trailing", "trailing", "other"]),
        "tenantId": st.sampled_from([*TENANTS, "tenant-1\n", "", "a b", 3]),
        "target": st.sampled_from(["Users", "Groups", "Users\n", "Users;drop", None]),
        "token": st.sampled_from(["tok", "", None]),
        "dueAt": st.sampled_from([T0, T0 + 5_000, 2**64, "soon", True]),
        "attempt": st.sampled_from([0, 3, 99, -1, "x"]),
    }
).map(json.dumps)
sqs_bodies = st.one_of(
    trailing_fields,
    st.text(max_size=30),
    json_values.map(json.dumps),
    st.integers(1, 12_000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(["prepared"]),  # a real trailing refresh recorded in the store
)


@FUZZ
@given(st.lists(sqs_bodies, min_size=1, max_size=10), cube_modes, cube_failures)
def test_fuzz_sqs_every_bad_message_is_reported_and_no_refused_claim_stands(bodies, mode, failures):
    rig = rig_for(mode, failures)
    prepared = _prepare_trailing(rig)
    records = [
        {"eventSource": "aws:sqs", "messageId": f"id-{i}", "body": prepared if body == "prepared" else body}
        for i, body in enumerate(bodies)
    ]
    response = app.handle({"Records": records}, None, service=rig.service)
    reported = {f["itemIdentifier"] for f in response["batchItemFailures"]}
    assert reported <= {r["messageId"] for r in records}
    for record in records:
        try:
            decode_trailing_message(record["body"])
        except ValueError:
            assert record["messageId"] in reported
    assert_no_unaccepted_claim(rig)


def _prepare_trailing(rig: Rig) -> str:
    message = TrailingMessage("tenant-1", "Users", "tok-prepared", T0)
    key = message.key
    rig.store.claim(key, now=T0 - 30_000, window_ms=30_000, claim_token="c", expires_at=0)
    rig.store.schedule_trailing(
        key,
        now=T0 - 29_000,
        oldest_event_ms=T0 - 29_500,
        trailing_token=message.token,
        due_at=T0,
        replaces=None,
        expires_at=0,
    )
    assert isinstance(rig.cube, AcceptingCube)
    rig.cube.accepted.add(key)  # its leading claim "c" stands from an earlier, accepted refresh
    return json.dumps(trailing_body(message))


# -- operations -----------------------------------------------------------------------------------
operations = st.fixed_dictionaries(
    {"operation": st.sampled_from(["refresh", "stats", "clear", "purge", "", 3])},
    optional={
        "tenantId": st.sampled_from([*TENANTS, "tenant-1\n", "", None, 7, "../x"]),
        "cubes": st.one_of(
            st.lists(st.sampled_from(["Users", "Users.daily", "Users\n", "", "a.b.c"]), max_size=3), any_values
        ),
        "entityType": st.sampled_from([*ENTITIES, "Invoice", "", None]),
        "force": st.one_of(st.booleans(), any_values),
        "extra": any_values,
    },
)


@FUZZ
@given(operations, cube_modes, cube_failures)
def test_fuzz_operations_answer_ok_or_a_one_line_error_and_no_refused_claim_stands(payload, mode, failures):
    rig = rig_for(mode, failures)
    response = app.handle(payload, None, service=rig.service)
    assert isinstance(response["ok"], bool)
    if not response["ok"] and "error" in response:
        assert isinstance(response["error"], str) and "\n" not in response["error"]
    assert_no_unaccepted_claim(rig)


# -- time hints (issue 19, item 1) ----------------------------------------------------------------
DAILY = "Users.dailyStatusCounts"
PRECISE = EntityCubeMap(
    {
        "User": [{"target": DAILY, "partitionBy": "timeHints.createdAt", "granularity": "month"}],
        "Group": [{"target": "Groups.weekly", "partitionBy": "timeHints.at", "granularity": "week"}],
        "Tenant": [{"target": "Tenants.daily", "partitionBy": "timestamp", "granularity": "day"}],
    }
)
ZONES = ("UTC", "Pacific/Kiritimati", "Asia/Tokyo", "Asia/Kolkata", "Europe/Paris", "America/New_York", "Etc/GMT+12")
LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
calendar_edges = st.sampled_from(
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T00:00:00-12:00",
        "1970-01-01T00:00:00Z",
        "2024-02-29T23:59:59.999Z",
        "2025-03-30T01:30:00+01:00",  # a DST change in Europe
        "9999-12-31T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999-12:00",
        "9999-12-31T23:59:59.999999+14:00",
        "2025-03-14 09:30:00",  # no zone: UTC
        "2025-03-14T09:30:00.123456789Z",  # nanoseconds: not ISO for Python
        "+275760-09-13T00:00:00Z",
        "\uff12\uff10\uff12\uff15-03-14T09:30:00Z",  # full-width digits
    ]
)
huge_or_odd_numbers = st.one_of(
    st.sampled_from([0, 1, LAST_MS, LAST_MS + 1, 10**15, 1_795_953_600_000_000, 10**20, 2**63 - 1, 2**63, 2**64, -1]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1795953600000", "²³¹", "9" * 30, "-5", " 42 ", "1e9", "0x10"]),
)
hint_values = st.one_of(st.none(), calendar_edges, huge_or_odd_numbers, st.integers(0, LAST_MS))
hints = st.one_of(
    st.fixed_dictionaries({}, optional={"old": hint_values, "new": hint_values}),
    json_values,
)
hinted_mutations = st.fixed_dictionaries(
    {
        "eventType": st.sampled_from(["ENTITY_UPDATED", "ENTITY_CREATED", "ENTITY_DELETED", "moved"]),
        "entityType": st.sampled_from(ENTITIES),
        "entityId": st.text(min_size=1, max_size=5),
        "tenantId": st.sampled_from(TENANTS),
        "timestamp": st.integers(0, T0 + DAY_MS),
        "timeHints": st.fixed_dictionaries({}, optional={"createdAt": hints, "at": hints}),
    }
)


@FUZZ
@given(st.lists(hinted_mutations, min_size=1, max_size=12), st.lists(st.sampled_from(ZONES), min_size=1, max_size=3))
def test_fuzz_time_hints_at_the_calendars_edges_never_crash_and_cover_every_record(values, zones):
    """Whatever a hint holds, the batch is handled: each record refreshes its target's partitions
    or, when a hint cannot be used, the whole target; none is reported with Cube up."""
    rig = Rig(routes=PRECISE, timezones=tuple(dict.fromkeys(zones)))
    response = app.handle(build_msk_event(values, partitions=2), None, service=rig.service)
    assert response == {"batchItemFailures": []}
    keys = set(rig.store.items)
    for value in values:
        [route] = PRECISE.routes_for(value["entityType"])
        assert any(k.tenant_id == value["tenantId"] and k.target == route.target for k in keys), value
    for key in keys:
        if key.partition:
            DateRange.parse(key.partition)  # every partition key is a real range of the calendar


# -- Cube answers (issue 19, items 3, 5, 8) -------------------------------------------------------
def _gzip_lie(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(body))


cube_bodies = st.one_of(
    st.lists(st.sampled_from(["a" * 32, "b" * 32, "c1" * 16]), max_size=3).map(lambda t: json.dumps(t).encode()),
    st.lists(st.sampled_from(["", "a.b", "x" * 129, "tok\n", "ok"]), min_size=1, max_size=3).map(
        lambda t: json.dumps(t).encode()
    ),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 120_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 120_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.binary(max_size=40),
    st.just(b'{"error": "invalid input syntax for type integer: \\"jane.doe@example.com\\""}'),
)
cube_answers = st.one_of(
    st.tuples(st.sampled_from([200, 200, 201, 400, 403, 404, 408, 429, 500, 502, 503]), cube_bodies, st.none()),
    st.tuples(
        st.just(429),
        cube_bodies,
        st.sampled_from(["1", "0", "abc", "-1", "99999999999", "Wed, 21 Oct 2015 07:28:00 GMT"]),
    ),
    st.tuples(st.just(-1), cube_bodies, st.none()),  # a gzip header on a body that is not gzip
)


def _cube_from(answers: list[tuple[int, bytes, str | None]], rig: Rig) -> CubeJobsClient:
    cycle = list(answers)

    def answer(request: httpx.Request) -> httpx.Response:
        status, body, retry_after = cycle[0] if len(cycle) == 1 else cycle.pop(0)
        if status == -1:
            return _gzip_lie(body)
        return httpx.Response(status, content=body, headers={"Retry-After": retry_after} if retry_after else {})

    return CubeJobsClient(
        "http://cube.test/cubejs-api",
        lambda: "local-test-secret-that-is-32-bytes-long",
        timeout_ms=1_000,
        retries=2,
        http=httpx.Client(transport=httpx.MockTransport(answer)),
        sleep=lambda s: None,
        now_ms=rig.clock.now_ms,
    )


class _Recorded(logging.Handler):
    """Every log record (message and extras) of the function while it is attached: its own
    Powertools logger (propagating to the root) and the domain's `handler.*` loggers."""

    LOGGERS = ("", "handler")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(json.dumps(record.__dict__, default=str))

    def __enter__(self) -> _Recorded:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


@FUZZ
@given(st.lists(cube_answers, min_size=1, max_size=4), st.lists(st.sampled_from(ENTITIES), min_size=1, max_size=3))
def test_fuzz_cube_answers_to_post_never_crash_and_no_unverifiable_refresh_stands(answers, entities):
    rig = Rig(verify=True)
    client = _cube_from(answers, rig)
    rig.service.cube = client
    with _Recorded() as logs:
        event = build_msk_event([mutation_of(e) for e in entities], partitions=1)
        response = app.handle(event, None, service=rig.service)
    refreshed = {k for k, s in rig.store.items.items() if s.claim_token is not None}
    verified = {t.key for _, m in rig.build_queue.messages if isinstance(m, VerifyMessage) for t in m.targets}
    nothing = {k for k, s in rig.store.items.items() if s.build_status == "nothing_to_build"}
    assert refreshed <= verified | nothing  # a standing claim is a refresh whose jobs will be verified
    for _, message in rig.build_queue.messages:  # and its verify message will be read back
        decode_queue_message(json.dumps(message.as_body()))
    reported = len(response["batchItemFailures"])
    assert (reported == 0) == (len(refreshed) == len({e for e in entities})), (reported, refreshed)
    assert "jane.doe" not in "".join(logs.text)


def mutation_of(entity: str) -> dict[str, Any]:
    return {
        "eventType": "ENTITY_UPDATED",
        "entityType": entity,
        "entityId": "e1",
        "tenantId": "tenant-1",
        "timestamp": T0,
    }


@FUZZ
@given(st.lists(cube_answers, min_size=1, max_size=4))
def test_fuzz_cube_answers_to_get_never_crash_and_settle_or_poll_again(answers):
    rig = Rig(verify=True)
    rig.verifier.cube = _cube_from(answers, rig)
    key = RefreshKey("tenant-1", "Users")
    rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    tokens = ("a" * 32, "b" * 32)
    verify = VerifyMessage("tenant-1", T0 + 600_000, (BuildTarget(key, tokens, T0, T0),))
    body = json.dumps(verify.as_body())
    response = app.handle(
        {"Records": [{"eventSource": "aws:sqs", "messageId": "m", "body": body}]}, None, service=rig.service
    )
    assert response == {"batchItemFailures": []}
    state = rig.store.get(key)
    polled_again = [m for _, m in rig.build_queue.messages if isinstance(m, VerifyMessage)]
    settled = state is not None and state.build_status is not None
    assert settled != bool(polled_again)  # settled (done, failed, dead-lettered) or polled again, never both
    if rig.build_queue.dead_letters:  # only a refusal (4xx other than 408/429) or a foreign job dead-letters at once
        assert state is not None and state.build_failure_class in {"rejected", "tenant_mismatch"}
        assert state.build_failure_class != "rejected" or any(s in {400, 403, 404} for s, _, _ in answers)


# -- forged queue messages (issue 19, items 7, 8, 9) ----------------------------------------------
MARK = "ZZMARK"
forged_targets = st.sampled_from(["Users", "Groups", DAILY, "Invoices", "Invoices.main", "Users.main"])
forged_partitions = st.sampled_from(
    ["", "2025-03-01..2025-03-31", "9999-12-01..9999-12-31", "0001-01-01..0001-01-31", "2025-03", MARK * 20_000]
)  # the last one: 120 KB
times = st.one_of(
    st.sampled_from([0, T0 - 1_000, T0, T0 + 30_000, T0 + 3_600_000, 10**15, 2**63, -1]), st.integers(0, 2 * T0)
)
good_tokens = st.lists(st.sampled_from(["a" * 32, "b" * 32, "tok_1", "T-2"]), min_size=1, max_size=3)
bad_tokens = st.one_of(
    st.lists(st.sampled_from(["a" * 32, "", "a.b", "x" * 129, "t\n"]), min_size=1, max_size=4).filter(
        lambda t: any(x in {"", "a.b", "x" * 129, "t\n"} for x in t)
    ),
    st.just([MARK] * 2),
    st.just([]),
    json_values.filter(lambda v: not isinstance(v, list)),
)
past_times = st.sampled_from([0, T0 - 600_000, T0 - 1_000, T0, T0 + 30_000])
future_times = st.sampled_from([T0 + 3_600_000, 10**15, 2**63])
VERIFY_FORGERIES = (
    "unmapped",
    "future_start",
    "future_oldest",
    "bad_tokens",
    "huge_partition",
    "bad_part",
    "bad_tenant",
)


@st.composite
def forged_verify(draw: st.DrawFn) -> dict[str, Any]:
    """A genuine verify message (mapped targets, good tokens, past times, any deadline and poll) with
    0 to 2 forgeries: an unmapped target, a future start or oldest mutation, bad tokens, a 120 KB
    partition, a bad part, a bad tenant."""
    forgeries = draw(st.sets(st.sampled_from(VERIFY_FORGERIES), max_size=2))
    targets = []
    for n in range(draw(st.integers(1, 3))):
        first = n == 0  # the forgeries go in the first target
        item: dict[str, Any] = {
            "target": "Invoices"
            if first and "unmapped" in forgeries
            else draw(st.sampled_from(["Users", "Groups", DAILY])),
            "tokens": draw(bad_tokens if first and "bad_tokens" in forgeries else good_tokens),
            "startedAt": draw(future_times if first and "future_start" in forgeries else past_times),
            "oldestAt": draw(future_times if first and "future_oldest" in forgeries else past_times),
        }
        if first and "huge_partition" in forgeries:
            item["partition"] = MARK * 20_000
        elif draw(st.booleans()):
            item["partition"] = "2025-03-01..2025-03-31"
        if first and "bad_part" in forgeries:
            item["part"] = draw(st.sampled_from([[2, 2], [0, 10**9], [-1, 2], "x", [0]]))
        elif draw(st.booleans()):
            item["part"] = draw(st.sampled_from([[0, 2], [1, 2]]))
        targets.append(item)
    return {
        "kind": "verify",
        "tenantId": "bad tenant" if "bad_tenant" in forgeries else draw(st.sampled_from(TENANTS)),
        "deadlineAt": draw(past_times | future_times),
        "poll": draw(st.sampled_from([0, 3, 10**12])),
        "targets": targets,
    }


forged_retrigger = st.fixed_dictionaries(
    {
        "kind": st.just("retrigger"),
        "tenantId": st.sampled_from(TENANTS),
        "attempt": st.sampled_from([1, 5, 10**9, -1]),
        "targets": st.lists(
            st.fixed_dictionaries(
                {"target": forged_targets, "oldestAt": times},
                optional={"partition": forged_partitions, "startedAt": times},
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={"deadLettered": st.booleans(), "failureClass": st.just("failure"), "error": st.just(MARK)},
)
forged_trailing = st.fixed_dictionaries(
    {
        "kind": st.just("trailing"),
        "tenantId": st.sampled_from(TENANTS),
        "target": forged_targets,
        "token": st.sampled_from(["tok", MARK]),
        "dueAt": times,
    },
    optional={"partition": forged_partitions, "attempt": st.sampled_from([0, 99])},
)


def _verify_body(**target: Any) -> dict[str, Any]:
    item = {"target": "Users", "tokens": ["a" * 32], "startedAt": T0 - 1_000, "oldestAt": T0 - 2_000} | target
    return {"kind": "verify", "tenantId": "tenant-1", "deadlineAt": 10**15, "poll": 0, "targets": [item]}


@FUZZ
@given(
    st.lists(st.one_of(forged_verify(), forged_retrigger, forged_trailing), min_size=1, max_size=6),
    cube_modes,
    st.sampled_from(["not_found", "processing", "done", "failure: boom"]),
)
@example([_verify_body()], "up", "processing")  # a huge deadline on a stuck build
@example([_verify_body(startedAt=T0 + 3_600_000)], "up", "failure: boom")  # a start in the future
@example([_verify_body(partition=MARK * 20_000)], "up", "done")
def test_fuzz_forged_queue_messages_never_reach_cube_for_what_the_map_does_not_cover(bodies, mode, status):
    rig = rig_for(mode, [])
    rig.jobs.default = status
    service = RefreshService(
        EntityCubeMap(), rig.debouncer, rig.cube, rig.telemetry, rig.clock, rig.timezones, verifier=rig.verifier
    )
    with _Recorded() as logs:
        records = [
            {"eventSource": "aws:sqs", "messageId": f"m{i}", "body": json.dumps(b)} for i, b in enumerate(bodies)
        ]
        response = app.handle({"Records": records}, None, service=service)
    reported = {f["itemIdentifier"] for f in response["batchItemFailures"]}
    for record, body in zip(records, bodies, strict=True):
        names = [body["target"]] if body["kind"] == "trailing" else [t["target"] for t in body["targets"]]
        if any(n.split(".")[0] not in {"Users", "Tenants", "Groups"} for n in names):
            assert record["messageId"] in reported
    sent = [
        n
        for _, selectors in rig.cube.requests
        for s in selectors
        for n in (*s.get("cubes", []), *s.get("preAggregations", []))
    ]
    assert all(n.split(".")[0] in {"Users", "Tenants", "Groups"} for n in sent), sent
    for _, message in rig.build_queue.messages:  # no poll outlives its build deadline
        if isinstance(message, VerifyMessage):
            # a build may wait in Cube's queue (at most QUEUED_BOUND_MS), then build (the build timeout)
            hard_end = min(t.started_at for t in message.targets) + QUEUED_BOUND_MS + rig.build_timeout_ms
            assert message.deadline_at <= hard_end
            assert all(t.started_at <= T0 + 60_000 for t in message.targets)
        else:
            assert all(t.target.split(".")[0] in {"Users", "Tenants", "Groups"} for t in message.targets)
    for state in rig.store.items.values():  # no time of a forged message lies ahead of the clock
        assert all(t is None or t <= T0 + 60_000 for t in (state.pending_since, state.build_started_at))
    text = "".join(logs.text)
    assert MARK not in text and len(text) < 100_000
    assert_no_unaccepted_claim(rig)
