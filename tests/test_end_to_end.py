"""The main job end to end on the simulator, and the trainer's restart guarantees (real broker, real Redis)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from deploy.infra import free_ports
from model.registry import LocalDirRegistry
from model.spec import default_live_spec
from stream.producer import EventProducer
from stream.samples import Labels, SampleCodec
from stream.topics import Topics, ensure_topics


def zenith_env(kafka_bootstrap: str, redis_url: str, home: Path) -> dict[str, str]:
    stream_port, trainer_port, scorer_port = free_ports(3)
    return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "REDIS_URL": redis_url,
            "ZENITH_HOME": str(home), "ZENITH_TOPIC_PREFIX": f"e{uuid.uuid4().hex[:8]}.",
            "ZENITH_STREAM_METRICS_PORT": str(stream_port), "ZENITH_TRAINER_METRICS_PORT": str(trainer_port),
            "ZENITH_SCORER_PORT": str(scorer_port)}


def test_main_job_learns_and_serves_fresh_versions(kafka_bootstrap, redis_url, redis_client, tmp_path) -> None:
    env = zenith_env(kafka_bootstrap, redis_url, tmp_path)
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "deploy.cli", "up", "--duration", "110", "--window-s", "15",
                          "--publish-every-s", "3", "--requests-per-s", "25", "--users", "600", "--authors", "120"],
                         env=env, capture_output=True, timeout=400)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    report = json.loads((tmp_path / "reports" / "up-report.json").read_text())
    curve = report["prequential_auc_over_time"]
    assert len(curve) >= 5, curve
    # Learning: the planted signal is picked up online (a constant scorer has AUC 0.5).
    assert curve[-1]["auc"] > 0.62, curve
    assert curve[-1]["auc"] > curve[0]["auc"] + 0.05
    assert report["samples_trained"] == report["samples_emitted"] > 3_000
    # Serving: versions published after the start were served, each within a few seconds of publishing.
    served = report["versions_served"]
    assert len(served) >= 5 and served == sorted(served)
    registry = LocalDirRegistry(tmp_path / "registry")
    first_new = registry.read_manifest(min(v for v in registry.list_versions() if v >= served[0]))
    assert first_new.created_ms / 1000 > t0
    assert report["freshness"]["published -> served"]["p99_s"] < 5.0
    lat = report["ranking_latency_ms"]
    assert lat["requests"] > 20 and lat["errors"] == 0
    assert (tmp_path / "reports" / "up-report.png").stat().st_size > 10_000


def publish_samples(bootstrap: str, topics: Topics, n: int, seed: int) -> set[str]:
    """Labelled samples straight onto the samples topic, with a planted signal in one dense feature."""
    from stream.features import FeatureRow

    spec = default_live_spec()
    codec = SampleCodec(spec)
    rng = np.random.default_rng(seed)
    p = EventProducer(bootstrap, topics)
    ids = set()
    for k in range(n):
        dense = rng.normal(size=spec.n_dense).astype(np.float32)
        entered = rng.random() < 1 / (1 + np.exp(-2.5 * dense[0]))
        row = FeatureRow(rng.integers(1, 1000, spec.n_ids), np.zeros((spec.n_seqs, spec.seq_len), np.int64), dense)
        imp = f"imp-{seed}-{k}"
        ids.add(imp)
        p.send_raw(topics.samples, f"u{k % 50}".encode(), codec.encode(imp, row, Labels(entered=entered),
                                                                       1_700_000_000_000 + k, 0))
        if k % 10 == 0:  # an at-least-once stream re-emits some samples: the trainer must drop them
            p.send_raw(topics.samples, f"u{k % 50}".encode(), codec.encode(imp, row, Labels(entered=entered),
                                                                           1_700_000_000_000 + k, 0))
    p.flush()
    return ids


def test_killed_trainer_resumes_from_the_newest_version_and_its_offsets(kafka_bootstrap, tmp_path) -> None:
    env = zenith_env(kafka_bootstrap, "redis://127.0.0.1:1/0", tmp_path)
    topics = Topics(env["ZENITH_TOPIC_PREFIX"])
    ensure_topics(kafka_bootstrap, topics)
    ids = publish_samples(kafka_bootstrap, topics, 12_000, seed=1)
    registry = LocalDirRegistry(tmp_path / "registry")
    cmd = [sys.executable, "-m", "deploy.cli", "trainer", "--publish-every-s", "0.5", "--batch-size", "128"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not registry.list_versions():  # kill right after the first version
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = registry.read_manifest(registry.latest())
    assert 0 < killed_at.samples_trained < len(ids), "kill the trainer mid-stream"

    # Publishing less often: a slow (shared) machine must not write 60 versions and prune the chain's start.
    second = subprocess.Popen([*cmd[:-4], "--publish-every-s", "2", *cmd[-2:]], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline:
        last = registry.read_manifest(registry.latest())
        if last.samples_trained >= len(ids):
            break
        time.sleep(0.5)
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=60)
    final = registry.read_manifest(registry.latest())
    # Every impression trained exactly once across the kill: none twice (offsets + dedup), none skipped.
    assert final.samples_trained == len(ids), err.decode()[-2000:]
    resumed = [registry.read_manifest(v) for v in registry.list_versions() if v > killed_at.version]
    assert resumed and resumed[0].parent == killed_at.version, "the new trainer continues the old one's chain"
    assert sum(final.offsets.values()) == len(ids) + len(ids) // 10  # consumed to the end, duplicates too
    assert final.extra["prequential_window"]["auc"] > 0.75  # and it learned the planted signal
