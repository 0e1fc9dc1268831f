"""The local Kafka endpoint: librdkafka's mock cluster (inside the confluent-kafka wheel) held open by
this process. `python -m devstack.kafka STATE_FILE` creates a producer with `test.mock.num.brokers`,
which makes librdkafka start an in-process cluster that speaks the Kafka protocol on a loopback port,
asks it for the stack's topics (the mock creates a topic on its first metadata request, with 4
partitions; AdminClient.create_topics times out against it), writes the broker address to STATE_FILE
and then sleeps until SIGTERM. Topics and offsets live in this process's memory: stopping it empties
them. Not a broker for production; no Kafka broker installs offline."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

TOPICS = ("core.entities.lifecycle.mutated", "core.entities.lifecycle.mutated.dlt")


def main(argv: list[str]) -> int:
    faulthandler.enable()  # a crash inside librdkafka leaves its stack in kafka.log
    from confluent_kafka import Producer  # noqa: PLC0415 - dev dependency, only in this process

    state = Path(argv[0])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    holder = Producer({"test.mock.num.brokers": 1, "bootstrap.servers": ""})
    for topic in TOPICS:
        holder.list_topics(topic=topic, timeout=10)  # the mock auto-creates the topic
    brokers = holder.list_topics(timeout=10).brokers
    broker = next(iter(brokers.values()))
    address = f"{broker.host}:{broker.port}"
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "bootstrap": address, "topics": list(TOPICS)}) + "\n")
    tmp.replace(state)
    print(f"{time.strftime('%H:%M:%S')} kafka mock cluster on {address}, topics {', '.join(TOPICS)}", flush=True)
    while not stop.wait(1.0):
        holder.poll(0)
    state.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
