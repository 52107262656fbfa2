"""``bench stream`` baselines: the Kafka clients alone on the bench's topics (confluent-kafka, + ``decode_event``,
aiokafka), and the offline processor (``stream.offline.build_samples`` on Redis, no Kafka, no Faust)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from deploy.bench.redis_cost import commandstats, redis_delta
from deploy.bench.stream_profile import profile_breakdown


def partitions(bootstrap: str, topic_names: list[str]) -> list[tuple[str, int]]:
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return [(t, p) for t in topic_names for p in sorted(md[t].partitions)]


def raw_confluent(bootstrap: str, topic_names: list[str], total: int, reps: int, timeout_s: float
                  ) -> tuple[dict, list]:
    """Read every input message, ``reps`` times with a fresh consumer each; best pass. Partitions are
    assigned (no group join) and the connection is up before the clock starts, so the time is fetching and
    handing out messages only."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    parts = partitions(bootstrap, topic_names)
    passes, values = [], []
    for _ in range(reps):
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                      "enable.auto.commit": False, "fetch.max.bytes": 52_428_800,
                      "queued.max.messages.kbytes": 262_144})
        try:
            c.list_topics(timeout=10)
            values = []
            deadline = time.monotonic() + timeout_s
            t0 = time.perf_counter()
            c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in parts])
            while len(values) < total and time.monotonic() < deadline:
                # consume(n) waits for n messages or the timeout: never ask for more than remain
                want = min(10_000, total - len(values))
                values += [m.value() for m in c.consume(want, timeout=0.5) if not m.error()]
            passes.append(time.perf_counter() - t0)
        finally:
            c.close()
    wall = min(passes)
    return {"events": len(values), "wall_s": wall, "events_per_s": len(values) / wall, "passes_s": passes}, values


def decode_rate(values: list[bytes], consume_s: float) -> dict:
    from stream.events import decode_event

    t0 = time.perf_counter()
    for v in values:
        decode_event(v)
    decode_s = time.perf_counter() - t0
    wall = consume_s + decode_s
    return {"events": len(values), "wall_s": wall, "decode_s": decode_s, "events_per_s": len(values) / wall}


def raw_aiokafka(bootstrap: str, topic_names: list[str], total: int, reps: int, timeout_s: float) -> dict:
    """The same with aiokafka, the client inside Faust."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    parts = [TopicPartition(t, p) for t, p in partitions(bootstrap, topic_names)]

    async def one() -> tuple[int, float]:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=10_000,
                             fetch_max_bytes=52_428_800, max_partition_fetch_bytes=10_485_760)
        await c.start()
        try:
            await c.topics()  # connected, metadata known
            n = 0
            deadline = time.monotonic() + timeout_s
            t0 = time.perf_counter()
            c.assign(parts)
            await c.seek_to_beginning(*parts)
            while n < total and time.monotonic() < deadline:
                got = await c.getmany(timeout_ms=500, max_records=10_000)
                n += sum(len(v) for v in got.values())
            return n, time.perf_counter() - t0
        finally:
            await c.stop()

    passes = [asyncio.run(one()) for _ in range(reps)]
    n, wall = min(passes, key=lambda p: p[1])
    return {"events": n, "wall_s": wall, "events_per_s": n / wall, "passes_s": [w for _, w in passes]}


@contextlib.contextmanager
def offline_redis(tmp: Path) -> Iterator[tuple[str, str]]:
    """(url, key prefix): a throwaway redis-server; without one, the given REDIS_URL under a fresh prefix."""
    from deploy.infra import InfraError, ephemeral_redis

    try:
        with ephemeral_redis(tmp / "offline-redis") as url:
            yield url, "zl:"
    except InfraError:
        from deploy.config import Settings

        given = Settings().redis_url
        if not given:
            raise
        yield given, f"zlbench:{uuid.uuid4().hex[:8]}:"


def offline(redis_url: str, prefix: str, raw_events: list[bytes], window_ms: int, profile: bool) -> dict:
    """``stream.offline.build_samples`` over events decoded from their wire bytes (as the app gets them)."""
    import cProfile

    from model.spec import default_live_spec
    from state.store import LiveState, StateConfig
    from stream.events import decode_event
    from stream.join import LabelJoiner
    from stream.offline import build_samples

    async def run() -> tuple[int, float]:
        state = LiveState.from_url(redis_url, StateConfig(prefix=prefix))
        try:
            await state.r.ping()
            t0 = time.perf_counter()
            arrays, _ = await build_samples((decode_event(v) for v in raw_events), state, default_live_spec(),
                                            LabelJoiner(window_ms, 0), batch_size=500)
            return len(arrays), time.perf_counter() - t0
        finally:
            await state.aclose()

    before = commandstats(redis_url)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    samples, wall = asyncio.run(run())
    if prof:
        prof.disable()
    out = {"events": len(raw_events), "samples": samples, "wall_s": wall, "events_per_s": len(raw_events) / wall,
           "samples_per_s": samples / wall, "redis": redis_delta(before, commandstats(redis_url), len(raw_events))}
    if prof:
        out["profile"] = profile_breakdown(prof, wall)
    return out
