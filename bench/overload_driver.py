"""The function's side of bench/bench_overload.py: runs `handler.app.handle` of the code under test.

Started by bench_overload.py as a child process, once per behaviour, with `PYTHONPATH` pointing at that
behaviour's `src/` (this checkout's, or a `git archive` of another commit), then this repository (for
devstack's SQS event shape), and the behaviour's settings in its environment. It plays the two event
source mappings the deployed function has:
- MSK: each line on stdin (`{"batch": [...], "offset": n}`) is one tick's mutations, already committed
  in PostgreSQL by the parent; it goes as one MSK-shaped event through `handle` (serially, like one
  partition's poller);
- SQS: `--pumps` threads receive the refresh queue's due messages (trailing refreshes, verify polls,
  re-triggers; up to 10 per receive) and hand them to `handle` as SQS events, deleting what the function
  did not report, as the SQS event source mapping does (failed ones come back after 2 s here, instead of
  after the visibility timeout, so that a failure is retried within the run).
`{"end": true}` on stdin stops it; it then writes what it saw to `--out` (JSON) and exits.

Only the function's public entry points are used (`handler.app.handle`, `handler.settings.load_settings`,
`handler.wiring.build_service`), so any version of the function can be run. What the benchmark reports
as ground truth (requests, queue depth, rollups, dead letters) is measured by the parent, not here; this
side reports what the function itself said (its telemetry counts and emitted FreshnessLag) and how late
the queue's messages were delivered (a check that the harness kept up).

Faults (`--fault`, comma-separated), for checking that the benchmark can fail:
- `lose-tenant:<id>`: the function's Cube client answers that tenant's refreshes with made-up job tokens
  and never calls Cube (a function that drops a key but believes it posted);
- `ignore-failures`: the verifier takes every job status as `done` (a verifier that ignores failures).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from devstack.esm import sqs_event

TOPIC = "core.entities.lifecycle.mutated"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def msk_event(values: list[dict[str, Any]], offset: int, timestamp_ms: int) -> dict[str, Any]:
    """An MSK event of one partition holding `values` as JSON records (what Lambda's poller delivers)."""
    records = [
        {
            "topic": TOPIC,
            "partition": 0,
            "offset": offset + i,
            "timestamp": timestamp_ms,
            "timestampType": "CREATE_TIME",
            "key": base64.b64encode(str(v["tenantId"]).encode()).decode(),
            "value": base64.b64encode(json.dumps(v).encode()).decode(),
            "headers": [],
        }
        for i, v in enumerate(values)
    ]
    return {
        "eventSource": "aws:kafka",
        "eventSourceArn": "arn:aws:kafka:us-east-1:123456789012:cluster/bench/00000000-0000-0000-0000-000000000000",
        "bootstrapServers": "127.0.0.1:9092",
        "records": {f"{TOPIC}-0": records},
    }


class Driver:
    def __init__(self, pumps: int, sqs_batch: int, faults: list[str], outcomes: Path | None = None) -> None:
        import boto3  # noqa: PLC0415

        # The code under test, from PYTHONPATH (checked by the parent through `handler_file`).
        import handler  # noqa: PLC0415
        from handler.app import handle  # noqa: PLC0415
        from handler.settings import load_settings  # noqa: PLC0415

        self.handler_file = str(Path(handler.__file__).resolve())
        self.handle = handle
        self.settings = load_settings()
        self.faults = faults
        self.sqs_batch = sqs_batch
        self.lock = threading.Lock()
        self.telemetries: list[Any] = []
        self.msk_service = self._service()
        self.pump_services = [self._service() for _ in range(pumps)]
        self.sqs = boto3.client("sqs")
        self.queue_url = self.settings.refresh_queue_url
        self.region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        self.queue_arn = f"arn:aws:sqs:{self.region}:123456789012:{self.queue_url.rsplit('/', 1)[-1]}"
        self.stop = threading.Event()
        self.delivered: Counter[str] = Counter()
        self.late_ms: list[int] = []  # delivery time minus the message's due time
        self.errors: Counter[str] = Counter()
        self.batch_failures = 0
        self._apply_faults()
        self.outcomes = outcomes.open("w") if outcomes else None
        if self.outcomes:
            for service in [self.msk_service, *self.pump_services]:
                self._record_outcomes(service)

    def _record_outcomes(self, service: Any) -> None:
        """Each decision the service reports per key (`Outcome.keys`: refreshed, debounced, deferred,
        rescheduled, skipped, failed, with its detail), one JSON line with the time and the entry point;
        a wake's decisions appear under `process_trailing` and again in the call that woke them."""
        for name in ("process_mutations", "process_trailing", "process_verify", "process_retrigger"):
            method = getattr(service, name, None)
            if method is None:
                continue

            def wrapped(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
                outcome = _method(*args, **kwargs)
                ms = now_ms()
                lines = [
                    json.dumps({"ms": ms, "call": _name, "key": k.key.pk, "status": k.status, "detail": k.detail})
                    for k in getattr(outcome, "keys", [])
                ]
                if lines and self.outcomes:
                    with self.lock:
                        self.outcomes.write("\n".join(lines) + "\n")
                return outcome

            setattr(service, name, wrapped)

    def _service(self) -> Any:
        from handler.wiring import build_service  # noqa: PLC0415

        try:
            from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415
        except ImportError:  # a version without it: counts are then not reported
            CountingTelemetry = None
        telemetry = CountingTelemetry() if CountingTelemetry else _NullTelemetry()
        self.telemetries.append(telemetry)
        return build_service(self.settings, telemetry)

    def _apply_faults(self) -> None:
        for fault in self.faults:
            if fault.startswith("lose-tenant:"):
                lost = fault.split(":", 1)[1]
                for service in [self.msk_service, *self.pump_services]:
                    service.cube = _LosingCube(service.cube, lost)
            elif fault == "ignore-failures":
                import handler.domain.verify as verify  # noqa: PLC0415

                verify.classify = _ignoring_failures(verify)
            elif fault:
                sys.exit(f"overload_driver: unknown fault {fault!r}")

    # -- MSK --------------------------------------------------------------------------------
    def on_batch(self, line: dict[str, Any]) -> None:
        values = [
            {
                "eventType": "ENTITY_UPDATED",
                "entityType": "User",
                "entityId": m["id"],
                "tenantId": m["tenant"],
                "timestamp": m["ms"],
            }
            for m in line["batch"]
        ]
        event = msk_event(values, int(line["offset"]), values[0]["timestamp"])
        try:
            response = self.handle(event, None, service=self.msk_service, settings=self.settings)
        except Exception as error:  # reported, and the run goes on (Lambda would retry the batch)
            self._error(f"msk: {error!r}")
            return
        failures = response.get("batchItemFailures", [])
        if failures:
            with self.lock:
                self.batch_failures += len(failures)

    # -- SQS --------------------------------------------------------------------------------
    def pump(self, service: Any) -> None:
        while not self.stop.is_set():
            try:
                answer = self.sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=self.sqs_batch,
                    WaitTimeSeconds=1,
                    VisibilityTimeout=60,
                    AttributeNames=["All"],
                )
                messages = answer.get("Messages", [])
                if not messages:
                    continue
                now = now_ms()
                kinds = []
                for message in messages:
                    try:
                        body = json.loads(message["Body"])
                    except ValueError:
                        body = {}
                    kinds.append(str(body.get("kind", "?")))
                    due = body.get("dueAt")  # trailing refreshes carry their due time
                    if isinstance(due, int):
                        with self.lock:
                            self.late_ms.append(now - due)
                response = self.handle(
                    sqs_event(messages, self.queue_arn, self.region), None, service=service, settings=self.settings
                )
                failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
                for message in messages:
                    if message["MessageId"] in failed:
                        self.sqs.change_message_visibility(
                            QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=2
                        )
                    else:
                        self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
                with self.lock:
                    self.delivered.update(kinds)
                    self.delivered["reported failed"] += len(failed)
            except Exception as error:
                self._error(f"sqs: {error!r}")
                time.sleep(0.5)

    def _error(self, text: str) -> None:
        with self.lock:
            self.errors[text[:200]] += 1

    def results(self) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        timings: dict[str, list[float]] = {}
        for telemetry in self.telemetries:
            counts.update(getattr(telemetry, "counts", {}))
            for name, values in getattr(telemetry, "timings", {}).items():
                timings.setdefault(name, []).extend(values)
        return {
            "handler_file": self.handler_file,
            "counts": dict(counts),
            "freshness_lag_emitted_ms": timings.get("FreshnessLag", []),
            "delivered": dict(self.delivered),
            "late_ms": self.late_ms,
            "errors": dict(self.errors),
            "msk_batch_item_failures": self.batch_failures,
        }


def _ignoring_failures(verify: Any) -> Any:
    """The `ignore-failures` fault: `classify` of handler.domain.verify, with every verdict turned `done`."""
    real = verify.classify

    def classify(target: Any, jobs: Any, tenant_id: str, *, now: int, deadline_at: int) -> Any:
        verdict = real(target, jobs, tenant_id, now=now, deadline_at=deadline_at)
        return verdict if verdict.state == "done" else verify.Verdict(target, "done")

    return classify


class _NullTelemetry:
    def count(self, name: str, value: int = 1, dimension: tuple[str, str] | None = None) -> None:
        pass

    def timing(self, name: str, ms: float) -> None:
        pass


class _LosingCube:
    """The `lose-tenant` fault: a Cube client that, for one tenant, answers every selector with made-up
    job tokens and sends nothing; other tenants go to the real client. Verification polls (`get`) of
    every tenant go to the real client, so the lost tenant's tokens come back `not_found`."""

    def __init__(self, inner: Any, tenant: str) -> None:
        self.inner = inner
        self.tenant = tenant

    def trigger(self, tenant_id: str, selectors: Any, *, deadline_ms: int) -> Any:
        if tenant_id != self.tenant:
            return self.inner.trigger(tenant_id, selectors, deadline_ms=deadline_ms)
        seed = f"{tenant_id}{time.time_ns()}"
        return [[hashlib.md5(f"{seed}{i}".encode()).hexdigest()] for i in range(len(selectors))]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pumps", type=int, default=4)
    parser.add_argument("--sqs-batch", type=int, default=10)
    parser.add_argument("--fault", default="")
    parser.add_argument("--outcomes", type=Path, help="write the function's decisions per key here (JSON lines)")
    args = parser.parse_args()
    driver = Driver(args.pumps, args.sqs_batch, [f for f in args.fault.split(",") if f], args.outcomes)
    threads = [threading.Thread(target=driver.pump, args=(s,), daemon=True) for s in driver.pump_services]
    for thread in threads:
        thread.start()
    print(json.dumps({"ready": True, "handler_file": driver.handler_file}), flush=True)
    for raw in sys.stdin:
        line = json.loads(raw)
        if line.get("end"):
            break
        driver.on_batch(line)
    driver.stop.set()
    for thread in threads:
        thread.join(timeout=30)
    if driver.outcomes:
        driver.outcomes.close()
    args.out.write_text(json.dumps(driver.results()))


if __name__ == "__main__":
    main()
