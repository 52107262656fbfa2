"""Did every event reach the state exactly once? Compare the users' counters in Redis with the events.

Each impression, engagement and interaction adds to its user's counters, so the sums of the counters over
all users must equal the sums the events imply: a lost write leaves a gap, a replay applied twice an excess.
Used by the fault drills and the stream tests (there are no per-event markers to look for: the state is
idempotent by input position).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from state.store import Entity, LiveState, StateConfig, is_cluster
from stream.events import Event
from stream.processor import state_change


def expected_user_counters(events: Iterable[Event]) -> Counter[str]:
    builder = LiveState(None)  # builds changes only (no client needed)
    out: Counter[str] = Counter()
    for ev in events:
        for t in state_change(builder, ev).targets:
            if t.entity is Entity.USER:
                out.update(t.incr)
    return out


def user_counters(redis_url: str, config: StateConfig | None = None) -> Counter[str]:
    """The sums over every user's counter hash (a Redis Cluster is scanned node by node)."""
    import redis

    cfg = config or StateConfig()
    if is_cluster(redis_url):
        from redis.cluster import RedisCluster

        client = RedisCluster.from_url(redis_url)
    else:
        client = redis.Redis.from_url(redis_url)
    out: Counter[str] = Counter()
    try:
        for key in client.scan_iter(match=f"{cfg.prefix}{{u:*", count=1000):
            if key.endswith(b"}"):  # the hash itself, not its :log or :seq
                out.update({k.decode(): float(v) for k, v in client.hgetall(key).items()
                            if not k.startswith(b"pos:")})
    finally:
        client.close()
    return out


def state_gap(redis_url: str, events: Iterable[Event], config: StateConfig | None = None) -> dict[str, float]:
    """Expected minus stored, per user counter, where they differ: {} means every event applied exactly once."""
    want, got = expected_user_counters(events), user_counters(redis_url, config)
    return {k: round(want[k] - got[k], 6) for k in set(want) | set(got) if abs(want[k] - got[k]) > 1e-6}

