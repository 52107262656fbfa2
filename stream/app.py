"""The Faust stream worker: events in, state in Redis, one labelled sample per impression out.

Agents:
* ``user_events`` consumes ``events.impression`` and ``events.engagement`` (co-partitioned by user id) in
  batches: state writes (one pipelined Redis round trip), then the label join in the ``pending`` table.
* ``live_events`` consumes ``events.live`` (keyed by author): room state only.
* the ``close_windows`` timer closes due attribution windows, reads state as of each impression, sends
  the samples, waits for the broker's acknowledgement, then shrinks the join state.

Delivery guarantee: at-least-once into ``samples`` (Faust flushes its producer before committing source
offsets; state writes are idempotent by event id; the join ignores impression ids it has seen). A crash
between a sample's acknowledgement and the table update can re-emit that sample after restart; the
trainer drops repeats by impression id, so each impression is *trained* exactly once.

The ``pending`` table uses the producer's key partitioner (``use_partitioner=True``) so the timer may
write it outside an event; the input producers use the same murmur2 partitioner (stream/producer.py),
so a user's changelog partition is the partition of that user's events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import faust
from prometheus_client import start_http_server

from model.spec import default_live_spec
from state.store import LiveState, StateConfig
from stream import metrics
from stream.events import EventLimits, MalformedEvent, RejectCode, decode_event
from stream.join import LabelJoiner
from stream.kafka_security import KafkaSecurity
from stream.processor import StreamProcessor, Watermark
from stream.resilience import Backoff, Guard
from stream.topics import Topics, ensure_topics

log = logging.getLogger("zenith.stream")

MAX_REASON_CHARS = 1024
DEAD_LETTER_COPY_BYTES = 4096  # what an oversized record's dead letter keeps of it


@dataclass(frozen=True)
class StreamConfig:
    bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    topics: Topics = field(default_factory=Topics)
    app_id: str = "zenith-stream"
    partitions: int = 4
    window_ms: int = 120_000
    lateness_ms: int = 5_000  # extra wait for cross-topic skew before a window closes
    batch_size: int = 500
    batch_within_s: float = 0.05
    close_interval_s: float = 0.5
    max_close_per_tick: int = 2_000
    # With no events for this long, stream time follows the wall clock, so a quiet stream still closes
    # its windows. 0 disables it (pure event time, e.g. for replays of old logs).
    idle_advance_s: float = 5.0
    metrics_port: int = 9101
    metrics_host: str = "127.0.0.1"
    state: StateConfig = field(default_factory=StateConfig)
    limits: EventLimits = field(default_factory=EventLimits)
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    backoff: Backoff = field(default_factory=Backoff)


def create_app(cfg: StreamConfig) -> faust.App:
    app = faust.App(
        f"{cfg.topics.prefix}{cfg.app_id}",  # group id and changelog names: one set per topic prefix
        broker=f"kafka://{cfg.bootstrap}",
        broker_credentials=cfg.kafka_security.faust_credentials(),
        store="memory://",  # the changelog is the durable copy; a restarted worker replays it
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=cfg.partitions,
        table_standby_replicas=0,  # the close timer walks the local table: it must hold only owned keys
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A killed worker's partitions move to a live one after this long (the default is 60 s).
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        web_enabled=False,
        producer_acks=-1,
    )
    topics = cfg.topics
    user_topic = app.topic(topics.impression, topics.engagement, key_type=bytes, value_type=bytes)
    live_topic = app.topic(topics.live, key_type=bytes, value_type=bytes)
    samples_topic = app.topic(topics.samples, key_type=bytes, value_type=bytes)
    deadletter_topic = app.topic(topics.deadletter, key_type=bytes, value_type=bytes)
    pending = app.Table("pending", default=None, use_partitioner=True, partitions=cfg.partitions,
                        key_type=str, value_type=bytes)
    joiner = LabelJoiner(cfg.window_ms, cfg.lateness_ms)
    user_topic_names = {topics.impression, topics.engagement}
    holder: dict[str, StreamProcessor] = {}
    watermark = Watermark(cfg.idle_advance_s, started_wall_s=time.time())

    def processor() -> StreamProcessor:
        # Created inside the worker's event loop: redis.asyncio connections bind to the running loop.
        if "p" not in holder:
            holder["p"] = StreamProcessor(LiveState.from_url(cfg.redis_url, cfg.state), default_live_spec(), joiner)
        return holder["p"]

    def resumed() -> None:
        # The input was held, not quiet: no partition may count as idle because of the outage.
        watermark.touch(time.time())

    # No explicit pause: while an agent retries, its batch is not done, its take buffer fills and Faust's own
    # flow control stops fetching those partitions (Consumer.on_buffer_full); they resume as it drains.
    guard = Guard(cfg.backoff, resume=resumed)

    async def handle_batch(batch: list[faust.EventT], *, tracks_time: bool) -> None:
        """Validate, dead-letter the rejects, apply the rest; returns only when every effect is done.

        Each step is retried by the guard until it succeeds, so Faust acknowledges the batch (when the agent
        body ends) only after its effects exist. Stream time moves only for accepted, applied events.
        """
        now_s = time.time()
        stream_ms = watermark.floor()
        good, seen = [], []
        for ev in batch:
            try:
                good.append(decode_event(ev.value, cfg.limits, now_ms=int(now_s * 1000), stream_ms=stream_ms))
            except MalformedEvent as exc:
                await guard.run(lambda m=ev.message, e=exc: dead_letter(m, str(e), e.code), "sending a dead letter")
                continue
            seen.append((f"{ev.message.topic}/{ev.message.partition}", good[-1].ts_ms))
        if not good:
            return
        proc = processor()
        if tracks_time:
            await guard.run(lambda: proc.apply_state(good), "writing state to Redis")
            proc.join(good, pending)  # in memory (the table's changelog is Faust's to deliver)
            for source, ts_ms in seen:
                watermark.observe(source, ts_ms, now_s)
        else:
            await guard.run(lambda: proc.apply_state(good), "writing room state to Redis")

    async def dead_letter(message: faust.types.tuples.Message, reason: str, code: RejectCode) -> None:
        value, key = message.value or b"", message.key or b""
        headers = {"x-reason": reason[:MAX_REASON_CHARS].encode(), "x-source-topic": message.topic.encode(),
                   "x-source-partition": str(message.partition).encode(),
                   "x-source-offset": str(message.offset).encode(), "x-original-bytes": str(len(value)).encode(),
                   "x-reject-code": code.value.encode()}
        if len(value) > cfg.limits.max_message_bytes or len(key) > cfg.limits.max_id_chars * 4:
            # The whole record may not even fit the producer's limit: keep a truncated copy and say so.
            value, key = value[:DEAD_LETTER_COPY_BYTES], key[:DEAD_LETTER_COPY_BYTES]
            headers["x-truncated"] = b"true"
        fut = await deadletter_topic.send(key=key, value=value, headers=headers)
        await fut  # the bytes are safe before the offset can be committed
        metrics.DEAD_LETTERS.labels(code.value).inc()
        log.warning("dead letter from %s/%s@%s: %s", message.topic, message.partition, message.offset,
                    reason[:300])

    @app.agent(user_topic)
    async def user_events(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(cfg.batch_size, within=cfg.batch_within_s):
            await handle_batch(batch, tracks_time=True)

    @app.agent(live_topic)
    async def live_events(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(cfg.batch_size, within=cfg.batch_within_s):
            await handle_batch(batch, tracks_time=False)

    @app.timer(cfg.close_interval_s)
    async def close_windows() -> None:
        if guard.outage:
            return  # an agent is waiting for a dependency: let it finish first
        # A timer that raises stops silently in Faust; the guard retries instead. Nothing can be lost
        # meanwhile: the join state forgets impressions only after their samples are acknowledged.
        await guard.run(_close_windows, "closing attribution windows")

    async def _close_windows() -> None:
        proc = processor()
        now_ms = watermark.current(time.time())
        if not now_ms:
            now_ms = watermark.current(time.time(), recovered_ms=proc.newest_pending_ms(pending))
        metrics.WATERMARK.set(now_ms)
        # Bounded per tick so a backlog does not stall the agents for seconds.
        if not now_ms:
            return
        due = proc.due(pending, now_ms, limit=cfg.max_close_per_tick)
        if not due.items and not due.tidy:
            return
        samples = await proc.build_samples(due)
        futures = [await samples_topic.send(key=s.key, value=s.value) for s in samples]
        await asyncio.gather(*futures)  # acknowledged by the broker before the join state forgets them
        proc.commit_closed(pending, due, now_ms)
        proc.observe_emitted(samples)


    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: set, **kwargs: object) -> None:
        watermark.expect([f"{tp.topic}/{tp.partition}" for tp in assigned if tp.topic in user_topic_names],
                         time.time())

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set, **kwargs: object) -> None:
        watermark.forget([f"{tp.topic}/{tp.partition}" for tp in revoked])

    @app.task
    async def on_start() -> None:
        if cfg.metrics_port:
            start_http_server(cfg.metrics_port, addr=cfg.metrics_host)
        log.info("stream worker up: window=%ss, topics %s", cfg.window_ms / 1000, topics.all())

    return app


def run_worker(cfg: StreamConfig, loglevel: str = "warning") -> None:
    """Run the worker until SIGINT/SIGTERM (Faust handles both and shuts down cleanly)."""
    ensure_topics(cfg.bootstrap, cfg.topics, cfg.partitions, security=cfg.kafka_security)
    app = create_app(cfg)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
