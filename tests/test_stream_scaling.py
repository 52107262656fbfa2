"""The stream worker scaled out: several workers sharing the partitions (one killed mid-stream), and the state
on a Redis Cluster -- with the guarantees of tests/test_stream_integration.py: one labelled sample per
impression with the right labels, and every event in the state exactly once."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter

import pytest

from model.spec import default_live_spec
from stream.audit import state_gap
from stream.events import Impression
from stream.samples import SampleCodec
from stream.topics import Topics, ensure_topics
from tests.test_stream_integration import WINDOW_S, Worker, consume, produce, reference_labels, sim_events

SPEC = default_live_spec()


def _env(kafka_bootstrap: str, redis_url: str) -> tuple[Topics, dict[str, str]]:
    prefix = f"s{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=4)
    return topics, {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "REDIS_URL": redis_url,
                    "ZENITH_TOPIC_PREFIX": prefix, "ZENITH_WINDOW_S": str(WINDOW_S), "ZENITH_LATENESS_S": "1",
                    "ZENITH_IDLE_ADVANCE_S": "2", "ZENITH_STREAM_METRICS_PORT": "0"}


def _members(bootstrap: str, group: str) -> list[int]:
    """Partitions held by each member of the consumer group, as the broker sees it."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
    except Exception:  # noqa: BLE001 (not formed yet, coordinator loading: ask again)
        return []
    return sorted(len(m.assignment.topic_partitions) for m in desc.members)


def _wait_members(bootstrap: str, group: str, want: list[int], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while (got := _members(bootstrap, group)) != want:
        assert time.time() < deadline, f"group {group}: members hold {got} partitions, want {want}"
        time.sleep(0.5)


def _check(got: list[bytes], events: list, redis_url: str) -> Counter:
    ids = {e.event_id for e in events if isinstance(e, Impression)}
    decoded = SampleCodec(SPEC).decode(got)
    counts = Counter(decoded.impression_ids)
    assert set(counts) == ids, f"missing {len(ids - set(counts))} impressions"
    ref = reference_labels(events, int(WINDOW_S * 1000))
    for imp_id, entered in zip(decoded.impression_ids, decoded.arrays.labels[:, 0], strict=True):
        assert bool(entered) == ref[imp_id][0], imp_id
    deadline = time.time() + 20
    while state_gap(redis_url, events) and time.time() < deadline:
        time.sleep(0.5)
    assert state_gap(redis_url, events) == {}, "every event is in the state exactly once"
    return counts


def test_two_workers_share_the_partitions_and_one_killed_loses_nothing(kafka_bootstrap, redis_url,
                                                                        redis_client) -> None:
    topics, env = _env(kafka_bootstrap, redis_url)
    events = sim_events(3_000, seed=21)
    n = sum(isinstance(e, Impression) for e in events)
    group = f"{topics.prefix}zenith-stream"
    a, b = Worker(env), Worker(env)
    try:
        _wait_members(kafka_bootstrap, group, [6, 6], 60)  # 3 input topics x 4 partitions, shared
        produce(kafka_bootstrap, topics, events)
        first = consume(kafka_bootstrap, topics.samples, n // 10, timeout_s=90)
        a.kill()  # SIGKILL: its partitions move to b after the session timeout
        assert len(first) < n, "the kill came too late to test anything"
        _wait_members(kafka_bootstrap, group, [12], 60)
        got = consume(kafka_bootstrap, topics.samples, n, timeout_s=150)
        counts = _check(got, events, redis_url)
        assert sum(counts.values()) - len(counts) < n // 2, "only the killed worker's last moments may repeat"
        assert b.proc.poll() is None
    finally:
        a.stop()
        b.stop()


@pytest.mark.timeout(300)
def test_the_stream_on_a_redis_cluster(kafka_bootstrap, redis_cluster_url) -> None:
    """State and join state on three masters (keys hashed so each atomic step touches one slot); a worker
    killed mid-stream and restarted still yields every impression, and every event is counted once."""
    topics, env = _env(kafka_bootstrap, redis_cluster_url)
    events = sim_events(1_500, seed=22)
    n = sum(isinstance(e, Impression) for e in events)
    produce(kafka_bootstrap, topics, events)
    worker = Worker(env)
    try:
        consume(kafka_bootstrap, topics.samples, n // 5, timeout_s=90)
        worker.kill()
        worker = Worker(env)
        got = consume(kafka_bootstrap, topics.samples, n, timeout_s=120)
        _check(got, events, redis_cluster_url)
        assert worker.proc.poll() is None
    finally:
        worker.stop()
