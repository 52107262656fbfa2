"""The stream worker's hot loop: a batch consumer, state and join writes per batch, windows closed by due time.

Each turn of the loop:

1. ``consume(batch_size)`` from the input topics (librdkafka fetches in the background; one call returns up
   to a batch, so the per-message cost is the client's, not a framework's);
2. decode and validate; rejects are produced to the dead-letter topic (not awaited one by one);
3. state writes for the accepted events, with the input positions they cover, in one round trip
   (``LiveState.apply``); then the label join in memory and its changed users and positions in one more
   (``JoinStore.commit``): a redelivered batch is recognised by position and changes nothing;
4. every ``close_interval_s``: the impressions whose window has closed (found through the due-time index),
   read as of their time, assembled and produced; once every sample is acknowledged, the join state forgets
   them;
5. the dead letters are acknowledged, then the batch's offsets are committed.

Every step that touches Redis or Kafka runs under ``Guard``: while a dependency is down the loop waits and
retries; it does not consume further, so nothing is skipped and nothing is acknowledged without its effect.

Partitions are shared by the consumer group: start the worker N times. The range assignor gives each worker
the same partition numbers of the impression and engagement topics (they are co-partitioned by user), and a
worker that is assigned a partition loads that partition's join state from Redis; its writes are fenced by an
epoch there, so a worker that lost a partition cannot overwrite its new owner's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from model.spec import default_live_spec
from state.store import LiveState, Position
from stream import metrics
from stream.config import StreamConfig
from stream.events import MalformedEvent, RejectCode, decode_event
from stream.gc_tuning import tune_gc
from stream.join import LabelJoiner
from stream.join_store import JoinStore
from stream.processor import Input, StreamProcessor, Watermark
from stream.resilience import Guard
from stream.sink import Delivery, Record, RecordSink

log = logging.getLogger("zenith.stream")

MAX_REASON_CHARS = 1024
DEAD_LETTER_COPY_BYTES = 4096  # what an oversized record's dead letter keeps of it
ERROR_LOG_EVERY_S = 10.0  # the same consumer error is logged at most this often


class StreamWorker:
    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg
        self.user_topics = {cfg.topics.impression, cfg.topics.engagement}
        self.group = f"{cfg.topics.prefix}{cfg.app_id}"
        self.watermark = Watermark(cfg.idle_advance_s, started_wall_s=time.time())
        self.guard = Guard(cfg.backoff, resume=lambda: self.watermark.touch(time.time()))
        self._kafka = ThreadPoolExecutor(1, thread_name_prefix="zenith-consume")  # the consumer's one thread
        self._assigned: set[tuple[str, int]] = set()
        self._reassigned = False  # set by the rebalance callbacks
        self._next_close = 0.0
        self._stopping = False
        self._errors_logged: dict[str, float] = {}

    # ---- set-up ------------------------------------------------------------------------------------------
    def _consumer(self) -> Consumer:
        c = self.cfg
        consumer = Consumer({
            "bootstrap.servers": c.bootstrap, **c.kafka_security.confluent(),
            "group.id": self.group,
            "enable.auto.commit": False,  # committed by us, after each batch's effects exist
            "auto.offset.reset": "earliest",
            # range gives each worker the same partition numbers of the co-partitioned input topics
            "partition.assignment.strategy": "range",
            "session.timeout.ms": int(c.session_timeout_s * 1000),  # a killed worker's partitions move this soon
            "heartbeat.interval.ms": int(c.session_timeout_s * 300),
            # a long dependency outage holds the loop: that is a pause, not a dead consumer
            "max.poll.interval.ms": 3_600_000,
            "fetch.wait.max.ms": 50,
        })
        consumer.subscribe([c.topics.impression, c.topics.engagement, c.topics.live],
                           on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)
        return consumer

    def _on_assign(self, _c: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        self._reassigned = True

    def _on_revoke(self, _c: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned -= {(tp.topic, tp.partition) for tp in partitions}
        self._reassigned = True

    async def _sync_partitions(self) -> None:
        """Load the join state of newly owned partitions, forget revoked ones; stream time follows suit.
        Only after a rebalance (the callbacks run inside ``consume``), not on every turn of the loop."""
        if not self._reassigned:
            return
        self._reassigned = False
        owned = {p for t, p in self._assigned if t in self.user_topics}
        held = set(self.joins.partitions)
        for n in sorted(owned - held):
            await self.guard.run(lambda n=n: self.joins.load(n), f"loading join partition {n}")
            log.info("join partition %d loaded: %d users, %d pending", n, len(self.joins.partitions[n].users),
                     self.joins.partitions[n].pending)
        for n in held - owned:
            self.joins.drop(n)
        sources = {f"{t}/{p}" for t, p in self._assigned if t in self.user_topics}
        self.watermark.forget([s for s in self.watermark.sources() if s not in sources])
        self.watermark.expect(sorted(sources), time.time())

    # ---- the loop ----------------------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.state = LiveState.from_url(cfg.redis_url, cfg.state)
        joiner = LabelJoiner(cfg.window_ms, cfg.lateness_ms, cfg.dedup_horizon_ms)
        self.joins = JoinStore(joiner, self.state.r, cfg.state.prefix, group=self.group)
        self.proc = StreamProcessor(self.state, default_live_spec(), joiner, self.joins)
        self.sink = RecordSink(cfg.bootstrap, cfg.kafka_security)
        consumer = await loop.run_in_executor(self._kafka, self._consumer)
        tune_gc()
        try:
            while not self._stopping:
                msgs = await loop.run_in_executor(self._kafka, consumer.consume, cfg.batch_size, cfg.batch_within_s)
                await self._sync_partitions()
                if msgs:
                    offsets = await self._handle(msgs)
                    if offsets:
                        await loop.run_in_executor(self._kafka, self._commit, consumer, offsets)
                if time.monotonic() >= self._next_close:
                    full = await self.guard.run(self._close_windows, "closing attribution windows")
                    # A tick that hit its bound leaves more due: close again after the next batch.
                    self._next_close = time.monotonic() + (0 if full else cfg.close_interval_s)
        finally:
            await loop.run_in_executor(self._kafka, consumer.close)
            self.sink.close()
            await self.state.aclose()

    def stop(self) -> None:
        self._stopping = True

    async def _handle(self, msgs: list[Message]) -> list[TopicPartition]:
        """Validate, dead-letter the rejects, apply the rest; returns the offsets to commit."""
        now_s = time.time()
        stream_ms = self.watermark.floor()
        good: list[Input] = []
        letters = Delivery()
        newest: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is not None:
                self._log_consumer_error(m.error())
                continue
            topic, part, offset = m.topic(), m.partition(), m.offset()
            if (topic, part) not in self._assigned:
                continue  # revoked while this batch was fetched: its new owner reads it
            newest[(topic, part)] = offset
            try:
                ev = decode_event(m.value(), self.cfg.limits, now_ms=int(now_s * 1000), stream_ms=stream_ms)
            except MalformedEvent as exc:
                letters.records.append(self._dead_letter(m, str(exc), exc.code))
                continue
            good.append(Input(ev, Position(f"{topic}/{part}", offset), part))
        good = self.proc.admit(good)
        if good:
            await self.guard.run(lambda: self.proc.apply_state(good), "writing state to Redis")
            user_events = [i for i in good if i.pos.source.rsplit("/", 1)[0] in self.user_topics]
            if user_events:
                await self.guard.run(lambda: self.proc.join_and_commit(user_events), "writing join state to Redis")
                for i in user_events:
                    self.watermark.observe(i.pos.source, i.event.ts_ms, now_s)
        if letters.records:
            await self.guard.run(lambda: self.sink.deliver(letters), "sending dead letters")
            for rec in letters.records:
                metrics.DEAD_LETTERS.labels(rec.headers["x-reject-code"].decode()).inc()
        return [TopicPartition(t, p, off + 1) for (t, p), off in newest.items()]

    def _log_consumer_error(self, err: object) -> None:
        # The client retries on its own; during a broker outage it reports the same error many times a second.
        key, now = str(err), time.monotonic()
        if now - self._errors_logged.get(key, -ERROR_LOG_EVERY_S) >= ERROR_LOG_EVERY_S:
            self._errors_logged[key] = now
            log.warning("consumer: %s", err)

    def _commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        # The effects are in Redis with their positions: a lost commit only means a harmless redelivery.
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            log.warning("offset commit failed (the batch will be redelivered and skipped by position): %s", exc)

    def _dead_letter(self, m: Message, reason: str, code: RejectCode) -> Record:
        value, key = m.value() or b"", m.key() or b""
        headers = {"x-reason": reason[:MAX_REASON_CHARS].encode(), "x-source-topic": m.topic().encode(),
                   "x-source-partition": str(m.partition()).encode(), "x-source-offset": str(m.offset()).encode(),
                   "x-original-bytes": str(len(value)).encode(), "x-reject-code": code.value.encode()}
        if len(value) > self.cfg.limits.max_message_bytes or len(key) > self.cfg.limits.max_id_chars * 4:
            # The whole record may not even fit the producer's limit: keep a truncated copy and say so.
            value, key = value[:DEAD_LETTER_COPY_BYTES], key[:DEAD_LETTER_COPY_BYTES]
            headers["x-truncated"] = b"true"
        log.warning("dead letter from %s/%s@%s: %s", m.topic(), m.partition(), m.offset(), reason[:300])
        return Record(self.cfg.topics.deadletter, key, value, headers)

    async def _close_windows(self) -> bool:
        """Close what is due; True when the tick's bound stopped it (more is due)."""
        proc = self.proc
        now_ms = self.watermark.current(time.time())
        if not now_ms:
            now_ms = self.watermark.current(time.time(), recovered_ms=proc.newest_pending_ms())
        metrics.WATERMARK.set(now_ms)
        if not now_ms:
            return False
        due = proc.due(now_ms, limit=self.cfg.max_close_per_tick)  # bounded: a backlog must not stall input
        if not due.users:
            return False
        samples = await proc.build_samples(due)
        out = Delivery([Record(self.cfg.topics.samples, s.key, s.value) for s in samples])
        await self.guard.run(lambda: self.sink.deliver(out), "sending samples")
        proc.commit_closed(due, now_ms)  # only now: the samples are acknowledged
        await self.guard.run(proc.commit_joins, "writing join state to Redis")
        proc.observe_emitted(samples)
        return len(due.items) >= self.cfg.max_close_per_tick

