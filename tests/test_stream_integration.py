"""The stream worker against the real broker and Redis: one sample per impression, right labels,
point-in-time features, dead letters, and a worker killed mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from confluent_kafka import Consumer

from model.spec import default_live_spec
from state.store import LiveState
from stream.audit import state_gap
from stream.events import Engagement, Event, Impression
from stream.join import LabelJoiner
from stream.offline import build_samples
from stream.producer import EventProducer
from stream.samples import LONG_VIEW_S, SampleCodec
from stream.simulator import SimConfig, Simulator
from stream.topics import Topics, ensure_topics

WINDOW_S = 10.0
SPEC = default_live_spec()


def sim_events(n: int, seed: int) -> list[Event]:
    return list(Simulator(SimConfig(n_users=120, n_authors=40, seed=seed)).events(max_impressions=n))


def reference_labels(events: list[Event], window_ms: int) -> dict[str, tuple[bool, bool]]:
    """Brute force: each engagement goes to the latest impression of its (user, room) at or before it,
    if that impression's window covers it. Returns impression id -> (entered, long_view)."""
    imps = [e for e in events if isinstance(e, Impression)]
    by_pair: dict[tuple[str, str], list[Impression]] = {}
    for i in imps:
        by_pair.setdefault((i.user_id, i.room_id), []).append(i)
    entered: set[str] = set()
    watch: Counter[str] = Counter()
    for e in events:
        if not isinstance(e, Engagement):
            continue
        before = [i for i in by_pair.get((e.user_id, e.room_id), []) if i.ts_ms <= e.ts_ms]
        if not before:
            continue
        owner = max(before, key=lambda i: i.ts_ms)
        if e.ts_ms <= owner.ts_ms + window_ms and e.kind.value in ("enter", "watch"):
            entered.add(owner.event_id)
            watch[owner.event_id] += e.watch_seconds
    return {i.event_id: (i.event_id in entered, watch[i.event_id] >= LONG_VIEW_S) for i in imps}


class Worker:
    """``zenith stream worker`` as a real subprocess."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "stream", "worker"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def stack(kafka_bootstrap: str, redis_url: str, redis_client):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=4)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "REDIS_URL": redis_url,
           "ZENITH_TOPIC_PREFIX": prefix, "ZENITH_WINDOW_S": str(WINDOW_S), "ZENITH_LATENESS_S": "1",
           "ZENITH_IDLE_ADVANCE_S": "2", "ZENITH_STREAM_METRICS_PORT": "0"}
    workers: list[Worker] = []

    def start() -> Worker:
        workers.append(Worker(env))
        return workers[-1]

    yield kafka_bootstrap, redis_url, topics, start
    for w in workers:
        w.stop()


def produce(bootstrap: str, topics: Topics, events: list[Event], raw: list[tuple[str, bytes]] = ()) -> None:
    p = EventProducer(bootstrap, topics)
    for ev in events:
        p.send(ev)
    for topic, value in raw:
        p.send_raw(topic, b"u-bad", value)
    report = p.flush()
    assert report.failed == 0


def consume(bootstrap: str, topic: str, want: int, timeout_s: float, headers: bool = False) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got: list = []
    deadline = time.time() + timeout_s
    while time.time() < deadline and len(got) < want:
        for m in c.consume(500, timeout=0.5):
            if not m.error():
                got.append((m.value(), dict(m.headers() or [])) if headers else m.value())
    # Linger a little: more than `want` would be a bug worth seeing.
    for m in c.consume(500, timeout=1.0):
        if not m.error():
            got.append((m.value(), dict(m.headers() or [])) if headers else m.value())
    c.close()
    return got


def test_one_sample_per_impression_with_the_planted_labels(stack) -> None:
    bootstrap, redis_url, topics, start = stack
    events = sim_events(1_500, seed=11)
    n = sum(isinstance(e, Impression) for e in events)
    # A producer retrying whole batches (every third batch of 150 events sent twice, the copy right after the
    # original, as a retry comes), plus junk for the dead-letter topic.
    junk = [(topics.impression, b"{not json"), (topics.engagement, b'{"v": 1, "type": "purchase"}')]
    sent = [e for k in range(0, len(events), 150) for e in events[k:k + 150] * (2 if k % 450 == 0 else 1)]
    assert len(sent) > len(events) * 1.25
    produce(bootstrap, topics, sent, raw=junk)
    worker = start()
    got = consume(bootstrap, topics.samples, n, timeout_s=90)
    decoded = SampleCodec(SPEC).decode(got)
    assert len(got) == n, f"{len(got)} samples for {n} impressions"
    assert sorted(decoded.impression_ids) == sorted(e.event_id for e in events if isinstance(e, Impression))
    ref = reference_labels(events, int(WINDOW_S * 1000))
    entered = dict(zip(decoded.impression_ids, decoded.arrays.labels[:, 0], strict=True))
    long_view = dict(zip(decoded.impression_ids, decoded.arrays.labels[:, 1], strict=True))
    assert all(bool(entered[i]) == ref[i][0] for i in ref)
    assert all(bool(long_view[i]) == ref[i][1] for i in ref)
    assert 0.05 < np.mean([v[0] for v in ref.values()]) < 0.6  # the labels are not degenerate

    letters = consume(bootstrap, topics.deadletter, 2, timeout_s=10, headers=True)
    reasons = sorted(h["x-reason"].decode() for _, h in letters)
    assert [v for v, _ in letters] and {v for v, _ in letters} == {b"{not json", b'{"v": 1, "type": "purchase"}'}
    assert reasons[0].startswith("not JSON") and "unknown event type 'purchase'" in reasons[1]
    assert worker.proc.poll() is None, "the worker must keep running after bad input"

    # Features: equal to the same code run offline in time order against a fresh state (point in time).
    async def offline() -> tuple:
        state = LiveState.from_url(redis_url)
        await state.r.flushdb()
        try:
            return await build_samples(events, state, SPEC, LabelJoiner(int(WINDOW_S * 1000), 0))
        finally:
            await state.aclose()

    ref_arrays, ref_ids = asyncio.run(offline())
    order = {i: k for k, i in enumerate(decoded.impression_ids)}
    rows = [order[i] for i in ref_ids]
    np.testing.assert_array_equal(decoded.arrays.ids[rows], ref_arrays.ids)
    np.testing.assert_array_equal(decoded.arrays.seqs[rows], ref_arrays.seqs)
    np.testing.assert_allclose(decoded.arrays.dense[rows], ref_arrays.dense, rtol=1e-5, atol=1e-5)


def test_features_do_not_see_engagements_after_the_impression(stack) -> None:
    """The engagement is consumed before its impression; the impression's features must not count it."""
    bootstrap, _, topics, start = stack
    t0 = 1_767_225_600_000
    imp = Impression(event_id="imp-1", request_id="q", user_id="u-leak", room_id="r-1", author_id="a-1",
                     position=0, ts_ms=t0, hour=0, device="ios", tab="live", category="c1")
    from stream.events import EngagementKind

    enter = Engagement(event_id="en-1", user_id="u-leak", room_id="r-1", kind=EngagementKind.ENTER, ts_ms=t0 + 500,
                       author_id="a-1")
    watch = Engagement(event_id="wa-1", user_id="u-leak", room_id="r-1", kind=EngagementKind.WATCH,
                       ts_ms=t0 + 2_000, author_id="a-1", watch_seconds=45.0)
    produce(bootstrap, topics, [enter, watch])
    worker = start()
    time.sleep(8)  # let the worker apply the engagements to Redis first
    produce(bootstrap, topics, [imp])
    [raw] = consume(bootstrap, topics.samples, 1, timeout_s=60)
    d = SampleCodec(SPEC).decode([raw])
    dense = dict(zip((f.name for f in SPEC.dense), d.arrays.dense[0], strict=True))
    assert d.arrays.labels[0, 0] == 1 and d.arrays.labels[0, 1] == 1  # the label sees them ...
    assert dense["user_ctr"] == pytest.approx(0.2)  # ... the features do not: the prior, 1 / 5
    assert dense["ua_watch_count"] == 0 and dense["room_audience"] == 0 and dense["user_avg_watch"] == 0
    assert (d.arrays.seqs[0] == 0).all()
    assert worker.proc.poll() is None


def test_killed_worker_restarts_without_losing_an_impression(stack) -> None:
    bootstrap, _, topics, start = stack
    events = sim_events(3_000, seed=12)
    ids = {e.event_id for e in events if isinstance(e, Impression)}
    produce(bootstrap, topics, events)
    worker = start()
    emitted = consume(bootstrap, topics.samples, len(ids) // 5, timeout_s=60)
    worker.kill()  # SIGKILL mid-stream: no clean shutdown, no final commit
    assert len(emitted) < len(ids), "the kill came too late to test anything"
    start()
    got = consume(bootstrap, topics.samples, len(ids), timeout_s=120)
    decoded = SampleCodec(SPEC).decode(got)
    counts = Counter(decoded.impression_ids)
    assert set(counts) == ids, f"missing {len(ids - set(counts))} impressions"
    # At-least-once: samples the killed worker sent but had not yet recorded as closed come again (the
    # trainer drops them by impression id). A repeat must be the same sample, and only the killed worker's
    # last moments can repeat, never the whole stream.
    dupes = sum(c - 1 for c in counts.values())
    assert dupes < len(ids) // 2, f"{dupes} re-emitted samples"
    ref = reference_labels(events, int(WINDOW_S * 1000))
    for imp_id, entered in zip(decoded.impression_ids, decoded.arrays.labels[:, 0], strict=True):
        assert bool(entered) == ref[imp_id][0], imp_id


def test_a_replay_of_a_2022_log_is_accepted_not_dead_lettered(stack, redis_client) -> None:
    """Event-time bounds protect state without breaking replays: the bound into the past is relative to
    stream time, which follows the log's own clock (KuaiRand's timestamps are from 2022). Every replayed
    event reaches the state, none is dead-lettered, and the windows that close yield samples."""
    from stream.replay import kuairand_events
    from tests.test_workload import KUAIRAND

    bootstrap, redis_url, topics, start = stack
    if KUAIRAND.exists():
        events = list(kuairand_events(KUAIRAND, limit=800))
    else:  # the same shape of clock without the data set: the simulator started in April 2022
        events = list(Simulator(SimConfig(n_users=60, n_authors=20, seed=5, start_ms=1_649_376_000_000,
                                          late_fraction=0.0)).events(max_impressions=800))
    assert max(e.ts_ms for e in events) < 1_672_531_200_000  # all before 2023
    produce(bootstrap, topics, events)
    worker = start()
    got = consume(bootstrap, topics.samples, 400, timeout_s=120)
    assert len(set(SampleCodec(SPEC).decode(got).impression_ids)) >= 400

    deadline = time.time() + 30
    while state_gap(redis_url, events) and time.time() < deadline:
        time.sleep(0.5)
    assert state_gap(redis_url, events) == {}, "every replayed event is applied to the state, once"
    assert consume(bootstrap, topics.deadletter, 1, timeout_s=3) == []
    assert worker.proc.poll() is None
