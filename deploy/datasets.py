"""Offline sample datasets for benchmarks, built by the stream's own code against a real Redis.

``load_samples("sim", n, seed)`` runs the live simulator; ``load_samples(path_to_kuairand_csv, n, seed)``
replays the public log. Either way the events go through the same state writes, label join and feature
assembly as the Faust app (``stream.offline``), on a throwaway redis-server, and the
result is cached under ``<home>/cache`` keyed by source, size, seed and feature-spec fingerprint.

The stream emits a sample when its attribution window closes, so emission order is "impression time plus
window, or earlier when the user engaged". Benchmarks replay samples in *impression-time* order instead
(a stable sort on ``event_ms``): that is the order the scorer served them in, so test-then-train and a
``--split-time`` cut mean what they say. Features are point-in-time either way.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import numpy as np
from rich.progress import Progress

from deploy.infra import ephemeral_redis
from model.batch import SampleArrays
from model.spec import FeatureSpec, default_live_spec
from state.store import LiveState
from stream.events import Event
from stream.join import LabelJoiner
from stream.offline import build_samples
from stream.replay import kuairand_events
from stream.simulator import SimConfig, Simulator

SIM = "sim"
CACHE_FORMAT = 2  # 2: rows in impression-time order (1 was window-close order); bump to invalidate caches


def source_events(source: str, n_impressions: int, seed: int) -> tuple[list[Event], str]:
    """The time-ordered events of a source, cut after ``n_impressions`` impressions (and their engagements)."""
    if source == SIM:
        sim = Simulator(SimConfig(seed=seed, n_users=1_000, n_authors=200))
        return list(sim.events(max_impressions=n_impressions)), "sim"
    path = Path(source)
    if not path.exists():
        raise SystemExit(f"no such data file: {path} (give a KuaiRand CSV such as ../shared/data/kuairand/*.csv)")
    return list(kuairand_events(path, limit=n_impressions)), f"kuairand-{path.stem}"


def load_samples(source: str = SIM, n_impressions: int = 20_000, seed: int = 0,
                 spec: FeatureSpec | None = None, cache_dir: Path | None = None,
                 window_s: float = 120.0) -> SampleArrays:
    spec = spec or default_live_spec()
    events, name = source_events(source, n_impressions, seed)
    cache_dir = cache_dir or Path(os.environ.get("ZENITH_HOME", ".zenith")) / "cache"
    cache = cache_dir / (f"samples-v{CACHE_FORMAT}-{name}-{n_impressions}-{seed}-{spec.fingerprint():08x}"
                         f"-{int(window_s)}.npz")
    if cache.exists():
        return SampleArrays.load(cache)
    arrays = by_impression_time(asyncio.run(_build(events, spec, LabelJoiner(int(window_s * 1000), 0))))
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays.save(cache)
    return arrays


def by_impression_time(arrays: SampleArrays) -> SampleArrays:
    """Rows stable-sorted by impression time (``event_ms``); ties keep emission order.

    >>> a = SampleArrays(np.zeros((3, 1), np.int64), np.zeros((3, 1, 1), np.int64), np.zeros((3, 1), np.float32),
    ...                  np.zeros((3, 1), np.float32), np.array([1, 2, 3]), np.array([20, 10, 10]))
    >>> by_impression_time(a).user.tolist()
    [2, 3, 1]
    """
    return arrays[np.argsort(arrays.event_ms, kind="stable")]


async def _build(events: list[Event], spec: FeatureSpec, joiner: LabelJoiner) -> SampleArrays:
    # Always a throwaway server: an offline build needs empty state and must never touch a live Redis.
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        task = progress.add_task("building samples (stream code, real Redis)", total=len(events))
        with ephemeral_redis(tmp) as url:
            state = LiveState.from_url(url)
            try:
                arrays, _ = await build_samples(events, state, spec, joiner,
                                                on_batch=lambda n: progress.advance(task, n))
            finally:
                await state.aclose()
    return arrays
