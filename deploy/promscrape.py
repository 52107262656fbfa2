"""Reading our own processes' Prometheus endpoints: counters, gauges, and histogram quantiles computed
the way Prometheus' ``histogram_quantile`` does (linear interpolation inside the bucket), so the report of
``zenith up`` agrees with the Grafana dashboard.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """Sum of all series of ``name`` whose labels include ``labels`` (nan when there is none)."""
        want = set(labels.items())
        hits = [v for (n, ls), v in self.samples.items() if n == name and want <= set(ls)]
        return sum(hits) if hits else math.nan

    def quantile(self, histogram: str, q: float) -> float:
        """``histogram_quantile(q, histogram)`` over all label sets of one histogram."""
        buckets: dict[float, float] = {}
        for (n, ls), v in self.samples.items():
            if n == f"{histogram}_bucket":
                le = float(dict(ls)["le"])
                buckets[le] = buckets.get(le, 0.0) + v
        return histogram_quantile(q, sorted(buckets.items()))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """``buckets``: (upper bound, cumulative count), ascending, ending with +Inf.

    >>> histogram_quantile(0.5, [(1.0, 0), (2.0, 10), (float("inf"), 10)])
    1.5
    """
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # Prometheus answers the highest finite bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return math.nan


def scrape(url: str, timeout_s: float = 2.0) -> Scrape:
    """Fetch and parse one ``/metrics`` endpoint; an unreachable one reads as empty."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return Scrape()
    out = Scrape()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
