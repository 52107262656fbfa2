"""``zenith drill redis|broker|none``: kill a dependency mid-run, restart it, and count what survived."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from deploy.drill import Fault


def register(app: typer.Typer) -> None:
    @app.command()
    def drill(
        fault: Fault = typer.Argument(..., help="Which dependency to kill (none: a baseline without a fault)."),
        repeat: int = typer.Option(1, min=1, help="Repetitions; each starts fresh servers and processes."),
        impressions: int = typer.Option(1_500, min=1),
        impressions_per_s: float = typer.Option(50.0, help="Production rate; slow enough to outlast start-up."),
        outage_s: float = typer.Option(5.0, help="How long the killed dependency stays down."),
        window_s: float = typer.Option(3.0, help="Attribution window of the stream worker under test."),
        trainer: bool = typer.Option(True, help="Also run a trainer and check its last version's count."),
        workdir: Path = typer.Option(None, help="Where servers, logs and the registry go (default: a temp dir)."),
        json_out: Path = typer.Option(None, "--json", help="Write the reports here."),
    ) -> None:
        """Fault drill on real processes (own redis-server and Kafka broker): SIGKILL, restart, read back."""
        import logging

        from deploy.drill import DrillConfig, run_drill

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        kind = fault
        root = workdir or Path(tempfile.mkdtemp(prefix="zenith-drill-"))
        reports = []
        for i in range(repeat):
            cfg = DrillConfig(fault=kind, workdir=root / f"run{i}", impressions=impressions,
                              impressions_per_s=impressions_per_s, outage_s=outage_s, window_s=window_s,
                              with_trainer=trainer, seed=i)
            report = run_drill(cfg)
            reports.append(report.as_dict())
            typer.echo(f"[{i + 1}/{repeat}] {kind.value}: impressions {report.impressions}, samples {report.samples} "
                       f"(repeats {report.repeats}), lost {report.lost}, conflicting {report.conflicting}, "
                       f"state counters off {report.state_gap or 0}, dead letters {report.dead_letters}, "
                       f"trained {report.trained}, outage {report.outage_s}s, {report.seconds}s -> "
                       f"{'OK' if report.ok else 'FAILED'}")
            for note in report.notes:
                typer.echo(f"  note: {note}", err=True)
        if json_out is not None:
            json_out.write_text(json.dumps(reports, indent=2))
        if not all(r["ok"] for r in reports):
            raise typer.Exit(1)
