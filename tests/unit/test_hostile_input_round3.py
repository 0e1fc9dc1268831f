"""Hostile input and failure handling, round 3 (issue 19, items 1 to 12b): time hints outside the
calendar, verify messages of any size, unreadable Cube answers, the deadline with verification on,
429/408, values in logs, forged queue messages, odd Kafka fixtures and configurations, and
duplicate deliveries. Each test names its item; each fails with its fix reverted."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from handler import app
from handler.adapters.aws import SqsBuildQueue
from handler.adapters.cube import CubeJobsClient
from handler.adapters.memory import RecordingBuildQueue
from handler.domain.decode import decode_queue_message, trailing_body
from handler.domain.errors import CubeThrottled, CubeTimeout
from handler.domain.model import RecordRef, RefreshKey, Selector
from handler.domain.ports import BuildMessage, CubeAnswer, TrailingMessage
from handler.domain.routing import EntityCubeMap, build_selectors
from handler.domain.service import RefreshService
from handler.domain.verify import (
    MAX_RETRIGGERS,
    MAX_TARGETS_PER_MESSAGE,
    BuildTarget,
    RetriggerMessage,
    RetriggerTarget,
    VerifyMessage,
    redact,
    verify_messages,
)
from handler.settings import ConfigurationError, load_settings
from tests.builders import T0, Rig, msk_event, mutation
from tests.unit.test_settings import REQUIRED

SQS_LIMIT = 262_144  # bytes: SQS's maximum message size
DAILY = "Users.dailyStatusCounts"
PRECISE = EntityCubeMap(
    {"User": [{"target": DAILY, "partitionBy": "timeHints.createdAt", "granularity": "month"}], "Group": ["Groups"]}
)


def sqs_event(*bodies: str) -> dict[str, Any]:
    return {"Records": [{"eventSource": "aws:sqs", "messageId": f"m-{i}", "body": b} for i, b in enumerate(bodies)]}


def reported(response: dict[str, Any]) -> list[Any]:
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


def md5ish() -> str:
    return uuid.uuid4().hex  # Cube's job tokens are 32-character md5 hex


# -- 1. time hints outside the calendar -----------------------------------------------------------
@pytest.mark.parametrize(
    ("hint", "zone"),
    [
        (1_795_953_600_000_000, "UTC"),  # epoch microseconds read as milliseconds: year ~58,900
        (10**20, "UTC"),
        ("9999-12-31T23:59:59Z", "Asia/Tokyo"),  # past 9999-12-31 once shifted east of UTC
        ("9999-12-15T00:00:00Z", "UTC"),  # its month's partition would end in year 10000
        (253_402_300_799_999, "Pacific/Kiritimati"),  # the last millisecond of 9999, UTC+14
    ],
    ids=["microseconds", "1e20", "9999-east", "9999-12-month", "last-ms-east"],
)
def test_item1_hint_outside_the_calendar_refreshes_the_whole_target_and_the_batch_goes_on(hint, zone):
    rig = Rig(routes=PRECISE, timezones=("UTC", zone))
    bad = mutation(entity_id="u1", timeHints={"createdAt": {"old": hint, "new": hint}})
    good = mutation("tenant-2", "Group", "g1")
    response = app.handle(msk_event(bad, good, partitions=1), None, service=rig.service)
    assert response == {"batchItemFailures": []}
    assert RefreshKey("tenant-1", DAILY) in rig.store.items  # the whole target, as for a malformed hint
    assert RefreshKey("tenant-2", "Groups") in rig.store.items
    assert rig.telemetry.counts["WholeTargetFallbacks"] == 1


def test_item1_trailing_partitions_ending_on_the_last_day_of_the_calendar_are_refreshed():
    rig = Rig(routes=PRECISE)
    bodies = []
    for n, label in enumerate(["9999-12-01..9999-12-31", "9999-12-31..9999-12-31"]):  # a month and its last day
        key = RefreshKey("tenant-1", DAILY, label)
        rig.store.claim(key, now=T0 - 60_000, window_ms=30_000, claim_token="c", expires_at=0)
        rig.store.schedule_trailing(
            key,
            now=T0 - 59_000,
            oldest_event_ms=T0 - 59_000,
            trailing_token=f"t{n}",
            due_at=T0,
            replaces=None,
            expires_at=0,
        )
        bodies.append(json.dumps(trailing_body(TrailingMessage("tenant-1", DAILY, f"t{n}", T0, partition=label))))
    assert app.handle(sqs_event(*bodies), None, service=rig.service) == {"batchItemFailures": []}
    [(_, [selector])] = rig.cube.requests  # the overlapping ranges merged into one
    assert selector["dateRange"] == ["9999-12-01T00:00:00.000", "9999-12-31T23:59:59.999"]


# -- 2. verify messages fit SQS whatever Cube answers ---------------------------------------------
class SizedSqs:
    """An SQS client that refuses a body over 256 KiB, as SQS does (moto does not check)."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    def send_message(self, *, QueueUrl: str, MessageBody: str, DelaySeconds: int = 0) -> dict[str, Any]:
        if len(MessageBody.encode()) > SQS_LIMIT:
            error = {"Error": {"Code": "InvalidParameterValue", "Message": "Message must be shorter than 262144 bytes"}}
            raise ClientError(error, "SendMessage")  # type: ignore[arg-type]
        self.bodies.append(MessageBody)
        return {}


@dataclass
class TokenCube:
    """Cube answering `per_selector` job tokens to each selector (one per partition x zone)."""

    per_selector: int
    tokens: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, list[dict[str, object]]]] = field(default_factory=list)

    def trigger(self, tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        self.requests.append((tenant_id, [dict(s.body) for s in selectors]))
        answers: list[CubeAnswer] = []
        for selector in selectors:
            tokens = [md5ish() for _ in range(self.per_selector)]
            for key in selector.keys:
                self.tokens[key.pk] = tokens
            answers.append(tokens)
        return answers


def verify_bodies(sqs: SizedSqs) -> list[VerifyMessage]:
    messages = [decode_queue_message(b) for b in sqs.bodies]
    assert all(isinstance(m, VerifyMessage) for m in messages)
    return messages  # type: ignore[return-value]


def test_item2_three_keys_sharing_2600_tokens_are_verified_in_messages_under_the_sqs_limit():
    sqs = SizedSqs()
    cube = TokenCube(2_600)
    rig = Rig(cube=cube, verify=True, build_queue=SqsBuildQueue(sqs, "q", "dlq"))  # type: ignore[arg-type]
    event = msk_event(mutation(entity_type="User"), mutation(entity_type="Tenant"), mutation(entity_type="Group"))
    assert app.handle(event, None, service=rig.service) == {"batchItemFailures": []}
    assert len(sqs.bodies) >= 2 and all(len(b.encode()) <= SQS_LIMIT for b in sqs.bodies)
    carried: dict[str, list[str]] = {}
    for message in verify_bodies(sqs):
        for target in message.targets:
            carried.setdefault(target.key.pk, []).extend(target.tokens)
    assert carried == cube.tokens  # every key with all its tokens, each once


def deliver_verify(rig: Rig, bodies: Sequence[str]) -> set[RecordRef]:
    messages = [decode_queue_message(b) for b in bodies]
    items = [(RecordRef("sqs", i), m) for i, m in enumerate(messages) if isinstance(m, VerifyMessage)]
    return rig.service.process_verify(items, deadline_ms=rig.deadline).failed


def test_item2_a_key_with_20000_tokens_is_split_into_parts_and_done_only_when_every_part_is():
    sqs = SizedSqs()
    cube = TokenCube(20_000)
    rig = Rig(cube=cube, verify=True, build_queue=SqsBuildQueue(sqs, "q", "dlq"))  # type: ignore[arg-type]
    assert app.handle(msk_event(mutation()), None, service=rig.service) == {"batchItemFailures": []}
    messages = verify_bodies(sqs)
    assert len(messages) >= 3 and all(len(b.encode()) <= SQS_LIMIT for b in sqs.bodies)
    parts = sorted((t.part, t.parts) for m in messages for t in m.targets)
    assert parts == [(i, len(messages)) for i in range(len(messages))]
    key = RefreshKey("tenant-1", "Users")
    last = cube.tokens[key.pk][-1]
    rig.jobs.statuses[last] = "processing"  # one job of the last part is still building
    rig.clock.advance(2_000)
    sqs.bodies.clear()
    assert deliver_verify(rig, [json.dumps(m.as_body()) for m in messages]) == set()
    assert rig.store.get(key).build_status is None, "not done while one part's job is building"
    [again] = verify_bodies(sqs)  # only the pending part is polled again
    assert [t.part for t in again.targets] == [len(messages) - 1]
    rig.jobs.statuses[last] = "done"
    rig.clock.advance(4_000)
    deliver_verify(rig, sqs.bodies)
    assert rig.store.get(key).build_status == "done"
    assert rig.telemetry.counts["BuildsSucceeded"] == 1


def test_item2_a_failed_part_fails_the_key_once_and_re_triggers_it_once():
    rig = Rig(verify=True)
    key = RefreshKey("tenant-1", "Users")
    rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    tokens = tuple(md5ish() for _ in range(20_000))
    messages = verify_messages("tenant-1", T0 + 600_000, [BuildTarget(key, tokens, T0, T0 - 9)])
    assert len(messages) >= 3
    rig.jobs.statuses[tokens[0]] = "failure: permission denied"
    rig.jobs.statuses[tokens[-1]] = "failure: permission denied"
    rig.clock.advance(2_000)
    items = [(RecordRef("sqs", i), m) for i, m in enumerate(messages)]
    assert rig.service.process_verify(items, deadline_ms=rig.deadline).failed == set()
    retriggers = [m for _, m in rig.build_queue.messages if isinstance(m, RetriggerMessage)]
    assert len(retriggers) == 1 and rig.store.get(key).build_failures == 1


def test_item2_verify_messages_hold_at_most_100_keys():
    keys = [RefreshKey("tenant-1", "Users", f"2025-{m:02d}-01..2025-{m:02d}-28") for m in range(1, 13)] * 20
    targets = [BuildTarget(k, (md5ish(),), T0 + i, T0) for i, k in enumerate(keys)]
    messages = verify_messages("tenant-1", T0 + 1, targets)
    assert [len(m.targets) for m in messages] == [MAX_TARGETS_PER_MESSAGE, MAX_TARGETS_PER_MESSAGE, 40]


def test_item2_retriggers_of_a_message_with_many_failed_keys_are_sent_100_keys_at_a_time():
    rig = Rig(verify=True)
    keys = [
        RefreshKey("tenant-1", DAILY, f"{2000 + i // 12}-{i % 12 + 1:02d}-01..{2000 + i // 12}-{i % 12 + 1:02d}-28")
        for i in range(250)
    ]
    for key in keys:
        rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    rig.jobs.default = "failure: boom"
    message = VerifyMessage("tenant-1", T0 + 600_000, tuple(BuildTarget(k, (md5ish(),), T0, T0) for k in keys))
    rig.service.process_verify([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline)
    retriggers = [m for _, m in rig.build_queue.messages if isinstance(m, RetriggerMessage)]
    assert [len(m.targets) for m in retriggers] == [100, 100, 50]
    assert sorted(k for m in retriggers for k, _ in m.refresh_keys()) == sorted(keys)


# -- 3. Cube answers that cannot be read ----------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000


def not_gzip() -> httpx.Response:
    # A body that says it is gzip and is not: httpx raises DecodingError while reading it.
    return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b'["not gzip"]'))


def deep(status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=DEEP)


def http_service(rig: Rig, answer: Any) -> RefreshService:
    client = CubeJobsClient(
        "http://cube.test/cubejs-api",
        lambda: "local-test-secret-that-is-32-bytes-long",
        timeout_ms=1_000,
        retries=1,
        http=httpx.Client(transport=httpx.MockTransport(lambda request: answer())),
        sleep=lambda s: None,
        now_ms=rig.clock.now_ms,
    )
    rig.service.cube = client
    rig.verifier.cube = client
    return rig.service


@pytest.mark.parametrize("answer", [not_gzip, deep, lambda: deep(500)], ids=["gzip", "deep", "deep-500"])
def test_item3_an_unreadable_cube_answer_to_post_releases_every_claim_and_reports_the_records(answer):
    rig = Rig()
    service = http_service(rig, answer)
    event = msk_event(mutation(entity_type="User"), mutation(entity_type="Group"), partitions=1)
    response = app.handle(event, None, service=service)
    assert [f["offset"] for f in reported(response)] == [100, 101]
    assert all(state.started_at is None and state.claim_token is None for state in rig.store.items.values())
    assert rig.telemetry.counts["CubeErrorsByClass[ErrorClass=server]"] == 1


@pytest.mark.parametrize("answer", [not_gzip, deep], ids=["gzip", "deep"])
def test_item3_an_unreadable_cube_answer_to_get_polls_again_and_fails_no_message(answer):
    rig = Rig(verify=True)
    key = RefreshKey("tenant-1", "Users")
    rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    verify = VerifyMessage("tenant-1", T0 + 600_000, (BuildTarget(key, ("tok",), T0, T0),))
    service = http_service(rig, answer)
    response = app.handle(sqs_event(json.dumps(verify.as_body()), "not json"), None, service=service)
    assert reported(response) == ["m-1"]  # only the bad message
    [(_, again)] = rig.build_queue.messages
    assert isinstance(again, VerifyMessage) and again.poll == 1


# -- 4. the deadline with verification on ---------------------------------------------------------
class SlowQueue(RecordingBuildQueue):
    """Each send takes a second of the fake clock (a slow SQS)."""

    def __init__(self, rig_clock: Any) -> None:
        super().__init__()
        self.clock = rig_clock

    def send(self, message: BuildMessage, *, due_at: int, now: int) -> None:
        self.clock.advance(1_000)
        super().send(message, due_at=due_at, now=now)


def test_item4_verification_is_scheduled_inside_the_cube_phase_so_the_batch_ends_before_its_deadline():
    rig = Rig(verify=True)
    rig.verifier.queue = SlowQueue(rig.clock)
    event = msk_event(*(mutation(f"t{i}") for i in range(100)), partitions=1)
    deadline = rig.clock.now + 60_000
    outcome = rig.service.process_mutations(
        [(RecordRef("p", i), m) for i, (_, m) in enumerate(_decoded(event, rig))], deadline_ms=deadline
    )
    assert rig.clock.now <= deadline
    refreshed = outcome.by_status("refreshed")
    assert 0 < len(refreshed) < 100 and len(outcome.failed) == 100 - len(refreshed)
    assert not any(s.claim_token for k, s in rig.store.items.items() if k not in {o.key for o in refreshed})


def _decoded(event: dict[str, Any], rig: Rig) -> list[Any]:
    from handler.domain.decode import decode_msk_event  # noqa: PLC0415

    return decode_msk_event(event, now_ms=rig.clock.now).mutations


def test_item4_the_verifier_settles_the_keys_of_a_message_side_by_side():
    calls: list[int] = []

    def recording_map(fn: Any, items: Sequence[Any]) -> list[Any]:
        calls.append(len(items))
        return [fn(i) for i in items]

    rig = Rig(verify=True, map_io=recording_map)
    keys = [
        RefreshKey("tenant-1", "Users", f"{2000 + i // 12}-{i % 12 + 1:02d}-01..{2000 + i // 12}-{i % 12 + 1:02d}-28")
        for i in range(1_000)
    ]
    for key in keys:
        rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    message = VerifyMessage(
        "tenant-1", T0 + 600_000, tuple(BuildTarget(k, (f"tok{i}",), T0, T0) for i, k in enumerate(keys))
    )
    rig.clock.advance(2_000)
    assert rig.service.process_verify([(RecordRef("sqs", 0), message)], deadline_ms=rig.deadline).failed == set()
    assert 1_000 in calls  # the 1,000 done records went through the mapper at once
    assert all(rig.store.get(k).build_status == "done" for k in keys)


def test_item4_verify_messages_not_started_before_the_cutoff_are_sent_again_not_failed():
    rig = Rig(verify=True)
    keys = [RefreshKey(f"t{i}", "Users") for i in range(5)]
    for key in keys:
        rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    real = rig.store.record_build

    def slow_record(key: RefreshKey, record: Any) -> bool:
        rig.clock.advance(30_000)  # each record takes half a minute
        return real(key, record)

    rig.store.record_build = slow_record  # type: ignore[method-assign]
    items = [
        (RecordRef("sqs", i), VerifyMessage(k.tenant_id, T0 + 600_000, (BuildTarget(k, ("tok",), T0, T0),)))
        for i, k in enumerate(keys)
    ]
    assert rig.service.process_verify(items, deadline_ms=rig.clock.now + 60_000).failed == set()
    settled = [k for k in keys if rig.store.get(k).build_status == "done"]
    again = [m for _, m in rig.build_queue.messages if isinstance(m, VerifyMessage)]
    assert len(settled) + len(again) == 5 and again and settled


# -- 5. 429 and 408 are transient -----------------------------------------------------------------
def cube_client(rig: Rig, *answers: httpx.Response, sleeps: list[float] | None = None) -> CubeJobsClient:
    queue = list(answers)
    return CubeJobsClient(
        "http://cube.test/cubejs-api",
        lambda: "local-test-secret-that-is-32-bytes-long",
        timeout_ms=1_000,
        retries=3,
        http=httpx.Client(transport=httpx.MockTransport(lambda request: queue.pop(0))),
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
        now_ms=rig.clock.now_ms,
    )


@pytest.mark.parametrize(("status", "error"), [(429, CubeThrottled), (408, CubeTimeout)])
def test_item5_429_and_408_on_get_poll_again_instead_of_dead_lettering(status, error):
    rig = Rig(verify=True)
    key = RefreshKey("tenant-1", "Users")
    rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    rig.verifier.cube = cube_client(rig, *[httpx.Response(status, json={"error": "slow down"})] * 4)
    verify = VerifyMessage("tenant-1", T0 + 600_000, (BuildTarget(key, ("tok",), T0, T0),))
    assert rig.service.process_verify([(RecordRef("sqs", 0), verify)], deadline_ms=rig.deadline).failed == set()
    assert rig.build_queue.dead_letters == []
    [(_, again)] = rig.build_queue.messages
    assert isinstance(again, VerifyMessage) and again.poll == 1
    assert rig.store.get(key).build_status is None
    assert rig.telemetry.counts[f"CubeErrorsByClass[ErrorClass={error.error_class}]"] == 1


def test_item5_429_on_post_is_retried_not_before_retry_after():
    rig = Rig()
    sleeps: list[float] = []
    client = cube_client(
        rig,
        httpx.Response(429, json={"error": "Too many requests"}, headers={"Retry-After": "3"}),
        httpx.Response(200, json=["tok"]),
        sleeps=sleeps,
    )
    [answer] = client.trigger("tenant-1", [Selector({"cubes": ["Users"]}, ())], deadline_ms=rig.clock.now + 60_000)
    assert answer == ["tok"] and sleeps == [3.0]


def test_item5_429_whose_retry_after_is_past_the_deadline_is_not_waited_for():
    rig = Rig()
    sleeps: list[float] = []
    client = cube_client(rig, httpx.Response(429, headers={"Retry-After": "120"}), sleeps=sleeps)
    [answer] = client.trigger("tenant-1", [Selector({"cubes": ["Users"]}, ())], deadline_ms=rig.clock.now + 60_000)
    assert isinstance(answer, CubeThrottled) and answer.retryable and sleeps == []


# -- 6. values in double quotes -------------------------------------------------------------------
def test_item6_redact_masks_values_in_double_quotes():
    text = 'failure: invalid input syntax for type integer: "jane.doe@example.com"'
    assert redact(text) == 'failure: invalid input syntax for type integer: "?"'


def test_item6_a_double_quoted_value_reaches_neither_the_logs_nor_the_table_nor_the_dead_letter(caplog):
    rig = Rig(verify=True)
    key = RefreshKey("tenant-1", "Users")
    rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    rig.jobs.statuses["tok"] = 'failure: invalid input syntax for type integer: "jane.doe@example.com"'
    verify = VerifyMessage("tenant-1", T0 + 600_000, (BuildTarget(key, ("tok",), T0, T0),))
    with caplog.at_level(logging.INFO, logger="handler"):
        app.handle(sqs_event(json.dumps(verify.as_body())), None, service=rig.service)
    logs = "".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert "build failed" in logs
    assert "jane.doe" not in logs and "jane.doe" not in (rig.store.get(key).build_error or "")
    assert all("jane.doe" not in json.dumps(m.as_body()) for _, m in rig.build_queue.messages)


# -- 7. forged or corrupt queue messages ----------------------------------------------------------
FORGED_TARGET = [
    RetriggerMessage("tenant-1", (RetriggerTarget("Invoices", T0),), 1).as_body(),
    VerifyMessage("tenant-1", T0 + 9, (BuildTarget(RefreshKey("tenant-1", "Invoices"), ("tok",), T0, T0),)).as_body(),
    trailing_body(TrailingMessage("tenant-1", "Invoices.main", "tok", T0)),
]


@pytest.mark.parametrize("body", FORGED_TARGET, ids=["retrigger", "verify", "trailing"])
def test_item7a_a_queue_message_naming_an_unmapped_target_is_reported_and_never_reaches_cube(body):
    rig = Rig(verify=True)
    rig.jobs.default = "not_found"  # a forged verify's unknown tokens would fail and re-trigger
    response = app.handle(sqs_event(json.dumps(body)), None, service=rig.service)
    assert reported(response) == ["m-0"]
    assert rig.cube.requests == [] and rig.jobs.requests == []
    assert rig.build_queue.messages == [] and rig.build_queue.dead_letters == []


def test_item7a_an_operation_refreshing_an_unmapped_cube_is_refused():
    rig = Rig(verify=True)
    result = app.handle(
        {"operation": "refresh", "tenantId": "tenant-1", "cubes": ["Invoices"]}, None, service=rig.service
    )
    assert result["ok"] is False and "Invoices" in result["error"] and "ENTITY_CUBE_MAP" in result["error"]
    assert rig.cube.requests == []


def test_item7b_a_forged_deadline_cannot_keep_a_stuck_build_polled_for_ever():
    rig = Rig(verify=True, build_timeout_ms=600_000)
    key = RefreshKey("tenant-1", "Users")
    rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    rig.jobs.default = "processing"
    message: BuildMessage = VerifyMessage("tenant-1", 10**15, (BuildTarget(key, ("tok",), T0, T0),))
    for _ in range(100):
        assert isinstance(message, VerifyMessage)
        body = json.dumps(message.as_body())
        app.handle(sqs_event(body), None, service=rig.service)
        [(due, message)] = rig.build_queue.messages
        rig.build_queue.messages.clear()
        rig.clock.now = due
        if isinstance(message, RetriggerMessage):
            break
    assert isinstance(message, RetriggerMessage), "still polling after 100 polls"
    assert rig.clock.now <= T0 + 600_000 + 60_000
    assert rig.store.get(key).build_failure_class == "timeout"


@pytest.mark.parametrize(
    "body",
    [
        VerifyMessage(
            "tenant-1", T0 + 9, (BuildTarget(RefreshKey("tenant-1", "Users"), ("tok",), T0 + 3_600_000, T0),)
        ).as_body(),
        RetriggerMessage("tenant-1", (RetriggerTarget("Users", T0 + 3_600_000),), 1).as_body(),
        RetriggerMessage("tenant-1", (RetriggerTarget("Users", T0, started_at=T0 + 3_600_000),), 1).as_body(),
    ],
    ids=["verify-startedAt", "retrigger-oldestAt", "retrigger-startedAt"],
)
def test_item7c_a_message_naming_a_future_time_is_refused(body):
    rig = Rig(verify=True)
    response = app.handle(sqs_event(json.dumps(body)), None, service=rig.service)
    assert reported(response) == ["m-0"]
    assert rig.store.items == {} and rig.cube.requests == [] and rig.jobs.requests == []


def test_item7c_a_refused_future_verify_leaves_later_genuine_failures_counted():
    rig = Rig(verify=True)
    key = RefreshKey("tenant-1", "Users")
    rig.store.claim(key, now=T0, window_ms=1, claim_token="c", expires_at=0)
    forged = VerifyMessage("tenant-1", T0 + 9, (BuildTarget(key, ("tok",), T0 + 3_600_000, T0),))
    app.handle(sqs_event(json.dumps(forged.as_body())), None, service=rig.service)
    rig.jobs.default = "failure: boom"
    genuine = VerifyMessage("tenant-1", T0 + 600_000, (BuildTarget(key, ("tok",), T0, T0),))
    app.handle(sqs_event(json.dumps(genuine.as_body())), None, service=rig.service)
    assert rig.store.get(key).build_failures == 1
    assert [m.attempt for _, m in rig.build_queue.messages if isinstance(m, RetriggerMessage)] == [1]


# -- 8. tokens a verify message could not carry ---------------------------------------------------
@pytest.mark.parametrize("token", ["", "a.b", "x" * 129, "tok\n"], ids=["empty", "dot", "129", "newline"])
def test_item8_tokens_the_verify_parser_would_refuse_fail_the_selector_not_every_delivery(token):
    rig = Rig(verify=True, cube=TokenCube(0))

    def answer(tenant_id: str, selectors: Sequence[Selector], *, deadline_ms: int) -> list[CubeAnswer]:
        return [["good", token] for _ in selectors]

    rig.service.cube.trigger = answer  # type: ignore[method-assign]
    response = app.handle(msk_event(mutation()), None, service=rig.service)
    assert [f["offset"] for f in reported(response)] == [100]
    assert rig.build_queue.messages == []  # no verify message anyone would refuse
    assert rig.store.get(RefreshKey("tenant-1", "Users")).claim_token is None  # released
    assert rig.telemetry.counts["CubeErrorsByClass[ErrorClass=server]"] == 1


# -- 9. no values in logs -------------------------------------------------------------------------
def test_item9_a_100kb_partition_in_a_trailing_message_is_not_logged(caplog):
    rig = Rig()
    body = json.dumps(trailing_body(TrailingMessage("tenant-1", "Users", "tok", T0)) | {"partition": "P" * 100_000})
    with caplog.at_level(logging.WARNING):
        response = app.handle(sqs_event(body), None, service=rig.service)
    assert reported(response) == ["m-0"]
    logs = "".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert "invalid partition" in logs and "PPPP" not in logs and len(logs) < 2_000


@pytest.mark.parametrize("stamp", ["²³¹", "9" * 5_000, "2026-13-45T99:99:99Z"])
def test_item9_a_kafka_timestamp_is_described_never_echoed(caplog, stamp):
    rig = Rig()
    with caplog.at_level(logging.WARNING):
        response = app.handle(msk_event(mutation(timestamp=stamp)), None, service=rig.service)
    assert len(reported(response)) == 1
    [record] = [r for r in caplog.records if r.getMessage() == "invalid record"]
    detail = record.__dict__["detail"]
    assert stamp not in detail and "²" not in detail and "timestamp" in detail and len(detail) < 300


# -- 10. a Kafka partition given as a string ------------------------------------------------------
def test_item10_a_record_with_a_digit_string_partition_is_processed():
    rig = Rig()
    event = msk_event(mutation())
    for records in event["records"].values():
        for record in records:
            record["partition"] = str(record["partition"])
    assert app.handle(event, None, service=rig.service) == {"batchItemFailures": []}
    assert len(rig.cube.requests) == 1


def test_item10_a_record_whose_partition_is_not_a_number_is_reported_alone():
    rig = Rig()
    event = msk_event(mutation("tenant-1"), mutation("tenant-2"), partitions=1)
    [(group, records)] = event["records"].items()
    records[0]["partition"] = "zero"
    response = app.handle(event, None, service=rig.service)
    assert reported(response) == [{"partition": group, "offset": records[0]["offset"]}]
    assert [t for t, _ in rig.cube.requests] == ["tenant-2"]


# -- 11. configuration with a trailing newline, a tz directory ------------------------------------
@pytest.mark.parametrize(
    "entry",
    [
        {"target": DAILY, "fields": ["status\n"]},
        {"target": DAILY, "partitionBy": "timeHints.createdAt\n", "granularity": "month"},
    ],
    ids=["fields", "partitionBy"],
)
def test_item11_map_field_names_with_a_trailing_newline_fail_the_cold_start(monkeypatch, entry):
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ENTITY_CUBE_MAP", json.dumps({"User": [entry]}))
    with pytest.raises(ConfigurationError, match="ENTITY_CUBE_MAP"):
        load_settings()


@pytest.mark.parametrize("value", ["Europe", "Asia", "Etc", "UTC,America"])
def test_item11_a_tz_database_directory_is_a_one_line_error_naming_cube_timezones(monkeypatch, value):
    for name, setting in REQUIRED.items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv("CUBE_TIMEZONES", value)
    with pytest.raises(ConfigurationError, match=r"^invalid configuration: CUBE_TIMEZONES: .*unknown time zone") as exc:
        load_settings()
    assert "\n" not in str(exc.value)


# -- 12. max_selectors holds ----------------------------------------------------------------------
def test_item12_one_selector_allowed_covers_a_cube_key_and_a_pre_aggregation_key_in_one_request():
    keys = [RefreshKey("t", "Users"), RefreshKey("t", "Groups.main"), RefreshKey("t", DAILY, "2025-03-01..2025-03-31")]
    [selector] = build_selectors(keys, "t", ("UTC",), max_selectors=1)
    assert selector.body["cubes"] == ["Groups", "Users"] and "preAggregations" not in selector.body
    assert sorted(selector.keys) == sorted(keys)


def test_item12_the_service_sends_one_request_per_tenant_with_max_selectors_1():
    rig = Rig(routes=EntityCubeMap({"User": ["Users"], "Group": ["Groups.main"]}))
    rig.service.max_selectors = 1
    event = msk_event(mutation(entity_type="User"), mutation(entity_type="Group"))
    assert app.handle(event, None, service=rig.service) == {"batchItemFailures": []}
    [(_, selectors)] = rig.cube.requests
    assert len(selectors) == 1


# -- 12b. at-least-once delivery --------------------------------------------------------------------
def failed_refresh(rig: Rig) -> RetriggerMessage:
    """A refresh of tenant-1#Users whose build failed: the retrigger message it produced."""
    rig.jobs.default = "failure: permission denied"
    assert app.handle(msk_event(mutation(timestamp=T0 - 300)), None, service=rig.service) == {"batchItemFailures": []}
    [(due, verify)] = rig.build_queue.messages
    rig.build_queue.messages.clear()
    rig.clock.now = due
    rig.service.process_verify([(RecordRef("sqs", 0), verify)], deadline_ms=rig.deadline)  # type: ignore[list-item]
    [(due, retrigger)] = rig.build_queue.messages
    rig.build_queue.messages.clear()
    rig.clock.now = max(due, T0 + rig.window_ms)
    assert isinstance(retrigger, RetriggerMessage)
    return retrigger


def test_item12b_a_retrigger_delivered_twice_refreshes_once():
    rig = Rig(verify=True, window_ms=5_000)
    retrigger = failed_refresh(rig)
    for _ in range(2):
        outcome = rig.service.process_retrigger([(RecordRef("sqs", 0), retrigger)], deadline_ms=rig.deadline)
        assert not outcome.failed
        rig.clock.advance(1_000)
    assert len(rig.cube.requests) == 2  # the failed refresh and one re-trigger
    assert rig.scheduler.messages == [], "the duplicate scheduled a trailing refresh: one more build"


def test_item12b_two_retriggers_of_one_failed_build_count_it_once():
    """A verify message redelivered after a crash between its re-trigger and its record sends the
    re-trigger twice: the failed build is counted once and re-built once."""
    rig = Rig(verify=True, window_ms=5_000)
    retrigger = failed_refresh(rig)
    for copy in (retrigger, RetriggerMessage(retrigger.tenant_id, retrigger.targets, retrigger.attempt)):
        rig.service.process_retrigger([(RecordRef("sqs", 0), copy)], deadline_ms=rig.deadline)
        rig.clock.advance(700)
    verifies = [m for _, m in rig.build_queue.messages if isinstance(m, VerifyMessage)]
    assert len(verifies) == 1 and rig.scheduler.messages == []
    rig.clock.advance(2_000)
    rig.service.process_verify([(RecordRef("sqs", 0), verifies[0])], deadline_ms=rig.deadline)
    assert rig.store.get(RefreshKey("tenant-1", "Users")).build_failures == 2


def test_item12b_every_message_delivered_twice_dead_letters_after_the_first_build_and_5_retriggers():
    rig = Rig(verify=True, window_ms=5_000)
    rig.jobs.default = "failure: permission denied"
    app.handle(msk_event(mutation(timestamp=T0 - 300)), None, service=rig.service)
    for _ in range(200):  # deliver every due message twice, in due order
        pending = [(d, m) for d, m in rig.build_queue.messages] + [(m.due_at, m) for m in rig.scheduler.messages]
        if not pending:
            break
        due = min(d for d, _ in pending)
        rig.clock.now = max(rig.clock.now, due)
        batch = rig.build_queue.due(rig.clock.now) + rig.scheduler.due(rig.clock.now)
        for message in [m for m in batch for _ in range(2)]:
            body = json.dumps(message.as_body() if not isinstance(message, TrailingMessage) else trailing_body(message))
            app.handle(sqs_event(body), None, service=rig.service)
            rig.clock.advance(100)
    assert len(rig.build_queue.dead_letters) == 1
    assert len(rig.cube.requests) == MAX_RETRIGGERS + 1  # one build per round: the first and 5 re-triggers
    assert rig.store.get(RefreshKey("tenant-1", "Users")).build_failures == MAX_RETRIGGERS + 1
