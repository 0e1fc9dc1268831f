import pytest

from handler.settings import ConfigurationError, load_settings

REQUIRED = {
    "CUBE_API_URL": "https://cube.example.com/cubejs-api",
    "CUBE_API_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:1:secret:x",
    "DEBOUNCE_TABLE_NAME": "t",
    "REFRESH_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/q",
    "BUILD_DEAD_LETTER_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/dlq",
}


@pytest.fixture
def env(monkeypatch):
    for name in [
        "CUBE_PREAGG_ENABLED",
        "CUBE_PREAGG_DEBOUNCE_MS",
        "CUBE_PREAGG_TIMEOUT_MS",
        "ENTITY_CUBE_MAP",
        "CUBE_TIMEZONES",
        "CUBE_PREAGG_RETRY_ATTEMPTS",
    ]:
        monkeypatch.delenv(name, raising=False)
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_settings_defaults_match_the_contract(env):
    s = load_settings()
    assert (s.enabled, s.debounce_ms, s.timeout_ms, s.retry_attempts) == (True, 30000, 30000, 3)
    assert s.cube_timezones == ("UTC",)
    assert s.entity_cube_map.targets_for("User") == ("Users",)


def test_settings_read_every_contract_variable(env):
    env.setenv("CUBE_PREAGG_ENABLED", "false")
    env.setenv("CUBE_PREAGG_DEBOUNCE_MS", "500")
    env.setenv("CUBE_PREAGG_TIMEOUT_MS", "1000")
    env.setenv("ENTITY_CUBE_MAP", '{"User": ["Users", "Users.dailyStatusCounts"]}')
    env.setenv("CUBE_TIMEZONES", "UTC, Europe/Paris")
    s = load_settings()
    assert (s.enabled, s.debounce_ms, s.timeout_ms) == (False, 500, 1000)
    assert s.entity_cube_map.targets_for("User") == ("Users", "Users.dailyStatusCounts")
    assert s.cube_timezones == ("UTC", "Europe/Paris")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CUBE_PREAGG_DEBOUNCE_MS", "soon"),
        ("CUBE_PREAGG_DEBOUNCE_MS", "-1"),
        ("CUBE_PREAGG_TIMEOUT_MS", "0"),
        ("CUBE_API_URL", "https://cube.example.com/api"),
        ("ENTITY_CUBE_MAP", "{not json"),
        ("ENTITY_CUBE_MAP", '{"User": "Users"}'),
        ("CUBE_TIMEZONES", " , "),
        ("CUBE_PREAGG_ENABLED", "maybe"),
    ],
)
def test_settings_bad_value_fails_naming_the_variable(env, name, value):
    env.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


def test_settings_missing_required_variable_is_named(env):
    env.delenv("DEBOUNCE_TABLE_NAME")
    with pytest.raises(ConfigurationError, match="DEBOUNCE_TABLE_NAME"):
        load_settings()


def test_settings_load_aware_defaults_budget_from_cube_concurrency_and_a_wider_maximum_window(env):
    for name in ("CUBE_BUILD_CONCURRENCY", "CUBE_PREAGG_BUILD_BUDGET", "CUBE_PREAGG_MAX_DEBOUNCE_MS"):
        env.delenv(name, raising=False)
    s = load_settings()
    assert (s.build_concurrency, s.effective_build_budget, s.max_debounce_ms) == (2, 8, 300_000)
    env.setenv("CUBE_BUILD_CONCURRENCY", "5")
    env.setenv("CUBE_PREAGG_BUILD_BUDGET", "")  # the SAM parameter's empty default
    assert load_settings().effective_build_budget == 20
    env.setenv("CUBE_PREAGG_BUILD_BUDGET", "0")
    assert load_settings().effective_build_budget == 0  # no admission control


def test_settings_maximum_window_is_never_below_the_base_and_targets_have_their_own(env):
    env.setenv("CUBE_PREAGG_DEBOUNCE_MS", "600000")
    env.setenv("CUBE_PREAGG_MAX_DEBOUNCE_MS", "300000")
    env.setenv("CUBE_PREAGG_TARGET_WINDOWS", '{"Users": {"debounceMs": 5000, "maxDebounceMs": 60000}}')
    windows = load_settings().windows
    from handler.domain.model import RefreshKey  # noqa: PLC0415

    assert (windows.default.base_ms, windows.default.max_ms) == (600_000, 600_000)
    span = windows.range_for(RefreshKey("t", "Users.main"))  # by cube
    assert (span.base_ms, span.max_ms) == (5_000, 60_000)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CUBE_PREAGG_BUILD_BUDGET", "101"),
        ("CUBE_PREAGG_BUILD_BUDGET", "-1"),
        ("CUBE_BUILD_CONCURRENCY", "0"),
        ("CUBE_PREAGG_TARGET_WINDOWS", '{"Users": {"debounceMs": "5s"}}'),
        ("CUBE_PREAGG_TARGET_WINDOWS", '{"Users": {"windowMs": 5}}'),
        ("CUBE_PREAGG_TARGET_WINDOWS", '{"bad name!": {"debounceMs": 5}}'),
        ("CUBE_PREAGG_TARGET_WINDOWS", "[1]"),
    ],
)
def test_settings_bad_load_aware_values_fail_naming_the_variable(env, name, value):
    env.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()
