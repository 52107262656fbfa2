"""Faults on real processes: redis-server and the Kafka broker killed with SIGKILL mid-stream and restarted,
and a poison corpus sent to the real input topics. Counts are read back from the topics and from Redis.

One repetition of each drill here; ``zenith drill redis --repeat 3`` / ``zenith drill broker --repeat 3``
run more (deploy/drill.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from deploy.drill import DrillConfig, Fault, run_drill
from deploy.infra import free_port
from deploy.poison import (
    check_dead_letters,
    corpus,
    produce_poison,
    scrape_watermark,
    state_dump,
)
from stream.events import Engagement, EngagementKind
from stream.producer import EventProducer
from stream.simulator import SimConfig, Simulator
from stream.topics import Topics, ensure_topics


def _explain(report: object) -> str:
    return "\n".join(getattr(report, "notes", [])) + f"\n{report}"


def test_redis_killed_mid_stream_loses_no_impression_and_no_state_write(kafka_bootstrap: str, tmp_path: Path) -> None:
    # Produced over ~30 s, longer than a worker takes to start here, so the kill lands mid-stream.
    report = run_drill(DrillConfig(fault=Fault.REDIS, workdir=tmp_path, impressions=1_500, impressions_per_s=50.0,
                                   outage_s=4.0, timeout_s=200.0), bootstrap=kafka_bootstrap)
    assert 0 < report.killed_after_events < report.events, "the kill must hit a worker mid-stream"
    assert report.outages_seen >= 1, "the worker must have seen the outage (else the drill tested nothing)"
    assert report.ok, _explain(report)
    assert report.with_sample == report.impressions == report.trained == 1_500


def test_broker_killed_mid_stream_loses_no_impression_and_the_trainer_survives(tmp_path: Path) -> None:
    report = run_drill(DrillConfig(fault=Fault.BROKER, workdir=tmp_path, impressions=1_500, impressions_per_s=50.0,
                                   outage_s=4.0, timeout_s=300.0))
    assert 0 < report.killed_after_events < report.events, "the kill must hit a worker mid-stream"
    assert report.ok, _explain(report)
    assert report.died == [] and report.trained == report.impressions == 1_500


@pytest.fixture
def worker_env(kafka_bootstrap: str, redis_url: str, redis_client) -> dict[str, str]:
    prefix = f"p{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, Topics(prefix), partitions=4)
    # Pure event time (no idle advance): stream time may only move with accepted events.
    return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "REDIS_URL": redis_url,
            "ZENITH_TOPIC_PREFIX": prefix, "ZENITH_WINDOW_S": "3", "ZENITH_LATENESS_S": "1",
            "ZENITH_IDLE_ADVANCE_S": "0", "ZENITH_STREAM_METRICS_PORT": str(free_port())}


def _events_total(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("zenith_stream_events_total{"))


def _wait(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except OSError:
            pass  # metrics endpoint not up yet
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_poison_corpus_is_dead_lettered_with_reasons_and_changes_nothing(worker_env: dict[str, str]) -> None:
    from tests.test_stream_integration import consume

    bootstrap, redis_url = worker_env["KAFKA_BOOTSTRAP_SERVERS"], worker_env["REDIS_URL"]
    topics = Topics(worker_env["ZENITH_TOPIC_PREFIX"])
    port = int(worker_env["ZENITH_STREAM_METRICS_PORT"])
    now_ms = int(time.time() * 1000)
    warm = list(Simulator(SimConfig(n_users=50, n_authors=20, seed=3, start_ms=now_ms - 120_000, requests_per_s=4,
                                    late_fraction=0.0, max_watch_s=10.0)).events(max_impressions=300))
    producer = EventProducer(bootstrap, topics)
    for ev in warm:
        producer.send(ev)
    producer.flush()
    worker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "stream", "worker"], env=worker_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _events_total(port) >= len(warm), 90, "the warm-up events")
        assert consume(bootstrap, topics.samples, 1, timeout_s=60), "the worker emits samples"
        time.sleep(1.5)  # a close tick after the last event: the state is settled
        before, wm_before = state_dump(redis_url), scrape_watermark(port)
        assert before and wm_before > now_ms - 130_000

        items = corpus(int(time.time() * 1000), int(wm_before))
        assert len({p.kind for p in items}) >= 15
        placed = produce_poison(bootstrap, topics, items)
        letters = consume(bootstrap, topics.deadletter, len(items), timeout_s=90, headers=True)
        report = check_dead_letters(letters, placed, max_message_bytes=64 * 1024)
        report.state_changed = state_dump(redis_url) != before
        report.watermark_before, report.watermark_after = wm_before, scrape_watermark(port)
        report.worker_alive = worker.poll() is None
        assert not report.missing, f"not dead-lettered: {report.missing}"
        assert not report.wrong_reason, report.wrong_reason
        assert report.dead_lettered == report.produced == len(items) and report.truncated == 2
        assert not report.state_changed, "a rejected record changed the state in Redis"
        assert report.watermark_after == report.watermark_before, "a rejected record moved stream time"
        assert report.worker_alive

        # Still working: a valid engagement after all that is applied.
        done = _events_total(port)
        last = warm[-1]
        likes = redis.Redis.from_url(redis_url).hget(f"zl:{{u:{last.user_id}}}", "likes")
        ok = Engagement(event_id="after-poison", user_id=last.user_id, room_id=last.room_id,
                        kind=EngagementKind.LIKE, ts_ms=last.ts_ms + 1, author_id="")
        producer.send(ok)
        producer.flush()
        _wait(lambda: _events_total(port) >= done + 1, 30, "the valid event after the poison")
        assert float(redis.Redis.from_url(redis_url).hget(f"zl:{{u:{last.user_id}}}", "likes") or 0) \
            == float(likes or 0) + 1
    finally:
        worker.terminate()
        worker.wait(30)
