"""Garbage-collector settings for a long-running process that allocates fast (the stream worker, a scorer).

Its own module so that a process can take it without importing the stream worker (Kafka clients and all).
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """For a long-running process that allocates fast (the stream worker, a scorer), once start-up is done.

    Such a process holds hundreds of thousands of long-lived objects (torch, Faust, caches); the cyclic GC
    rescans them all on every full collection: a third of the stream's per-event time, and 200 ms pauses
    in the scorer (its p99). Freeze what start-up made, and collect the young generation less often.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
