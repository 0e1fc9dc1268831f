"""Regenerates docs/scale.md's tables and docs/scale-*.png (`make scale`), or a team's own report from
its scenario file (`make scale CONFIG=ours.yaml`, written to scale-out/<name>/).

    PYTHONPATH=src:. .venv/bin/python -m bench.sim.report [--config FILE] [--quick] [--no-write] [--out DIR]

Runs the scenario's designs (the event-driven ones through the real code, once per seed), prints every
table, and rewrites the blocks between `<!-- sim:NAME -->` and `<!-- /sim:NAME -->` in docs/scale.md
(the prose around them is hand-written); with another scenario file, writes a report of its own.
`--quick` runs small budgets and two sizes (a minute or two) and writes nothing unless asked."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.sim import analysis as A
from bench.sim.config import DEFAULT, SOURCES, Config, ConfigError, Pricing, load
from bench.sim.engine import run_ours
from bench.sim.workload import HOUR_S, Scenario, flush_interval, partition_rates, tenant_rates

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "scale.md"
SLOW_WINDOW_S = 300.0  # a longer W, to show what it buys
# Cube's refresh worker variants in the tables: (kind, every). Cube's default for a pre-aggregation
# without a refresh key is `every: 1 hour` (BaseQuery.preAggregationInvalidateKeyQueries).
WORKERS: tuple[tuple[str, float], ...] = (
    ("every", 3600.0),
    ("every", 60.0),
    ("sql", 60.0),
    ("filter", 60.0),
    ("incremental", 60.0),
)


# --------------------------------------------------------------------------- formatting


def money(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if x >= 100:
        return f"${x:,.0f}"
    return f"${x:,.2f}"


def big(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def secs(x: float) -> str:
    if math.isinf(x):
        return "never"
    if math.isnan(x):
        return "n/a"
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 120:
        return f"{x / 60:.1f} min"
    return f"{x:.1f} s"


def span(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """A figure over the seeds: one value when they print the same, else the lowest and highest joined
    by an en dash."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}\u2013{hi}"


# --------------------------------------------------------------------------- the runs


@dataclasses.dataclass
class Variant:
    """The designs of one scenario for one seed."""

    seed: int
    designs: list[A.Design]
    info: str
    wall_s: float


def _strip(d: A.Design) -> A.Design:
    """Keep a design small enough to send between processes (timelines thinned)."""
    if d.timeline is not None and d.timeline[0].size > 20_000:
        idx = np.random.default_rng(0).choice(d.timeline[0].size, 20_000, replace=False)
        d.timeline = (d.timeline[0][idx], d.timeline[1][idx])
    return d


WHOLE = "event-driven (this project), whole-target refreshes"
PRECISE = "event-driven, partition-precise (`partitionBy`)"
SLOW = f"event-driven, partition-precise, W = {SLOW_WINDOW_S / 60:.0f} min"


def run_event_driven(sc: Scenario, *, slow: bool = True) -> tuple[list[A.Design], str, float, list[float]]:
    """The event-driven runs (whole target, partition-precise, and partition-precise with a long W)
    and the seed's design on the whole-target run's batches."""
    began = time.perf_counter()
    whole = run_ours(sc)
    precise_sc = sc.with_(partition_precise=True)
    precise = run_ours(precise_sc, keep_batches=False)
    designs = [A.ours(sc, whole, WHOLE), A.ours(precise_sc, precise, PRECISE)]
    if slow:
        slow_sc = precise_sc.with_(window_s=SLOW_WINDOW_S)
        designs.append(A.ours(slow_sc, run_ours(slow_sc, keep_batches=False), SLOW))
    designs.append(A.seed_design(sc, whole, sc.partitions))
    detail = [whole.counts.get(k, 0.0) for k in DETAIL_KEYS] + [whole.msk_invocations, whole.records]
    return [_strip(d) for d in designs], run_info(sc, whole), time.perf_counter() - began, detail


DETAIL_KEYS = (
    "decisions", "sqs_sends", "sqs_invocations", "verify_sends", "retrigger_sends", "dead_letters", "cube_posts",
    "cube_gets", "partitions_built", "ddb_writes", "verify_writes", "ddb_reads",
)  # fmt: skip


def run_sweep_size(sc: Scenario) -> tuple[list[A.Design], str, float, list[float]]:
    return run_event_driven(sc, slow=False)


def run_workers(sc: Scenario, pricing: Pricing) -> list[A.Design]:
    pop = A.population(sc)
    return [_strip(A.cube_worker(sc, kind, every, pricing, pop)) for kind, every in WORKERS]


def run_info(sc: Scenario, r: object) -> str:
    p = r.plan  # type: ignore[attr-defined]
    full = int((p.weights == 1).sum())
    sampled = f"{len(p.tenants):,} of {sc.tenants:,} tenants (the {full:,} busiest in full, the rest sampled)"
    if len(p.tenants) == sc.tenants:
        sampled = f"all {sc.tenants:,} tenants"
    return (
        f"{sampled}; {p.slice_s} s of every hour through the real code (+{p.warmup_s} s warm-up), counts x "
        f"{p.hour_scale:.1f}; {big(p.estimated_decisions)} decisions (the full day: {big(p.full_decisions)})"
    )


# --------------------------------------------------------------------------- tables


def comparison_table(sc: Scenario, variants: Sequence[Variant], pricing: Pricing) -> str:
    n = sc.cube_concurrency
    rows = [
        "| design | AWS $/month | warehouse queries/h (day average) | partitions built/day | warehouse busy h/day "
        f"| peak-hour load: utilisation of {n} slots / slots needed | freshness p50 / p99, {n} slots "
        "| freshness p50 / p99, enough slots | mutations never refreshed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, first in enumerate(variants[0].designs):
        ds = [v.designs[i] for v in variants]
        rows.append(
            f"| {first.name} | {span([d.aws_monthly(pricing) for d in ds], money)} "
            f"| {span([d.warehouse_queries / 24 for d in ds], big)} | {span([d.partitions_built for d in ds], big)} "
            f"| {span([d.warehouse_busy_s / 3600 for d in ds], lambda x: f'{x:,.1f}')} "
            f"| {span([d.peak_utilisation for d in ds], lambda x: f'{x:.2f}')} / "
            f"{span([d.slots_needed for d in ds], lambda x: f'{x:,.0f}')} "
            f"| {span([d.lag_p50 for d in ds], secs)} / {span([d.lag_p99 for d in ds], secs)} "
            f"| {span([d.sized_p50 for d in ds], secs)} / {span([d.sized_p99 for d in ds], secs)} "
            f"| {span([d.stale_share * 100 for d in ds], lambda x: f'{x:.1f}%')} |"
        )
    return "\n".join(rows)


def warehouse_table(sc: Scenario, variants: Sequence[Variant], pricing: Pricing) -> str:
    w = pricing.warehouse
    rows = [
        f"| design | per busy hour (${w.busy_hour_usd:g}/h of build and query time) | per second while running "
        f"(${w.per_second_usd_per_hour:g}/h, {w.auto_suspend_s:.0f} s auto-suspend, 60 s minimum) "
        f"| per TiB scanned (${w.usd_per_tib:g}/TiB; {w.bytes_per_build / 1e9:g} GB a build, "
        f"{w.bytes_per_key_query / 1e6:g} MB a key query) | flat provisioned (${w.provisioned_usd_per_hour:g}/h) |",
        "|---|---|---|---|---|",
    ]
    for i, first in enumerate(variants[0].designs):
        ms = [v.designs[i].warehouse_monthly(w, sc.cube_concurrency) for v in variants]
        cells = [span([m[k] for m in ms], money) for k in ("busy_hour", "per_second", "bytes_scanned", "provisioned")]
        rows.append(f"| {first.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def aws_options_table(sc: Scenario, variants: Sequence[Variant], pricing: Pricing) -> str:
    """The event-driven design's AWS bill under each event source mapping option."""
    options = [
        ("provisioned mode, 1 poller of its own (the template's default)", dataclasses.replace(pricing,
         esm_mode="provisioned", poller_group_mappings=1),
         "nothing: partial batch responses, retries with a limit, bisection, on-failure destination (Kafka/S3)"),
        ("provisioned mode, poller group shared by 10 mappings", dataclasses.replace(pricing,
         esm_mode="provisioned", poller_group_mappings=10),
         "the same; the group's pollers are shared (aggregate `MaximumPollers` <= 2,000), so a busy mapping "
         "can take capacity from the others"),
        ("provisioned mode, poller group shared by 100 mappings (the most a group holds)", dataclasses.replace(
            pricing, esm_mode="provisioned", poller_group_mappings=100), "the same, shared 100 ways"),
        ("on-demand mode (no `ProvisionedPollerConfig`)", dataclasses.replace(pricing, esm_mode="on_demand"),
         "partial batch responses, `MaximumRetryAttempts`, `MaximumRecordAgeInSeconds`, bisection and the "
         "on-failure destination: a failing batch is retried until its records expire, blocking its partition, "
         "and nothing is dead-lettered"),
    ]  # fmt: skip
    rows = [
        "| event source mapping | AWS $/month, whole-target | AWS $/month, partition-precise | what it gives up |",
        "|---|---|---|---|",
    ]
    for label, p, gives_up in options:
        whole = span([v.designs[0].aws_monthly(p) for v in variants], money)
        precise = span([v.designs[1].aws_monthly(p) for v in variants], money)
        rows.append(f"| {label} | {whole} | {precise} | {gives_up} |")
    return "\n".join(rows)


def detail_table(sc: Scenario, details: Sequence[list[float]], variants: Sequence[Variant], pricing: Pricing) -> str:
    idx = {k: i for i, k in enumerate(DETAIL_KEYS)}

    def cell(key: str) -> str:
        return span([d[idx[key]] for d in details], big)

    ds = [v.designs[0] for v in variants]
    rows = [
        "| figure | per day | source |",
        "|---|---|---|",
        f"| mutations (records on the topic) | {span([d[-1] for d in details], big)} | workload |",
        f"| MSK batches = Lambda invocations | {span([d[-2] for d in details], big)} | batching model |",
        f"| debounce decisions (key x batch) | {cell('decisions')} | real code |",
        f"| SQS messages sent: all / verify / retrigger | {cell('sqs_sends')} / {cell('verify_sends')} / "
        f"{cell('retrigger_sends')} | real code (trailing, verify and retrigger share the refresh queue) |",
        f"| SQS invocations | {cell('sqs_invocations')} | real code + delivery model |",
        f"| Cube job POSTs / `get` polls | {cell('cube_posts')} / {cell('cube_gets')} | real code |",
        f"| partitions built | {cell('partitions_built')} | real code x the rollups of each target |",
        f"| DynamoDB writes: all / verification's (`record_jobs`, `record_build`) | {cell('ddb_writes')} / "
        f"{cell('verify_writes')} | real code (failed conditions billed too) |",
        f"| DynamoDB reads (verification reads the key before settling) | {cell('ddb_reads')} | real code |",
        f"| builds dead-lettered | {cell('dead_letters')} | real code |",
        f"| freshness p50 / p99, {sc.cube_concurrency} slots | {span([d.lag_p50 for d in ds], secs)} / "
        f"{span([d.lag_p99 for d in ds], secs)} | real code + build queue |",
        f"| longest queue wait of the day | {span([d.max_wait_s for d in ds], secs)} | build queue |",
    ]
    per = [d.aws_per_day(pricing) for d in ds]
    rows += [
        "",
        "| cost per month | $ |",
        "|---|---|",
        f"| Lambda (requests + GB-s, arm64) | {span([p['lambda'] * A.DAYS_PER_MONTH for p in per], money)} |",
        f"| DynamoDB on-demand | {span([p['dynamodb'] * A.DAYS_PER_MONTH for p in per], money)} |",
        f"| SQS | {span([p['sqs'] * A.DAYS_PER_MONTH for p in per], money)} |",
        f"| provisioned poller ({pricing.minimum_pollers}, assumed ${pricing.poller_usd_per_hour}/h) | "
        f"{money(pricing.poller_usd_per_day() * A.DAYS_PER_MONTH)} |",
        f"| **AWS total** | **{span([d.aws_monthly(pricing) for d in ds], money)}** |",
    ]
    return "\n".join(rows)


def limits_table(sc: Scenario, r_counts: dict[str, float], design: A.Design) -> str:
    """Where each AWS limit is reached for this scenario's shape, computed from the scenario and the run."""
    rates = tenant_rates(sc)
    peak = max(sc.profile)
    part = partition_rates(sc, rates) * peak
    iv = min(flush_interval(sc, float(x)) for x in part)
    vf = max(1.0, A.FULL_VCPU_MB / A.MEMORY_MB)
    keys = min(sc.batch_size, sc.tenants * sc.entity_types)
    full_batch_ms = (
        (A.CPU_MS_PER_INVOCATION + sc.batch_size * A.CPU_US_PER_RECORD / 1000) * vf
        + 2 * A.DDB_WRITE_MS * math.ceil(keys / A.IO_THREADS)
        + A.CUBE_POST_MS
    )
    per_partition = sc.batch_size / (full_batch_ms / 1000)
    max_pollers = 2  # template.yaml MaximumPollers default
    concurrent = min(sc.partitions, 5 * max_pollers)
    peak_records_s = float(rates.sum() * peak)
    msk_cap = per_partition * concurrent
    key_parts = 1 if sc.kafka_key == "tenant" else sc.partitions
    worst_key_wcu = 2 * key_parts / iv
    sqs_peak = r_counts.get("sqs_sends", 0) / 24 * peak / HOUR_S
    sqs_cap = 5 * 10 / 0.1
    rows = [
        (
            "DynamoDB: 1,000 write units/s per partition key",
            f"worst key ~{worst_key_wcu:.0f} WCU/s (2 writes x {key_parts} partitions / {iv:.2f} s batches)",
            "partitions a key's records spread over / batch interval >= 500",
            "a throttled write is `StoreUnavailable`: the key's records fail and are retried",
        ),
        (
            f"Lambda: one invocation at a time per Kafka partition; <= 5 per poller (MaximumPollers {max_pollers})",
            f"{peak_records_s:,.0f} records/s; a partition takes ~{per_partition:,.0f}/s, {concurrent} at a time: "
            f"{msk_cap:,.0f}/s",
            f"topic > {msk_cap:,.0f} records/s, or one partition > {per_partition:,.0f}/s",
            "OffsetLag grows and refreshes are late by the backlog; nothing is lost (offset-lag alarm)",
        ),
        (
            "SQS: the refresh queue's consumer (MaximumConcurrency 5 x BatchSize 10); ~120,000 in flight",
            f"peak ~{sqs_peak:,.1f} messages/s sent (trailing, verify, retrigger) against ~{sqs_cap:,.0f}/s consumed"
            + (" (REACHED)" if sqs_peak > sqs_cap else ""),
            f"more than ~{sqs_cap:,.0f} messages/s (at 100 ms an invocation); the in-flight limit cannot be "
            "reached through the mapping, the consumer saturates first",
            "trailing refreshes and verifications wait in the queue, late by the backlog (not simulated: the "
            "simulation delivers them on time)",
        ),
        (
            f"Cube's build queue ({sc.cube_concurrency} slots, {sc.build_s:g} s a partition)",
            f"peak-hour utilisation {design.peak_utilisation:.2f}; longest wait of the day {secs(design.max_wait_s)}",
            "see [where it breaks](#where-it-breaks): computed from runs at every size, not extrapolated",
            "the backlog carries on: builds, so freshness, are late by it; verification polls it, at most once a "
            "minute, and a build still queued is alive up to 65 min (Cube drops a job after an hour)",
        ),
    ]
    out = ["| limit | this scenario, peak hour | reached when | what the design does then |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- breaking points


def peak_builds_per_s(d: A.Design, sc: Scenario) -> float:
    """Peak-hour builds per second before any re-trigger feedback (queries counted at their share)."""
    return d.onset_load / sc.build_s


def breaking_points(
    sizes: Sequence[int], loads: dict[str, list[float]], build_times: Sequence[float], sc: Scenario
) -> tuple[str, dict[str, list[float]]]:
    """Tenants at which the peak hour fills the configured slots, for each build time: each design's
    peak-hour builds were simulated at every size; between two simulated sizes the figure is
    interpolated (log-log), never extrapolated past the sizes run."""
    n = sc.cube_concurrency
    header = "| design | " + " | ".join(f"build {b:g} s" for b in build_times) + " |"
    rows = [header, "|---|" + "---|" * len(build_times)]
    found: dict[str, list[float]] = {}
    for name, builds_peak in loads.items():  # builds per second at the peak hour, per size
        cells, values = [], []
        for b in build_times:
            util = [x * b / n for x in builds_peak]
            value = _crossing(sizes, util)
            values.append(value)
            if value == math.inf:
                cells.append(f"> {sizes[-1]:,}")
            elif value == 0:
                cells.append(f"<= {sizes[0]:,}")
            else:
                cells.append(f"{value:,.0f}")
        found[name] = values
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows), found


def _crossing(sizes: Sequence[int], util: Sequence[float]) -> float:
    if util[0] >= 1:
        return 0.0
    for (x0, u0), (x1, u1) in itertools.pairwise(zip(sizes, util, strict=True)):
        if u0 < 1 <= u1:
            if u0 <= 0:
                return float(x1)
            f = (math.log(1) - math.log(u0)) / (math.log(u1) - math.log(u0))
            return float(math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0))))
    return math.inf


# --------------------------------------------------------------------------- plots

STYLES = {  # distinct colour, marker and line per design; this project drawn last and thickest
    "whole": ("C0", "o", "-", 2.6),
    "precise": ("C2", "s", "--", 2.0),
    "slow": ("C8", "D", ":", 1.6),
    "seed": ("C1", "v", "-.", 1.4),
    "every 1 h": ("C3", "^", "-", 1.2),
    "every 1 min": ("C4", "<", "--", 1.2),
    "sql": ("C5", ">", "-.", 1.2),
    "filter": ("C6", "P", ":", 1.4),
    "incremental": ("C7", "X", "-", 1.0),
}


def style_of(name: str) -> tuple[str, str, str, float]:
    if name.startswith("event-driven (this project)"):
        return STYLES["whole"]
    if "W =" in name:
        return STYLES["slow"]
    if name.startswith("event-driven"):
        return STYLES["precise"]
    if name.startswith("seed"):
        return STYLES["seed"]
    if "FILTER_PARAMS" in name:
        return STYLES["filter"]
    if "incremental" in name:
        return STYLES["incremental"]
    if "`sql`" in name:
        return STYLES["sql"]
    if "every 1 h" in name:
        return STYLES["every 1 h"]
    return STYLES["every 1 min"]


def plots(
    out: Path,
    sc: Scenario,
    pricing: Pricing,
    size_designs: dict[int, dict[str, A.Design]],
    headline: Sequence[Variant],
    rate_points: list[tuple[float, list[A.Design]]],
    window_points: list[tuple[float, A.Design]],
    breaking: dict[str, list[float]],
    build_times: Sequence[float],
    rate_n: int,
) -> list[Path]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []
    names = [d.name for d in headline[0].designs]
    # 1. cost and warehouse work vs tenants; one legend below both panels
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 7.2))
    worker_drawn = False
    for i, name in enumerate(names):
        color, marker, line, width = style_of(name)
        xs = [n for n in sorted(size_designs) if name in size_designs[n]]
        ys = [size_designs[n][name] for n in xs]
        busy = [max(d.warehouse_busy_s / 3600, 1e-3) for d in ys]
        z = 3 if name == WHOLE else 2
        ax2.plot(xs, busy, marker=marker, linestyle=line, color=color, lw=width, label=name, zorder=z, ms=5)
        if ys[0].worker:  # every variant of the worker is one Fargate task: one line, drawn once
            if not worker_drawn:
                ax.plot(xs, [d.aws_monthly(pricing) for d in ys], color="k", lw=1.2, linestyle="-",
                        label="_nolegend_")  # fmt: skip
                ax.annotate("Cube refresh worker, any variant: one Fargate task", (xs[0], ys[0].aws_monthly(pricing)),
                            textcoords="offset points", xytext=(4, 6), fontsize=8)  # fmt: skip
                worker_drawn = True
            continue
        ax.plot(xs, [d.aws_monthly(pricing) for d in ys], marker=marker, linestyle=line, color=color, lw=width,
                zorder=z, ms=5)  # fmt: skip
        vals = [v.designs[i].aws_monthly(pricing) for v in headline]  # the headline's range over the seeds
        mid = float(np.mean(vals))
        ax.errorbar([sc.tenants], [mid], yerr=[[max(0.0, mid - min(vals))], [max(0.0, max(vals) - mid)]],
                    color=color, capsize=4, lw=1)  # fmt: skip
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("tenants (log scale)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("AWS $ / month (log scale)")
    ax.set_title(f"AWS per month: Lambda, DynamoDB, SQS, poller (bars: {len(headline)} seeds)", fontsize=10)
    ax2.set_ylabel("warehouse busy hours / day (log scale)")
    ax2.set_title(f"Warehouse work ({sc.build_s:g} s a partition build)", fontsize=10)
    handles, labels = ax2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    written.append(_save(fig, out / "scale-cost-vs-tenants.png", plt))

    # 2. warehouse queries vs mutation rate
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [x for x, _ in rate_points]
    for i, name in enumerate([d.name for d in rate_points[0][1]]):
        color, marker, line, width = style_of(name)
        ax.plot(xs, [max(ds[i].warehouse_queries / 24, 1) for _, ds in rate_points], marker=marker, linestyle=line,
                color=color, lw=width, label=name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mutations per tenant per day (log scale)")
    ax.set_ylabel("warehouse queries / hour, day average (log scale)")
    ax.set_title(f"Warehouse queries vs mutation rate ({rate_n:,} tenants)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "scale-queries-vs-rate.png", plt))

    # 3. freshness vs W
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [x for x, _ in window_points]
    ax.plot(xs, [d.sized_p50 for _, d in window_points], "o-", color="C0", label="event-driven p50")
    ax.plot(xs, [d.sized_p99 for _, d in window_points], "s--", color="C0", label="event-driven p99")
    ax.plot(xs, [x + 1 for x in xs], ":", color="grey", label="W + 1 s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("debounce window W, s (log scale)")
    ax.set_ylabel("mutation -> partition rebuilt, s (log scale)")
    ax.set_title("Freshness vs W (enough build slots)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "scale-freshness-vs-window.png", plt))

    # 4. the peak day with the configured slots: freshness p99 per 20 minutes, and the queue's wait
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 9.5), sharex=True)
    v = headline[0]
    bins = np.arange(0, 24 * HOUR_S + 1, 1200)
    for d in v.designs:
        if d.timeline is None:
            continue
        color, marker, line, width = style_of(d.name)
        t, lag = d.timeline
        centre, p99 = [], []
        for b0, b1 in itertools.pairwise(bins):
            sel = lag[(t >= b0) & (t < b1)]
            if sel.size >= 5:
                centre.append((b0 + b1) / 2 / HOUR_S)
                p99.append(float(np.percentile(sel, 99)))
        ax.plot(centre, np.maximum(p99, 0.1), linestyle=line, color=color, lw=width, marker=marker, ms=3,
                markevery=6, label=d.name)  # fmt: skip
        if d.backlog is not None:
            bt, bw = d.backlog
            mids, peaks = [], []
            for b0, b1 in itertools.pairwise(bins):
                sel = bw[(bt >= b0) & (bt < b1)]
                if sel.size:
                    mids.append((b0 + b1) / 2 / HOUR_S)
                    peaks.append(max(float(sel.max()), 0.01))
            ax2.plot(mids, peaks, linestyle=line, color=color, lw=width, marker=marker, ms=3, markevery=6)
    ax.set_yscale("log")
    ax.set_ylabel("freshness p99 per 20 min, s (log scale)")
    ax.set_title(f"The day with {sc.cube_concurrency} build slots: {sc.tenants:,} tenants, {sc.build_s:g} s a build, "
                 f"seed {v.seed}")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax2.set_yscale("log")
    ax2.set_ylabel("longest build queue wait per 20 min, s (log scale)")
    ax2.set_xlabel("hour of the day (UTC)")
    ax2.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    written.append(_save(fig, out / "scale-peak-day.png", plt))

    # 5. breaking points vs build time
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, values in breaking.items():
        color, marker, line, width = style_of(name)
        pts = [(b, x) for b, x in zip(build_times, values, strict=True) if 0 < x < math.inf]
        if pts:
            ax.plot([b for b, _ in pts], [x for _, x in pts], marker=marker, linestyle=line, color=color, lw=width,
                    label=name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("build slot time per partition, s (log scale)")
    ax.set_ylabel("tenants at which the peak hour fills the slots (log scale)")
    ax.set_title(f"Where {sc.cube_concurrency} build slots run out (outside the simulated sizes: left out)",
                 fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=7, frameon=False)
    fig.set_size_inches(8, 7.5)
    fig.tight_layout(rect=(0, 0.27, 1, 1))
    written.append(_save(fig, out / "scale-breaking-points.png", plt))
    return written


def _save(fig: object, path: Path, plt: object) -> Path:
    fig.savefig(path, dpi=100)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return path


# --------------------------------------------------------------------------- main


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- sim:{name} -->\n).*?(<!-- /sim:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"the report has no <!-- sim:{name} --> block: add it, then rerun")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def _map(pool: ProcessPoolExecutor | None, fn: Callable[..., object], items: Sequence[object]) -> list[object]:
    if pool is None:
        return [fn(i) for i in items]
    return list(pool.map(fn, items))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.environ.get("CONFIG") or None, help="scenario file (YAML)")
    ap.add_argument("--quick", action="store_true", help="small budgets, few sizes; writes nothing unless --write")
    ap.add_argument("--write", action="store_true", help="with --quick: write anyway")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=None, help="folder of a scenario's own report (default scale-out/<name>)")
    args = ap.parse_args(argv)
    if "handler" not in sys.modules and not any(Path(p, "handler").is_dir() for p in sys.path if p):
        raise SystemExit("run with PYTHONPATH=src:. (make scale does)")
    try:
        cfg = load(args.config)
    except ConfigError as error:
        raise SystemExit(f"scale: {error}") from None
    own = cfg.source.resolve() != DEFAULT.resolve()
    wall0 = time.perf_counter()
    write = (not args.quick or args.write) and not args.no_write
    if write:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            raise SystemExit(
                "scale: matplotlib is missing: run `make scale` (it installs requirements-bench.txt)"
            ) from None
    run = cfg.run
    if args.quick:
        run = dataclasses.replace(run, budget=run.budget // 5, small_budget=run.small_budget // 4,
                                  sweep_budget=run.sweep_budget // 4,
                                  sizes=(run.sizes[0], run.sizes[len(run.sizes) // 2], run.sizes[-1]),
                                  rates=run.rates[:2], windows=run.windows[:2])  # fmt: skip
    base = cfg.scenario
    now = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    print(f"# scale simulation ({cfg.source.name}), {now}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    sizes_table = [("headline", base.tenants)]
    if run.small_tenants and run.small_tenants != base.tenants:
        sizes_table.append(("small", run.small_tenants))
    pool = ProcessPoolExecutor(run.workers) if run.workers > 1 else None
    try:
        budgets = {"headline": run.budget, "small": run.small_budget}
        jobs = [base.with_(tenants=n, seed=s, budget=budgets[label]) for label, n in sizes_table for s in run.seeds]
        results = _map(pool, run_event_driven, jobs)
        variants: dict[str, list[Variant]] = {}
        details: dict[str, list[list[float]]] = {}
        k = 0
        for label, n in sizes_table:
            variants[label], details[label] = [], []
            for s in run.seeds:
                designs, info, wall, detail = results[k]  # type: ignore[misc]
                k += 1
                sc = base.with_(tenants=n, seed=s)
                designs = designs + run_workers(sc, cfg.pricing)
                variants[label].append(Variant(s, designs, info, wall))
                details[label].append(detail)
            print(f"{label}: {n:,} tenants, seeds {', '.join(map(str, run.seeds))}: "
                  f"{', '.join(f'{v.wall_s:.0f} s' for v in variants[label])}", flush=True)  # fmt: skip
        # Sweeps (first seed). The tenants sweep reuses the tables' runs at their sizes, so plot and
        # tables agree; the other sizes are run with the sweep budget.
        seed0 = run.seeds[0]
        size_designs: dict[int, dict[str, A.Design]] = {}
        for label, n in sizes_table:
            size_designs[n] = {d.name: d for d in variants[label][0].designs}
        todo = [n for n in run.sizes if n not in size_designs]
        swept = _map(pool, run_sweep_size, [base.with_(tenants=n, seed=seed0, budget=run.sweep_budget) for n in todo])
        for n, res in zip(todo, swept, strict=True):
            designs = res[0] + run_workers(base.with_(tenants=n, seed=seed0), cfg.pricing)  # type: ignore[index]
            size_designs[n] = {d.name: d for d in designs}
        rate_n = run.small_tenants or base.tenants
        rate_scs = [base.with_(tenants=rate_n, mutations_per_tenant_day=r, seed=seed0, budget=run.sweep_budget)
                    for r in run.rates]  # fmt: skip
        rate_whole = _map(pool, _ours_only, rate_scs)
        rate_points = [
            (r, [d, *run_workers(sc, cfg.pricing)])
            for r, sc, d in zip(run.rates, rate_scs, rate_whole, strict=True)  # type: ignore[misc]
        ]
        window_scs = [base.with_(tenants=rate_n, window_s=w, seed=seed0, budget=run.sweep_budget) for w in run.windows]
        window_points = list(zip(run.windows, _map(pool, _ours_only, window_scs), strict=True))
    finally:
        if pool is not None:
            pool.shutdown()

    blocks: dict[str, str] = {}
    for label, n in sizes_table:
        vs = variants[label]
        sc = base.with_(tenants=n)
        info = vs[0].info + f"; seeds {', '.join(str(v.seed) for v in vs)} (ranges: lowest to highest)"
        blocks[f"compare-{label}"] = f"{info}.\n\n{comparison_table(sc, vs, cfg.pricing)}"
        blocks[f"warehouse-{label}"] = warehouse_table(sc, vs, cfg.pricing)
        print(f"\n## {n:,} tenants\n{blocks[f'compare-{label}']}\n\n{blocks[f'warehouse-{label}']}")
    head = variants["headline"]
    blocks["aws-options"] = aws_options_table(base, head, cfg.pricing)
    blocks["detail"] = detail_table(base, details["headline"], head, cfg.pricing)
    sends = details["headline"][0][DETAIL_KEYS.index("sqs_sends")]
    blocks["limits"] = limits_table(base, {"sqs_sends": sends}, head[0].designs[0])
    sizes = sorted(size_designs)
    common = [d.name for d in head[0].designs if all(d.name in size_designs[n] for n in sizes)]
    loads = {name: [peak_builds_per_s(size_designs[n][name], base) for n in sizes] for name in common}
    blocks["breaking"], breaking = breaking_points(sizes, loads, run.build_times, base)
    blocks["sweeps"] = sweep_tables(size_designs, rate_points, window_points, cfg.pricing, rate_n)
    for name in ("aws-options", "detail", "limits", "breaking", "sweeps"):
        print("\n" + blocks[name])
    total = time.perf_counter() - wall0
    command = f"make scale CONFIG={cfg.source}" if own else "make scale"
    blocks["run"] = (
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}` "
        f"in {total:.0f} s on a {os.cpu_count()}-core machine (load average {os.getloadavg()[0]:.1f} at the end), "
        f"Python {platform.python_version()}, {run.workers} processes; scenario `{cfg.source.name}`."
    )
    print("\n" + blocks["run"])
    if write:
        out = Path(args.out) if args.out else (ROOT / "scale-out" / cfg.name if own else ROOT / "docs")
        out.mkdir(parents=True, exist_ok=True)
        written = plots(out, base, cfg.pricing, size_designs, head, rate_points, window_points, breaking,
                        run.build_times, rate_n)  # fmt: skip
        doc = out / "scale.md" if own or args.out else DOC
        text = doc.read_text() if doc.exists() else own_template(cfg)
        for name, body in blocks.items():
            text = replace_block(text, name, body)
        doc.write_text(text)
        print("\nwrote", doc, *written, sep="\n  ")
    print(f"\ntotal wall time {time.perf_counter() - wall0:.0f} s")
    return 0


def _ours_only(sc: Scenario) -> A.Design:
    return _strip(A.ours(sc, run_ours(sc, keep_batches=False), WHOLE))


def sweep_tables(
    size_designs: dict[int, dict[str, A.Design]],
    rate_points: list[tuple[float, list[A.Design]]],
    window_points: list[tuple[float, A.Design]],
    pricing: Pricing,
    rate_n: int,
) -> str:
    out = [
        "Tenants (the headline's mutation rate; each size's designs as in the tables above):",
        "",
        "| tenants | this project $/month (AWS) | partition-precise $/month | queries/h: this project / precise / "
        "worker `every 1 h` / `sql` 1 min | peak utilisation of the slots: this project / precise | "
        "freshness p99 with the configured slots: this project / precise |",
        "|---|---|---|---|---|---|",
    ]
    for n in sorted(size_designs):
        by = size_designs[n]
        whole, precise = by[WHOLE], by[PRECISE]
        worker_h = next(d for d in by.values() if "every 1 h" in d.name)
        worker_sql = next(d for d in by.values() if "`sql`" in d.name)
        out.append(
            f"| {n:,} | {money(whole.aws_monthly(pricing))} | {money(precise.aws_monthly(pricing))} | "
            f"{big(whole.warehouse_queries / 24)} / {big(precise.warehouse_queries / 24)} / "
            f"{big(worker_h.warehouse_queries / 24)} / {big(worker_sql.warehouse_queries / 24)} | "
            f"{whole.peak_utilisation:.2f} / {precise.peak_utilisation:.2f} | {secs(whole.lag_p99)} / "
            f"{secs(precise.lag_p99)} |"
        )
    out += [
        "",
        f"Mutation rate ({rate_n:,} tenants):",
        "",
        "| mutations/tenant/day | this project $/month (AWS) | queries/h: this project / worker `every 1 h` / "
        "`sql` 1 min / `FILTER_PARAMS` 1 min | freshness p99, configured slots |",
        "|---|---|---|---|",
    ]
    for r, ds in rate_points:
        w = {d.name: d for d in ds[1:]}
        names = list(w)
        out.append(
            f"| {r:g} | {money(ds[0].aws_monthly(pricing))} | {big(ds[0].warehouse_queries / 24)} / "
            f"{big(w[names[0]].warehouse_queries / 24)} / {big(w[names[2]].warehouse_queries / 24)} / "
            f"{big(w[names[3]].warehouse_queries / 24)} | {secs(ds[0].lag_p99)} |"
        )
    out += [
        "",
        f"Debounce window W ({rate_n:,} tenants):",
        "",
        "| W (s) | this project $/month (AWS) | queries/h | freshness p50 / p99, enough slots |",
        "|---|---|---|---|",
    ]
    for w_s, d in window_points:
        out.append(
            f"| {w_s:g} | {money(d.aws_monthly(pricing))} | {big(d.warehouse_queries / 24)} | "
            f"{secs(d.sized_p50)} / {secs(d.sized_p99)} |"
        )
    return "\n".join(out)


def own_template(cfg: Config) -> str:
    """The skeleton of a scenario's own report; the blocks are filled in by the run."""
    sc = cfg.scenario
    blocks = [
        ("run", "How it was made"),
        ("compare-headline", f"{sc.tenants:,} tenants: the designs side by side"),
        ("warehouse-headline", "Warehouse cost per month under each pricing model"),
        ("compare-small", f"{cfg.run.small_tenants:,} tenants"),
        ("warehouse-small", f"Warehouse cost per month, {cfg.run.small_tenants:,} tenants"),
        ("aws-options", "Event source mapping options"),
        ("detail", "The headline day in detail (event-driven, whole-target)"),
        ("breaking", "Where the build slots run out"),
        ("limits", "AWS limits"),
        ("sweeps", "Sweeps"),
    ]
    parts = [
        f"# Scale and cost: {cfg.name}\n",
        f"Generated from `{cfg.source}` by `make scale CONFIG={cfg.source}`. What each design and column means, "
        "and what is real code and what is modelled: docs/scale.md in the repository.\n",
        "![cost](scale-cost-vs-tenants.png)\n\n![peak day](scale-peak-day.png)\n\n"
        "![breaking points](scale-breaking-points.png)\n",
    ]
    for name, title in blocks:
        parts.append(f"## {title}\n\n<!-- sim:{name} -->\n<!-- /sim:{name} -->\n")
    parts.append("Prices: " + "; ".join(f"{k}: {u} ({s})" for k, (u, s) in SOURCES.items()) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
