"""Shared builders for tests: mutations, MSK events, a fake clock and a service over in-memory fakes."""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handler.adapters.memory import (
    CountingTelemetry,
    InMemoryDebounceStore,
    RecordingBuildQueue,
    RecordingCube,
    RecordingScheduler,
    ScriptedJobs,
)
from handler.domain.admission import Admission
from handler.domain.debounce import Debouncer
from handler.domain.routing import EntityCubeMap
from handler.domain.service import Mapper, RefreshService, serial_map
from handler.domain.verify import BuildVerifier
from handler.domain.window import Windows
from preagg_cli.local import build_msk_event

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"


def sample_events() -> list[Path]:
    """The repository's sample events: `events/*.json` tracked by git. A developer's own files there
    (`make-event ... > events/mine.json`) are not test inputs; everything committed is."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", "events/*.json"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file is a sample
        return sorted(EVENTS.glob("*.json"))
    return sorted(ROOT / name for name in listed.split("\0") if name and "/" not in name.removeprefix("events/"))


T0 = 1_795_953_600_000


def mutation(
    tenant: str = "tenant-1",
    entity_type: str = "User",
    entity_id: str = "user-1",
    timestamp: int | str = T0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "eventType": "ENTITY_UPDATED",
        "entityType": entity_type,
        "entityId": entity_id,
        "tenantId": tenant,
        "timestamp": timestamp,
        **extra,
    }


def msk_event(*values: Any, partitions: int = 2) -> dict[str, Any]:
    return build_msk_event(list(values), partitions=partitions)


def load_event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return data


@dataclass
class FakeClock:
    now: int = T0

    def now_ms(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@dataclass
class Rig:
    """A RefreshService over in-memory fakes, with handles on each fake."""

    clock: FakeClock = field(default_factory=FakeClock)
    store: InMemoryDebounceStore = field(default_factory=InMemoryDebounceStore)
    scheduler: RecordingScheduler = field(default_factory=RecordingScheduler)
    cube: RecordingCube = field(default_factory=RecordingCube)
    telemetry: CountingTelemetry = field(default_factory=CountingTelemetry)
    window_ms: int = 30_000
    routes: EntityCubeMap = field(default_factory=EntityCubeMap)
    timezones: tuple[str, ...] = ("UTC",)
    map_io: Mapper = serial_map
    verify: bool = False  # wire a BuildVerifier (Cube's `get` scripted by `jobs`)
    jobs: ScriptedJobs = field(default_factory=ScriptedJobs)
    build_queue: RecordingBuildQueue = field(default_factory=RecordingBuildQueue)
    build_timeout_ms: int = 600_000
    budget: int = 0  # build budget in jobs (0: no admission control)
    max_window_ms: int | None = None  # the adaptive window's maximum (None: a fixed window)

    def __post_init__(self) -> None:
        self.windows = Windows(self.window_ms, self.max_window_ms)
        self.admission = Admission(self.store, self.clock, self.telemetry, self.budget, rng=random.Random(1))
        self.debouncer = Debouncer(self.store, self.scheduler, self.clock, self.window_ms, windows=self.windows)
        self.verifier = BuildVerifier(
            self.store,
            self.jobs,
            self.build_queue,
            self.telemetry,
            self.clock,
            self.build_timeout_ms,
            self.map_io,
            admission=self.admission,
            windows=self.windows,
        )
        self.service = RefreshService(
            self.routes,
            self.debouncer,
            self.cube,
            self.telemetry,
            self.clock,
            self.timezones,
            map_io=self.map_io,
            verifier=self.verifier if self.verify else None,
            admission=self.admission,
        )

    @property
    def deadline(self) -> int:
        return self.clock.now + 60_000
