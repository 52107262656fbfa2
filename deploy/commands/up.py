"""``zenith up``: the main job (local stack + simulator + stream + trainer + scorer, with a report)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def up(
        duration_s: float = typer.Option(None, "--duration", help="Run this many seconds (default: until Ctrl-C)."),
        requests_per_s: float = typer.Option(20.0, help="Simulated feed requests per second (~6 rooms each)."),
        window_s: float = typer.Option(30.0, help="Attribution window for labels, seconds."),
        publish_every_s: float = typer.Option(5.0, help="Trainer publishes a model version this often."),
        users: int = typer.Option(2_000),
        authors: int = typer.Option(300),
        seed: int = typer.Option(0),
        report_dir: Path = typer.Option(None, help="Where the JSON report and plot go (default <home>/reports)."),
    ) -> None:
        """Run everything locally on the built-in live-stream simulator and report what it did."""
        from deploy.mainjob import MainJob, UpConfig

        MainJob(UpConfig(duration_s=duration_s, requests_per_s=requests_per_s, window_s=window_s,
                         publish_every_s=publish_every_s, users=users, authors=authors, seed=seed,
                         report_dir=report_dir)).run()
