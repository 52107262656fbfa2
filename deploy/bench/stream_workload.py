"""``bench stream`` workload: simulated events made unique to a run, pre-produced to the input topics; the
sentinels that push stream time past the backlog's last window; the paced live phase; exact delays read back
from the samples topic."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from deploy.bench.stats import percentile


def sim_events(impressions: int, seed: int, run: str, start_ms: int | None = None,
               requests_per_s: float = 40.0) -> list:
    """Simulated events, time-ordered, with event ids made unique to this run (a shared Redis remembers
    event ids for a day and would treat a rerun as replays)."""
    from stream.simulator import SimConfig, Simulator

    cfg = SimConfig(seed=seed, requests_per_s=requests_per_s)
    span_ms = int(1000 * impressions / (cfg.requests_per_s * cfg.rooms_per_request))
    cfg = dataclasses.replace(cfg, start_ms=start_ms or int(time.time() * 1000) - span_ms - 60_000)
    events = Simulator(cfg).events(max_impressions=impressions)
    # Engagements and room ends trail the last impression (by minutes): without a given start, move the
    # whole (seeded, so identical) run back until its last event is a minute old, or validation would
    # refuse the tail as "in the future".
    late_ms = max(e.ts_ms for e in events) - (int(time.time() * 1000) - 60_000) if events else 0
    if start_ms is None and late_ms > 0:
        cfg = dataclasses.replace(cfg, start_ms=cfg.start_ms - late_ms)
        events = Simulator(cfg).events(max_impressions=impressions)
    return [dataclasses.replace(e, event_id=f"{run}-{e.event_id}") for e in events]


def produce(bootstrap: str, topics: Any, events: list) -> float:
    from stream.producer import EventProducer

    t0 = time.perf_counter()
    p = EventProducer(bootstrap, topics, **{"linger.ms": 20, "batch.num.messages": 10_000})
    for ev in events:
        p.send(ev)
    report = p.flush(120)
    if report.failed:
        raise RuntimeError(f"{report.failed} events not delivered: {report.first_error}")
    return time.perf_counter() - t0


def sentinels(topics: Any, partitions: int, ts_ms: int, run: str) -> list:
    """One impression and one engagement per input partition at ``ts_ms``, so stream time passes every
    backlog window as soon as the backlog is read (no wait for the idle advance). Keys are picked with the
    producers' partitioner (murmur2) so each partition gets one."""
    from aiokafka.partitioner import DefaultPartitioner

    from stream.events import Engagement, EngagementKind, Impression

    part = DefaultPartitioner()
    users: dict[int, str] = {}
    i = 0
    while len(users) < partitions:
        key = f"{run}-sentinel-{i}"
        users.setdefault(part(key.encode(), list(range(partitions)), list(range(partitions))), key)
        i += 1
    out: list = []
    for p, user in sorted(users.items()):
        out.append(Impression(event_id=f"{run}-si{p}", request_id="sentinel", user_id=user, room_id="r-sentinel",
                              author_id="a-sentinel", position=0, ts_ms=ts_ms, hour=0, device="web", tab="live"))
        out.append(Engagement(event_id=f"{run}-se{p}", user_id=user, room_id="r-sentinel",
                              kind=EngagementKind.LIKE, ts_ms=ts_ms, author_id="a-sentinel"))
    return out


def exact_delays(bootstrap: str, topic: str, id_prefix: str, window_s: float, timeout_s: float = 20.0) -> dict:
    """Exact per-sample delays from the records on the samples topic: emitted_ms - event_ms."""
    import numpy as np
    from confluent_kafka import Consumer

    from model.spec import default_live_spec
    from stream.samples import SampleCodec

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-check-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    raw: list[bytes] = []
    idle_since = time.monotonic()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and time.monotonic() - idle_since < 3.0:
            got = [m.value() for m in c.consume(10_000, timeout=0.5) if not m.error()]
            if got:
                raw += got
                idle_since = time.monotonic()
    finally:
        c.close()
    d = SampleCodec(default_live_spec()).decode(raw)
    mask = np.array([i.startswith(id_prefix) for i in d.impression_ids], dtype=bool)
    delay = (d.emitted_ms[mask] - d.arrays.event_ms[mask]) / 1000.0
    if not len(delay):
        return {"count": 0}
    delays = delay.tolist()
    close = [max(x - window_s, 0.0) for x in delays]
    return {"count": len(delays),
            "event_to_sample_p50_s": percentile(delays, 0.5), "event_to_sample_p99_s": percentile(delays, 0.99),
            "event_to_sample_max_s": max(delays),
            "close_delay_p50_s": percentile(close, 0.5), "close_delay_p99_s": percentile(close, 0.99)}


def live_phase(bootstrap: str, topics: Any, seconds: float, requests_per_s: float, seed: int, run: str) -> dict:
    """Produce events stamped now, paced at real time, for ``seconds``; in-flight engagements are cut."""
    from stream.events import Impression
    from stream.producer import EventProducer, paced
    from stream.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(seed=seed, start_ms=int(time.time() * 1000), requests_per_s=requests_per_s))
    p = EventProducer(bootstrap, topics)
    n = imps = 0
    t_end = time.monotonic() + seconds
    for ev in paced(sim.events(duration_s=seconds), speed=1.0):
        if time.monotonic() > t_end:
            break
        p.send(dataclasses.replace(ev, event_id=f"{run}-{ev.event_id}"))
        n += 1
        imps += isinstance(ev, Impression)
    p.flush(30)
    return {"events": n, "impressions": imps, "seconds": seconds}
