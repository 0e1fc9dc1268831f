"""Lambda entry point: MSK batches, trailing refreshes from SQS, and direct-invoke operations.

Thin on purpose: decode, one call into the domain, shape the answer. Everything else lives in
`handler.domain` (rules) and `handler.adapters` (AWS and HTTP)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from handler import snapstart
from handler.domain.decode import MalformedEvent, decode_msk_event, decode_queue_message, iter_msk_records
from handler.domain.model import RecordRef
from handler.domain.ports import TrailingMessage
from handler.domain.service import Outcome, RefreshService
from handler.domain.verify import RetriggerMessage, VerifyMessage
from handler.observability import PowertoolsTelemetry, logger, metrics, tracer
from handler.settings import Settings, load_settings
from handler.wiring import build_service, now_ms

if TYPE_CHECKING:  # annotations only: importing it at runtime loads Powertools' utilities package
    from aws_lambda_powertools.utilities.typing import LambdaContext

# Milliseconds kept back from the Lambda deadline for releasing claims and answering.
DEADLINE_RESERVE_MS = 2_000
LOCAL_DEADLINE_MS = 60_000

SETTINGS: Settings = load_settings()  # cold start: a bad variable fails here, named
telemetry = PowertoolsTelemetry()


@lru_cache(maxsize=1)
def _service() -> RefreshService:
    return build_service(SETTINGS, telemetry)


snapstart.register(_service)  # no-op unless the runtime takes snapshots (SnapStart=on)


def _deadline(context: LambdaContext | None) -> int:
    if context is None:
        return now_ms() + LOCAL_DEADLINE_MS
    return now_ms() + max(0, context.get_remaining_time_in_millis() - DEADLINE_RESERVE_MS)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    try:
        return handle(event, context)
    finally:
        telemetry.flush_dimensioned()


# Lambda's Kafka event sources: MSK, and self-managed Kafka (spelt both ways in AWS's examples).
KAFKA_EVENT_SOURCES = ("aws:kafka", "SelfManagedKafka", "aws:SelfManagedKafka")
UNRECOGNISED = "unrecognised event: expected an MSK batch, SQS trailing refreshes or an operation"


def handle(
    event: Any,
    context: LambdaContext | None = None,
    *,
    service: RefreshService | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Route one invocation. `service` and `settings` are injectable for tests and local runs.
    Raises MalformedEvent (one line naming the problem) for anything that is not one of the three."""
    settings = settings or SETTINGS
    if not isinstance(event, Mapping):
        raise MalformedEvent(f"{UNRECOGNISED}; got {type(event).__name__}")
    if event.get("eventSource") in KAFKA_EVENT_SOURCES:
        return handle_msk(event, context, service, settings)
    records = event.get("Records")
    if (
        isinstance(records, list)
        and records
        and isinstance(records[0], Mapping)
        and records[0].get("eventSource") == "aws:sqs"
    ):
        return handle_trailing(records, context, service, settings)
    if "operation" in event:
        # Operator calls are rare: their module is loaded on the first one, not at every cold start.
        from handler.operations import OperationError, run_operation  # noqa: PLC0415

        try:
            return run_operation(event, service or _service(), settings, deadline_ms=_deadline(context))
        except OperationError as exc:
            logger.warning("operation rejected", extra={"error": str(exc)})
            return {"ok": False, "error": str(exc)}
    raise MalformedEvent(UNRECOGNISED)


def handle_msk(
    event: Mapping[str, Any], context: LambdaContext | None, service: RefreshService | None, settings: Settings
) -> dict[str, Any]:
    svc = service or _service()
    tel = svc.telemetry
    if not settings.enabled:
        count = sum(1 for _ in iter_msk_records(event))
        tel.count("EventsReceived", count)
        tel.count("DisabledAcks", count)
        logger.info("refresh disabled: acknowledging batch", extra={"records": count})
        return {"batchItemFailures": []}

    batch = decode_msk_event(event, now_ms=svc.clock.now_ms())
    tel.count("EventsReceived", batch.total)
    for bad in batch.invalid:
        logger.warning(
            "invalid record",
            extra={
                "partition": bad.ref.partition,
                "offset": bad.ref.offset,
                "reason": bad.reason,
                "detail": bad.detail,
            },
        )
    if batch.invalid:
        tel.count("InvalidEvents", len(batch.invalid))
    outcome = svc.process_mutations(batch.mutations, deadline_ms=_deadline(context))
    failed = outcome.failed | {bad.ref for bad in batch.invalid}
    _log_outcome(outcome, batch.total, len(failed))
    if failed:
        tel.count("RecordsFailed", len(failed))
    ordered = sorted(failed, key=lambda r: (r.partition, r.offset))
    return {"batchItemFailures": [ref.as_failure() for ref in ordered]}


def _message_ids(records: list[Any]) -> list[str]:
    """A failed SQS message is reported by its messageId: a record without one could not be
    reported on its own, so such an event is refused whole (and retried whole) before any work."""
    ids = []
    for index, record in enumerate(records):
        message_id = record.get("messageId") if isinstance(record, Mapping) else None
        if not isinstance(message_id, str) or not message_id:
            raise MalformedEvent(
                f"SQS record {index} has no messageId: not an SQS event as Lambda sends it; nothing was processed"
            )
        ids.append(message_id)
    return ids


def handle_trailing(
    records: list[Any], context: LambdaContext | None, service: RefreshService | None, settings: Settings
) -> dict[str, Any]:
    svc = service or _service()
    if not settings.enabled:
        svc.telemetry.count("DisabledAcks", len(records))
        return {"batchItemFailures": []}
    message_ids = _message_ids(records)
    ids: dict[RecordRef, str] = {}
    trailing: list[tuple[RecordRef, TrailingMessage]] = []
    verify: list[tuple[RecordRef, VerifyMessage]] = []
    retrigger: list[tuple[RecordRef, RetriggerMessage]] = []
    failed: set[RecordRef] = set()
    now = svc.clock.now_ms()
    for index, record in enumerate(records):
        ref = RecordRef("sqs", index)
        ids[ref] = message_ids[index]
        try:
            message = decode_queue_message(record.get("body", ""), routes=svc.routes, now_ms=now)
        except ValueError as exc:
            logger.warning("invalid queue message", extra={"message_id": ids[ref], "error": str(exc)})
            failed.add(ref)
            continue
        if isinstance(message, VerifyMessage):
            verify.append((ref, message))
        elif isinstance(message, RetriggerMessage):
            retrigger.append((ref, message))
        else:
            trailing.append((ref, message))
    deadline = _deadline(context)
    handled = Outcome()  # one "batch handled" line per invocation, whatever kinds of message it held
    for outcome in (
        svc.process_trailing(trailing, deadline_ms=deadline),
        svc.process_retrigger(retrigger, deadline_ms=deadline) if retrigger else None,
        svc.process_verify(verify, deadline_ms=deadline) if verify else None,
    ):
        if outcome is not None:
            failed |= outcome.failed
            handled.keys += outcome.keys
    _log_outcome(handled, len(records), len(failed))
    return {"batchItemFailures": [{"itemIdentifier": ids[ref]} for ref in sorted(failed, key=lambda r: r.offset)]}


def _log_outcome(outcome: Outcome, records: int, failed: int) -> None:
    logger.info(
        "batch handled",
        extra={
            "records": records,
            "records_failed": failed,
            "keys_refreshed": len(outcome.by_status("refreshed")),
            "keys_debounced": len(outcome.by_status("debounced")),
            "keys_failed": len(outcome.by_status("failed")),
        },
    )
