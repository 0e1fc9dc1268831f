"""The Cube jobs adapter against an httpx mock transport: body, JWT, retries, 4xx."""

import json

import httpx
import jwt
import pytest

from handler.adapters.cube import CubeJobsClient
from handler.domain.errors import (
    CubeError,
    CubeRejected,
    CubeSecretUnavailable,
    CubeServerError,
    CubeTimeout,
    CubeUnreachable,
)
from handler.domain.model import RefreshKey, Selector
from handler.domain.routing import build_selectors

SECRET = "local-test-secret-that-is-32-bytes-long"
NOW = 1_795_953_600_000


class Server:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def client(server: Server, *, retries=3, sleeps=None, now=lambda: NOW) -> CubeJobsClient:
    return CubeJobsClient(
        "http://cube.test/cubejs-api/",
        lambda: SECRET,
        timeout_ms=1_000,
        retries=retries,
        http=httpx.Client(transport=httpx.MockTransport(server)),
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
        now_ms=now,
    )


def ok(tokens=("tok-1",)):
    return httpx.Response(200, json=list(tokens))


SELECTOR = Selector({"cubes": ["Users"]}, (RefreshKey("t", "Users"),))


def only(c: CubeJobsClient, *, deadline_ms: int, tenant: str = "t") -> list[str]:
    """The answer to a one-selector trigger, raised when it is an error."""
    (answer,) = c.trigger(tenant, [SELECTOR], deadline_ms=deadline_ms)
    if isinstance(answer, CubeError):
        raise answer
    return answer


def test_cube_client_posts_the_job_request_with_the_tenant_context():
    server = Server(ok(["a", "b"]))
    answers = client(server).trigger(
        "tenant-1", build_selectors(["Users"], "tenant-1", ["UTC"]), deadline_ms=NOW + 60_000
    )
    assert answers == [["a", "b"]]
    (request,) = server.requests
    assert request.method == "POST"
    assert str(request.url) == "http://cube.test/cubejs-api/v1/pre-aggregations/jobs"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "action": "post",
        "selector": {
            "contexts": [{"securityContext": {"tenantId": "tenant-1"}}],
            "timezones": ["UTC"],
            "cubes": ["Users"],
        },
    }


def test_cube_client_signs_a_short_lived_tenant_token_with_the_jobs_scope():
    server = Server(ok())
    only(client(server, now=lambda: NOW), tenant="tenant-1", deadline_ms=NOW + 60_000)
    token = server.requests[0].headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["tenantId"] == "tenant-1"
    assert claims["scopes"] == ["jobs"]
    assert 0 < claims["exp"] - NOW // 1000 <= 300
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-also-32-bytes-long!!", algorithms=["HS256"], options={"verify_exp": False})


def test_cube_client_retries_a_500_then_succeeds():
    sleeps: list[float] = []
    server = Server(httpx.Response(500, json={"error": "boom"}), ok())
    assert only(client(server, sleeps=sleeps), deadline_ms=NOW + 60_000) == ["tok-1"]
    assert len(server.requests) == 2
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.2


def test_cube_client_does_not_retry_a_4xx_and_keeps_cube_error_text():
    server = Server(httpx.Response(403, json={"error": "API scope is missing: jobs"}))
    with pytest.raises(CubeRejected, match=r"403.*API scope is missing: jobs") as info:
        only(client(server), deadline_ms=NOW + 60_000)
    assert info.value.status == 403
    assert len(server.requests) == 1


def test_cube_client_gives_up_after_the_configured_retries():
    server = Server(*[httpx.ConnectError("refused")] * 4)
    with pytest.raises(CubeUnreachable):
        only(client(server, retries=3), deadline_ms=NOW + 60_000)
    assert len(server.requests) == 4


def test_cube_client_retries_timeouts_and_reports_them_as_timeouts():
    server = Server(httpx.ReadTimeout("slow"), httpx.ReadTimeout("slow"))
    with pytest.raises(CubeTimeout):
        only(client(server, retries=1), deadline_ms=NOW + 60_000)
    assert len(server.requests) == 2


def test_cube_client_never_retries_past_the_deadline():
    clock = [NOW]

    def now():
        return clock[0]

    def sleep(seconds):
        clock[0] += int(seconds * 1000)

    server = Server(*[httpx.Response(503, text="unavailable")] * 10)
    c = CubeJobsClient(
        "http://cube.test/cubejs-api",
        lambda: SECRET,
        timeout_ms=1_000,
        retries=10,
        backoff_ms=10_000,
        http=httpx.Client(transport=httpx.MockTransport(server)),
        sleep=sleep,
        now_ms=now,
    )
    with pytest.raises(CubeServerError):
        only(c, deadline_ms=NOW + 5_000)
    assert clock[0] <= NOW + 5_000
    assert len(server.requests) < 10


def test_cube_client_with_no_time_left_does_not_call():
    server = Server()
    with pytest.raises(CubeTimeout):
        only(client(server), deadline_ms=NOW - 1)
    assert server.requests == []


def test_cube_client_unreadable_secret_is_a_typed_error_that_sends_nothing():
    server = Server()

    def no_secret() -> str:
        raise RuntimeError("AccessDeniedException: not authorized to perform secretsmanager:GetSecretValue")

    c = CubeJobsClient(
        "http://cube.test/cubejs-api",
        no_secret,
        timeout_ms=1_000,
        retries=3,
        http=httpx.Client(transport=httpx.MockTransport(server)),
        now_ms=lambda: NOW,
    )
    with pytest.raises(CubeSecretUnavailable, match="RuntimeError") as info:
        only(c, deadline_ms=NOW + 60_000)
    assert info.value.error_class == "secret"
    assert server.requests == []


def test_cube_client_answers_per_selector_and_keeps_the_jobs_of_accepted_selectors():
    server = Server(ok(["u-1"]), httpx.Response(400, json={"error": "A user's selector doesn't match any"}))
    selectors = build_selectors(["Users", "Tenants.summary"], "tenant-1", ["UTC"])
    first, second = client(server).trigger("tenant-1", selectors, deadline_ms=NOW + 60_000)
    assert first == ["u-1"]
    assert isinstance(second, CubeRejected) and second.status == 400
    assert len(server.requests) == 2


def test_cube_client_unreadable_secret_fails_every_selector_without_a_request():
    server = Server()

    def no_secret() -> str:
        raise RuntimeError("throttled")

    c = CubeJobsClient("http://cube.test/cubejs-api", no_secret, timeout_ms=1_000, retries=0, now_ms=lambda: NOW)
    answers = c.trigger("t", build_selectors(["Users", "Tenants.summary"], "t", ["UTC"]), deadline_ms=NOW + 60_000)
    assert [type(a) for a in answers] == [CubeSecretUnavailable, CubeSecretUnavailable]
    assert server.requests == []


@pytest.mark.parametrize(
    "body",
    [None, {"jobs": ["tok-1"]}, "tok-1", [1, 2], {"error": "x"}],
    ids=["null", "object", "string", "ints", "err"],
)
def test_cube_client_2xx_without_a_json_array_of_tokens_is_a_server_error(body):
    server = Server(*[httpx.Response(200, content=json.dumps(body).encode())] * 2)
    with pytest.raises(CubeServerError, match="instead of a JSON array of job tokens") as info:
        only(client(server, retries=1), deadline_ms=NOW + 60_000)
    assert info.value.status == 200
    assert info.value.retryable
    assert len(server.requests) == 2  # retried like a 5xx


def test_cube_client_2xx_with_a_non_json_body_is_a_server_error():
    server = Server(httpx.Response(200, text="<html>ok</html>"))
    with pytest.raises(CubeServerError, match="non-JSON body"):
        only(client(server, retries=0), deadline_ms=NOW + 60_000)


def test_cube_client_redacts_a_token_cube_echoes_in_its_error_text():
    jwt_text = "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRJZCI6InQxIn0.c2lnbmF0dXJl"
    server = Server(httpx.Response(403, json={"error": f"Invalid token Bearer {jwt_text} / {jwt_text}"}))
    with pytest.raises(CubeRejected) as info:
        only(client(server), deadline_ms=NOW + 60_000)
    assert str(info.value) == "Cube rejected the request (403): Invalid token Bearer [redacted] / [redacted]"


NO_MATCH_400 = {"error": "A user's selector doesn't match any of the pre-aggregations defined in the data model."}


def test_cube_client_no_partition_in_a_date_range_is_no_jobs_not_an_error():
    # Cube answers this 400 when the range lies outside the pre-aggregation's build range (observed).
    ranged = Selector({"preAggregations": ["Users.daily"], "dateRange": ["2010-03-01", "2010-03-31"]}, ())
    server = Server(httpx.Response(400, json=NO_MATCH_400), httpx.Response(400, json=NO_MATCH_400))
    answers = client(server).trigger("t", [ranged, SELECTOR], deadline_ms=NOW + 60_000)
    assert answers[0] == []
    assert isinstance(answers[1], CubeRejected), "without a date range the same 400 is a configuration error"
    assert len(server.requests) == 2


def test_cube_client_other_400s_on_a_date_range_stay_errors():
    ranged = Selector({"preAggregations": ["Users.daily"], "dateRange": ["2010-03-01", "2010-03-31"]}, ())
    server = Server(httpx.Response(400, json={"error": "Unknown key: dateRanges"}))
    [answer] = client(server).trigger("t", [ranged], deadline_ms=NOW + 60_000)
    assert isinstance(answer, CubeRejected)
