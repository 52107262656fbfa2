"""Histogram buckets shared by every freshness metric (stream, trainer, scorer). No metrics live here, so
importing it registers nothing in a process's Prometheus registry."""

# Freshness buckets for every stage of every process (one set, so stages add up on one dashboard): fine
# below a second for the fast stages, and every few seconds from 10 s to 3 min because delays that include
# an attribution window (30 s in `zenith up`, 120 s by default) sit there; coarse buckets would blur them.
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 12.5, 15, 20, 25, 30, 32, 34, 36,
                     40, 45, 50, 60, 75, 90, 105, 120, 125, 130, 140, 150, 180, 240, 300, 600, 1800, 3600)
