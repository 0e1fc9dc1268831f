"""Secrets Manager and SQS adapters."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from aws_lambda_powertools.utilities import parameters
from botocore.exceptions import BotoCoreError, ClientError

from handler.domain.decode import trailing_body
from handler.domain.errors import SchedulerUnavailable
from handler.domain.ports import BuildMessage, TrailingMessage
from handler.domain.verify import encode

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

SQS_MAX_DELAY_S = 900


def cached_secret(arn: str, max_age_s: int = 300) -> Callable[[], str]:
    """The Cube API secret, fetched through Powertools Parameters and cached across invocations."""

    def fetch() -> str:
        value = parameters.get_secret(arn, max_age=max_age_s)
        if not isinstance(value, str) or not value:
            raise RuntimeError("the Cube API secret is empty or not a string")
        return value

    return fetch


class SqsTrailingScheduler:
    """Trailing refreshes as delayed SQS messages. Windows over 15 minutes arrive early and are
    re-scheduled by the receiver until their time comes."""

    def __init__(self, client: SQSClient, queue_url: str) -> None:
        self.client = client
        self.queue_url = queue_url

    def schedule(self, message: TrailingMessage, *, now: int) -> None:
        delay = min(SQS_MAX_DELAY_S, max(0, math.ceil((message.due_at - now) / 1000)))
        body = json.dumps(trailing_body(message))
        try:
            self.client.send_message(QueueUrl=self.queue_url, MessageBody=body, DelaySeconds=delay)
        except (ClientError, BotoCoreError) as exc:
            raise SchedulerUnavailable(f"SQS send failed: {type(exc).__name__}") from exc


class SqsBuildQueue:
    """Verify and retrigger messages on the refresh queue (delays up to 60 s: within SQS's 900 s);
    builds that failed after their re-triggers go to the dead-letter queue as retrigger messages,
    so redriving that queue to the refresh queue replays them."""

    def __init__(self, client: SQSClient, queue_url: str, dead_letter_url: str) -> None:
        self.client = client
        self.queue_url = queue_url
        self.dead_letter_url = dead_letter_url

    def send(self, message: BuildMessage, *, due_at: int, now: int) -> None:
        delay = min(SQS_MAX_DELAY_S, max(0, math.ceil((due_at - now) / 1000)))
        self._send(self.queue_url, message, delay)

    def dead_letter(self, message: BuildMessage) -> None:
        self._send(self.dead_letter_url, message, 0)

    def _send(self, url: str, message: BuildMessage, delay: int) -> None:
        body = encode(message)  # the body whose size verify_messages kept under SQS's limit
        try:
            self.client.send_message(QueueUrl=url, MessageBody=body, DelaySeconds=delay)
        except (ClientError, BotoCoreError) as exc:
            raise SchedulerUnavailable(f"SQS send failed: {type(exc).__name__}") from exc
