"""Cold import of `handler.app` against a naive import of the same stack, with and without
precompiled bytecode, each in fresh subprocesses.

Run from the repository root (the benchmark does not touch sys.path; `src` comes from PYTHONPATH):

    PYTHONPATH=src .venv/bin/python bench/bench_cold_import.py [--runs 7] [--tracing both|on|off]

Bytecode is controlled with PYTHONPYCACHEPREFIX (plus PYTHONDONTWRITEBYTECODE=1 so no run leaves
bytecode behind for the next):
- "pyc":    a prefix holding bytecode for every module imported (as if the build ran compileall);
- "no pyc": a prefix holding bytecode for the standard library only, so the app and its
            dependencies are compiled from source in every process, as on Lambda when `sam build`
            ships no .pyc and the code folder is read-only (docs/msk-event-source.md).
The import is timed inside each child with perf_counter (interpreter start-up excluded); RSS is the
child's ru_maxrss after the import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from datetime import UTC, datetime

_MEASURE = """
import json, resource, time
t, c = time.perf_counter(), time.process_time()
{body}
ms, cpu = (time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000
print(json.dumps({{"ms": ms, "cpu_ms": cpu, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

TARGETS = {
    "handler.app": "import handler.app",
    # What the first invocation adds before its first network call: the service with its boto3 clients,
    # httpx client and Cube client (deferred imports land here), so nothing is only moved later.
    "app + 1st service": "import handler.app\nhandler.app._service()",
    "naive stack": "\n".join(
        [
            "import boto3",
            "boto3.client('dynamodb')",
            "from aws_lambda_powertools import Logger, Metrics, Tracer",
            "Logger(); Metrics(); Tracer()",
            "import pydantic",
            "class M(pydantic.BaseModel):",
            "    a: int",
            "    b: str",
            "M(a=1, b='x')",
            "import httpx",
            "httpx.Client()",
        ]
    ),
    "interpreter only": "pass",
}


def _base_env(tracing: bool, task_root: str) -> dict[str, str]:
    from preagg_cli.local import LOCAL_DEFAULTS  # noqa: PLC0415 (stdlib-only module)

    env = dict(os.environ)
    for name, value in LOCAL_DEFAULTS.items():
        env.setdefault(name, value)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["POWERTOOLS_METRICS_DISABLED"] = "false"
    # Lambda always sets LAMBDA_TASK_ROOT. Without it the X-Ray SDK (imported by Powertools even with
    # tracing disabled) builds a botocore session for its sampler at import: ~+100 ms, ~+12 MB.
    env["LAMBDA_TASK_ROOT"] = task_root
    # Tracing ON is the template default (TracingEnabled=true); Powertools then patches with X-Ray.
    env["POWERTOOLS_TRACE_DISABLED"] = "false" if tracing else "true"
    return env


def _run(body: str, env: dict[str, str], prefix: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**env, "PYTHONPYCACHEPREFIX": prefix}
    proc = subprocess.run(
        [sys.executable, *extra, "-c", _MEASURE.format(body=body)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit("import child failed; run as PYTHONPATH=src .venv/bin/python bench/bench_cold_import.py")
    return proc


def _prepare_prefixes(root: str, env: dict[str, str]) -> tuple[str, str]:
    """Fill one prefix with bytecode of everything imported; copy its stdlib part to a second one."""
    full, std = os.path.join(root, "pyc-all"), os.path.join(root, "pyc-stdlib")
    warm = {**env}
    warm.pop("PYTHONDONTWRITEBYTECODE")
    for body in TARGETS.values():
        _run(body, warm, full)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    mirrored = os.path.join(full, stdlib.lstrip(os.sep))
    if not os.path.isdir(mirrored):
        raise SystemExit(f"no stdlib bytecode found under {mirrored}")
    shutil.copytree(mirrored, os.path.join(std, stdlib.lstrip(os.sep)))
    return full, std


def _top_imports(env: dict[str, str], prefix: str, count: int = 12) -> list[tuple[str, int]]:
    """Imports of handler.app (depth 1 and 2) by cumulative time, from -X importtime."""
    proc = _run(TARGETS["handler.app"], env, prefix, "-X", "importtime")
    rows: list[tuple[str, int]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2  # CPython indents two spaces per level
        if depth in (1, 2):  # what handler.app imports, and one level below
            rows.append(("  " * (depth - 1) + name.strip(), int(cumulative)))
    return sorted(rows, key=lambda r: -r[1])[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tracing", choices=("both", "on", "off"), default="both")
    args = parser.parse_args()
    try:
        import preagg_cli.local  # noqa: F401, PLC0415
    except ImportError:
        raise SystemExit(
            "cannot import 'handler': run from the repo root as PYTHONPATH=src .venv/bin/python "
            "bench/bench_cold_import.py"
        ) from None

    print(
        f"bench_cold_import  {datetime.now(UTC):%Y-%m-%d %H:%M UTC}  python {platform.python_version()}  "
        f"{os.cpu_count()} cpu  load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{args.runs} fresh subprocesses per cell, interleaved; import time in ms inside the child "
        f"(interpreter start-up excluded); RSS = child's max RSS after the import"
    )
    tracings = {"both": (True, False), "on": (True,), "off": (False,)}[args.tracing]
    with tempfile.TemporaryDirectory(prefix="bench-import-") as root:
        task_root = os.path.join(root, "task")
        os.mkdir(task_root)
        for tracing in tracings:
            env = _base_env(tracing, task_root)
            full, std = _prepare_prefixes(os.path.join(root, f"trace-{tracing}"), env)
            cells = [(t, b) for b in ("pyc", "no pyc") for t in TARGETS]
            results: dict[tuple[str, str], list[tuple[float, float, float]]] = {c: [] for c in cells}
            for _ in range(args.runs):
                for target, bytecode in cells:
                    proc = _run(TARGETS[target], env, full if bytecode == "pyc" else std)
                    data = json.loads(proc.stdout.strip().splitlines()[-1])
                    results[(target, bytecode)].append((data["ms"], data["cpu_ms"], data["rss_mb"]))

            mode = "ON (as deployed by default: Powertools patches with the X-Ray SDK)" if tracing else "OFF"
            print(f"\n== tracing {mode}")
            print(
                f"{'':18} {'bytecode':>8} {'min ms':>8} {'median ms':>10} {'CPU ms (median)':>16} "
                f"{'RSS MB (median)':>16}"
            )
            summary: dict[tuple[str, str], float] = {}
            for target, bytecode in cells:
                ms = [r[0] for r in results[(target, bytecode)]]
                cpu = [r[1] for r in results[(target, bytecode)]]
                rss = [r[2] for r in results[(target, bytecode)]]
                # CPU time of the child: unlike wall time, it does not grow while the child waits for a
                # core, so it stays comparable on a shared machine. The ratios below use it.
                summary[(target, bytecode)] = statistics.median(cpu)
                print(
                    f"{target:18} {bytecode:>8} {min(ms):>8.0f} {statistics.median(ms):>10.0f} "
                    f"{statistics.median(cpu):>16.0f} {statistics.median(rss):>16.1f}"
                )
            for bytecode in ("pyc", "no pyc"):
                naive = summary[("naive stack", bytecode)]
                for target in ("handler.app", "app + 1st service"):
                    ratio = summary[(target, bytecode)] / naive
                    print(f"{target} / naive stack ({bytecode}): {ratio:.0%} (median CPU ms; import target: <= 50%)")
            for target in ("handler.app", "naive stack"):
                saved = summary[(target, "no pyc")] - summary[(target, "pyc")]
                print(
                    f"{target}: precompiled bytecode saves {saved:.0f} CPU ms median "
                    f"({summary[(target, 'no pyc')]:.0f} -> {summary[(target, 'pyc')]:.0f})"
                )
            print("handler.app: slowest imports, depth 1-2, cumulative (one run, pyc, -X importtime):")
            for name, us in _top_imports(env, full):
                print(f"  {us / 1000:7.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
