"""The local event source mappings: what Lambda does in front of the function, run as one process of the
local stack (`python -m devstack.esm`), so that the local stack behaves like the deployed one.

* Kafka (the MSK mapping): a consumer group on the local topic; batches of up to `BatchSize` records
  gathered for up to `MaximumBatchingWindowInSeconds`, shaped as Lambda shapes an MSK event (records
  grouped by `<topic>-<partition>`, base64 key and value, headers as lists of byte values); the
  function's partial batch response honoured (a partition is retried from its lowest failed offset,
  later offsets again too, as the docs warn); a function error retried and, with
  `BisectBatchOnFunctionError`, bisected; after `MaximumRetryAttempts` retries what still fails is
  written to the dead-letter topic with its payload; offsets are committed only after a batch is done
  (processed or dead-lettered).
* SQS (the trailing-refresh mapping): messages received when they come due (SQS applies DelaySeconds),
  up to the template's `BatchSize`; the ones the function did not report are deleted; reported ones
  are left to come back after the queue's visibility timeout, and the queue's redrive policy
  (`maxReceiveCount`, set from template.yaml by devstack) moves them to the DLQ. Any message body is
  delivered unchanged: the function decides what it is.

Every setting comes from template.yaml (`devstack.template.event_sources`). The function runs in this
process (`handler.app.handle` with the service `handler.wiring.build_service` builds, observed), with
the stack's environment, one invocation at a time per mapping: a Kafka batch and an SQS batch run side
by side, as in two Lambda execution environments. Each invocation is logged as one human line and one
JSON line in `.stack/logs/invocations.jsonl` (what the demo and `invoke --stack` read), with the calls
it made (`calls`: DynamoDB writes, SQS sends, Cube jobs; `bench.sim.agreement --event-sources` adds them up).

Local differences, on purpose: one poller, so a failing partition holds the others while it retries
(Lambda's pollers work per partition); the retry pause is a fixed 0.25 s; the dead-letter record
carries the on-failure envelope of the S3 destination (metadata and the one-record MSK event as
`payload`) as its value, with the original key and headers, which `preagg-refresh replay` reads."""

from __future__ import annotations

import base64
import faulthandler
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devstack import function as function_settings
from devstack.template import EventSources, event_sources

CLUSTER_ARN = "arn:aws:kafka:us-east-1:123456789012:cluster/local-devstack/00000000-0000-0000-0000-000000000000-1"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:preagg-refresh-local"
RETRY_PAUSE_S = 0.25
# With an on-failure destination, Lambda caps "infinite" retries (-1) at 10 (kafka-on-failure-destination).
INFINITE_RETRIES_CAP = 10

KafkaRecord = dict[str, Any]
Invoke = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class FunctionError(Exception):
    """The function raised (Lambda: an unhandled error): the whole batch failed."""


# ------------------------------------------------------------------------------ Kafka batches


def msk_event(records: Sequence[KafkaRecord], bootstrap: str = "127.0.0.1:9092") -> dict[str, Any]:
    """Records (already in MSK record shape) as the MSK event source mapping delivers them."""
    groups: dict[str, list[KafkaRecord]] = {}
    for record in records:
        groups.setdefault(f"{record['topic']}-{record['partition']}", []).append(record)
    return {"eventSource": "aws:kafka", "eventSourceArn": CLUSTER_ARN, "bootstrapServers": bootstrap, "records": groups}


def record_from_message(message: Any) -> KafkaRecord:
    """A confluent_kafka Message as an MSK event record."""
    kind, stamp = message.timestamp()
    key, value = message.key(), message.value()
    headers = [{name: list(raw or b"")} for name, raw in message.headers() or []]
    return {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": stamp,
        "timestampType": "LOG_APPEND_TIME" if kind == 2 else "CREATE_TIME",
        "key": base64.b64encode(key).decode() if key is not None else None,
        "value": base64.b64encode(value).decode() if value is not None else None,
        "headers": headers,
    }


def _failed_refs(response: Mapping[str, Any], records: Sequence[KafkaRecord]) -> set[tuple[int, int]] | None:
    """(partition, offset) of the reported failures; None when the answer fails the whole batch (not a
    dict, or an identifier that is not in the batch: Lambda then treats the batch as failed)."""
    if not isinstance(response, Mapping):
        return None
    failures = response.get("batchItemFailures") or []
    present = {(int(r["partition"]), int(r["offset"])) for r in records}
    refs: set[tuple[int, int]] = set()
    for failure in failures:
        ident = failure.get("itemIdentifier") if isinstance(failure, Mapping) else None
        if not isinstance(ident, Mapping):
            return None
        group, _, number = str(ident.get("partition", "")).rpartition("-")
        try:
            ref = (int(number), int(ident.get("offset")))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        if not group or ref not in present:
            return None
        refs.add(ref)
    return refs


@dataclass
class KafkaOutcome:
    invocations: int = 0
    dead_lettered: list[KafkaRecord] = field(default_factory=list)


@dataclass
class KafkaMapping:
    """Retries, bisection and dead-lettering of one polled batch, as the template configures them."""

    invoke: Invoke
    dead_letter: Callable[[KafkaRecord, str, int], None]
    maximum_retry_attempts: int = 10
    bisect_on_function_error: bool = True
    bootstrap: str = "127.0.0.1:9092"
    pause_s: float = RETRY_PAUSE_S
    log: Callable[[str], None] = lambda line: None

    @property
    def retries(self) -> int:
        return INFINITE_RETRIES_CAP if self.maximum_retry_attempts < 0 else self.maximum_retry_attempts

    def process(self, records: Sequence[KafkaRecord]) -> KafkaOutcome:
        """Run the batch to completion: every record is processed or dead-lettered on return."""
        outcome = KafkaOutcome()
        work: deque[tuple[list[KafkaRecord], int]] = deque([(list(records), 0)])
        while work:
            batch, attempt = work.popleft()
            if attempt:
                time.sleep(self.pause_s)
            outcome.invocations += 1
            try:
                failed = _failed_refs(self.invoke(msk_event(batch, self.bootstrap)), batch)
                error = None if failed is not None else "the response names records not in the batch"
            except FunctionError as exc:
                failed, error = None, str(exc)
            if failed is not None and not failed:
                continue
            if failed is None:  # a function error: the whole batch failed
                if self.bisect_on_function_error and len(batch) > 1:
                    half = len(batch) // 2
                    self.log(f"kafka: function error ({error}); bisecting {len(batch)} records")
                    work.appendleft((batch[half:], attempt))  # splitting does not count as a retry
                    work.appendleft((batch[:half], attempt))
                    continue
                still = batch
            else:
                # A partition is retried from its lowest failed offset (later offsets come again too).
                lowest: dict[int, int] = {}
                for partition, offset in failed:
                    lowest[partition] = min(offset, lowest.get(partition, offset))
                still = [r for r in batch if r["partition"] in lowest and r["offset"] >= lowest[r["partition"]]]
            if attempt >= self.retries:
                reported = still if failed is None else [r for r in still if (r["partition"], r["offset"]) in failed]
                condition = "RetryAttemptsExhausted"
                for record in reported:
                    self.dead_letter(record, condition, attempt + 1)
                outcome.dead_lettered.extend(reported)
                self.log(
                    f"kafka: {len(reported)} record(s) failed {attempt + 1} times: sent to the dead-letter topic "
                    + ", ".join(f"{r['topic']}-{r['partition']}@{r['offset']}" for r in reported)
                )
                continue
            self.log(f"kafka: retry {attempt + 1}/{self.retries} of {len(still)} record(s)")
            work.appendleft((still, attempt + 1))
        return outcome


def dead_letter_value(record: KafkaRecord, condition: str, invocations: int, bootstrap: str) -> dict[str, Any]:
    """The dead-letter record's value: metadata plus the one-record MSK event as `payload`."""
    return {
        "version": "1.0",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requestContext": {
            "requestId": str(uuid.uuid4()),
            "functionArn": FUNCTION_ARN,
            "condition": condition,
            "approximateInvokeCount": invocations,
        },
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": None},
        "KafkaBatchInfo": {
            "batchSize": 1,
            "eventSourceArn": CLUSTER_ARN,
            "bootstrapServers": bootstrap,
            "topic": record["topic"],
            "partition": record["partition"],
            "firstOffset": record["offset"],
            "lastOffset": record["offset"],
        },
        "payload": json.dumps(msk_event([record], bootstrap)),
    }


# ------------------------------------------------------------------------------ SQS batches


def sqs_event(messages: Iterable[Mapping[str, Any]], queue_arn: str, region: str) -> dict[str, Any]:
    """SQS messages (ReceiveMessage shape) as the SQS event source mapping delivers them."""
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": message.get("Attributes", {}),
                "messageAttributes": {
                    name: {
                        "stringValue": attr.get("StringValue"),
                        "binaryValue": attr.get("BinaryValue"),
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": attr.get("DataType", "String"),
                    }
                    for name, attr in (message.get("MessageAttributes") or {}).items()
                },
                "md5OfBody": message.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": region,
            }
            for message in messages
        ]
    }


def sqs_failed_ids(response: Any, ids: Sequence[str]) -> set[str]:
    """Message ids to leave in the queue: the reported ones; all of them when the answer is unusable."""
    if not isinstance(response, Mapping):
        return set(ids)
    failed: set[str] = set()
    for failure in response.get("batchItemFailures") or []:
        ident = failure.get("itemIdentifier") if isinstance(failure, Mapping) else None
        if ident not in ids:
            return set(ids)  # an unknown or empty identifier fails the whole batch
        failed.add(str(ident))
    return failed


class SqsMapping:
    """One receive -> invoke -> delete round against a queue (the queue's own settings apply)."""

    def __init__(self, sqs: Any, queue_url: str, invoke: Invoke, batch_size: int, region: str) -> None:
        self.sqs, self.queue_url, self.invoke, self.batch_size, self.region = sqs, queue_url, invoke, batch_size, region
        arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.queue_arn = str(arn)

    def poll_once(self, wait_s: int = 1) -> tuple[int, int]:
        """(delivered, failed) for one round; (0, 0) when nothing was due."""
        answer = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=min(self.batch_size, 10),
            WaitTimeSeconds=wait_s,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = answer.get("Messages", [])
        if not messages:
            return 0, 0
        ids = [str(m["MessageId"]) for m in messages]
        try:
            response: Any = self.invoke(sqs_event(messages, self.queue_arn, self.region))
        except FunctionError:
            response = None
        failed = sqs_failed_ids(response, ids)
        done = [m for m in messages if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done[start : start + 10])
            ]
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        return len(messages), len(failed)


# ------------------------------------------------------------------------------ the process


DYNAMODB_WRITES = ("UpdateItem", "PutItem", "DeleteItem")


class CallCounter:
    """Counts chosen API calls of boto3 clients (at `before-call`, once per call, retries aside), under
    names, between two resets. Thread-safe: the service spreads keys over an I/O pool."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def watch(self, client: Any, service: str, operations: Sequence[str], name: str) -> None:
        for operation in operations:
            client.meta.events.register(f"before-call.{service}.{operation}", lambda **_: self.add(name))

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1

    def reset(self) -> None:
        with self._lock:
            self._counts = {}

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Function:
    """The function, in this process: `handler.app.handle` over an observed service, one call at a time.
    Returns the response; raises FunctionError for what Lambda would report as a function error."""

    def __init__(self, environ: Mapping[str, str], journal: Path, journal_lock: threading.Lock | None = None) -> None:
        # The stack's values win over the inherited environment (which may point elsewhere); settings the
        # stack does not set (CUBE_PREAGG_DEBOUNCE_MS, ENTITY_CUBE_MAP, ...) are taken from it.
        os.environ.update(environ)
        os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
        os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "preagg-refresh")
        from devstack.cubeapi import Spacer  # noqa: PLC0415
        from devstack.observe import build_observed_service  # noqa: PLC0415 - env first: settings read at import
        from handler import app  # noqa: PLC0415
        from handler.adapters.memory import CountingTelemetry  # noqa: PLC0415

        self._app = app
        # No spacing of a tenant's rebuilds (the local helpers' guard against docs/cube-jobs-api.md, hazard c):
        # the deployed function has none, and it waited up to 1.2 s inside an invocation. A key's next
        # build waits for the last one to be verified (the in-flight gate); a collision is re-triggered.
        self.service = build_observed_service(app.SETTINGS, CountingTelemetry(), Spacer(0.0))
        self.journal = journal
        self._journal_lock = journal_lock or threading.Lock()
        self._lock = threading.Lock()
        self.calls = CallCounter()
        self.calls.watch(self.service.debouncer.store.client, "dynamodb", DYNAMODB_WRITES, "ddb_writes")  # type: ignore[attr-defined]
        self.calls.watch(self.service.debouncer.scheduler.client, "sqs", ("SendMessage",), "sqs_sends")  # type: ignore[attr-defined]

    def __call__(self, event: Mapping[str, Any]) -> Mapping[str, Any]:
        source = "kafka" if event.get("eventSource") == "aws:kafka" else "sqs"
        records = sum(len(v) for v in event["records"].values()) if source == "kafka" else len(event.get("Records", []))
        with self._lock:
            began = time.monotonic()
            self.calls.reset()
            notes, verifying = self._read(event, source)
            try:
                response: Mapping[str, Any] = self._app.handle(event, service=self.service)
                error = None
            except Exception as exc:  # Lambda: an unhandled error fails the invocation
                response, error = {}, f"{type(exc).__name__}: {exc}"
            keys = [
                {"key": key.key.pk, "status": key.status, "detail": key.detail, "jobs": list(key.job_tokens)}
                for outcome in self.service.outcomes
                for key in outcome.keys
            ]
            notes += [self._verified(target) for target in verifying]
            # What the invocation asked of the services (the handler-driven agreement check counts the same
            # at the boto3 clients): DynamoDB writes, SQS sends, and the jobs Cube queued.
            calls = self.calls.snapshot() | {"cube_jobs": sum(len(c.tokens) for c in self.service.recorder.calls)}
            del self.service.outcomes[:]  # a long-lived process: keep nothing between invocations
            del self.service.recorder.calls[:]
            entry = {
                "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "source": source,
                "records": records,
                "ms": round((time.monotonic() - began) * 1000),
                "failures": len(response.get("batchItemFailures") or []) if error is None else records,
                "error": error,
                "keys": keys,
                "notes": notes,
                "refs": [
                    f"{r['topic']}-{r['partition']}@{r['offset']}"
                    for group in event.get("records", {}).values()
                    for r in group
                ]
                if source == "kafka"
                else [],
                "calls": calls,
            }
            with self._journal_lock, self.journal.open("a") as out:
                out.write(json.dumps(entry) + "\n")
        decided = [
            f"{k['key']} {k['status']}"
            + (f" {k['detail']}" if k["status"] == "refreshed" and k["detail"] else "")
            + (f" ({len(k['jobs'])} jobs)" if k["jobs"] else "")
            for k in keys
        ]
        unit = "record(s)" if source == "kafka" else "message(s)"
        print(
            f"{time.strftime('%H:%M:%S')} {source}: {records} {unit} -> "
            + (
                f"function error {error}"
                if error
                else f"{entry['failures']} failed; " + ("; ".join(decided + notes) or "no keys")
            ),
            flush=True,
        )
        if error:
            raise FunctionError(error)
        return response

    def _read(self, event: Mapping[str, Any], source: str) -> tuple[list[str], list[Any]]:
        """What the log line says beyond the keys decided: invalid records and unmapped entity types
        (Kafka); the builds a verification message checks (SQS), looked up after the invocation."""
        from handler.domain.decode import decode_msk_event, decode_queue_message  # noqa: PLC0415
        from handler.domain.verify import RetriggerMessage, VerifyMessage  # noqa: PLC0415

        notes: list[str] = []
        verifying: list[Any] = []
        if source == "kafka":
            batch = decode_msk_event(event, now_ms=int(time.time() * 1000))
            notes += [f"invalid {bad.ref.partition}@{bad.ref.offset}: {bad.reason}" for bad in batch.invalid]
            routes = self.service.routes
            for entity in sorted({m.entity_type for _, m in batch.mutations if not routes.targets_for(m.entity_type)}):
                notes.append(
                    f"unmapped entity type {entity}: acknowledged, nothing to refresh "
                    f"(known: {', '.join(routes.entity_types())})"
                )
            return notes, verifying
        for record in event.get("Records", []):
            try:
                message = decode_queue_message(record.get("body", ""))
            except ValueError as exc:
                notes.append(f"message {record.get('messageId')}: {exc}")
                continue
            if isinstance(message, VerifyMessage):
                verifying += list(message.targets)
            elif isinstance(message, RetriggerMessage):
                targets = ", ".join(f"{message.tenant_id}#{t.target}" for t in message.targets)
                notes.append(
                    f"re-trigger {targets} (attempt {message.attempt}{', dead-lettered' * message.dead_lettered})"
                )
        return notes, verifying

    def _verified(self, target: Any) -> str:
        """One build a verification message checked, as the function recorded it."""
        state = self.service.debouncer.store.get(target.key)
        name = f"verify {target.key.pk}"
        if state is None or state.build_started_at != target.started_at:
            return f"{name}: not built yet, checked again later"
        if state.build_status == "done":
            return f"{name}: build done (freshness lag {(state.freshness_lag_ms or 0) / 1000:.1f} s)"
        if state.build_status == "failed":
            due = state.retrigger_due_at
            when = f", re-trigger at {datetime.fromtimestamp(due / 1000, UTC):%H:%M:%S}" if due else ""
            return f"{name}: build failed ({state.build_failure_class}: {state.build_error}){when}"
        return f"{name}: {state.build_status}"


def _run_kafka(
    settings: EventSources, bootstrap: str, function: Function, stop: threading.Event, ready: threading.Event
) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: PLC0415 - dev dependency

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": settings.consumer_group,
            "enable.auto.commit": False,
            # The local topic is empty at every start, so TRIM_HORIZON and LATEST differ only in what a
            # producer sent while the group was joining: start from the earliest offset to lose none.
            "auto.offset.reset": "earliest",
            # A member that died without leaving frees its partitions after 6 s, not the default 45 s.
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            # A broker answers a waiting fetch as soon as fetch.min.bytes (1) are there; librdkafka's mock
            # cluster answers only when fetch.wait.max.ms (500 ms) is over, so records came 0-500 ms late
            # (median 265 ms, measured) and batches split where MSK's would not. 25 ms: median 23 ms.
            "fetch.wait.max.ms": 25,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap})

    def dead_letter(record: KafkaRecord, condition: str, invocations: int) -> None:
        key = base64.b64decode(record["key"]) if record.get("key") else None
        headers: list[tuple[str, str | bytes | None]] = [
            (str(name), bytes(raw)) for header in record.get("headers") or [] for name, raw in header.items()
        ]
        value = json.dumps(dead_letter_value(record, condition, invocations, bootstrap)).encode()
        producer.produce(settings.dead_letter_topic, value=value, key=key, headers=headers)
        producer.flush(10)

    mapping = KafkaMapping(
        function,
        dead_letter,
        settings.maximum_retry_attempts,
        settings.bisect_on_function_error,
        bootstrap,
        log=lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", flush=True),
    )
    consumer.subscribe([settings.topic], on_assign=lambda _c, parts: ready.set() if parts else None)
    try:
        while not stop.is_set():
            first = consumer.poll(0.5)
            if first is None:
                continue
            messages = [first]
            deadline = time.monotonic() + settings.batching_window_s
            while len(messages) < settings.batch_size and (left := deadline - time.monotonic()) > 0:
                messages.extend(consumer.consume(settings.batch_size - len(messages), timeout=left))
            records = [record_from_message(m) for m in messages if not m.error()]
            for m in messages:
                if m.error():
                    print(f"{time.strftime('%H:%M:%S')} kafka: consumer error {m.error()}", flush=True)
            if not records:
                continue
            mapping.process(records)
            ends: dict[int, int] = {}
            for record in records:
                ends[record["partition"]] = max(record["offset"] + 1, ends.get(record["partition"], 0))
            consumer.commit(
                offsets=[TopicPartition(settings.topic, p, end) for p, end in ends.items()], asynchronous=False
            )
    finally:
        consumer.close()  # leaves the group: a new member gets the partitions at once
        print(f"{time.strftime('%H:%M:%S')} kafka: consumer closed", flush=True)


def _run_sqs(settings: EventSources, environ: Mapping[str, str], function: Function, stop: threading.Event) -> None:
    import boto3  # noqa: PLC0415

    sqs = boto3.client(
        "sqs",
        endpoint_url=environ["AWS_ENDPOINT_URL_SQS"],
        region_name=environ["AWS_DEFAULT_REGION"],
        aws_access_key_id=environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=environ["AWS_SECRET_ACCESS_KEY"],
    )
    mapping = SqsMapping(
        sqs, environ["REFRESH_QUEUE_URL"], function, settings.sqs_batch_size, environ["AWS_DEFAULT_REGION"]
    )
    while not stop.is_set():
        try:
            mapping.poll_once()
        except Exception as exc:  # moto restarting: say so and keep polling
            print(f"{time.strftime('%H:%M:%S')} sqs: {type(exc).__name__}: {exc}", flush=True)
            stop.wait(1.0)


def main(argv: list[str]) -> int:
    """`python -m devstack.esm REPO_ROOT`: run both mappings until SIGTERM."""
    faulthandler.enable()  # a crash in a native extension (librdkafka) leaves its stack in esm.log
    root = Path(argv[0]).resolve()
    state = root / ".stack"
    environ = json.loads((state / "env.json").read_text())
    bootstrap = environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
    settings = event_sources(root / "template.yaml")
    # The function's settings: what `make stack-start` recorded (.stack/function.json), and only that.
    given = function_settings.recorded_environ(state)
    function_env = {k: v for k, v in environ.items() if k not in ("CUBE_API_SECRET", "PG_DSN")} | given
    # One function per mapping, as Lambda runs a Kafka batch and an SQS batch in two execution environments
    # at once: an SQS message due while a Kafka batch is processed is not held until it ends.
    journal, journal_lock = state / "logs" / "invocations.jsonl", threading.Lock()
    sqs_function = Function(function_env, journal, journal_lock)
    stop, ready = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = [threading.Thread(target=_run_sqs, args=(settings, environ, sqs_function, stop), name="sqs", daemon=True)]
    if bootstrap:
        kafka_function = Function(function_env, journal, journal_lock)
        threads.append(
            threading.Thread(
                target=_run_kafka, args=(settings, bootstrap, kafka_function, stop, ready), name="kafka", daemon=True
            )
        )
    else:
        ready.set()
    for thread in threads:
        thread.start()
    while not ready.wait(0.2):
        if stop.is_set():
            return 0
    status = state / "esm.json"
    status.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "kafka": f"{settings.topic} @ {bootstrap} (group {settings.consumer_group})" if bootstrap else None,
                "sqs": environ["REFRESH_QUEUE_URL"],
                "environ": given,
            }
        )
        + "\n"
    )
    print(
        f"{time.strftime('%H:%M:%S')} event sources ready: kafka {settings.topic} (batch {settings.batch_size}, "
        f"window {settings.batching_window_s:g} s, retries {settings.maximum_retry_attempts}, "
        f"bisect {settings.bisect_on_function_error}, dead letters -> {settings.dead_letter_topic}); "
        f"sqs {environ['REFRESH_QUEUE_URL']} (batch {settings.sqs_batch_size}); function: "
        + str(function_settings.recorded(state).get("summary", "defaults")),
        flush=True,
    )
    while not stop.wait(0.5):
        if not all(t.is_alive() for t in threads):
            print(f"{time.strftime('%H:%M:%S')} a poller died; exiting", flush=True)
            break
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    status.unlink(missing_ok=True)
    print(f"{time.strftime('%H:%M:%S')} event sources stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
