"""The Faust app that hosts the stream worker: events in, state in Redis, one labelled sample per impression out.

Faust runs the process: its lifecycle (start-up, SIGINT/SIGTERM, clean shutdown), logging, and one
long-running task, the worker's batch loop (``stream/worker.py``). The loop consumes with confluent-kafka's
``consume(num_messages=...)`` rather than through a Faust agent because a Faust agent's per-message path costs
about as much as all of the stream's own work: in ``zenith bench stream`` a Faust agent that does nothing
drains barely faster than the batch loop doing everything (README, "Stream throughput"). The commit
discipline is the one the agent had: offsets are committed only after a batch's effects are in Redis and its
samples and dead letters are acknowledged.

Delivery guarantee: at-least-once into ``samples``; state and join writes are idempotent by input position;
the trainer drops repeated impression ids, so each impression is *trained* exactly once.
"""

from __future__ import annotations

import logging

import faust
from prometheus_client import start_http_server

from stream.config import StreamConfig
from stream.topics import ensure_topics
from stream.worker import StreamWorker

__all__ = ["StreamConfig", "create_app", "run_worker"]

log = logging.getLogger("zenith.stream")


def create_app(cfg: StreamConfig) -> faust.App:
    app = faust.App(
        f"{cfg.topics.prefix}{cfg.app_id}-host",  # Faust's own group: it consumes nothing itself
        broker=f"kafka://{cfg.bootstrap}",
        broker_credentials=cfg.kafka_security.faust_credentials(),
        store="memory://",
        web_enabled=False,
    )
    worker = StreamWorker(cfg)

    @app.task
    async def batch_loop() -> None:
        if cfg.metrics_port:
            start_http_server(cfg.metrics_port, addr=cfg.metrics_host)
        log.info("stream worker up: window=%ss, topics %s", cfg.window_ms / 1000, cfg.topics.all())
        await worker.run()

    @app.on_before_shutdown.connect  # type: ignore[misc]
    def _stop(app: faust.App, **kwargs: object) -> None:
        worker.stop()

    return app


def run_worker(cfg: StreamConfig, loglevel: str = "warning") -> None:
    """Run the worker until SIGINT/SIGTERM (Faust handles both and shuts down cleanly)."""
    ensure_topics(cfg.bootstrap, cfg.topics, cfg.partitions, security=cfg.kafka_security)
    app = create_app(cfg)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
