"""``zenith bench freshness``: event-to-served delay per stage, p50/p99, at a given event rate.

Runs the main job (``zenith up``: simulator -> Kafka -> stream worker -> samples -> trainer -> registry ->
scorer, plus a ranking client) as a subprocess for ``--duration`` seconds at ``--requests-per-s`` simulated
feed requests per second (~6 impressions each, plus their engagements), on an ephemeral Kafka + Redis (or
``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` when set), with free ports, a temp ``ZENITH_HOME`` and a fresh topic
prefix. It reads the job's JSON report (per-stage quantiles from each process's Prometheus histograms, computed
the way Grafana's ``histogram_quantile`` does) and adds two exact measurements the histograms' buckets blur:

* event -> sample and window close -> sample from every record on the samples topic (``emitted_ms - event_ms``);
* newest event -> published from every surviving version manifest in the registry (``created_ms - watermark_ms``).

Baseline rows: the attribution window itself (no sample can leave the stream before its window ends: the floor
the design imposes) and window + lateness (when the join may close), so the table shows what each stage adds.
``--rates 10,40`` runs once per rate and plots p99 per stage against the rate; ``--plot FILE.png`` draws bars per
stage (log scale).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from deploy.bench.stats import percentile

# (key, label, report stage name or None for exact-only rows, what it adds)
STAGES = [
    ("event_to_sample", "event -> sample (incl. attribution window)", "event -> sample (incl. attribution window)"),
    ("close_to_sample", "window close -> sample (the stream's own delay)", "window close -> sample"),
    ("sample_to_trained", "sample -> trained", "sample -> trained"),
    ("trained_to_published", "trained -> published", "trained -> published"),
    ("published_to_served", "published -> served", "published -> served"),
    ("event_to_served", "newest event -> served (model data age at swap)", "newest event -> served (model data age)"),
]
CUMULATIVE = {"event_to_sample", "event_to_served", "event_to_published"}  # these contain the window


def _cumulative(key: str) -> bool:
    return key.removesuffix("_exact") in CUMULATIVE


@contextlib.contextmanager
def _stack(tmp: Path) -> Iterator[tuple[str, str, bool]]:
    """(bootstrap, redis url, ours): ours=True when the servers are throwaway (so Redis may be flushed)."""
    from deploy.config import Settings

    settings = Settings()
    kafka, redis_url = settings.kafka_bootstrap_servers, settings.redis_url
    if kafka and redis_url:
        yield kafka, redis_url, False
        return
    from deploy.infra import ephemeral_stack

    with ephemeral_stack(tmp) as ep:
        yield ep.kafka_bootstrap, ep.redis_url, True


def _exact_samples(bootstrap: str, topic: str, window_s: float, timeout_s: float = 30.0) -> dict:
    """Every sample record's emitted_ms - event_ms (event -> sample) and that minus the window."""
    from confluent_kafka import Consumer

    from model.spec import default_live_spec
    from stream.samples import SampleCodec

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-fresh-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    raw: list[bytes] = []
    deadline, idle_since = time.monotonic() + timeout_s, time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - idle_since < 3.0:
            got = [m.value() for m in c.consume(5_000, timeout=0.5) if not m.error()]
            if got:
                raw += got
                idle_since = time.monotonic()
    finally:
        c.close()
    if not raw:
        return {"count": 0}
    d = SampleCodec(default_live_spec()).decode(raw)
    delay = ((d.emitted_ms - d.arrays.event_ms) / 1000.0).tolist()
    close = [max(x - window_s, 0.0) for x in delay]
    return {"count": len(delay),
            "event_to_sample": {"p50_s": percentile(delay, 0.5), "p99_s": percentile(delay, 0.99)},
            "close_to_sample": {"p50_s": percentile(close, 0.5), "p99_s": percentile(close, 0.99)}}


def _exact_versions(registry_dir: Path, started_s: float) -> dict:
    """created_ms - watermark_ms of each version published during the run (the registry prunes old ones)."""
    from model.registry import LocalDirRegistry

    reg = LocalDirRegistry(registry_dir)
    ages = []
    for v in reg.list_versions():
        try:
            m = reg.read_manifest(v)
        except Exception:  # noqa: BLE001 - pruned between list and read, or partial: no point
            continue
        if m.created_ms / 1000 >= started_s and m.watermark_ms > 0:
            ages.append((m.created_ms - m.watermark_ms) / 1000.0)
    return {"count": len(ages), "p50_s": percentile(ages, 0.5), "p99_s": percentile(ages, 0.99)}


def run_one(bootstrap: str, redis_url: str, flush_redis: bool, tmp: Path, rate: float, duration_s: float,
            window_s: float, publish_every_s: float, users: int, authors: int, seed: int) -> dict[str, Any]:
    from deploy.infra import free_ports
    from deploy.mainjob import UpConfig

    if flush_redis:  # state (and event-id dedup markers) from a previous rate must not leak into this one
        import redis

        r = redis.Redis.from_url(redis_url)
        r.flushdb()
        r.close()
    else:  # a shared Redis remembers event ids for a day: a fresh seed gives fresh ids
        seed += int(time.time()) % 1_000_000
    home = tmp / f"home-{rate:g}"
    report_dir = home / "reports"
    stream_port, trainer_port, scorer_port = free_ports(3)
    prefix = f"fresh{uuid.uuid4().hex[:8]}."
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url, "ZENITH_HOME": str(home),
           "ZENITH_TOPIC_PREFIX": prefix, "ZENITH_STREAM_METRICS_PORT": str(stream_port),
           "ZENITH_TRAINER_METRICS_PORT": str(trainer_port), "ZENITH_SCORER_PORT": str(scorer_port)}
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--duration", str(duration_s), "--requests-per-s", str(rate),
           "--window-s", str(window_s), "--publish-every-s", str(publish_every_s), "--users", str(users),
           "--authors", str(authors), "--seed", str(seed), "--report-dir", str(report_dir)]
    log_path = tmp / f"up-{rate:g}.log"
    typer.echo(f"  rate {rate:g} req/s: zenith up for {duration_s:g}s (log {log_path})", err=True)
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=duration_s + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"zenith up exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
    report = json.loads((report_dir / "up-report.json").read_text())
    lateness_s = UpConfig().lateness_s
    exact_samples = _exact_samples(bootstrap, f"{prefix}samples", window_s)
    exact_versions = _exact_versions(home / "registry", t0)
    stages: dict[str, dict[str, Any]] = {}
    for key, _label, report_name in STAGES:
        q = report["freshness"].get(report_name, {})
        stages[key] = {"p50_s": q.get("p50_s"), "p99_s": q.get("p99_s"), "source": "histogram"}
    for key in ("event_to_sample", "close_to_sample"):
        if exact_samples.get("count"):
            stages[f"{key}_exact"] = {**exact_samples[key], "source": f"{exact_samples['count']} sample records"}
    if exact_versions["count"]:
        stages["event_to_published_exact"] = {"p50_s": exact_versions["p50_s"], "p99_s": exact_versions["p99_s"],
                                              "source": f"{exact_versions['count']} version manifests"}
    events = sum(report["events"].values())
    return {"requests_per_s": rate, "duration_s": report["duration_s"], "window_s": window_s,
            "lateness_s": lateness_s, "publish_every_s": publish_every_s,
            "events": report["events"], "events_per_s": events / max(report["duration_s"], 1e-9),
            "impressions_per_s": report["events"].get("impression", 0) / max(report["duration_s"], 1e-9),
            "samples_emitted": report["samples_emitted"], "samples_trained": report["samples_trained"],
            "versions_served": len(report["versions_served"]), "ranking_latency_ms": report["ranking_latency_ms"],
            "stages": stages, "report": report}


def run_bench(rates: list[float], duration_s: float, window_s: float, publish_every_s: float, users: int,
              authors: int, seed: int) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "freshness", "cpus": os.cpu_count(), "window_s": window_s,
                              "duration_s": duration_s, "publish_every_s": publish_every_s, "runs": []}
    with tempfile.TemporaryDirectory(prefix="zenith-bench-freshness-") as tmpdir:
        tmp = Path(tmpdir)
        with _stack(tmp) as (bootstrap, redis_url, ours):
            result["servers"] = "ephemeral (local broker + redis-server)" if ours else "given servers (env)"
            for rate in rates:
                run = run_one(bootstrap, redis_url, ours, tmp, rate, duration_s, window_s, publish_every_s, users,
                              authors, seed)
                result["runs"].append(run)
                st = run["stages"]
                typer.echo(f"  rate {rate:g}: {run['events_per_s']:.0f} events/s, data age at swap p50 "
                           f"{_f(st['event_to_served']['p50_s'])}s p99 {_f(st['event_to_served']['p99_s'])}s", err=True)
    return result


# ---- output --------------------------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _rows(run: dict) -> list[tuple[str, str, float | None, float | None, float | None, str]]:
    """(key, label, p50, p99, adds over the floor (p50), source) in pipeline order, baselines first."""
    w, late = run["window_s"], run["lateness_s"]
    st = run["stages"]
    out = [("floor_window", "baseline: attribution window (design floor)", w, w, None, "config"),
           ("floor_close", "baseline: window + lateness (earliest close)", w + late, w + late, None, "config")]
    order = [("event_to_sample", "event -> sample (incl. window)"),
             ("event_to_sample_exact", "event -> sample (incl. window), exact"),
             ("close_to_sample", "window close -> sample"),
             ("close_to_sample_exact", "window close -> sample, exact"),
             ("sample_to_trained", "sample -> trained"),
             ("trained_to_published", "trained -> published"),
             ("event_to_published_exact", "newest event -> published, exact"),
             ("published_to_served", "published -> served"),
             ("event_to_served", "newest event -> served (total model data age)")]
    for key, label in order:
        if key not in st:
            continue
        s = st[key]
        p50 = s.get("p50_s")
        adds = (p50 - w if p50 is not None else None) if _cumulative(key) else p50
        out.append((key, label, p50, s.get("p99_s"), adds, s["source"]))
    return out


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = result["runs"]
    r0 = runs[0]
    t = Table(title=f"zenith bench freshness: event -> served model, per stage ({result['cpus']} CPUs, "
                    f"{result['servers']}; window {result['window_s']:g}s, lateness {r0['lateness_s']:g}s, publish "
                    f"every {result['publish_every_s']:g}s, {result['duration_s']:g}s per rate)")
    t.add_column("stage")
    for run in runs:
        tag = f"@{run['requests_per_s']:g} req/s ({run['events_per_s']:.0f} ev/s)"
        t.add_column(f"p50 s {tag}", justify="right")
        t.add_column("p99 s", justify="right")
        t.add_column("adds (p50)", justify="right")
    t.add_column("source")
    rows = [_rows(run) for run in runs]
    keys = list(dict.fromkeys(k for rs in rows for k, *_ in rs))
    for key in keys:
        cells, label, source = [], key, ""
        for rs in rows:
            hit = next((r for r in rs if r[0] == key), None)
            if hit:
                _, label, p50, p99, adds, source = hit
                cells += [_f(p50), _f(p99), "-" if key.startswith("floor") or adds is None else
                          ("+" if _cumulative(key) else "") + _f(adds)]
            else:
                cells += ["-", "-", "-"]
        t.add_row(f"[dim]{label}[/]" if key.startswith("floor") else label, *cells, source)
    con = Console(width=220)
    con.print(t)
    for run in runs:
        lat = run["ranking_latency_ms"]
        con.print(f"@{run['requests_per_s']:g} req/s: {sum(run['events'].values()):,} events "
                  f"({run['impressions_per_s']:.0f} impressions/s), samples emitted "
                  f"{_f(run['samples_emitted'], ',.0f')} / trained {_f(run['samples_trained'], ',.0f')}, "
                  f"versions served {run['versions_served']}, ranking "
                  f"p50 {lat['p50']} ms p99 {lat['p99']} ms over {lat['requests']} requests. 'adds' is the stage "
                  f"itself, or for rows that contain the window, what comes on top of it.")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = result["runs"]
    sweep = len(runs) > 1
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(14 if sweep else 9, 5.5))
    ax = axes[0] if sweep else axes
    rows = _rows(runs[0])
    y = np.arange(len(rows))
    p50 = [r[2] or np.nan for r in rows]
    p99 = [r[3] or np.nan for r in rows]
    ax.barh(y - 0.2, p50, 0.4, label="p50")
    ax.barh(y + 0.2, p99, 0.4, label="p99")
    ax.axvline(result["window_s"], color="grey", ls="--", lw=1, label="attribution window")
    ax.set_yticks(y, [r[1] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="seconds (log)",
           title=f"freshness per stage @ {runs[0]['requests_per_s']:g} req/s ({runs[0]['events_per_s']:.0f} events/s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    if sweep:
        bx = axes[1]
        rates = [r["events_per_s"] for r in runs]
        for key, label, *_ in _rows(runs[0]):
            if key.startswith("floor"):
                continue
            vals = [r["stages"].get(key, {}).get("p99_s") for r in runs]
            bx.plot(rates, [v if v is not None else np.nan for v in vals], marker="o", label=label,
                    ls="--" if key.endswith("_exact") else "-")
        bx.set(xlabel="events/s offered", ylabel="p99 seconds (log)", yscale="log", title="p99 per stage vs rate")
        bx.legend(fontsize=7)
        bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(bench: typer.Typer) -> None:
    @bench.command("freshness")
    def freshness_bench(
        requests_per_s: float = typer.Option(20.0, "--requests-per-s",
                                             help="simulated feed requests/s (~6 impressions each)"),
        rates: str = typer.Option("", "--rates", help="sweep: comma-separated request rates, one run each"),
        duration_s: float = typer.Option(120.0, "--duration", help="seconds per run"),
        window_s: float = typer.Option(30.0, "--window-s", help="attribution window (the freshness floor)"),
        publish_every_s: float = typer.Option(5.0, "--publish-every-s", help="trainer publishes this often"),
        users: int = typer.Option(2_000, "--users"),
        authors: int = typer.Option(300, "--authors"),
        seed: int = typer.Option(0, "--seed"),
        json_path: Path | None = typer.Option(None, "--json", help="write all numbers here"),
        plot_path: Path | None = typer.Option(None, "--plot", help="bar chart per stage (and p99 vs rate) PNG"),
    ) -> None:
        """Event-to-served delay p50/p99 per stage at a given event rate, against the attribution-window floor."""
        rate_list = [float(r) for r in rates.split(",") if r.strip()] or [requests_per_s]
        if min(rate_list) <= 0:
            raise typer.BadParameter("rates must be positive")
        if duration_s < window_s + 2 * publish_every_s + 10:
            raise typer.BadParameter(f"--duration must exceed the window plus a few publishes "
                                     f"(>= {window_s + 2 * publish_every_s + 10:g}s) for any sample to be served")
        result = run_bench(rate_list, duration_s, window_s, publish_every_s, users, authors, seed)
        print_table(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=1, default=str))
            typer.echo(f"wrote {json_path}")
        if plot_path:
            plot(result, plot_path)
            typer.echo(f"wrote {plot_path}")
