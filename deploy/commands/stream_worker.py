"""``zenith stream worker``: the Faust app that turns events into labelled samples."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    stream = typer.Typer(help="The stream stage: events -> Redis state -> labelled samples.", no_args_is_help=True)
    app.add_typer(stream, name="stream")

    @stream.command("worker")
    def worker(
        window_s: float = typer.Option(None, help="Attribution window in seconds (default: ZENITH_WINDOW_S or 120)."),
        metrics_port: int = typer.Option(None, help="Prometheus port (0: none)."),
        loglevel: str = typer.Option("warning"),
    ) -> None:
        """Run a stream worker until interrupted. Start several for more partitions' throughput."""
        from deploy.config import Settings
        from stream.app import run_worker

        overrides = {k: v for k, v in {"window_s": window_s, "stream_metrics_port": metrics_port}.items()
                     if v is not None}
        run_worker(Settings(**overrides).stream_config(), loglevel=loglevel)
