"""Offline sample datasets for benchmarks, built by the stream's own code against a real Redis.

``load_samples("sim", n, seed)`` runs the live simulator; ``load_samples(path_to_kuairand_csv, n, seed)``
replays the public log. Either way the events go through the same state writes, label join and feature
assembly as the Faust app (``stream.offline``), on a throwaway redis-server, and the
result is cached under ``<home>/cache`` keyed by source, size, seed and feature-spec fingerprint.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

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
    cache = cache_dir / f"samples-{name}-{n_impressions}-{seed}-{spec.fingerprint():08x}-{int(window_s)}.npz"
    if cache.exists():
        return SampleArrays.load(cache)
    arrays = asyncio.run(_build(events, spec, LabelJoiner(int(window_s * 1000), 0)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays.save(cache)
    return arrays


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
