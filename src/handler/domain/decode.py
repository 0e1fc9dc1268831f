"""Decoding MSK records into mutations, one record at a time so one bad record cannot sink a batch."""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from handler.domain.model import EntityMutation, InvalidRecord, RecordRef, is_valid_target, is_valid_tenant
from handler.domain.partitions import DateRange
from handler.domain.ports import TrailingMessage
from handler.domain.routing import EntityCubeMap
from handler.domain.verify import RetriggerMessage, VerifyMessage, check_times, parse_retrigger, parse_verify


class MalformedEvent(ValueError):
    """The event itself (not one record) is not an MSK batch: nothing can be acknowledged."""


@dataclass(slots=True)
class DecodedBatch:
    mutations: list[tuple[RecordRef, EntityMutation]] = field(default_factory=list)
    invalid: list[InvalidRecord] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.mutations) + len(self.invalid)


# A record whose `partition` is not a number is isolated as invalid (this marks its value).
BAD_PARTITION = object()
_MAX_NUMBER_DIGITS = 19  # an int64
_MAX_SHOWN = 80


def _number(value: Any) -> int | None:
    """A Kafka partition or offset: an integer, or a string of ASCII digits (some third-party
    events carry them as strings); None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and 0 < len(value) <= _MAX_NUMBER_DIGITS and value.isascii() and value.isdigit():
        return int(value)
    return None


def _shown(name: Any) -> str:
    """A group key as an error message may show it: bounded (the event's text is not ours)."""
    text = repr(name)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def iter_msk_records(event: Mapping[str, Any]) -> Iterator[tuple[RecordRef, Any]]:
    """Yield (ref, raw value) for every record. The ref names the record in a partial batch response.
    A record whose partition is not a number gets its group key (`<topic>-<partition>`) as its ref and
    BAD_PARTITION as its value: it is reported alone. A record without a numeric offset cannot be
    named in a partial batch response at all: the event is refused whole (MalformedEvent)."""
    groups = event.get("records")
    if not isinstance(groups, Mapping):
        raise MalformedEvent("event has no 'records' object: not an MSK event")
    for group_key, records in groups.items():
        if not isinstance(records, list):
            raise MalformedEvent(f"records[{_shown(group_key)}] is not a list")
        for record in records:
            if not isinstance(record, Mapping):
                raise MalformedEvent(f"a record under {_shown(group_key)} is not an object")
            topic, partition, offset = (
                record.get("topic"),
                _number(record.get("partition")),
                _number(record.get("offset")),
            )
            if offset is None:
                raise MalformedEvent(f"a record under {_shown(group_key)} has no integer offset")
            if partition is None:
                yield RecordRef(str(group_key), offset), BAD_PARTITION
                continue
            name = f"{topic}-{partition}" if isinstance(topic, str) else str(group_key)
            yield RecordRef(name, offset), record.get("value")


def _summarise(exc: ValidationError) -> str:
    # Field locations and messages only: input values may carry personal data.
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# A mutation stamped further ahead of the function's clock than this is refused: a producer's clock
# or units are wrong (seconds or microseconds for milliseconds, year 9999), and a future time would
# poison the key's pendingSince and the staleness metric. Old timestamps are fine (replays).
MAX_FUTURE_MS = 24 * 3600 * 1000


def decode_value(ref: RecordRef, value: Any, *, now_ms: int) -> EntityMutation | InvalidRecord:
    if value is BAD_PARTITION:
        return InvalidRecord(ref, "bad_partition", "record partition is not a number")
    if value is None:
        return InvalidRecord(ref, "null_value", "record value is null (tombstone?)")
    if not isinstance(value, str):
        return InvalidRecord(ref, "bad_base64", "record value is not a base64 string")
    try:
        raw = b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return InvalidRecord(ref, "bad_base64", "record value is not valid base64")
    try:
        mutation = EntityMutation.model_validate_json(raw)
    except ValidationError as exc:
        kinds = {e["type"] for e in exc.errors()}
        if "json_invalid" in kinds:
            return _not_json(ref, raw)
        if "model_type" in kinds:
            return InvalidRecord(ref, "not_object", "record value is JSON but not an object")
        return InvalidRecord(ref, "invalid_fields", _summarise(exc))
    if mutation.timestamp > now_ms + MAX_FUTURE_MS:
        return InvalidRecord(
            ref,
            "future_timestamp",
            "timestamp is more than 24 h ahead of the function's clock: send epoch milliseconds or ISO-8601 "
            "from a synchronised clock",
        )
    return mutation


_TOO_DEEP = 64  # a mutation is a flat object; the fast parser gives up at about 200 levels


def _not_json(ref: RecordRef, raw: bytes) -> InvalidRecord:
    """The fast parser refused the value: tell JSON nested too deeply apart from text that is not
    JSON, by parsing again with the standard library (only ever for bad records)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        return InvalidRecord(ref, "too_deep", "record value is JSON nested too deeply")
    except ValueError:
        return InvalidRecord(ref, "not_json", "record value is not JSON")
    if _depth(data) > _TOO_DEEP:
        return InvalidRecord(ref, "too_deep", "record value is JSON nested too deeply")
    return InvalidRecord(ref, "not_json", "record value is not strict JSON")


def _depth(data: Any) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest


def decode_msk_event(event: Mapping[str, Any], *, now_ms: int) -> DecodedBatch:
    batch = DecodedBatch()
    for ref, value in iter_msk_records(event):
        decoded = decode_value(ref, value, now_ms=now_ms)
        if isinstance(decoded, InvalidRecord):
            batch.invalid.append(decoded)
        else:
            batch.mutations.append((ref, decoded))
    return batch


def trailing_body(message: TrailingMessage) -> dict[str, object]:
    """The SQS body of a trailing refresh (what `decode_trailing_message` reads back). `partition`
    only for partition keys, so whole-target messages read as they did before partitions existed."""
    body: dict[str, object] = {
        "kind": "trailing",
        "tenantId": message.tenant_id,
        "target": message.target,
        "token": message.token,
        "dueAt": message.due_at,
        "attempt": message.attempt,
    }
    if message.partition:
        body["partition"] = message.partition
    return body


def decode_trailing_message(body: str) -> TrailingMessage:
    """Parse a trailing-refresh message body; raises ValueError with a safe description."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise ValueError("trailing message body is JSON nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise ValueError("trailing message body is not JSON") from exc
    if not isinstance(data, dict) or data.get("kind") != "trailing":
        raise ValueError("not a trailing-refresh message")
    tenant, target, token, due = data.get("tenantId"), data.get("target"), data.get("token"), data.get("dueAt")
    if not is_valid_tenant(tenant):
        raise ValueError("trailing message has an invalid tenantId")
    if not is_valid_target(target):
        raise ValueError("trailing message has an invalid target")
    if not (isinstance(token, str) and token) or not isinstance(due, int) or isinstance(due, bool):
        raise ValueError("trailing message lacks token or dueAt")
    attempt = data.get("attempt", 0)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise ValueError("trailing message has an invalid attempt")
    partition = data.get("partition", "")
    if partition != "":
        try:
            if not isinstance(partition, str):
                raise ValueError(partition)
            partition = DateRange.parse(partition).label
        except ValueError:
            raise ValueError("trailing message has an invalid partition") from None
    return TrailingMessage(tenant, target, token, due, attempt, partition)


QueueMessage = TrailingMessage | VerifyMessage | RetriggerMessage


def decode_queue_message(body: str, *, routes: EntityCubeMap | None = None, now_ms: int | None = None) -> QueueMessage:
    """Any message of the refresh queue, by its `kind`: trailing, verify, retrigger. With `routes`,
    a message naming a target the map does not cover is refused (it would make Cube build it); with
    `now_ms`, a verify or retrigger message naming a future time (verify.check_times). Raises
    ValueError with a safe description."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise ValueError("queue message body is JSON nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise ValueError("queue message body is not JSON") from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    message: QueueMessage
    if kind == "verify":
        message = parse_verify(data)
    elif kind == "retrigger":
        message = parse_retrigger(data)
    else:
        message = decode_trailing_message(body)
    if routes is not None and not all(routes.covers(t) for t in _targets_of(message)):
        raise ValueError(f"{kind or 'trailing'} message names a target ENTITY_CUBE_MAP does not map")
    if now_ms is not None and not isinstance(message, TrailingMessage):
        check_times(message, now_ms=now_ms)
    return message


def _targets_of(message: QueueMessage) -> list[str]:
    if isinstance(message, TrailingMessage):
        return [message.target]
    if isinstance(message, VerifyMessage):
        return [t.key.target for t in message.targets]
    return [t.target for t in message.targets]
