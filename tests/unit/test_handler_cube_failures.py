"""The handler with the real Cube HTTP adapter over an httpx mock transport: the done-when cases of
500-then-200, 400, and Cube down throughout, seen from the Lambda response and the debounce store."""

import json

import httpx

from handler import app
from handler.adapters.cube import CubeJobsClient
from handler.domain.debounce import Debouncer
from handler.domain.decode import trailing_body
from handler.domain.model import RefreshKey
from handler.domain.routing import EntityCubeMap
from handler.domain.service import RefreshService
from tests.builders import Rig, msk_event, mutation

SECRET = "local-test-secret-that-is-32-bytes-long"


class Cube:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def service_with(cube: Cube, rig: Rig) -> RefreshService:
    client = CubeJobsClient(
        "http://cube.test/cubejs-api",
        lambda: SECRET,
        timeout_ms=1_000,
        retries=3,
        http=httpx.Client(transport=httpx.MockTransport(cube)),
        sleep=lambda s: None,
        now_ms=rig.clock.now_ms,
    )
    debouncer = Debouncer(rig.store, rig.scheduler, rig.clock, rig.window_ms)
    return RefreshService(rig.routes, debouncer, client, rig.telemetry, rig.clock, rig.timezones)


EVENT = msk_event(mutation("tenant-1", entity_id="u1"), mutation("tenant-1", entity_id="u2"), partitions=1)
KEY = RefreshKey("tenant-1", "Users")


def test_cube_500_then_200_refreshes_after_one_retry():
    rig = Rig()
    cube = Cube(httpx.Response(500, json={"error": "boom"}), httpx.Response(200, json=["job-1"]))
    response = app.handle(EVENT, None, service=service_with(cube, rig))
    assert response == {"batchItemFailures": []}
    assert cube.calls == 2
    assert rig.store.get(KEY).started_at == rig.clock.now  # the claim stands


def test_cube_400_reports_the_records_without_retry_and_releases_the_claim():
    rig = Rig()
    cube = Cube(httpx.Response(400, json={"error": "A user's selector doesn't match any of the pre-aggregations"}))
    response = app.handle(EVENT, None, service=service_with(cube, rig))
    assert [f["itemIdentifier"]["offset"] for f in response["batchItemFailures"]] == [100, 101]
    assert cube.calls == 1
    assert rig.store.get(KEY).started_at is None


def test_cube_down_throughout_reports_records_releases_claim_and_redelivery_refreshes_at_once():
    rig = Rig()
    down = Cube(httpx.ConnectError("connection refused"))
    response = app.handle(EVENT, None, service=service_with(down, rig))
    assert len(response["batchItemFailures"]) == 2
    assert down.calls == 4  # the first try and 3 retries
    assert rig.store.get(KEY).claim_token is None
    rig.clock.advance(500)  # Lambda redelivers the batch well inside the window
    up = Cube(httpx.Response(200, json=["job-1"]))
    assert app.handle(EVENT, None, service=service_with(up, rig)) == {"batchItemFailures": []}
    assert up.calls == 1


class SelectorCube:
    """Cube that answers 400 to pre-aggregation selectors (a renamed pre-aggregation) and queues
    the cube selectors; counts the `Users` builds it queued."""

    def __init__(self, *, refuse_preaggs: bool = True) -> None:
        self.users_builds = 0
        self.refuse_preaggs = refuse_preaggs

    def __call__(self, request: httpx.Request) -> httpx.Response:
        selector = json.loads(request.content)["selector"]
        if "preAggregations" in selector:
            if self.refuse_preaggs:
                return httpx.Response(
                    400, json={"error": "A user's selector doesn't match any of the pre-aggregations"}
                )
            return httpx.Response(200, json=[f"job-{p.replace('.', '_')}" for p in selector["preAggregations"]])
        self.users_builds += selector["cubes"].count("Users")
        return httpx.Response(200, json=[f"job-{c}" for c in selector["cubes"]])


TWO_SELECTORS = EntityCubeMap({"User": ["Users"], "Tenant": ["Tenants.summary"]})


def test_cube_refusing_one_selector_keeps_the_other_targets_refresh_across_redeliveries():
    """Issue 12.3: the User record was reported with the Tenant one and every redelivery rebuilt
    `Users` again (5 builds in 5 deliveries); now `Users` is built once and only the Tenant record
    is reported."""
    rig = Rig(routes=TWO_SELECTORS)
    cube = SelectorCube()
    event = msk_event(mutation("tenant-1", "User", "u1"), mutation("tenant-1", "Tenant", "t1"), partitions=1)
    service = service_with(cube, rig)
    for _ in range(5):  # the first delivery and four redeliveries inside the window
        response = app.handle(event, None, service=service)
        assert [f["itemIdentifier"]["offset"] for f in response["batchItemFailures"]] == [101]  # the Tenant record
        rig.clock.advance(500)
    assert cube.users_builds == 1
    assert rig.store.get(RefreshKey("tenant-1", "Users")).started_at is not None  # the Users claim stands
    assert rig.store.get(RefreshKey("tenant-1", "Tenants.summary")).started_at is None  # released
    assert len(rig.scheduler.messages) == 1  # the redelivered User record waits for one trailing refresh


def test_cube_refusing_one_selector_on_the_trailing_path_fails_only_its_message():
    rig = Rig(routes=TWO_SELECTORS)
    cube = SelectorCube(refuse_preaggs=False)
    service = service_with(cube, rig)
    event = msk_event(mutation("tenant-1", "User", "u1"), mutation("tenant-1", "Tenant", "t1"), partitions=1)
    app.handle(event, None, service=service)
    rig.clock.advance(1_000)
    app.handle(event, None, service=service)  # inside the window: both keys get a trailing refresh
    rig.clock.advance(30_000)
    cube.refuse_preaggs = True  # the pre-aggregation was renamed meanwhile
    due = rig.scheduler.due(rig.clock.now)
    assert sorted(m.target for m in due) == ["Tenants.summary", "Users"]
    records = [{"eventSource": "aws:sqs", "messageId": m.target, "body": json.dumps(trailing_body(m))} for m in due]
    response = app.handle({"Records": records}, None, service=service)
    assert response == {"batchItemFailures": [{"itemIdentifier": "Tenants.summary"}]}  # 4xx: back to SQS
    assert cube.users_builds == 2  # the leading and the trailing refresh
    assert rig.store.get(RefreshKey("tenant-1", "Users")).trailing_token is None  # finished


def test_cube_2xx_with_a_null_or_object_body_reports_the_records_and_releases_the_claim():
    for body in (b"null", b'{"queued": true}'):
        rig = Rig()
        cube = Cube(httpx.Response(200, content=body))
        response = app.handle(EVENT, None, service=service_with(cube, rig))
        assert [f["itemIdentifier"]["offset"] for f in response["batchItemFailures"]] == [100, 101], body
        assert cube.calls == 4  # retried like a 5xx: the first try and 3 retries
        assert rig.store.get(KEY).claim_token is None  # released
        assert rig.telemetry.counts["CubeErrorsByClass[ErrorClass=server]"] == 1
