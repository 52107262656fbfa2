"""Topic names, partition keys and topic creation: defined here once.

Impressions and engagements are keyed by user id so one user's events land in one partition, in order,
at one stream worker (the label join and the user's state updates need that). Lifecycle events have no
user; they are keyed by author id and update room state only.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream.events import Engagement, Event, Impression, LiveEvent
from stream.kafka_security import KafkaSecurity

PLAINTEXT = KafkaSecurity()


@dataclass(frozen=True)
class Topics:
    """Topic names; ``prefix`` lets several stacks (or tests) share one broker."""

    prefix: str = ""

    @property
    def impression(self) -> str:
        return f"{self.prefix}events.impression"

    @property
    def engagement(self) -> str:
        return f"{self.prefix}events.engagement"

    @property
    def live(self) -> str:
        return f"{self.prefix}events.live"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}events.deadletter"

    @property
    def samples(self) -> str:
        return f"{self.prefix}samples"

    @property
    def model_updates(self) -> str:
        return f"{self.prefix}model-updates"

    def for_event(self, event: Event) -> str:
        return {Impression: self.impression, Engagement: self.engagement, LiveEvent: self.live}[type(event)]

    def all(self) -> list[str]:
        return [self.impression, self.engagement, self.live, self.deadletter, self.samples, self.model_updates]


def partition_key(event: Event) -> bytes:
    if isinstance(event, LiveEvent):
        return event.author_id.encode()
    return event.user_id.encode()


def ensure_topics(bootstrap: str, topics: Topics, partitions: int = 4, timeout_s: float = 30.0,
                  security: KafkaSecurity = PLAINTEXT) -> None:
    """Create the project's topics if missing (idempotent). Input topics share a partition count
    because the stream joins them by key (co-partitioning)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, **security.confluent()})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [NewTopic(t, num_partitions=partitions, replication_factor=1)
              for t in topics.all() if t not in existing]
    if not wanted:
        return
    for topic, fut in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            fut.result(timeout_s)
        except Exception as exc:  # a concurrent creator is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {topic}: {exc}") from exc
