"""Property-based fuzzing of `app.handle` with the in-memory adapters (issue 12.11): arbitrary
events, MSK records, SQS bodies and operation payloads, with Cube up, down or failing at random.

Properties: nothing escapes but MalformedEvent (the documented error for an envelope that is not
an MSK batch, SQS trailing refreshes or an operation); every bad record is reported; a record is
reported only when it is bad or its refresh failed; no claim is left standing that Cube did not
accept. Deterministic (derandomized), a few seconds in all."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler import app
from handler.adapters.memory import RecordingCube
from handler.domain.decode import MalformedEvent, decode_trailing_message, decode_value, trailing_body
from handler.domain.errors import CubeRejected, CubeServerError, CubeTimeout
from handler.domain.model import InvalidRecord, RecordRef, RefreshKey
from handler.domain.ports import TrailingMessage
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
