"""Builds the service from settings: the one place adapters are chosen and clients created.

boto3, httpx, PyJWT and the adapters are imported by `build_service`, not by this module: importing
`handler.app` then costs only what every invocation needs (bench/bench_cold_import.py measures both
the import and the first `build_service`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from handler.domain.admission import Admission
from handler.domain.debounce import Debouncer
from handler.domain.ports import Telemetry
from handler.domain.service import RefreshService
from handler.domain.verify import BuildVerifier
from handler.settings import Settings

IO_THREADS = 8

_T = TypeVar("_T")
_R = TypeVar("_R")


class ThreadMap:
    """Runs a batch's independent remote calls (one per key, one per tenant) side by side; boto3
    clients and httpx.Client are thread-safe. Results keep the input order."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="io")

    def __call__(self, fn: Callable[[_T], _R], items: Sequence[_T], /) -> list[_R]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SystemClock:
    def now_ms(self) -> int:
        return now_ms()


def build_service(settings: Settings, telemetry: Telemetry) -> RefreshService:
    # Deferred imports (see the module docstring); PLC0415 is the point here.
    import boto3  # noqa: PLC0415
    import httpx  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    from handler.adapters.aws import SqsBuildQueue, SqsTrailingScheduler, cached_secret  # noqa: PLC0415
    from handler.adapters.cube import CubeJobsClient  # noqa: PLC0415
    from handler.adapters.dynamodb import DynamoDBDebounceStore  # noqa: PLC0415

    aws_config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=2,
        read_timeout=5,
        max_pool_connections=IO_THREADS,
    )
    clock = SystemClock()
    store = DynamoDBDebounceStore(boto3.client("dynamodb", config=aws_config), settings.debounce_table_name)
    sqs = boto3.client("sqs", config=aws_config)
    scheduler = SqsTrailingScheduler(sqs, settings.refresh_queue_url)
    build_queue = SqsBuildQueue(sqs, settings.refresh_queue_url, settings.build_dead_letter_queue_url)
    cube = CubeJobsClient(
        settings.cube_api_url,
        cached_secret(settings.cube_api_secret_arn),
        timeout_ms=settings.timeout_ms,
        retries=settings.retry_attempts,
        http=httpx.Client(limits=httpx.Limits(max_connections=IO_THREADS)),
    )
    map_io = ThreadMap(IO_THREADS)
    windows = settings.windows
    admission = Admission(store, clock, telemetry, settings.effective_build_budget)
    debouncer = Debouncer(store, scheduler, clock, settings.debounce_ms, windows=windows)
    verifier = BuildVerifier(
        store,
        cube,
        build_queue,
        telemetry,
        clock,
        settings.build_timeout_ms,
        map_io=map_io,
        admission=admission,
        windows=windows,
    )
    return RefreshService(
        settings.entity_cube_map,
        debouncer,
        cube,
        telemetry,
        clock,
        settings.cube_timezones,
        map_io=map_io,
        verifier=verifier,
        max_selectors=settings.max_selectors,
        admission=admission,
    )
