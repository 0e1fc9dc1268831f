"""Overload at 1x, 3x and 10x Cube's build capacity: today's code and the load-aware one side by side
(docs/scale.md, "Overload: today's code and the load-aware one"; `make scale-overload`).

    PYTHONPATH=src:. .venv/bin/python -m bench.sim.overload [--seeds 7 8 9] [--factors 1 3 10] [--quick] [--no-write]

The same schedule of mutations runs through two versions of the real domain code on the simulated
clock of bench/sim/engine.py (its SimCube, SQS and store stand-ins): `today`, the code before issue 16
(commit OLD_COMMIT's src/, extracted with `git archive`, unmodified), and `new`, this checkout's
src/ (wired as deployed: in-flight gate and ride-along, slow builds alive, admission control with the
default budget of 4 jobs per build slot, adaptive window). Each (code, factor, seed) runs in a process
of its own whose PYTHONPATH puts that version's `handler` package first.

The schedule: identical tenants (partition-precise routes, 3 entity types, 12 monthly partitions),
a quiet start, one peak hour in which `factor` times as many tenants mutate as Cube's build slots can
serve (capacity: slots / build time; demand: the partition builds per second the refreshes ask for
when Cube keeps up, measured first), then the load drops back to `LOW` of capacity for the rest.
Cube's queue is bench/sim/queue.py's FIFO with the backlog carried over time, and Cube's one-hour
orphan timeout (a job still waiting an hour after its post is dropped and reports
`missing_partition`). Freshness is counted from Cube's side, not from what the code claims: a
mutation is fresh when the first build of its partition that *started* after the mutation was
received is done; a mutation with no such build is uncovered."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "scale.md"
PLOT = ROOT / "docs" / "scale-overload.png"
OLD_COMMIT = "8feeac0"  # main before issue 16's load-aware refresh (h17's simulation of the real code)
# The rows: (name, code, build budget: None = the deployed default, 4 jobs a build slot; 0 = no admission)
VARIANTS = {
    "today": ("today", None),
    "new": ("new", None),
    "new-budget-0": ("new", 0),
}
LABELS = {
    "today": "today (8feeac0)",
    "new": "load-aware (new)",
    "new-budget-0": "load-aware, admission off (budget 0)",
}
FACTORS = (1.0, 3.0, 10.0)
SEEDS = (7, 8, 9)
LOW = 0.3  # the load before and after the peak hour, as a share of capacity
BIN_S = 300.0  # the plot's bins of mutation time
ORPHAN_S = 3_600.0  # Cube drops a job still waiting an hour after its post (docs/load-aware.md)
DRAIN_HORIZON_S = 12 * 3_600.0  # after the last mutation, messages are delivered until nothing is left


@dataclass(frozen=True)
class Shape:
    """The overload scenario (seconds; rates per second)."""

    slots: int = 2  # Cube's build concurrency for the data source
    build_s: float = 2.0  # slot time per partition build
    tenant_rate: float = 0.05  # mutations per second of one tenant (180 an hour)
    window_s: float = 30.0  # CUBE_PREAGG_DEBOUNCE_MS / 1000
    before_s: float = 600.0  # quiet start
    peak_s: float = 3_600.0  # the peak hour
    after_s: float = 5_400.0  # the load dropped back
    build_timeout_s: float = 1_800.0  # CUBE_PREAGG_BUILD_TIMEOUT_MS / 1000 (the template's default)

    @property
    def capacity(self) -> float:
        """Partition builds per second Cube's slots serve."""
        return self.slots / self.build_s

    @property
    def end_s(self) -> float:
        return self.before_s + self.peak_s + self.after_s


@dataclass(frozen=True)
class Case:
    code: str  # a VARIANTS name, or calibrate
    factor: float
    seed: int
    tenants: int  # in the peak hour
    low_tenants: int  # before and after it
    shape: Shape
    budget: int | None = None  # CUBE_PREAGG_BUILD_BUDGET (None: the default)


# --------------------------------------------------------------------------- one run (in its own process)


def scenario(shape: Shape, tenants: int, seed: int, *, slots: int | None = None, build_s: float | None = None) -> Any:
    from bench.sim.workload import FLAT, Scenario  # noqa: PLC0415

    return Scenario(
        name="overload", tenants=tenants, mutations_per_tenant_day=shape.tenant_rate * 86_400, zipf_s=0.0,
        profile=FLAT, entity_types=3, window_s=shape.window_s, partition_precise=True, preagg_partitions=12,
        newest_share=0.8, build_s=shape.build_s if build_s is None else build_s,
        cube_concurrency=shape.slots if slots is None else slots, build_timeout_s=shape.build_timeout_s, seed=seed,
    )  # fmt: skip


def schedule(sc: Any, phases: Sequence[tuple[float, float, int]], rate: float) -> list[Any]:
    """Key-batches of `tenants` identical tenants mutating at `rate` each, per phase (start, end,
    tenants: the first n of them), sorted by flush time."""
    from bench.sim.workload import key_batches  # noqa: PLC0415

    rng = np.random.default_rng(sc.seed)
    out = []
    for start, end, n in phases:
        if n <= 0 or end <= start:
            continue
        tenants = np.arange(n)
        lam = np.full(n * sc.entity_types, rate / sc.entity_types)
        part_rates = np.full(sc.partitions, n * rate / sc.partitions)
        out += key_batches(
            sc, lam, np.repeat(tenants, sc.entity_types), np.tile(np.arange(sc.entity_types), n), start, end - start,
            part_rates, np.zeros(n, dtype=int), rng,
        )  # fmt: skip
    out.sort(key=lambda b: (b.flush_s, b.partition))
    return out


def run_case(case: Case) -> dict[str, Any]:
    """One (code, factor, seed) through the `handler` package on sys.path."""
    import handler  # noqa: PLC0415

    logging.getLogger("handler").setLevel(logging.CRITICAL)  # simulated failures and dead letters log lines
    from bench.sim.engine import Meter, SliceSetup, play_slice, tenant_id  # noqa: PLC0415
    from bench.sim.queue import CubeQueue  # noqa: PLC0415
    from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415

    began = time.perf_counter()
    shape = case.shape
    if case.code == "calibrate":  # enough slots and quick builds: Cube keeps up
        sc = scenario(shape, case.tenants, case.seed, slots=1_000, build_s=0.01)
        phases = [(0.0, shape.peak_s / 2, case.tenants)]
        end = shape.peak_s / 2
    else:
        sc = scenario(shape, case.tenants, case.seed).with_(build_budget=case.budget)
        p0, p1 = shape.before_s, shape.before_s + shape.peak_s
        phases = [(0.0, p0, case.low_tenants), (p0, p1, case.tenants), (p1, shape.end_s, case.low_tenants)]
        end = shape.end_s
    batches = schedule(sc, phases, shape.tenant_rate)
    n = max(case.tenants, case.low_tenants)
    meter = Meter({tenant_id(i): 1.0 for i in range(n)})
    queue = CubeQueue(sc.cube_concurrency, sc.build_s, orphan_s=ORPHAN_S)
    builds: list[tuple[str, str, int, float, float, float]] = []
    telemetry = CountingTelemetry()
    setup = SliceSetup(sc, meter, {i: 1.0 for i in range(n)}, 1.0, np.random.default_rng(case.seed + 3),
                       queue=queue, builds=builds, telemetry=telemetry)  # fmt: skip
    coverage = play_slice(setup, batches, 0.0, end + DRAIN_HORIZON_S, 0)
    sim_s = time.perf_counter() - began
    peak = (shape.before_s, shape.before_s + shape.peak_s)
    fresh = freshness(coverage.arrivals, builds, _cubes(sc), peak, 2 * shape.window_s)
    depth = queue_depth(builds)
    return {
        "code": case.code,
        "handler": str(Path(handler.__file__).parent),
        "factor": case.factor,
        "seed": case.seed,
        "tenants": case.tenants,
        "low_tenants": case.low_tenants,
        "mutations": float(sum(a[5] for a in coverage.arrivals)),
        "counts": dict(meter.counts),
        "telemetry": {k: v for k, v in telemetry.counts.items() if "[" not in k},
        "queue_max_builds": max(depth, default=0.0),
        "queue_max_wait_s": max((w for _, w in queue.samples), default=0.0),
        "fresh": fresh,
        "wall_s": sim_s,
    }


def queue_depth(builds: Sequence[tuple[str, str, int, float, float, float]]) -> list[int]:
    """Partition builds in Cube's queue (waiting or building) just after each post."""
    events = sorted([(b[3], 1) for b in builds] + [(b[5], -1) for b in builds], key=lambda e: (e[0], e[1]))
    depth, out = 0, []
    for _, step in events:
        depth += step
        if step > 0:
            out.append(depth)
    return out


def _cubes(sc: Any) -> list[str]:
    from bench.sim.engine import target_names  # noqa: PLC0415

    return target_names(sc)


def freshness(
    arrivals: Sequence[tuple[int, int, int, float, float, int]],
    builds: Sequence[tuple[str, str, int, float, float, float]],
    cubes: Sequence[str],
    peak: tuple[float, float] = (0.0, 0.0),
    settled_s: float = 60.0,
) -> dict[str, Any]:
    """Per group of records (a key-batch's records of one month): the lag from its oldest record to
    the end of the first build of that partition that started at or after the batch reached the
    function (its flush); no such build: uncovered. Also the p99 of the mutations in the peak and
    after it, and how long after the peak's end the p99 per bin stays at or below `settled_s`."""
    from bench.sim.engine import BuildIndex, tenant_id  # noqa: PLC0415

    index = BuildIndex(builds)
    times, lags, weights = [], [], []
    uncovered = 0
    for tenant, etype, month, oldest, flush, n in arrivals:
        found = index.covering((tenant_id(tenant), cubes[etype], month), flush)
        if found is None:
            uncovered += n
            continue
        times.append(oldest)
        lags.append(found[1] - oldest)
        weights.append(n)
    lag = np.repeat(np.array(lags), np.array(weights, dtype=int)) if lags else np.zeros(0)
    t = np.repeat(np.array(times), np.array(weights, dtype=int)) if times else np.zeros(0)
    bins: list[list[float]] = []
    if t.size:
        for b0 in np.arange(0.0, float(t.max()) + BIN_S, BIN_S):
            sel = lag[(t >= b0) & (t < b0 + BIN_S)]
            if sel.size:
                bins.append([float(b0), float(np.percentile(sel, 50)), float(np.percentile(sel, 99)), float(sel.max())])
    pct = (lambda q: float(np.percentile(lag, q))) if lag.size else (lambda q: math.nan)
    in_peak = lag[(t >= peak[0]) & (t < peak[1])]
    after = lag[t >= peak[1]]
    late = [b[0] + BIN_S for b in bins if b[2] > settled_s and b[0] + BIN_S > peak[1]]
    if bins and late and late[-1] == bins[-1][0] + BIN_S:  # still late in the last bin of mutations
        late.append(math.inf)
    return {
        "p50": pct(50),
        "p99": pct(99),
        "max": float(lag.max()) if lag.size else math.nan,
        "p99_peak": float(np.percentile(in_peak, 99)) if in_peak.size else math.nan,
        "p99_after": float(np.percentile(after, 99)) if after.size else math.nan,
        "settled_after_s": max(0.0, max(late, default=peak[1]) - peak[1]),
        "uncovered": uncovered,
        "bins": bins,
    }


# --------------------------------------------------------------------------- the driver


def code_trees(tmp: Path) -> dict[str, Path]:
    """The src/ of each code version: this checkout's, and OLD_COMMIT's extracted (unmodified)."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{OLD_COMMIT}^{{commit}}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if commit.returncode != 0:
        raise SystemExit(f"overload: commit {OLD_COMMIT} (today's code) is not in this clone: fetch main's history")
    target = tmp / "today"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit.stdout.strip(), "src"], capture_output=True,
                             check=True)  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return {"today": target / "src", "new": ROOT / "src", "calibrate": ROOT / "src"}


def tree_of(case: Case, trees: dict[str, Path]) -> Path:
    return trees[VARIANTS[case.code][0] if case.code in VARIANTS else case.code]


def run_in_process(case: Case, src: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sim.overload", "--case", json.dumps(asdict(case))],
        env=env, capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(
            f"overload case {case.code} x{case.factor:g} seed {case.seed} failed:\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["handler"]).resolve() != (src / "handler").resolve():
        raise RuntimeError(f"overload case {case.code}: ran {result['handler']}, not {src / 'handler'}")
    return result


def demand_per_tenant(shape: Shape, trees: dict[str, Path], seed: int) -> float:
    """Partition builds per second one tenant's refreshes ask for when Cube keeps up (this checkout's
    code, enough slots, 0.01 s builds), over half an hour of 40 tenants."""
    tenants = 40
    r = run_in_process(Case("calibrate", 0.0, seed, tenants, 0, shape), trees["calibrate"])
    return float(r["counts"].get("partitions_built", 0.0)) / tenants / (shape.peak_s / 2)


def cases(shape: Shape, per_tenant: float, factors: Sequence[float], seeds: Sequence[int]) -> list[Case]:
    out = []
    low = max(1, round(LOW * shape.capacity / per_tenant))
    for factor in factors:
        tenants = max(1, round(factor * shape.capacity / per_tenant))
        for seed in seeds:
            out += [Case(name, factor, seed, tenants, low, shape, budget) for name, (_, budget) in VARIANTS.items()]
    return out


# --------------------------------------------------------------------------- the report


def _span(values: Sequence[float], fmt: Any) -> str:
    from bench.sim.report import span  # noqa: PLC0415

    return span(values, fmt)


def table(results: Sequence[dict[str, Any]], shape: Shape, per_tenant: float) -> str:
    from bench.sim.report import big, secs  # noqa: PLC0415

    def c(rs: Sequence[dict[str, Any]], key: str) -> str:
        return _span([r["counts"].get(key, 0.0) for r in rs], big)

    def minutes(x: float) -> str:
        return f"not by the load's end ({shape.after_s / 60:g} min)" if math.isinf(x) else f"{x:.0f} min"

    def t(rs: Sequence[dict[str, Any]], key: str) -> str:
        return _span([r["telemetry"].get(key, 0.0) for r in rs], big)

    rows = [
        "| overload | code | tenants: peak / before and after | mutations | Cube job POSTs | partitions built "
        "| Cube queue max: builds / wait | re-triggers | dead letters | jobs Cube dropped "
        "(1 h) | FreshnessLag p50 / p99 / max | p99: peak hour / after it | 5-min p99 back under 2 W, after the peak "
        "| uncovered mutations "
        "| ride-alongs / keys deferred | DynamoDB writes (budget's) / reads | SQS "
        "messages sent | Cube `get` polls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    factors = sorted({r["factor"] for r in results})
    for factor in factors:
        for code, label in LABELS.items():
            rs = [r for r in results if r["factor"] == factor and r["code"] == code]
            if not rs:
                continue
            rows.append(
                f"| {factor:g}x | {label} | {rs[0]['tenants']:,} / {rs[0]['low_tenants']:,} "
                f"| {_span([r['mutations'] for r in rs], big)} | {c(rs, 'cube_posts')} "
                f"| {c(rs, 'partitions_built')} "
                f"| {_span([r['queue_max_builds'] for r in rs], big)} / "
                f"{_span([r['queue_max_wait_s'] for r in rs], secs)} "
                f"| {c(rs, 'retrigger_sends')} | {c(rs, 'dead_letters')} | {c(rs, 'cube_dropped')} "
                f"| {_span([r['fresh']['p50'] for r in rs], secs)} / {_span([r['fresh']['p99'] for r in rs], secs)} / "
                f"{_span([r['fresh']['max'] for r in rs], secs)} "
                f"| {_span([r['fresh']['p99_peak'] for r in rs], secs)} / "
                f"{_span([r['fresh']['p99_after'] for r in rs], secs)} "
                f"| {_span([r['fresh']['settled_after_s'] / 60 for r in rs], minutes)} "
                f"| {_span([r['fresh']['uncovered'] for r in rs], big)} "
                f"| {t(rs, 'RideAlongs')} / {t(rs, 'KeysDeferred')} "
                f"| {c(rs, 'ddb_writes')} ({c(rs, 'budget_writes')}) / {c(rs, 'ddb_reads')} | {c(rs, 'sqs_sends')} "
                f"| {c(rs, 'cube_gets')} |"
            )  # fmt: skip
    seeds = sorted({r["seed"] for r in results})
    head = (
        f"Cube: {shape.slots} build slots, {shape.build_s:g} s a partition build: capacity "
        f"{shape.capacity * 3600:,.0f} partition builds an hour. Tenants: {shape.tenant_rate * 3600:g} mutations an "
        f"hour each, 3 entity types, partition-precise routes over 12 monthly partitions (80 % in the newest), "
        f"W = {shape.window_s:g} s, build timeout {shape.build_timeout_s / 60:g} min. Demand measured with Cube "
        f"keeping up: {per_tenant * 3600:.1f} partition builds an hour per tenant, so "
        f"{shape.capacity / per_tenant:.1f} tenants fill the slots. Schedule: {shape.before_s / 60:g} min at "
        f"{LOW:g}x, the peak hour at the factor, {shape.after_s / 60:g} min at {LOW:g}x, then delivery "
        f"until nothing is left. Seeds {', '.join(map(str, seeds))} (ranges: lowest to "
        "highest); every count is for the whole run."
    )
    return head + "\n\n" + "\n".join(rows)


def plot(results: Sequence[dict[str, Any]], shape: Shape, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    factors = sorted({r["factor"] for r in results})
    seed = min(r["seed"] for r in results)
    fig, axes = plt.subplots(1, len(factors), figsize=(4.2 * len(factors), 4.2), sharey=True, squeeze=False)
    styles = {"today": ("#c0392b", "--"), "new": ("#1f77b4", "-"), "new-budget-0": ("#7f7f7f", ":")}
    for ax, factor in zip(axes[0], factors, strict=True):
        ax.axvspan(shape.before_s / 60, (shape.before_s + shape.peak_s) / 60, color="#f4d03f", alpha=0.2,
                   label="peak hour")  # fmt: skip
        for code, label in LABELS.items():
            rs = [r for r in results if r["factor"] == factor and r["code"] == code and r["seed"] == seed]
            if not rs:
                continue
            color, line = styles[code]
            bins = np.array(rs[0]["fresh"]["bins"])
            if bins.size:
                x = (bins[:, 0] + BIN_S / 2) / 60
                ax.plot(x, np.maximum(bins[:, 2], 0.1), color=color, linestyle=line, lw=1.8, label=f"{label}: p99")
                ax.plot(x, np.maximum(bins[:, 1], 0.1), color=color, linestyle=line, lw=0.8, alpha=0.6,
                        label=f"{label}: p50")  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"demand {factor:g}x capacity in the peak hour", fontsize=10)
        ax.set_xlabel("mutation time, minutes from the start")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"FreshnessLag per {BIN_S / 60:g} min of mutations, s (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Overload: {shape.slots} build slots, {shape.build_s:g} s a build, seed {seed}", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one run, in a process of its own
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--factors", type=float, nargs="+", default=list(FACTORS))
    ap.add_argument("--quick", action="store_true", help="one seed, 1x and 3x, nothing written")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.case:
        data = json.loads(args.case)
        data["shape"] = Shape(**data["shape"])
        print(json.dumps(run_case(Case(**data))))
        return 0
    if args.quick:
        args.seeds, args.factors, args.no_write = args.seeds[:1], [f for f in args.factors if f <= 3], True
    if not args.no_write:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            raise SystemExit("overload: matplotlib is missing: run `make scale-overload`") from None
    began = time.perf_counter()
    shape = Shape()
    print(f"# overload simulation, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        trees = code_trees(Path(tmp))
        per_tenant = demand_per_tenant(shape, trees, args.seeds[0])
        print(f"demand when Cube keeps up: {per_tenant * 3600:.2f} partition builds an hour per tenant", flush=True)
        todo = sorted(cases(shape, per_tenant, args.factors, args.seeds), key=lambda c: -c.factor)
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            results = list(pool.map(lambda c: run_in_process(c, tree_of(c, trees)), todo))
    for r in sorted(results, key=lambda r: (r["factor"], r["code"], r["seed"])):
        print(f"  {r['code']:>5} x{r['factor']:g} seed {r['seed']}: {r['wall_s']:.0f} s, "
              f"p99 {r['fresh']['p99']:.0f} s, uncovered {r['fresh']['uncovered']}", flush=True)  # fmt: skip
    body = table(results, shape, per_tenant)
    total = time.perf_counter() - began
    run_line = (
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make scale-overload` in {total:.0f} s on a "
        f"{os.cpu_count()}-core machine (load average {os.getloadavg()[0]:.1f} at the end), Python "
        f"{platform.python_version()}, {args.workers} processes; today's code: commit {OLD_COMMIT}'s src/."
    )
    print("\n" + body + "\n\n" + run_line)
    if not args.no_write:
        from bench.sim.report import replace_block  # noqa: PLC0415

        plot(results, shape, PLOT)
        text = replace_block(DOC.read_text(), "overload", body)
        DOC.write_text(replace_block(text, "overload-run", run_line))
        print("\nwrote", DOC, PLOT, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
