"""Prometheus metrics of the stream stage. Names are prefixed ``zenith_stream_``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from stream.freshness import FRESHNESS_BUCKETS

DELAY_BUCKETS = FRESHNESS_BUCKETS

EVENTS_IN = Counter("zenith_stream_events_total", "Events consumed, by type", ["type"])
DEAD_LETTERS = Counter("zenith_stream_deadletters_total", "Events sent to the dead-letter topic", ["reason"])
REPLAYED = Counter("zenith_stream_replayed_events_total",
                   "Redelivered events whose input position had been applied before (no effect)")
DUPLICATES = Counter("zenith_stream_duplicate_events_total",
                     "Events dropped because their id was seen recently (a producer sent them twice)", ["type"])
SAMPLES_OUT = Counter("zenith_stream_samples_total", "Labelled samples emitted, by main label", ["entered"])
ENGAGEMENTS = Counter("zenith_stream_engagements_total", "Engagements by attribution outcome", ["outcome"])
PENDING = Gauge("zenith_stream_pending_impressions", "Impressions waiting for their window to close")
WATERMARK = Gauge("zenith_stream_watermark_ms", "Stream time (max event time seen), epoch ms")
EVENT_TO_SAMPLE = Histogram(
    "zenith_freshness_event_to_sample_seconds",
    "Wall time of sample emission minus impression time (includes the attribution window)",
    buckets=DELAY_BUCKETS,
)
CLOSE_DELAY = Histogram(
    "zenith_stream_close_delay_seconds",
    "Emission wall time minus the end of the impression's attribution window (the stream's own delay)",
    buckets=DELAY_BUCKETS,
)
REDIS_LATENCY = Histogram(
    "zenith_stream_redis_seconds", "Redis round trip per pipelined batch", ["op"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)
DEPENDENCY_UP = Gauge("zenith_stream_dependency_up",
                      "1 while the dependency answers, 0 during an outage (the stream then holds its input)",
                      ["dependency"])
OUTAGES = Counter("zenith_stream_outages_total", "Outages of a dependency seen by the stream", ["dependency"])
OUTAGE_SECONDS = Counter("zenith_stream_outage_seconds_total", "Seconds spent waiting for a dependency",
                         ["dependency"])
DEPENDENCY_RETRIES = Counter("zenith_stream_dependency_retries_total", "Failed attempts that were retried",
                             ["dependency"])
