"""``zenith simulate`` and ``zenith replay`` deliver every event to the real broker, in order."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from stream.events import Engagement, Impression, decode_event
from stream.topics import Topics

KUAIRAND = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuairand" / "log_random_early.csv"


def run_cli(args: list[str], bootstrap: str, redis_url: str, prefix: str) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url, "ZENITH_TOPIC_PREFIX": prefix}
    done = subprocess.run([sys.executable, "-m", "deploy.cli", *args], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def read_all(bootstrap: str, topics: list[str]) -> dict[str, list[list]]:
    """Every event on ``topics``, per topic and partition, in offset order."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest",
                  "enable.partition.eof": True})
    c.subscribe(topics)
    out: dict[str, dict[int, list]] = {t: {} for t in topics}
    eof: set[tuple[str, int]] = set()
    idle = 0
    while idle < 10:
        msgs = c.consume(1000, timeout=0.5)
        idle = idle + 1 if not msgs else 0
        for m in msgs:
            if m.error():
                eof.add((m.topic(), m.partition()))
                continue
            out[m.topic()].setdefault(m.partition(), []).append(decode_event(m.value()))
    c.close()
    return {t: list(parts.values()) for t, parts in out.items()}


@pytest.mark.skipif(not KUAIRAND.exists(), reason="the shared KuaiRand log is not beside this checkout")
def test_replay_keeps_time_order_and_loses_no_row(kafka_bootstrap, redis_url) -> None:
    prefix = f"r{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix)
    run_cli(["replay", str(KUAIRAND), "--limit", "5000"], kafka_bootstrap, redis_url, prefix)
    got = read_all(kafka_bootstrap, [topics.impression, topics.engagement])
    imps = [e for part in got[topics.impression] for e in part]
    with open(KUAIRAND) as f:
        rows = list(csv.DictReader(f))[:5000]
    assert len(imps) == len(rows)  # no row lost
    assert {e.event_id for e in imps} == {f"kr{i}" for i in range(len(rows))}
    clicks = sum(r["is_click"] == "1" for r in rows)
    enters = [e for part in got[topics.engagement] for e in part if e.kind.value == "enter"]
    assert len(enters) == clicks
    for part in got[topics.impression] + got[topics.engagement]:  # each user's events in time order
        by_user: dict[str, int] = {}
        for e in part:
            assert e.ts_ms >= by_user.get(e.user_id, 0)
            by_user[e.user_id] = e.ts_ms


def test_simulate_delivers_every_event(kafka_bootstrap, redis_url) -> None:
    prefix = f"s{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix)
    run_cli(["simulate", "--impressions", "3000", "--speed", "0", "--users", "200", "--authors", "40", "--seed", "3"],
            kafka_bootstrap, redis_url, prefix)
    got = read_all(kafka_bootstrap, [topics.impression, topics.engagement, topics.live])
    imps = [e for part in got[topics.impression] for e in part]
    engs = [e for part in got[topics.engagement] for e in part]
    assert len(imps) == 3000 and all(isinstance(e, Impression) for e in imps)
    assert len(engs) > 300 and all(isinstance(e, Engagement) for e in engs)
    assert len({e.event_id for e in imps + engs}) == len(imps) + len(engs)
    assert sum(len(p) for p in got[topics.live]) > 0
