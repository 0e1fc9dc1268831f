"""Builds the service from settings: the one place adapters are chosen and clients created."""

from __future__ import annotations

import time

import boto3
from botocore.config import Config

from handler.adapters.aws import SqsTrailingScheduler, cached_secret
from handler.adapters.cube import CubeJobsClient
from handler.adapters.dynamodb import DynamoDBDebounceStore
from handler.domain.debounce import Debouncer
from handler.domain.ports import Telemetry
from handler.domain.service import RefreshService
from handler.settings import Settings

_AWS_CONFIG = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=2, read_timeout=5)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SystemClock:
    def now_ms(self) -> int:
        return now_ms()


def build_service(settings: Settings, telemetry: Telemetry) -> RefreshService:
    clock = SystemClock()
    store = DynamoDBDebounceStore(boto3.client("dynamodb", config=_AWS_CONFIG), settings.debounce_table_name)
    scheduler = SqsTrailingScheduler(boto3.client("sqs", config=_AWS_CONFIG), settings.refresh_queue_url)
    cube = CubeJobsClient(
        settings.cube_api_url,
        cached_secret(settings.cube_api_secret_arn),
        timeout_ms=settings.timeout_ms,
        retries=settings.retry_attempts,
    )
    debouncer = Debouncer(store, scheduler, clock, settings.debounce_ms)
    return RefreshService(settings.entity_cube_map, debouncer, cube, telemetry, clock, settings.cube_timezones)
