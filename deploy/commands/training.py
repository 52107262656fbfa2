"""``zenith trainer``: the online trainer process."""

from __future__ import annotations

import signal
import threading

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def trainer(
        arch: str = typer.Option("zenith", help="zenith | zenith++ | dlrm | dcnv2 | rankmixer | transformer"),
        size: str = typer.Option("S", help="Size preset: S | M | L"),
        publish_every_s: float = typer.Option(5.0, help="Publish a model version this often (seconds)."),
        batch_size: int = typer.Option(256),
        device: str = typer.Option(None, help="cuda | cpu (default: CUDA when present)."),
    ) -> None:
        """Learn continuously from the samples topic; publish model versions to the registry."""
        import logging

        from deploy.config import Settings
        from deploy.trainer import Trainer, TrainerConfig

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        s = Settings()
        bootstrap, _ = s.require_servers()
        cfg = TrainerConfig(bootstrap=bootstrap, registry_dir=s.registry, topics=s.topics,
                            group_id=f"{s.topic_prefix}zenith-trainer", arch=arch, size=size, batch_size=batch_size,
                            publish_every_s=publish_every_s, metrics_port=s.trainer_metrics_port,
                            metrics_host=s.metrics_host, device=device,
                            max_future_skew_ms=int(s.max_future_skew_s * 1000), retry_max_s=s.retry_max_s,
                            kafka_security=s.kafka_security())
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        Trainer(cfg).run(stop)
