"""The stream worker's typed configuration (filled from the environment in ``deploy/config.py`` only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from state.store import StateConfig
from stream.events import EventLimits
from stream.kafka_security import KafkaSecurity
from stream.resilience import Backoff
from stream.topics import Topics


@dataclass(frozen=True)
class StreamConfig:
    bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    topics: Topics = field(default_factory=Topics)
    app_id: str = "zenith-stream"
    partitions: int = 4
    window_ms: int = 120_000
    lateness_ms: int = 5_000  # extra wait for cross-topic skew before a window closes
    dedup_horizon_ms: int = 300_000  # the event-id guard's memory (stream.join.LabelJoiner)
    batch_size: int = 2000  # messages per consume(): per-batch Redis work is shared by more events
    batch_within_s: float = 0.05  # ... or what arrived within this long
    session_timeout_s: float = 10.0  # a killed worker's partitions move to a live one after this long
    close_interval_s: float = 0.5
    max_close_per_tick: int = 10_000  # a tick that hits it closes again after the next batch
    # With no events for this long, stream time follows the wall clock, so a quiet stream still closes
    # its windows. 0 disables it (pure event time, e.g. for replays of old logs).
    idle_advance_s: float = 5.0
    metrics_port: int = 9101
    metrics_host: str = "127.0.0.1"
    state: StateConfig = field(default_factory=StateConfig)
    limits: EventLimits = field(default_factory=EventLimits)
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    backoff: Backoff = field(default_factory=Backoff)
