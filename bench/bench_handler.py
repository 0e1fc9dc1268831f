"""Throughput, remote calls and memory of one 10,000-record MSK batch through the whole handler,
with a naive per-record worker measured in the same run as the baseline.

Run from the repository root (the benchmark does not touch sys.path; `src` comes from PYTHONPATH):

    PYTHONPATH=src .venv/bin/python bench/bench_handler.py [--runs 15] [--profile]

Each measured path (handler, naive) runs in a child process of its own, so the process max RSS of
one is not inflated by the other. Inside a child: the event is built (base64/JSON) before anything is
timed; each timed run gets a fresh in-memory store; stdout (Powertools EMF output) goes to
/dev/null during timed runs; tracemalloc is on only for one separate, untimed run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

RECORDS = 10_000  # the MSK maximum batch size
TENANTS = ("acme", "globex", "initech")
ENTITY_TYPES = ("User", "Tenant", "Group")
PARTITIONS = 3
T0_MS = 1_795_953_600_000

TARGET_RECORDS_PER_S = 50_000
TARGET_PEAK_MB = 150
# Assumed remote latencies for the projection line only (docs/cube-jobs-api.md: Cube answers in 8-30 ms warm;
# a DynamoDB conditional write is single-digit ms in-region). Not measured here.
ASSUMED_WRITE_MS = 5.0
ASSUMED_POST_MS = 20.0


def _configure_env() -> None:
    """Settings are read when handler.app is imported: set the environment first."""
    from preagg_cli.local import LOCAL_DEFAULTS  # noqa: PLC0415 (stdlib-only module; env must precede app)

    for name, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # Metrics stay enabled so their cost is measured; their EMF output goes to /dev/null.
    os.environ["POWERTOOLS_METRICS_DISABLED"] = "false"
    os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"
    os.environ["POWERTOOLS_TRACE_DISABLED"] = "true"
    # As on Lambda; without it the X-Ray SDK builds a botocore session at import (~+12 MB RSS).
    os.environ.setdefault("LAMBDA_TASK_ROOT", tempfile.gettempdir())


def _mutations() -> list[dict[str, Any]]:
    combos = [(t, e) for t in TENANTS for e in ENTITY_TYPES]
    values = []
    for i in range(RECORDS):
        tenant, entity = combos[i % len(combos)]
        values.append(
            {
                "eventType": "updated",
                "entityType": entity,
                "entityId": f"{entity.lower()}-{i:05d}",
                "tenantId": tenant,
                "timestamp": T0_MS + i,
            }
        )
    return values


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    """Redirect file descriptor 1 (not just sys.stdout): Powertools prints EMF with print()."""
    sys.stdout.flush()
    saved = os.dup(1)
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(sink)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the two paths --------------------------------------------------------------------------------
class _Fakes:
    def __init__(self, settings: Any) -> None:
        from handler.adapters.memory import (  # noqa: PLC0415
            CountingTelemetry,
            InMemoryDebounceStore,
            RecordingCube,
            RecordingScheduler,
        )
        from handler.domain.debounce import Debouncer  # noqa: PLC0415
        from handler.domain.service import RefreshService  # noqa: PLC0415
        from handler.wiring import SystemClock  # noqa: PLC0415

        self.settings = settings
        self.store = InMemoryDebounceStore()
        self.scheduler = RecordingScheduler()
        self.cube = RecordingCube()
        self.clock = SystemClock()
        self.debouncer = Debouncer(self.store, self.scheduler, self.clock, settings.debounce_ms)
        self.service = RefreshService(
            settings.entity_cube_map,
            self.debouncer,
            self.cube,
            CountingTelemetry(),
            self.clock,
            settings.cube_timezones,
        )

    def calls(self) -> tuple[int, int, int]:
        return self.store.writes, len(self.cube.requests), len(self.scheduler.messages)


def _handler_runner(event: dict[str, Any]) -> Callable[[_Fakes], dict[str, Any]]:
    from handler import app  # noqa: PLC0415

    def run(fakes: _Fakes) -> dict[str, Any]:
        response = app.handle(event, None, service=fakes.service, settings=app.SETTINGS)
        # What lambda_handler's decorators do after handle(): emit the invocation's metrics.
        app.telemetry.flush_dimensioned()
        app.metrics.flush_metrics()
        return response

    return run


def _naive_runner(event: dict[str, Any]) -> Callable[[_Fakes], dict[str, Any]]:
    """Per record: decode it, one conditional write, one Cube call. No coalescing."""
    from handler.domain.decode import decode_value, iter_msk_records  # noqa: PLC0415
    from handler.domain.model import InvalidRecord, RefreshKey  # noqa: PLC0415
    from handler.domain.routing import build_selectors  # noqa: PLC0415

    def run(fakes: _Fakes) -> dict[str, Any]:
        settings, store, cube, clock = fakes.settings, fakes.store, fakes.cube, fakes.clock
        failures = []
        for ref, value in iter_msk_records(event):
            mutation = decode_value(ref, value, now_ms=clock.now_ms())
            if isinstance(mutation, InvalidRecord):
                failures.append(ref.as_failure())
                continue
            for target in settings.entity_cube_map.targets_for(mutation.entity_type):
                now = clock.now_ms()
                key = RefreshKey(mutation.tenant_id, target)
                store.claim(
                    key,
                    now=now,
                    window_ms=settings.debounce_ms,
                    claim_token=uuid.uuid4().hex,
                    expires_at=now // 1000 + 86_400,
                )
                selectors = build_selectors([target], mutation.tenant_id, settings.cube_timezones)
                cube.trigger(mutation.tenant_id, selectors, deadline_ms=now + 60_000)
        return {"batchItemFailures": failures}

    return run


# -- child: measure one path ----------------------------------------------------------------------
def _child(path: str, runs: int, profile: bool) -> dict[str, Any]:
    rss_start = _max_rss_mb()
    _configure_env()
    from handler import app  # noqa: PLC0415
    from preagg_cli.local import build_msk_event  # noqa: PLC0415

    event = build_msk_event(_mutations(), partitions=PARTITIONS)  # outside every timed region
    records = sum(len(v) for v in event["records"].values())
    assert records == RECORDS, records
    settings = app.SETTINGS
    run = (_handler_runner if path == "handler" else _naive_runner)(event)

    # warm-up (first-call costs: pydantic, Powertools, lazy imports), on its own store
    with _stdout_to_devnull():
        run(_Fakes(settings))
    rss_before = _max_rss_mb()

    seconds: list[float] = []
    cpu_seconds: list[float] = []
    calls = (0, 0, 0)
    response: dict[str, Any] = {}
    for _ in range(runs):
        fakes = _Fakes(settings)
        with _stdout_to_devnull():
            t, c = time.perf_counter(), time.process_time()
            response = run(fakes)
            seconds.append(time.perf_counter() - t)
            cpu_seconds.append(time.process_time() - c)
        calls = fakes.calls()
    rss_after = _max_rss_mb()

    # tracemalloc peak of one call (separate run: tracing slows the code several-fold)
    fakes = _Fakes(settings)
    tracemalloc.start()
    with _stdout_to_devnull():
        run(fakes)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result: dict[str, Any] = {
        "path": path,
        "records": records,
        "runs": runs,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "writes": calls[0],
        "posts": calls[1],
        "trailing_msgs": calls[2],
        "failures": len(response.get("batchItemFailures", [])),
        "tracemalloc_peak_mb": peak / 2**20,
        "rss_start_mb": rss_start,
        "rss_before_runs_mb": rss_before,
        "rss_max_mb": max(rss_after, _max_rss_mb()),
    }

    # the same batch again, on the same store, within the debounce window
    fakes = _Fakes(settings)
    with _stdout_to_devnull():
        t_first = time.perf_counter()
        run(fakes)
        first = fakes.calls()
        run(fakes)
        second = fakes.calls()
        elapsed_ms = (time.perf_counter() - t_first) * 1000
    result["repeat"] = {
        "first": first,
        "second_delta": tuple(b - a for a, b in zip(first, second, strict=True)),
        "elapsed_ms": elapsed_ms,
        "window_ms": settings.debounce_ms,
        "keys_in_store": len(fakes.store.items),
    }

    if profile:
        fakes = _Fakes(settings)
        prof = cProfile.Profile()
        with _stdout_to_devnull():
            prof.enable()
            run(fakes)
            prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).strip_dirs()
        stats.sort_stats("tottime").print_stats(15)
        stats.sort_stats("cumulative").print_stats(25)
        result["profile"] = out.getvalue()
    return result


# -- parent: run both children, print side by side ------------------------------------------------
def _spawn(path: str, runs: int, profile: bool) -> dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--child", path, "--runs", str(runs)]
    if profile:
        argv.append("--profile")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child '{path}' failed (exit {proc.returncode}); is PYTHONPATH=src set?")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _report(h: dict[str, Any], n: dict[str, Any]) -> int:
    def rate(r: dict[str, Any], f: Callable[[list[float]], float]) -> float:
        return r["records"] / f(r["seconds"])

    distinct_keys, tenants = len(TENANTS) * len(ENTITY_TYPES), len(TENANTS)
    h_best, h_med = rate(h, min), rate(h, statistics.median)
    n_best, n_med = rate(n, min), rate(n, statistics.median)

    print(
        f"bench_handler  {datetime.now(UTC):%Y-%m-%d %H:%M UTC}  python {platform.python_version()}  "
        f"{os.cpu_count()} cpu  load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"batch: {h['records']} MSK records, {tenants} tenants x {len(ENTITY_TYPES)} entity types "
        f"({distinct_keys} keys), {PARTITIONS} partitions; {h['runs']} timed runs per path, fresh store each"
    )
    print()
    w = 26
    print(f"{'':{w}} {'handler':>14} {'naive baseline':>16}   target")
    print(
        f"{'records/s (best)':{w}} {h_best:>14,.0f} {n_best:>16,.0f}   >= {TARGET_RECORDS_PER_S:,}  "
        f"{_verdict(h_best >= TARGET_RECORDS_PER_S)}"
    )
    print(
        f"{'records/s (median)':{w}} {h_med:>14,.0f} {n_med:>16,.0f}   >= {TARGET_RECORDS_PER_S:,}  "
        f"{_verdict(h_med >= TARGET_RECORDS_PER_S)}"
    )

    c_best = h["records"] / min(h["cpu_seconds"])
    nc_best = n["records"] / min(n["cpu_seconds"])
    print(
        f"{'records/s, CPU time (best)':{w}} {c_best:>14,.0f} {nc_best:>16,.0f}   >= {TARGET_RECORDS_PER_S:,}  "
        f"{_verdict(c_best >= TARGET_RECORDS_PER_S)}  (process CPU: less sensitive to other load)"
    )

    def ms(r: dict[str, Any]) -> str:
        sec = r["seconds"]
        return f"{min(sec) * 1e3:.0f}/{statistics.median(sec) * 1e3:.0f}/{max(sec) * 1e3:.0f}"

    print(f"{'ms/batch (best/med/worst)':{w}} {ms(h):>14} {ms(n):>16}")
    print(
        f"{'debounce store writes':{w}} {h['writes']:>14,} {n['writes']:>16,}   == {distinct_keys}  "
        f"{_verdict(h['writes'] == distinct_keys)}"
    )
    print(f"{'Cube POSTs':{w}} {h['posts']:>14,} {n['posts']:>16,}   == {tenants}  {_verdict(h['posts'] == tenants)}")
    print(f"{'trailing messages (SQS)':{w}} {h['trailing_msgs']:>14,} {n['trailing_msgs']:>16,}")
    print(f"{'batchItemFailures':{w}} {h['failures']:>14,} {n['failures']:>16,}")
    print(
        f"{'tracemalloc peak MB':{w}} {h['tracemalloc_peak_mb']:>14.1f} {n['tracemalloc_peak_mb']:>16.1f}   "
        f"< {TARGET_PEAK_MB}  {_verdict(h['tracemalloc_peak_mb'] < TARGET_PEAK_MB)}"
    )
    print(
        f"{'process max RSS MB':{w}} {h['rss_max_mb']:>14.1f} {n['rss_max_mb']:>16.1f}   "
        f"< {TARGET_PEAK_MB}  {_verdict(h['rss_max_mb'] < TARGET_PEAK_MB)}"
    )
    print(f"{'  (RSS after import+event)':{w}} {h['rss_before_runs_mb']:>14.1f} {n['rss_before_runs_mb']:>16.1f}")

    def projected(r: dict[str, Any]) -> float:
        return min(r["seconds"]) + (r["writes"] * ASSUMED_WRITE_MS + r["posts"] * ASSUMED_POST_MS) / 1000

    print(
        f"{'projected s, serial remote':{w}} {projected(h):>14.2f} {projected(n):>16.2f}   "
        f"(assumes {ASSUMED_WRITE_MS:g} ms/write, {ASSUMED_POST_MS:g} ms/POST; not measured)"
    )
    print()
    for label, r in (("handler", h), ("naive", n)):
        rep = r["repeat"]
        dw, dp, dm = rep["second_delta"]
        fw, fp, fm = rep["first"]
        print(
            f"same batch twice on one store ({label}), both within {rep['elapsed_ms']:.0f} ms "
            f"(window {rep['window_ms']} ms): first run {fw} writes / {fp} POSTs / {fm} trailing msgs; "
            f"second run {dw} writes / {dp} POSTs / {dm} trailing msgs"
        )
    second_posts = h["repeat"]["second_delta"][1]
    print(f"handler second run Cube POSTs == 0  {_verdict(second_posts == 0)}")
    if "profile" in h:
        print("\n--- cProfile of one handler call ---")
        print(h["profile"])
    ok = (
        h_best >= TARGET_RECORDS_PER_S
        and h["tracemalloc_peak_mb"] < TARGET_PEAK_MB
        and h["rss_max_mb"] < TARGET_PEAK_MB
        and h["writes"] == distinct_keys
        and h["posts"] == tenants
        and second_posts == 0
    )
    print(f"\noverall: {_verdict(ok)}  (best-of-{h['runs']} rate; timings are wall clock on a shared machine)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one handler call")
    parser.add_argument("--child", choices=("handler", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = _child(args.child, args.runs, args.profile and args.child == "handler")
        print(json.dumps(result))
        return 0
    try:
        import preagg_cli.local  # noqa: F401, PLC0415
    except ImportError:
        raise SystemExit(
            "cannot import 'handler': run from the repo root as PYTHONPATH=src .venv/bin/python bench/bench_handler.py"
        ) from None
    h = _spawn("handler", args.runs, args.profile)
    n = _spawn("naive", max(3, args.runs // 3), False)
    return _report(h, n)


if __name__ == "__main__":
    raise SystemExit(main())
