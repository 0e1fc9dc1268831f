"""What the operator CLI does only against the local stack (`make stack-start`): check it is up before
an operation (one line and exit 2 when it is not, instead of a Kafka client's retries or a boto3
traceback), read what Cube serves with a token minted from the stack's secret, list the cubes and
pre-aggregations Cube knows, and follow the local event sources (their consumer group's lag on the
topic, their journal of invocations)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOPIC = "core.entities.lifecycle.mutated"
CONSUMER_GROUP = "preagg-refresh"  # the local esm's group (template.yaml's ConsumerGroupId default)


class LocalStackError(Exception):
    """The local stack cannot do it (not running, Cube answered an error); one line with the fix."""


def quiet_kafka_logger() -> logging.Logger:
    """librdkafka logs every refused connection to stderr (dozens of lines when the stack is down):
    its log goes here instead; what matters comes back through delivery reports and exceptions."""
    quiet = logging.getLogger("preagg_cli.librdkafka")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    return quiet


@dataclass
class LocalStack:
    root: Path  # the checkout whose `.stack/` this is
    env: Mapping[str, str]

    @property
    def state(self) -> Path:
        return self.root / ".stack"

    # -- is it up? -------------------------------------------------------------------------------
    def require(self, services: Sequence[str]) -> None:
        """LocalStackError naming what is down, unless every one of `services` answers. An environment
        file outside a devstack state folder (no ports.json beside it) is taken as it is."""
        if not (self.state / "ports.json").is_file():
            return
        from devstack import Stack  # noqa: PLC0415 - dev-only package, installed with the CLI

        statuses = Stack(self.root).status()
        wanted = list(services)
        down = [name for name in wanted if not statuses[name].up]
        if all(not status.up for status in statuses.values()):
            raise LocalStackError("the local stack is not running: start it with `make stack-start`")
        if down:
            raise LocalStackError(
                f"the local stack is only partly running ({', '.join(down)} down): `make stack-start` starts "
                "what is missing"
            )

    # -- Cube --------------------------------------------------------------------------------------
    def _cube(self) -> Any:
        from devstack import Stack, StackEnv  # noqa: PLC0415
        from devstack.cubeapi import CubeApi  # noqa: PLC0415

        stack = Stack(self.root)
        env = StackEnv(**{k.lower(): v for k, v in self.env.items() if k.lower() in StackEnv.__dataclass_fields__})
        return CubeApi(stack, env)

    def load(self, tenant_id: str, query: Mapping[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
        """`/v1/load` for the tenant, waiting out Cube's "Continue wait"; LocalStackError on an error."""
        from devstack.cubeapi import CubeApiError  # noqa: PLC0415

        try:
            answer: dict[str, Any] = self._cube().load(tenant_id, query, timeout_s=timeout_s)
        except CubeApiError as exc:
            text = str(exc)
            if "No pre-aggregation partitions were built yet" in text:
                raise LocalStackError(
                    f'Cube has built no rollup for {tenant_id} that answers this query yet (400 "No '
                    'pre-aggregation partitions were built yet"; a fresh stack builds nothing until asked): '
                    f"`preagg-refresh refresh --tenant {tenant_id} --entity-type User --force`, then "
                    f"`preagg-refresh jobs --tenant {tenant_id} --wait`"
                ) from None
            raise LocalStackError(f"Cube refused the query: {text}") from None
        except OSError as exc:
            raise LocalStackError(f"Cube is not reachable ({exc}): `make stack-status`") from None
        return answer

    def known_targets(self, tenant_id: str) -> list[str]:
        """Cube's cubes and `Cube.preAggregation` ids in the tenant's data model ([] if unknown)."""
        try:
            token = self._cube().stack.cube_token({"tenantId": tenant_id})
            meta = self._cube()._request("/v1/meta?extended=true", token)
        except Exception:  # a hint only: never let it hide the error being reported
            return []
        names: list[str] = []
        for cube in meta.get("cubes", []) if isinstance(meta, dict) else []:
            names.append(str(cube.get("name")))
            names += [f"{cube.get('name')}.{p.get('name')}" for p in cube.get("preAggregations") or []]
        return names

    # -- the local event sources -----------------------------------------------------------------
    def lag(self, timeout_s: float = 5.0) -> int:
        """Records on the topic the local event sources have not finished (committed) yet."""
        from confluent_kafka import Consumer, KafkaException, TopicPartition  # noqa: PLC0415

        bootstrap = self.env.get("KAFKA_BOOTSTRAP_SERVERS", "")
        # Same group id, never subscribed: reads the group's committed offsets without joining it.
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": CONSUMER_GROUP, "logger": quiet_kafka_logger()}
        )
        try:
            topic = consumer.list_topics(TOPIC, timeout=timeout_s).topics.get(TOPIC)
            partitions = [TopicPartition(TOPIC, p) for p in sorted(topic.partitions if topic else {})]
            committed = consumer.committed(partitions, timeout=timeout_s)
            behind = 0
            for part in committed:
                low, high = consumer.get_watermark_offsets(TopicPartition(TOPIC, part.partition), timeout=timeout_s)
                behind += high - (part.offset if part.offset >= 0 else low)
            return behind
        except KafkaException as exc:
            raise LocalStackError(f"cannot read the local topic at {bootstrap} ({exc}): `make stack-status`") from None
        finally:
            consumer.close()

    def wait_caught_up(self, timeout_s: float) -> None:
        """Until the local event sources have handled every record on the topic."""
        deadline = time.monotonic() + timeout_s
        while (behind := self.lag()) > 0:
            if time.monotonic() > deadline:
                raise LocalStackError(
                    f"the local event sources still have {behind} record(s) to handle after {timeout_s:.0f} s: "
                    "is esm up? `make stack-status`, `tail .stack/logs/esm.log`"
                )
            time.sleep(0.2)

    def invocations(self) -> list[dict[str, Any]]:
        """The esm's journal: one entry per function invocation (`.stack/logs/invocations.jsonl`)."""
        path = self.state / "logs" / "invocations.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
