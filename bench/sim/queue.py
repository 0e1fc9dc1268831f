"""Cube's build queue for one data source: N build slots, FIFO, measured build time per partition,
a backlog that carries over time.

Two forms of the same queue:
- `CubeQueue`: online, for the event-driven design simulated with the real code. A job (one refresh's
  builds) posted at t is done at t + backlog / N + ceil(builds / N) x build_s, where the backlog is the
  unfinished work (slot-seconds) ahead of it; FIFO, so nothing posted later delays it and its done time
  is known when it is posted. Work drains at N slot-seconds per second. Jobs of sampled tenants stand
  for `weight` tenants: one copy is posted as a job, the others are spread as work over the next
  `SPREAD_S` seconds (they are other tenants' jobs, not one lump).
- `day_queue`: time-stepped, for the designs that are models (Cube's refresh worker, the seed): per
  step, Poisson-many jobs of the step's rate arrive and the backlog follows Lindley's recursion
  (W <- max(0, W + arrivals - N x dt)), computed with cumulative sums.

Both treat the N slots as one server of speed N for waiting (a fluid FIFO): below saturation this
overstates the tiny waits of an M/D/N queue slightly; at and above saturation, which is what the
tables are about, it is the backlog growing at (load - N) slot-seconds per second
(tests/unit/test_scale_sim.py checks both against an exact multi-server queue)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

SPREAD_S = 60.0


@dataclass
class CubeQueue:
    slots: int
    build_s: float
    t: float = 0.0  # seconds since the simulated midnight
    work: float = 0.0  # slot-seconds queued or running
    _spread: deque[tuple[float, float]] = field(default_factory=deque)  # (until, rate) of spread work
    _rate: float = 0.0  # slot-seconds per second arriving from spread work and background
    _background: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, wait s) at each post
    busy_s: float = 0.0  # slot-seconds served
    posted: float = 0.0  # slot-seconds posted (weighted), for the load of a stretch of time
    # Cube drops a job still waiting this long after its post (None: never). FIFO, so whether a job is
    # dropped is known when it is posted: its wait is the work ahead of it, and a dropped job adds none.
    orphan_s: float | None = None
    last_start: float = 0.0  # when the last posted job's first build starts
    dropped: float = 0.0  # slot-seconds dropped (weighted)

    def copy(self) -> CubeQueue:
        return CubeQueue(
            self.slots, self.build_s, self.t, self.work, deque(self._spread), self._rate, self._background, [], 0.0,
            orphan_s=self.orphan_s,
        )  # fmt: skip

    def set_background(self, rate: float) -> None:
        """Work arriving steadily (slot-seconds per second) from load not simulated job by job."""
        self._rate += rate - self._background
        self._background = rate

    def advance(self, t: float) -> None:
        while self.t < t:
            until = self._spread[0][0] if self._spread else math.inf
            step_end = min(t, until)
            dt = step_end - self.t
            served = min(self.work + self._rate * dt, self.slots * dt)
            self.busy_s += served
            self.work = max(0.0, self.work + (self._rate - self.slots) * dt)
            self.t = step_end
            if step_end == until:
                _, rate = self._spread.popleft()
                self._rate -= rate

    def wait(self, t: float) -> float:
        self.advance(t)
        return self.work / self.slots

    def post(self, t: float, builds: int, weight: float = 1.0, *, load: bool = True) -> float:
        """A job of `builds` partition builds posted at t; returns when its last build is done.
        `load=False`: the job's done time is computed but it adds no work (warm-up). A job that would
        wait longer than `orphan_s` is dropped: it adds no work and is never done (math.inf)."""
        self.advance(max(t, self.t))
        self.last_start = self.t + self.work / self.slots
        done = self.last_start + math.ceil(builds / self.slots) * self.build_s
        self.samples.append((self.t, self.work / self.slots))
        if self.orphan_s is not None and self.work / self.slots > self.orphan_s:
            self.dropped += builds * self.build_s * weight if load else 0.0
            return math.inf
        if load and builds:
            job = builds * self.build_s
            self.work += job
            self.posted += job * weight
            if weight > 1:
                rate = (weight - 1) * job / SPREAD_S
                self._spread.append((self.t + SPREAD_S, rate))
                self._rate += rate
        return done


def day_queue(
    arrivals_per_s: np.ndarray,
    work_per_job: float,
    slots: int,
    dt: float,
    rng: np.random.Generator,
    start_work: float = 0.0,
) -> np.ndarray:
    """Work (slot-seconds) queued at the start of each step of dt seconds, for Poisson job arrivals
    at `arrivals_per_s[i]` during step i, each job bringing `work_per_job` slot-seconds."""
    jobs = rng.poisson(np.maximum(arrivals_per_s, 0.0) * dt)
    net = jobs * work_per_job - slots * dt
    cumulative = np.concatenate([[start_work], start_work + np.cumsum(net)])
    # Lindley's recursion in closed form: W_k = S_k - min(0, min_{j<=k} S_j)
    floor = np.minimum.accumulate(np.minimum(cumulative, 0.0))
    return (cumulative - floor)[:-1]


def exact_fifo_waits(arrivals: np.ndarray, service_s: float, slots: int) -> np.ndarray:
    """Waiting times of an exact FIFO multi-server queue (for the tests of the fluid forms)."""
    free = [0.0] * slots
    waits = np.empty_like(arrivals)
    import heapq  # noqa: PLC0415

    for i, t in enumerate(arrivals):
        first = heapq.heappop(free)
        start = max(t, first)
        waits[i] = start - t
        heapq.heappush(free, start + service_s)
    return waits
