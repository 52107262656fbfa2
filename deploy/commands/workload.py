"""``zenith simulate`` and ``zenith replay``: put a workload on the event topics."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def endpoints() -> tuple[str, str]:
    """Explicit servers from the environment, else the local stack (started if needed)."""
    from deploy.config import Settings
    from deploy.infra import ensure_running

    s = Settings()
    if s.kafka_bootstrap_servers and s.redis_url:
        return s.kafka_bootstrap_servers, s.redis_url
    ep = ensure_running(s.home)
    return ep.kafka_bootstrap, ep.redis_url


def publish(events: Iterable, total: int | None, speed: float, label: str) -> dict:
    """Send events to Kafka (paced), show progress, wait for every delivery; return a report."""
    from deploy.config import Settings
    from stream.producer import EventProducer, paced
    from stream.topics import ensure_topics

    bootstrap, _ = endpoints()
    settings = Settings()
    security = settings.kafka_security()
    ensure_topics(bootstrap, settings.topics, settings.partitions, security=security)
    producer = EventProducer(bootstrap, settings.topics, security)
    by_type: Counter[str] = Counter()
    t0 = time.perf_counter()
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=total, rate="")
        for ev in paced(events, speed):
            producer.send(ev)
            by_type[ev.TYPE] += 1
            if by_type.total() % 1000 == 0:
                rate = by_type.total() / (time.perf_counter() - t0)
                progress.update(task, completed=by_type["impression"], rate=f"{rate:,.0f} events/s")
        progress.update(task, completed=by_type["impression"])
        report = producer.flush()
    seconds = time.perf_counter() - t0
    result = {"events": by_type.total(), **{f"{k}s": v for k, v in by_type.items()}, "delivered": report.delivered,
              "failed": report.failed, "seconds": round(seconds, 2),
              "events_per_s": round(by_type.total() / max(seconds, 1e-9), 1), "bootstrap": bootstrap}
    console.print(result)
    if report.failed or report.delivered != by_type.total():
        raise typer.Exit(f"{report.failed} events failed: {report.first_error}") from None
    return result


def register(app: typer.Typer) -> None:
    @app.command()
    def simulate(
        impressions: int = typer.Option(None, help="Stop after this many impressions."),
        duration_s: float = typer.Option(None, help="Stop after this much simulated time (seconds)."),
        speed: float = typer.Option(1.0, help="x real time; 0 = as fast as possible."),
        requests_per_s: float = typer.Option(40.0, help="Feed requests per simulated second (each shows ~6 rooms)."),
        users: int = typer.Option(2_000),
        authors: int = typer.Option(300),
        seed: int = typer.Option(0),
    ) -> None:
        """Stream the built-in live-streaming world (planted signal) into Kafka."""
        from stream.simulator import SimConfig, Simulator

        if impressions is None and duration_s is None:
            impressions = 20_000
        base = SimConfig(n_users=users, n_authors=authors, seed=seed, requests_per_s=requests_per_s)
        # Event time = now, so freshness is measured against the wall clock. Faster than real time, the
        # simulated clock would run ahead of it, and the stream refuses events from the future: start it
        # early by the lead it would build up (plus the tail of late engagements).
        span_s = duration_s if duration_s is not None else impressions / (requests_per_s * base.rooms_per_request)
        span_s += base.late_delay_s + base.max_watch_s
        lead_s = span_s if speed <= 0 else max(span_s * (1 - 1 / speed), 0.0)
        start_ms = int((time.time() - lead_s) * 1000)
        sim = Simulator(dataclasses.replace(base, start_ms=start_ms))
        publish(sim.events(max_impressions=impressions, duration_s=duration_s), impressions, speed, "simulate")

    @app.command()
    def replay(
        path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A KuaiRand log CSV."),
        speed: float = typer.Option(0.0, help="x real time of the log; 0 = as fast as possible."),
        limit: int = typer.Option(None, help="Replay only the first N rows."),
    ) -> None:
        """Replay the public KuaiRand log in time order (impression, then its engagements)."""
        from stream.replay import kuairand_events

        with open(path) as f:
            rows = sum(1 for _ in f) - 1
        if limit is not None:
            rows = min(rows, limit)
        publish(kuairand_events(path, limit), rows, speed, "replay")
