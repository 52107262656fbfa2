"""The online trainer: ``samples`` topic -> progressive validation + incremental update -> model versions.

Guarantees, and how:

* **Score, then learn.** Each mini-batch goes through ``OnlineLearner.step`` (the same loop the offline
  benchmarks use), so the reported AUC/logloss are of predictions made before the labels were seen.
* **Offsets only after durability.** Kafka offsets are committed after the version that includes them is
  written (fsync + atomic rename); the version's manifest also records them.
* **Resume exactly.** A restarted trainer loads the newest good version and seeks every partition to the
  offsets *in that manifest* (not to the committed ones, which can lag if the trainer died between publish
  and commit), so nothing in a published version is trained twice and nothing after it is skipped.
* **Exactly once per impression.** The stream is at-least-once (it may re-emit a sample after a crash);
  the trainer drops repeats by impression id. The ids of the recent past travel with each version
  (``trainer_state``), so the dedup survives restarts. Approximation, stated: ids older than
  ``dedup_horizon_s`` of event time are forgotten (the stream re-emits within seconds, not hours).
* Optimizer moments are not persisted: a restarted trainer continues from the weights with fresh Adam /
  Adagrad state (a brief warm-up; weights and data positions are exact).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from model.config import preset
from model.factory import build_model, default_device
from model.learner import OnlineLearner
from model.metrics import MultiTaskMetrics
from model.registry import LocalDirRegistry, Manifest, VersionWriter, WriterConfig
from model.spec import FeatureSpec, default_live_spec
from stream.features import hash_id
from stream.freshness import FRESHNESS_BUCKETS
from stream.kafka_security import KafkaSecurity
from stream.samples import SampleCodec, SampleFormatError
from stream.topics import Topics

log = logging.getLogger("zenith.trainer")

SAMPLES = Counter("zenith_trainer_samples_total", "Samples trained on")
DUPLICATES = Counter("zenith_trainer_duplicate_samples_total", "Samples dropped as repeats of an impression id")
BAD = Counter("zenith_trainer_bad_records_total", "Records on the samples topic that could not be decoded")
PUBLISH_S = Histogram("zenith_trainer_publish_seconds", "Time to write a model version durably",
                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
VERSION = Gauge("zenith_trainer_model_version", "Newest published model version")
SAMPLES_PER_S = Gauge("zenith_trainer_samples_per_second", "Training throughput over the last publish interval")
PREQ = Gauge("zenith_trainer_prequential", "Prequential metrics (trailing window)", ["task", "metric"])
COMMIT_FAILURES = Counter("zenith_trainer_commit_failures_total",
                          "Offset commits that failed (retried; the version's manifest keeps the offsets)")
KAFKA_UP = Gauge("zenith_trainer_kafka_up", "1 while offset commits succeed, 0 while the broker is unreachable")
LAG = Gauge("zenith_trainer_consumer_lag", "Samples behind the end of the samples topic")
SAMPLE_TO_TRAINED = Histogram("zenith_freshness_sample_to_trained_seconds",
                              "Sample emitted by the stream -> learned by the trainer", buckets=FRESHNESS_BUCKETS)
TRAINED_TO_PUBLISHED = Histogram("zenith_freshness_trained_to_published_seconds",
                                 "Sample learned -> version containing it durable", buckets=FRESHNESS_BUCKETS)


@dataclass(frozen=True)
class TrainerConfig:
    bootstrap: str
    registry_dir: Path
    topics: Topics = field(default_factory=Topics)
    group_id: str = "zenith-trainer"
    arch: str = "zenith"
    size: str = "S"
    batch_size: int = 256
    publish_every_s: float = 5.0
    publish_every_samples: int = 50_000
    full_every: int = 20
    dedup_horizon_s: float = 3600.0
    metrics_port: int = 9102
    metrics_host: str = "127.0.0.1"
    metrics_window: int = 5_000
    # Samples whose event time is further ahead of the wall clock are refused: a bad clock must not drag
    # the watermark (and with it the dedup horizon) into the future.
    max_future_skew_ms: int = 5 * 60_000
    commit_attempts: int = 5  # per publish; a commit still failing then waits for the next publish
    retry_max_s: float = 5.0
    device: str | None = None  # None: CUDA when present, else CPU
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)


@dataclass
class TrainerStatus:
    """What the trainer has done; read by ``zenith up`` for its progress line and report."""

    samples: int = 0
    duplicates: int = 0
    version: int | None = None
    watermark_ms: int = 0
    window: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)  # one point per publish


class Trainer:
    def __init__(self, cfg: TrainerConfig, spec: FeatureSpec | None = None) -> None:
        self.cfg = cfg
        self.spec = spec = spec or default_live_spec()
        self.codec = SampleCodec(spec)
        self.registry = LocalDirRegistry(cfg.registry_dir)
        self.writer = VersionWriter(self.registry, WriterConfig(full_every=cfg.full_every))
        self.device = torch.device(cfg.device) if cfg.device else default_device()
        self.status = TrainerStatus()
        self._kafka_down = False
        self._seen: dict[int, int] = {}  # hashed impression id -> event ms (dedup)
        self._offsets: dict[str, int] = {}  # "topic:partition" -> next offset to consume
        resumed = self.writer.load_latest_for_training(spec, self.device)
        if resumed is None:
            model = build_model(spec, preset(cfg.arch, cfg.size, spec), device=self.device)
            self.start_manifest: Manifest | None = None
        else:
            model, self.start_manifest, state = resumed
            self._offsets = dict(self.start_manifest.offsets)
            self.status.samples = self.start_manifest.samples_trained
            self.status.version = self.start_manifest.version
            self.status.watermark_ms = self.start_manifest.watermark_ms
            if state:
                self._seen = dict(zip(state["dedup_ids"].tolist(), state["dedup_ms"].tolist(), strict=True))
            log.info("resuming from version %s (%s samples)", self.start_manifest.version,
                     self.start_manifest.samples_trained)
        self.learner = OnlineLearner(model, spec, device=self.device)
        self.metrics = MultiTaskMetrics([t.name for t in spec.tasks], window=cfg.metrics_window)

    # ---- Kafka ---------------------------------------------------------------------------------------
    def _consumer(self) -> Consumer:
        c = Consumer({
            "bootstrap.servers": self.cfg.bootstrap, **self.cfg.kafka_security.confluent(),
            "group.id": self.cfg.group_id,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "fetch.min.bytes": 1, "session.timeout.ms": 10_000,
        })

        def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            # The manifest, not the group's committed offset, says where the published model stops.
            for tp in partitions:
                key = f"{tp.topic}:{tp.partition}"
                if key in self._offsets:
                    tp.offset = self._offsets[key]
            consumer.assign(partitions)

        c.subscribe([self.cfg.topics.samples], on_assign=on_assign)
        return c

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event, on_publish: Callable[[Manifest], None] | None = None) -> None:
        """Train until ``stop`` is set; publishes a last version on the way out."""
        if self.cfg.metrics_port:
            start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_host)
        consumer = self._consumer()
        notifier = Producer({"bootstrap.servers": self.cfg.bootstrap, **self.cfg.kafka_security.confluent()})
        last_publish, since_publish, trained_at = time.time(), 0, []
        try:
            while not stop.is_set():
                msgs = consumer.consume(self.cfg.batch_size, timeout=0.2)
                if msgs:
                    trained = self._train_on(msgs)
                    if trained:
                        since_publish += trained
                        trained_at.append(time.time())
                due = time.time() - last_publish >= self.cfg.publish_every_s
                if since_publish and (due or since_publish >= self.cfg.publish_every_samples):
                    self._publish(consumer, notifier, since_publish, time.time() - last_publish, trained_at,
                                  on_publish)
                    last_publish, since_publish, trained_at = time.time(), 0, []
            if since_publish:
                self._publish(consumer, notifier, since_publish, time.time() - last_publish, trained_at, on_publish)
        finally:
            consumer.close()
            notifier.flush(5)

    def _train_on(self, msgs: list) -> int:
        good = []
        for m in msgs:
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", m.error())
                continue
            self._offsets[f"{m.topic()}:{m.partition()}"] = m.offset() + 1
            if len(m.value() or b"") != self.codec.record_size:
                BAD.inc()
                log.warning("skipping a %s-byte record at %s:%s@%s: not a sample of this feature spec",
                            len(m.value() or b""), m.topic(), m.partition(), m.offset())
                continue
            good.append(m.value())
        if not good:
            return 0
        try:
            decoded = self.codec.decode(good)
        except SampleFormatError as exc:
            BAD.inc(len(good))
            log.warning("skipping %s records: %s", len(good), exc)
            return 0
        future_ok = decoded.arrays.event_ms <= int(time.time() * 1000) + self.cfg.max_future_skew_ms
        if not future_ok.all():
            BAD.inc(int((~future_ok).sum()))
            log.warning("refusing %s samples with event times more than %ss in the future",
                        int((~future_ok).sum()), self.cfg.max_future_skew_ms / 1000)
        keep = future_ok.copy()
        for k, (imp_id, ev_ms) in enumerate(zip(decoded.impression_ids, decoded.arrays.event_ms.tolist(),
                                                strict=True)):
            h = hash_id("impression", imp_id)
            if not keep[k]:
                continue
            if h in self._seen:
                keep[k] = False
            else:
                self._seen[h] = ev_ms
        dupes = int((future_ok & ~keep).sum())
        DUPLICATES.inc(dupes)
        self.status.duplicates += dupes
        arrays = decoded.arrays[keep]
        if not len(arrays):
            return 0
        res = self.learner.step(arrays)
        self.metrics.update(arrays.labels, res.probs, arrays.user)
        now = time.time()
        for emitted in decoded.emitted_ms[keep].tolist():
            SAMPLE_TO_TRAINED.observe(max(now - emitted / 1000, 0))
        SAMPLES.inc(len(arrays))
        self.status.samples += len(arrays)
        self.status.watermark_ms = max(self.status.watermark_ms, int(arrays.event_ms.max()))
        return len(arrays)

    def _publish(self, consumer: Consumer, notifier: Producer, n: int, seconds: float, trained_at: list[float],
                 on_publish: Callable[[Manifest], None] | None) -> None:
        horizon = self.status.watermark_ms - int(self.cfg.dedup_horizon_s * 1000)
        self._seen = {h: ms for h, ms in self._seen.items() if ms >= horizon}
        state = {"dedup_ids": torch.tensor(list(self._seen), dtype=torch.int64),
                 "dedup_ms": torch.tensor(list(self._seen.values()), dtype=torch.int64)}
        window = self._window_metrics()
        t0 = time.perf_counter()
        manifest = self.writer.publish(
            self.learner.model, watermark_ms=self.status.watermark_ms, offsets=dict(self._offsets),
            samples_trained=self.status.samples, trainer_state=state,
            extra={"prequential_window": window, "arch": self.cfg.arch, "size": self.cfg.size},
        )
        PUBLISH_S.observe(time.perf_counter() - t0)
        now = time.time()
        for t in trained_at:
            TRAINED_TO_PUBLISHED.observe(now - t)
        # Only now, with the version durable, do the offsets it includes count as consumed.
        commit = [TopicPartition(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1]), off)
                  for k, off in self._offsets.items()]
        if commit:
            self._commit(consumer, commit)
        self._notify(notifier, orjson.dumps(
            {"version": manifest.version, "kind": manifest.kind.value, "created_ms": manifest.created_ms,
             "watermark_ms": manifest.watermark_ms, "registry": str(self.cfg.registry_dir)}))
        VERSION.set(manifest.version)
        SAMPLES_PER_S.set(n / max(seconds, 1e-9))
        self._update_lag(consumer)
        self.status.version = manifest.version
        self.status.window = window
        self.status.curve.append({"version": manifest.version, "samples": self.status.samples,
                                  "wall_s": now, **window})
        log.info("published v%s (%s, %s samples, window AUC %.4f)", manifest.version, manifest.kind.value,
                 self.status.samples, window.get("auc", float("nan")))
        if on_publish:
            on_publish(manifest)

    def _commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> bool:
        """Commit with bounded retries. A broker blip must not end the trainer: the version is durable and
        its manifest holds these offsets (a restart seeks to them), so a commit that still fails is only
        late -- the next publish commits newer offsets."""
        delay = 0.1
        for attempt in range(1, self.cfg.commit_attempts + 1):
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                COMMIT_FAILURES.inc()
                KAFKA_UP.set(0)
                self._kafka_down = True
                log.warning("offset commit failed (attempt %s/%s): %s", attempt, self.cfg.commit_attempts, exc)
                time.sleep(delay)
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            if self._kafka_down:  # back from an outage: say so once
                log.warning("offset commits succeed again")
                self._kafka_down = False
            KAFKA_UP.set(1)
            return True
        log.error("offset commit still failing after %s attempts; the next publish retries (the published "
                  "version's manifest has the offsets, so a restart resumes exactly)", self.cfg.commit_attempts)
        return False

    def _notify(self, notifier: Producer, value: bytes) -> None:
        """Tell scorers about a version. Best effort: they also poll the registry, and librdkafka retries
        delivery while the broker is away; only a full local queue needs handling here."""
        for _ in range(50):
            try:
                notifier.produce(self.cfg.topics.model_updates, key=b"model", value=value)
                break
            except BufferError:
                notifier.poll(0.1)
            except KafkaException as exc:
                log.warning("model-update notice not queued: %s", exc)
                break
        notifier.poll(0)

    def _window_metrics(self) -> dict[str, float]:
        got = self.metrics.get()
        main = got[self.spec.tasks[0].name]
        out = {"auc": main["window_auc"], "uauc": main["window_uauc"], "logloss": main["window_logloss"]}
        for task, vals in got.items():
            for metric in ("window_auc", "window_uauc", "window_logloss"):
                PREQ.labels(task, metric.removeprefix("window_")).set(vals[metric])
        return out

    def _update_lag(self, consumer: Consumer) -> None:
        lag = 0
        for key, off in self._offsets.items():
            topic, part = key.rsplit(":", 1)
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, int(part)), timeout=1.0, cached=True)
            except Exception:  # lag is a gauge; a slow metadata call must not stop training
                continue
            lag += max(high - off, 0)
        LAG.set(lag)


