"""Replay of failed Kafka records: read them back, plan, and feed them through the same pipeline.

Inputs (all end up as a list of Kafka records, each keeping its ORIGINAL topic, partition, offset
and value, so the function's logs and partial-batch answers name the records the DLT named):

* The S3 on-failure destination object Lambda writes for an MSK/Kafka event source mapping
  (AWS Lambda developer guide, "Capturing discarded batches for Amazon MSK and self-managed Apache
  Kafka event sources", kafka-on-failure): a JSON document
  `{"requestContext": {...}, "responseContext": {...}, "version": "1.0", "timestamp": "...",
    "KafkaBatchInfo": {...}, "payload": "<the whole MSK event as an escaped JSON string>"}`.
  `payload` is also accepted as an object. SQS/SNS destinations carry no payload: nothing to replay.
* A JSON dump of the dead-letter topic: a JSON array or JSON lines of Kafka records with at least
  `topic`, `partition`, `offset` and `value` (base64, as in an MSK event; a plain JSON object is
  accepted and encoded). A record whose value is Lambda's failure envelope (what a `kafka://`
  on-failure destination writes) is unwrapped into the records of its `payload`.
* An MSK event (`{"eventSource": "aws:kafka", "records": {...}}`), e.g. a file under events/.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from handler.domain.decode import decode_value
from handler.domain.model import InvalidRecord, RecordRef
from handler.domain.routing import EntityCubeMap

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BATCH_RECORDS = 500
# Synchronous Lambda invoke payloads are limited to 6 MB; stay clear of it.
BATCH_BYTES = 5_000_000
REPLAY_EVENT_SOURCE_ARN = "arn:aws:kafka:::cluster/preagg-refresh-replay"

KafkaRecord = dict[str, Any]
Progress = Callable[[int, int], None]


class ReplayInputError(ValueError):
    """The replay input cannot be read; the message names the file or object and what is wrong."""


# -- reading -------------------------------------------------------------------------------------
def _is_envelope(doc: Mapping[str, Any]) -> bool:
    return "payload" in doc or "KafkaBatchInfo" in doc or "requestContext" in doc


def _is_record(doc: Mapping[str, Any]) -> bool:
    return "topic" in doc and "partition" in doc and "offset" in doc


def _envelope_records(doc: Mapping[str, Any], source: str) -> list[KafkaRecord]:
    payload = doc.get("payload")
    if payload is None:
        raise ReplayInputError(
            f"{source}: an on-failure record without 'payload' (SQS/SNS destinations keep only offsets): "
            "read the records from the topic by their offsets and replay a dump with --file"
        )
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError as exc:
            raise ReplayInputError(f"{source}: 'payload' is not the JSON of an MSK event ({exc})") from None
    if not isinstance(payload, Mapping):
        raise ReplayInputError(f"{source}: 'payload' is not an MSK event object")
    return _event_records(payload, source)


def _event_records(event: Mapping[str, Any], source: str) -> list[KafkaRecord]:
    groups = event.get("records")
    if not isinstance(groups, Mapping):
        raise ReplayInputError(f"{source}: no 'records' object: not an MSK event")
    out: list[KafkaRecord] = []
    for group, items in groups.items():
        if not isinstance(items, list):
            raise ReplayInputError(f"{source}: records[{group!r}] is not a list")
        out.extend(_record(item, f"{source} records[{group!r}]") for item in items)
    return out


def _unwrap_value(value: Any) -> Any:
    """The record value as JSON when it is base64 of JSON (else None)."""
    if isinstance(value, Mapping):
        return value
    if not isinstance(value, str):
        return None
    try:
        return json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return None


def _record(item: Any, source: str) -> KafkaRecord:
    if not isinstance(item, Mapping) or not _is_record(item):
        raise ReplayInputError(f"{source}: a record needs topic, partition, offset and value")
    topic, partition, offset = item["topic"], item["partition"], item["offset"]
    try:
        partition, offset = int(partition), int(offset)
    except (TypeError, ValueError):
        raise ReplayInputError(f"{source}: partition and offset must be integers") from None
    if not isinstance(topic, str) or not topic:
        raise ReplayInputError(f"{source}: topic must be a non-empty string")
    value = item.get("value")
    if isinstance(value, Mapping):  # a dump with decoded values: encode as the MSK event would
        value = base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()
    record: KafkaRecord = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp": item.get("timestamp", 0),
        "timestampType": item.get("timestampType", "CREATE_TIME"),
        "key": item.get("key"),
        "value": value,
        "headers": item.get("headers") or [],
    }
    return record


def records_from_document(doc: Any, source: str) -> list[KafkaRecord]:
    """Kafka records from one parsed JSON document of any accepted shape."""
    if isinstance(doc, list):
        out: list[KafkaRecord] = []
        for index, item in enumerate(doc):
            out.extend(records_from_document(item, f"{source}[{index}]"))
        return out
    if not isinstance(doc, Mapping):
        raise ReplayInputError(f"{source}: expected a JSON object or array, found {type(doc).__name__}")
    if _is_record(doc):
        inner = _unwrap_value(doc.get("value"))
        if isinstance(inner, Mapping) and _is_envelope(inner) and "payload" in inner:
            return _envelope_records(inner, f"{source} (Kafka on-failure envelope)")
        return [_record(doc, source)]
    if isinstance(doc.get("records"), Mapping):
        return _event_records(doc, source)
    if _is_envelope(doc):
        return _envelope_records(doc, source)
    raise ReplayInputError(
        f"{source}: not a Lambda on-failure record, an MSK event or a Kafka record "
        "(expected 'payload', 'records' or topic/partition/offset/value)"
    )


def parse_text(text: str, source: str) -> list[KafkaRecord]:
    """A JSON document, or JSON lines (one document per line)."""
    stripped = text.strip()
    if not stripped:
        return []
    try:
        return records_from_document(json.loads(stripped), source)
    except json.JSONDecodeError:
        pass
    out: list[KafkaRecord] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReplayInputError(f"{source} line {number}: not JSON ({exc.msg})") from None
        out.extend(records_from_document(doc, f"{source} line {number}"))
    return out


def read_file(path: str) -> list[KafkaRecord]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ReplayInputError(f"cannot read {path}: {exc.strerror}") from None
    return parse_text(text, path)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise ReplayInputError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


def list_s3_objects(s3: S3Client, uri: str) -> list[str]:
    bucket, prefix = parse_s3_uri(uri)
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
    return sorted(keys)


def read_s3(s3: S3Client, uri: str, progress: Progress | None = None) -> tuple[list[KafkaRecord], int]:
    """All records of all on-failure objects under the prefix, and the number of objects read."""
    bucket, _ = parse_s3_uri(uri)
    keys = list_s3_objects(s3, uri)
    records: list[KafkaRecord] = []
    for done, key in enumerate(keys, 1):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ReplayInputError(f"s3://{bucket}/{key}: not UTF-8 JSON") from None
        records.extend(parse_text(text, f"s3://{bucket}/{key}"))
        if progress:
            progress(done, len(keys))
    return records, len(keys)


# -- planning ------------------------------------------------------------------------------------
def ref_of(record: Mapping[str, Any]) -> RecordRef:
    return RecordRef(f"{record['topic']}-{record['partition']}", int(record["offset"]))


@dataclass
class ReplayPlan:
    records: list[KafkaRecord]  # valid records, in (topic, partition, offset) order
    duplicates: int = 0
    invalid: list[InvalidRecord] = field(default_factory=list)
    by_target: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tenant, target) -> records
    unmapped: Counter[str] = field(default_factory=Counter)  # entity type -> records

    @property
    def total(self) -> int:
        return len(self.records) + len(self.invalid)

    def as_dict(self) -> dict[str, Any]:
        tenants: dict[str, dict[str, int]] = {}
        for (tenant, target), count in sorted(self.by_target.items()):
            tenants.setdefault(tenant, {})[target] = count
        return {
            "records": self.total,
            "valid": len(self.records),
            "duplicatesDropped": self.duplicates,
            "byTenant": tenants,
            "unmapped": dict(sorted(self.unmapped.items())),
            "invalid": [
                {"partition": bad.ref.partition, "offset": bad.ref.offset, "reason": bad.reason, "detail": bad.detail}
                for bad in self.invalid
            ],
        }


def plan(records: Iterable[KafkaRecord], routes: EntityCubeMap) -> ReplayPlan:
    """Decode every record (as the function would) and count what a replay would touch."""
    now = time.time_ns() // 1_000_000
    seen: set[RecordRef] = set()
    ordered = sorted(records, key=lambda r: (r["topic"], r["partition"], r["offset"]))
    result = ReplayPlan(records=[])
    for record in ordered:
        ref = ref_of(record)
        if ref in seen:
            result.duplicates += 1
            continue
        seen.add(ref)
        decoded = decode_value(ref, record.get("value"), now_ms=now)
        if isinstance(decoded, InvalidRecord):
            result.invalid.append(decoded)
            continue
        result.records.append(record)
        targets = routes.targets_for(decoded.entity_type)
        if not targets:
            result.unmapped[decoded.entity_type] += 1
        for target in targets:
            result.by_target[(decoded.tenant_id, target)] += 1
    return result


# -- running -------------------------------------------------------------------------------------
def _event(records: Sequence[KafkaRecord], event_source_arn: str) -> dict[str, Any]:
    groups: dict[str, list[KafkaRecord]] = {}
    for record in records:
        groups.setdefault(f"{record['topic']}-{record['partition']}", []).append(record)
    return {
        "eventSource": "aws:kafka",
        "eventSourceArn": event_source_arn,
        "bootstrapServers": "",
        "records": {k: sorted(v, key=lambda r: r["offset"]) for k, v in sorted(groups.items())},
    }


def build_events(
    records: Sequence[KafkaRecord],
    *,
    batch_records: int = BATCH_RECORDS,
    batch_bytes: int = BATCH_BYTES,
    event_source_arn: str = REPLAY_EVENT_SOURCE_ARN,
) -> list[dict[str, Any]]:
    """MSK-shaped events of at most `batch_records` records and about `batch_bytes` of JSON each."""
    events: list[dict[str, Any]] = []
    chunk: list[KafkaRecord] = []
    size = 0
    for record in records:
        record_size = len(json.dumps(record)) + 2
        if chunk and (len(chunk) >= batch_records or size + record_size > batch_bytes):
            events.append(_event(chunk, event_source_arn))
            chunk, size = [], 0
        chunk.append(record)
        size += record_size
    if chunk:
        events.append(_event(chunk, event_source_arn))
    return events


@dataclass
class ReplayResult:
    records: int = 0
    batches: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)  # itemIdentifier of each failed record
    errors: list[str] = field(default_factory=list)  # whole batches that could not be delivered

    @property
    def ok(self) -> bool:
        return not self.failed and not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "batches": self.batches,
            "failed": self.failed,
            "errors": self.errors,
        }


def run(
    events: Sequence[Mapping[str, Any]],
    invoke: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    progress: Progress | None = None,
    *,
    stop_on: tuple[type[Exception], ...] = (),
) -> ReplayResult:
    """Invoke the pipeline once per event; collect the records it reports as failed. An exception of
    a `stop_on` type (e.g. access denied) ends the replay; any other one fails just its batch."""
    result = ReplayResult()
    for done, event in enumerate(events, 1):
        count = sum(len(v) for v in event["records"].values())
        result.records += count
        result.batches += 1
        try:
            answer = invoke(event)
        except stop_on:
            raise
        except Exception as exc:  # one undeliverable batch must not hide the others
            result.errors.append(f"batch {done}: {exc}")
        else:
            for failure in answer.get("batchItemFailures") or []:
                result.failed.append(dict(failure.get("itemIdentifier") or {}))
        if progress:
            progress(done, len(events))
    return result


def read_kafka(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[KafkaRecord]:
    """Every record on `topic` (a dead-letter topic), from the first offset to the end, without a
    consumer group (nothing is committed: reading it again gives the same records). A record whose value
    is an on-failure envelope is unwrapped to the record it carries."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition  # noqa: PLC0415

    from preagg_cli.localstack import quiet_kafka_logger  # noqa: PLC0415

    # librdkafka's own log would print every refused connection: errors come back as exceptions.
    config = {"bootstrap.servers": bootstrap, "group.id": "preagg-refresh-replay", "logger": quiet_kafka_logger()}
    consumer = Consumer(config)
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=timeout_s)
        except KafkaException as exc:
            raise ReplayInputError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
        partitions = sorted((metadata.topics.get(topic) and metadata.topics[topic].partitions) or {})
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s) for p in partitions}
        wanted = {p: high for p, (low, high) in ends.items() if high > low}
        if not wanted:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in wanted])
        records: list[KafkaRecord] = []
        done: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(wanted) and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=0.5):
                if message.error():
                    continue
                partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                source = f"{topic}-{partition}@{offset}"
                raw = message.value()
                try:
                    doc = json.loads(raw) if raw is not None else None
                except ValueError:
                    doc = None
                if isinstance(doc, Mapping) and _is_envelope(doc):
                    records.extend(_envelope_records(doc, source))
                else:
                    value = base64.b64encode(raw).decode() if raw is not None else None
                    records.append(
                        _record({"topic": topic, "partition": partition, "offset": offset, "value": value}, source)
                    )
                if offset + 1 >= wanted[partition]:
                    done.add(partition)
        if len(done) < len(wanted):
            raise ReplayInputError(f"timed out reading {topic} at {bootstrap} after {timeout_s:.0f} s")
        return records
    finally:
        consumer.close()
