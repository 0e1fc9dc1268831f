"""The handler with the real Cube HTTP adapter over an httpx mock transport: the done-when cases of
500-then-200, 400, and Cube down throughout, seen from the Lambda response and the debounce store."""

import httpx

from handler import app
from handler.adapters.cube import CubeJobsClient
from handler.domain.debounce import Debouncer
from handler.domain.model import RefreshKey
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
