"""The one settings object, read from the environment and validated once at cold start."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from handler.domain.admission import MAX_BUDGET
from handler.domain.partitions import zone
from handler.domain.routing import EntityCubeMap
from handler.domain.window import DEFAULT_MAX_WINDOW_MS, MAX_WINDOW_MS, WindowRange, Windows, parse_target_windows

# Jobs of ours per Cube build slot: one building and three waiting. A slot is freed when a poll sees
# its build done (2 s doubling), so Cube needs waiting work to stay busy between polls; three covers
# builds down to about two thirds of a second, and a new job waits at most three builds.
BUDGET_PER_BUILD_SLOT = 4
_MAP_SHAPE = "must be a JSON object of entity type -> list of cube names or target objects"


class ConfigurationError(RuntimeError):
    """A setting is missing or invalid; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True, arbitrary_types_allowed=True)

    enabled: bool = Field(True, validation_alias="CUBE_PREAGG_ENABLED")
    debounce_ms: int = Field(30_000, ge=0, le=86_400_000, validation_alias="CUBE_PREAGG_DEBOUNCE_MS")
    timeout_ms: int = Field(30_000, gt=0, le=900_000, validation_alias="CUBE_PREAGG_TIMEOUT_MS")
    retry_attempts: int = Field(3, ge=0, le=10, validation_alias="CUBE_PREAGG_RETRY_ATTEMPTS")
    cube_api_url: str = Field(validation_alias="CUBE_API_URL")
    cube_api_secret_arn: str = Field(min_length=1, validation_alias="CUBE_API_SECRET_ARN")
    debounce_table_name: str = Field(min_length=1, validation_alias="DEBOUNCE_TABLE_NAME")
    refresh_queue_url: str = Field(min_length=1, validation_alias="REFRESH_QUEUE_URL")
    # Verification of builds (handler.domain.verify): a build not `done` this long after its refresh
    # started counts as failed; builds failed after their re-triggers go to this queue.
    build_timeout_ms: int = Field(1_800_000, ge=1_000, le=86_400_000, validation_alias="CUBE_PREAGG_BUILD_TIMEOUT_MS")
    build_dead_letter_queue_url: str = Field(min_length=1, validation_alias="BUILD_DEAD_LETTER_QUEUE_URL")
    entity_cube_map: Annotated[EntityCubeMap, NoDecode] = Field(
        default_factory=EntityCubeMap, validation_alias="ENTITY_CUBE_MAP"
    )
    cube_timezones: Annotated[tuple[str, ...], NoDecode] = Field(("UTC",), validation_alias="CUBE_TIMEZONES")
    max_selectors: int = Field(10, ge=1, le=100, validation_alias="CUBE_PREAGG_MAX_SELECTORS")
    # Load-aware refresh (docs/load-aware.md): Cube's build concurrency for the data source, the
    # budget of jobs in Cube at once (empty: BUDGET_PER_BUILD_SLOT x the concurrency; 0: no admission
    # control), the adaptive window's maximum (never below the base) and per-target windows.
    build_concurrency: int = Field(2, ge=1, le=MAX_BUDGET, validation_alias="CUBE_BUILD_CONCURRENCY")
    build_budget: int | None = Field(None, ge=0, le=MAX_BUDGET, validation_alias="CUBE_PREAGG_BUILD_BUDGET")
    max_debounce_ms: int = Field(
        DEFAULT_MAX_WINDOW_MS, ge=0, le=MAX_WINDOW_MS, validation_alias="CUBE_PREAGG_MAX_DEBOUNCE_MS"
    )
    target_windows_json: str = Field("", validation_alias="CUBE_PREAGG_TARGET_WINDOWS")

    @property
    def effective_build_budget(self) -> int:
        if self.build_budget is not None:
            return self.build_budget
        return min(MAX_BUDGET, BUDGET_PER_BUILD_SLOT * self.build_concurrency)

    @property
    def target_windows(self) -> dict[str, WindowRange]:
        return parse_target_windows(self.target_windows_json, base_ms=self.debounce_ms, max_ms=self.max_debounce_ms)

    @property
    def windows(self) -> Windows:
        return Windows(self.debounce_ms, self.max_debounce_ms, self.target_windows)

    @field_validator("build_budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("target_windows_json")
    @classmethod
    def _target_windows(cls, value: str) -> str:
        parse_target_windows(value, base_ms=0, max_ms=0)  # the shape; the values are checked as they are
        return value

    @field_validator("cube_api_url")
    @classmethod
    def _cube_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("https://", "http://")) or not value.endswith("/cubejs-api"):
            raise ValueError("must be an http(s) URL ending in /cubejs-api")
        return value

    @field_validator("entity_cube_map", mode="before")
    @classmethod
    def _map(cls, value: Any) -> EntityCubeMap:
        if isinstance(value, EntityCubeMap):
            return value
        if value is None or (isinstance(value, str) and not value.strip()):
            return EntityCubeMap()
        try:
            data = json.loads(value) if isinstance(value, str) else value
        except ValueError as exc:
            raise ValueError(_MAP_SHAPE) from exc
        if not isinstance(data, dict):
            raise ValueError(_MAP_SHAPE)
        return EntityCubeMap(data)

    @field_validator("cube_timezones", mode="before")
    @classmethod
    def _timezones(cls, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value)
        zones = tuple(z.strip() for z in items if z.strip())
        if not zones or any(
            not z.replace("/", "").replace("_", "").replace("-", "").replace("+", "").isalnum() for z in zones
        ):
            raise ValueError("must be a comma list of IANA time zone names")
        for name in zones:
            try:
                zone(name)  # partitions are computed in local time: the zone must be known here too
            except (KeyError, ValueError, OSError):  # OSError: a directory of the tz database (`Europe`)
                raise ValueError(f"unknown time zone {name!r}: use an IANA name such as Europe/Paris") from None
        return zones


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            name = ".".join(str(p) for p in err["loc"])
            problems.append(f"{name}: {err['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
