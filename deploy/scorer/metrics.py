"""The scorer's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream.freshness import FRESHNESS_BUCKETS


class ScorerMetrics:
    """The scorer's Prometheus metrics, in their own registry (so several scorers can live in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.request_seconds = Histogram(
            "zenith_scorer_request_seconds", "Ranking request latency (parse to response), successful requests",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
            registry=r)
        self.stage_seconds = Histogram(
            "zenith_scorer_stage_seconds",
            "Time per ranking stage: read (user from Redis, cache misses), user (the user's part, once), "
            "assemble (every candidate's features), forward (the model)",
            ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1), registry=r)
        self.requests = Counter("zenith_scorer_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.candidates = Counter("zenith_scorer_candidates_total", "Candidates scored", registry=r)
        self.candidates_per_request = Histogram(
            "zenith_scorer_candidates_per_request", "Candidates per ranking request",
            buckets=(1, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000), registry=r)
        self.state_up = Gauge("zenith_scorer_state_up", "1 while the state store (Redis) answers, else 0",
                              registry=r)
        self.state_up.set(1)
        self.model_version = Gauge("zenith_scorer_model_version", "Model version being served (0: none)", registry=r)
        self.load_seconds = Histogram(
            "zenith_scorer_version_load_seconds", "Time to load and verify a new version, by how it was built",
            ["how"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.swaps = Counter("zenith_scorer_swaps_total", "Model versions swapped in, by how", ["how"], registry=r)
        self.refused = Counter("zenith_scorer_refused_versions_total",
                               "Versions refused (corrupt, partial, mismatched); the previous kept serving",
                               registry=r)
        self.load_errors = Counter("zenith_scorer_version_load_errors_total",
                                   "Transient failures loading a version (retried)", registry=r)
        self.item_lookups = Counter(
            "zenith_scorer_item_cache_lookups_total",
            "Candidates whose room and author came from the shared cache (hit) or were read in the request (miss)",
            ["result"], registry=r)
        self.item_cache_age = Gauge(
            "zenith_scorer_item_cache_age_seconds",
            "Age of the shared room/author snapshot (re-read every item_refresh_s; unused past 1 s)", registry=r)
        self.item_refresh_seconds = Histogram(
            "zenith_scorer_item_cache_refresh_seconds", "Time to re-read every cached room and author",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.forward_fallbacks = Counter(
            "zenith_scorer_forward_fallbacks_total",
            "Versions served with the eager forward because the configured one failed to build or to match",
            registry=r)
        self.data_age = Gauge("zenith_scorer_model_data_age_seconds",
                              "Now minus the data watermark (newest event time) of the served version", registry=r)
        self.published_to_served = Histogram(
            "zenith_freshness_published_to_served_seconds",
            "Time a version started serving minus the time it was published", buckets=FRESHNESS_BUCKETS, registry=r)
        self.event_to_served = Histogram(
            "zenith_freshness_event_to_served_seconds",
            "Time a version started serving minus its data watermark (newest event it learned from)",
            buckets=FRESHNESS_BUCKETS, registry=r)
