"""Publishing events to Kafka: keyed, paced, with delivery accounting.

The producer uses ``murmur2_random``, the Java client's (and aiokafka's) partitioner, so librdkafka puts a
user's events in the same partition the Faust app's table partitioner expects (librdkafka's own default,
CRC32, would not).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import KafkaException, Producer

from stream.events import Event, encode_event
from stream.kafka_security import KafkaSecurity
from stream.topics import PLAINTEXT, Topics, partition_key

PRODUCER_DEFAULTS = {
    "partitioner": "murmur2_random",
    "enable.idempotence": True,  # retries never duplicate or reorder a partition's events
    "linger.ms": 5,
}


@dataclass
class DeliveryReport:
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    first_error: str = ""


class EventProducer:
    def __init__(self, bootstrap: str, topics: Topics, security: KafkaSecurity = PLAINTEXT,
                 **overrides: object) -> None:
        self.topics = topics
        self.report = DeliveryReport()
        self._p = Producer({"bootstrap.servers": bootstrap, **security.confluent(), **PRODUCER_DEFAULTS, **overrides})

    def _on_delivery(self, err: object, _msg: object) -> None:
        if err is None:
            self.report.delivered += 1
        else:
            self.report.failed += 1
            self.report.first_error = self.report.first_error or str(err)

    def send(self, event: Event) -> None:
        self.send_raw(self.topics.for_event(event), partition_key(event), encode_event(event))

    def send_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self._p.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._p.poll(0.05)
        self.report.sent += 1
        self._p.poll(0)

    def flush(self, timeout_s: float = 60.0) -> DeliveryReport:
        remaining = self._p.flush(timeout_s)
        if remaining:
            raise KafkaException(f"{remaining} events still undelivered after {timeout_s}s")
        return self.report


def paced(events: Iterable[Event], speed: float, clock: Callable[[], float] = time.monotonic) -> Iterator[Event]:
    """Release events at ``speed`` x their own time base (speed <= 0: as fast as possible)."""
    if speed <= 0:
        yield from events
        return
    t0_wall, t0_event = clock(), None
    for ev in events:
        if t0_event is None:
            t0_event = ev.ts_ms
        wait = (ev.ts_ms - t0_event) / 1000 / speed - (clock() - t0_wall)
        if wait > 0:
            time.sleep(wait)
        yield ev
