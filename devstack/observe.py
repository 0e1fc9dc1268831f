"""The Lambda's real service, observed: the same adapters `handler.wiring.build_service` creates (DynamoDB,
SQS, Cube over httpx, the secret from Secrets Manager), with the Cube client wrapped to record job
tokens and each batch's Outcome kept, so tests and the demo can go through `handler.app.handle` and
still see what happened inside (the Lambda response carries only batchItemFailures); and the stack's
SQS queue of trailing refreshes, read the way the Lambda event source mapping would."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from devstack.cubeapi import RecordingCube, Spacer
from devstack.stack import StackEnv
from handler.domain.model import EntityMutation, RecordRef
from handler.domain.ports import Telemetry, TrailingMessage
from handler.domain.service import Outcome, RefreshService
from handler.settings import Settings
from handler.wiring import build_service

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient


class ObservedService(RefreshService):
    """A RefreshService that keeps every Outcome it returns (newest last)."""

    outcomes: list[Outcome]
    recorder: RecordingCube

    def process_mutations(self, mutations: Iterable[tuple[RecordRef, EntityMutation]], *, deadline_ms: int) -> Outcome:
        outcome = super().process_mutations(mutations, deadline_ms=deadline_ms)
        self.outcomes.append(outcome)
        return outcome

    def process_trailing(
        self, messages: Iterable[tuple[RecordRef, TrailingMessage]], *, deadline_ms: int, wake: bool = True
    ) -> Outcome:
        outcome = super().process_trailing(messages, deadline_ms=deadline_ms, wake=wake)
        self.outcomes.append(outcome)
        return outcome

    @property
    def last(self) -> Outcome:
        return self.outcomes[-1]


def build_observed_service(settings: Settings, telemetry: Telemetry, spacer: Spacer | None = None) -> ObservedService:
    """`build_service(settings, telemetry)` with its Cube client wrapped in a RecordingCube."""
    real = build_service(settings, telemetry)
    recorder = RecordingCube(real.cube, spacer=spacer or Spacer())
    # Same instance state as the wired service (whatever its constructor takes, e.g. its I/O mapper),
    # in the observing subclass.
    service = ObservedService.__new__(ObservedService)
    service.__dict__.update(vars(real))
    service.cube = recorder
    service.outcomes = []
    service.recorder = recorder
    return service


def _sqs(env: StackEnv) -> SQSClient:
    import boto3  # noqa: PLC0415

    client: SQSClient = boto3.client(
        "sqs",
        endpoint_url=env.aws_endpoint_url_sqs,
        region_name=env.aws_default_region,
        aws_access_key_id=env.aws_access_key_id,
        aws_secret_access_key=env.aws_secret_access_key,
    )
    return client


def receive_trailing(env: StackEnv, tokens: Iterable[str], *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The trailing-refresh messages carrying `tokens`, from the stack's queue, as the Lambda event source
    would receive them (SQS delays them until about their due time). Messages with other tokens (another
    test, an earlier run) are left invisible for their 30 s visibility timeout, so that a queue holding
    many of them cannot keep ours out of the ten a receive returns."""
    wanted = set(tokens)
    sqs = _sqs(env)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < len(wanted):
        if time.monotonic() > deadline:
            missing = sorted(wanted - set(found))
            raise TimeoutError(f"no trailing-refresh message for tokens {missing} after {timeout_s:.0f} s")
        answer = sqs.receive_message(
            QueueUrl=env.refresh_queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            VisibilityTimeout=30,
            AttributeNames=["All"],
        )
        for message in answer.get("Messages", []):
            token = json.loads(message.get("Body", "{}")).get("token")
            if token in wanted and token not in found:
                found[token] = dict(message)
    return [found[t] for t in sorted(found, key=lambda t: json.loads(found[t]["Body"])["dueAt"])]


def delete_messages(env: StackEnv, messages: Iterable[Mapping[str, Any]]) -> None:
    """What Lambda does with the SQS messages a successful invocation did not report as failed."""
    sqs = _sqs(env)
    for message in messages:
        sqs.delete_message(QueueUrl=env.refresh_queue_url, ReceiptHandle=str(message["ReceiptHandle"]))


def as_sqs_event(messages: Iterable[Mapping[str, Any]], env: StackEnv) -> dict[str, Any]:
    """SQS messages as the Lambda event source mapping delivers them."""
    from devstack.esm import sqs_event  # noqa: PLC0415

    queue_name = env.refresh_queue_url.rsplit("/", 1)[-1]
    arn = f"arn:aws:sqs:{env.aws_default_region}:123456789012:{queue_name}"
    return sqs_event(messages, arn, env.aws_default_region)


def deliver_queue_messages(
    env: StackEnv,
    handle: Callable[[dict[str, Any]], dict[str, Any]],
    tenant_id: str | None,
    *,
    kinds: Collection[str] = ("trailing", "verify", "retrigger"),
    wait_s: int = 1,
    since_ms: int = 0,
    visibility_s: int = 30,
) -> list[dict[str, Any]]:
    """One round of what the SQS event source mapping does, for one tenant's messages (any tenant's
    when `tenant_id` is None): receive the
    due ones of `kinds`, invoke `handle` with them as an SQS event, delete those it did not report
    failed (a failed one comes back after 2 s). Messages of other tenants or kinds are left invisible
    for `visibility_s`; the tenant's messages sent before
    `since_ms` (left by an earlier run) are deleted. Returns the bodies delivered."""
    sqs = _sqs(env)
    answer = sqs.receive_message(
        QueueUrl=env.refresh_queue_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=wait_s,
        VisibilityTimeout=visibility_s,
        AttributeNames=["All"],
    )
    ours: list[dict[str, Any]] = []
    bodies: list[dict[str, Any]] = []
    for received in answer.get("Messages", []):
        try:
            body = json.loads(received.get("Body", "{}"))
        except ValueError:
            continue
        if not (isinstance(body, dict) and tenant_id in (None, body.get("tenantId")) and body.get("kind") in kinds):
            continue
        if int(received.get("Attributes", {}).get("SentTimestamp", since_ms)) < since_ms:
            sqs.delete_message(QueueUrl=env.refresh_queue_url, ReceiptHandle=str(received["ReceiptHandle"]))
        else:
            ours.append(dict(received))
            bodies.append(body)
    if not ours:
        return []
    response = handle(as_sqs_event(ours, env))
    failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
    for message in ours:
        if message["MessageId"] in failed:
            sqs.change_message_visibility(
                QueueUrl=env.refresh_queue_url, ReceiptHandle=str(message["ReceiptHandle"]), VisibilityTimeout=2
            )
        else:
            sqs.delete_message(QueueUrl=env.refresh_queue_url, ReceiptHandle=str(message["ReceiptHandle"]))
    return bodies
