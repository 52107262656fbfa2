"""``zenith up``: the whole system on one machine, with the built-in simulator as its workload.

Starts (or reuses) Kafka and Redis, then runs the stream worker, the trainer and a scorer as child
processes, streams the simulator into Kafka in real time, sends ranking requests to the scorer as a
client would, shows live progress, and at the end prints (and writes as JSON and a plot) a report:
events, samples, prequential AUC over time, freshness p50/p99 per stage, ranking latency, versions served.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deploy.config import Settings
from deploy.promscrape import Scrape, scrape

console = Console(stderr=True)

STAGES = [  # (stage, process, histogram)
    ("event -> sample (incl. attribution window)", "stream", "zenith_freshness_event_to_sample_seconds"),
    ("window close -> sample", "stream", "zenith_stream_close_delay_seconds"),
    ("sample -> trained", "trainer", "zenith_freshness_sample_to_trained_seconds"),
    ("trained -> published", "trainer", "zenith_freshness_trained_to_published_seconds"),
    ("published -> served", "scorer", "zenith_freshness_published_to_served_seconds"),
    ("newest event -> served (model data age)", "scorer", "zenith_freshness_event_to_served_seconds"),
]


@dataclass(frozen=True)
class UpConfig:
    duration_s: float | None = None  # None: until Ctrl-C
    requests_per_s: float = 20.0  # simulated feed requests per second (each shows ~6 rooms)
    users: int = 2_000
    authors: int = 300
    seed: int = 0
    window_s: float = 30.0
    lateness_s: float = 2.0  # the simulator's topics are produced together: little cross-topic skew
    publish_every_s: float = 5.0
    rank_every_s: float = 0.5
    candidates: int = 100
    report_dir: Path | None = None  # default: <home>/reports


@dataclass
class RunState:
    events: dict[str, int] = field(default_factory=dict)
    rank_ms: list[float] = field(default_factory=list)
    rank_errors: int = 0
    served: list[tuple[float, int]] = field(default_factory=list)  # (wall s, version) when first seen
    live_rooms: list[tuple[str, str, str]] = field(default_factory=list)


class MainJob:
    def __init__(self, cfg: UpConfig) -> None:
        self.cfg = cfg
        self.settings = Settings()
        self.state = RunState()
        self.stop = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}

    # ---- processes -----------------------------------------------------------------------------------
    def _endpoints(self) -> tuple[str, str]:
        s = self.settings
        if s.kafka_bootstrap_servers and s.redis_url:
            return s.kafka_bootstrap_servers, s.redis_url
        from deploy.infra import ensure_running

        ep = ensure_running(s.home)
        return ep.kafka_bootstrap, ep.redis_url

    def _spawn(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.children[name] = subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], env=env, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True)

    def _urls(self) -> dict[str, str]:
        s = self.settings
        return {"stream": f"http://127.0.0.1:{s.stream_metrics_port}/metrics",
                "trainer": f"http://127.0.0.1:{s.trainer_metrics_port}/metrics",
                "scorer": f"http://127.0.0.1:{s.scorer_port}/metrics"}

    # ---- workload and client -------------------------------------------------------------------------
    def _simulate(self, bootstrap: str) -> None:
        from stream.producer import EventProducer, paced
        from stream.simulator import SimConfig, Simulator

        c = self.cfg
        sim = Simulator(SimConfig(n_users=c.users, n_authors=c.authors, seed=c.seed,
                                  start_ms=int(time.time() * 1000), requests_per_s=c.requests_per_s))
        producer = EventProducer(bootstrap, self.settings.topics, self.settings.kafka_security())
        for n, ev in enumerate(paced(sim.events(duration_s=c.duration_s or 10**9), speed=1.0)):
            if self.stop.is_set():
                break
            producer.send(ev)
            self.state.events[ev.TYPE] = self.state.events.get(ev.TYPE, 0) + 1
            if n % 200 == 0:  # the rooms live now: what the ranking client asks about
                self.state.live_rooms = sim.live_rooms()
        producer.flush(30)

    def _client(self) -> None:
        """Rank like a feed service would: a random user, the rooms live now."""
        url = f"http://127.0.0.1:{self.settings.scorer_port}"
        rng = random.Random(self.cfg.seed)
        while not self.stop.wait(self.cfg.rank_every_s):
            model = _get_json(f"{url}/v1/model")
            if model and model.get("model_version") is not None:
                v = int(model["model_version"])
                if not self.state.served or self.state.served[-1][1] != v:
                    self.state.served.append((time.time(), v))
            rooms = self.state.live_rooms
            if not rooms or not self.state.served:
                continue
            shown = rng.sample(rooms, min(len(rooms), self.cfg.candidates))
            cands = [{"room_id": r, "author_id": a, "category": c} for r, a, c in shown]
            body = {"user_id": f"u{rng.randrange(self.cfg.users)}", "candidates": cands, "context": {"tab": "live"}}
            t0 = time.perf_counter()
            if _post_json(f"{url}/v1/rank", body) is None:
                self.state.rank_errors += 1
            else:
                self.state.rank_ms.append((time.perf_counter() - t0) * 1000)

    # ---- the run -------------------------------------------------------------------------------------
    def run(self) -> dict:
        from stream.topics import ensure_topics

        s, c = self.settings, self.cfg
        bootstrap, redis_url = self._endpoints()
        ensure_topics(bootstrap, s.topics, s.partitions, security=s.kafka_security())
        logs = Path(s.home) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url,
               "ZENITH_WINDOW_S": str(c.window_s), "ZENITH_LATENESS_S": str(c.lateness_s),
               "ZENITH_REGISTRY_DIR": str(s.registry)}
        console.print(f"[bold]zenith up[/]: Kafka {bootstrap}, Redis {redis_url}, registry {s.registry}, "
                      f"logs in {logs}")
        self._spawn("stream", ["stream", "worker"], env, logs)
        self._spawn("trainer", ["trainer", "--publish-every-s", str(c.publish_every_s)], env, logs)
        self._spawn("scorer", ["serve"], env, logs)
        t_start = time.time()
        threads = [threading.Thread(target=self._simulate, args=(bootstrap,), daemon=True),
                   threading.Thread(target=self._client, daemon=True)]
        for t in threads:
            t.start()
        previous = signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        try:
            with Live(self._progress(t_start, {}), console=console, refresh_per_second=1) as live:
                while not self.stop.wait(1.0):
                    scrapes = {k: scrape(u) for k, u in self._urls().items()}
                    live.update(self._progress(t_start, scrapes))
                    dead = [n for n, p in self.children.items() if p.poll() is not None]
                    if dead:
                        console.print(f"[red]{dead} exited; see {logs}/<name>.log[/]")
                        break
                    if c.duration_s is not None and time.time() - t_start >= c.duration_s:
                        break
        finally:
            signal.signal(signal.SIGINT, previous)
            self.stop.set()
            for t in threads:
                t.join(timeout=35)
            scrapes = self._drain()
            self._stop_children()
        report = self._report(t_start, scrapes)
        self._write(report)
        return report

    def _drain(self, timeout_s: float = 45.0) -> dict[str, Scrape]:
        """With the workload stopped, give the trainer until it has caught up with the samples the stream has
        emitted (two equal readings in a row), so the report compares finished counts, not a race."""
        deadline, equal = time.time() + timeout_s, 0
        while True:
            scrapes = {k: scrape(u) for k, u in self._urls().items()}
            tr = scrapes.get("trainer", Scrape())
            emitted = _count(scrapes.get("stream", Scrape()).value("zenith_stream_samples_total"))
            trained = _count(tr.value("zenith_trainer_samples_total"))
            caught_up = emitted > 0 and trained + _count(tr.value("zenith_trainer_duplicate_samples_total")) >= emitted
            equal = equal + 1 if caught_up else 0
            if equal >= 2 or time.time() >= deadline or any(p.poll() is not None for p in self.children.values()):
                return scrapes
            time.sleep(1.0)

    def _stop_children(self) -> None:
        for p in self.children.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        for p in self.children.values():
            try:
                p.wait(max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()

    def _progress(self, t0: float, sc: dict[str, Scrape]) -> Table:
        t = Table(title=f"zenith up - {time.time() - t0:,.0f}s", show_header=False)
        st, tr = sc.get("stream", Scrape()), sc.get("trainer", Scrape())
        ev = sum(self.state.events.values())
        served = self.state.served[-1][1] if self.state.served else "-"
        rows = [
            ("events produced", f"{ev:,} ({ev / max(time.time() - t0, 1e-9):,.0f}/s)"),
            ("samples emitted (stream)", _fmt(st.value("zenith_stream_samples_total"))),
            ("samples trained", _fmt(tr.value("zenith_trainer_samples_total"))),
            ("window AUC (enter)", _fmt(tr.value("zenith_trainer_prequential", task="enter", metric="auc"), ".4f")),
            ("version published / served", f"{_fmt(tr.value('zenith_trainer_model_version'))} / {served}"),
            ("rank p50 (ms)", _fmt(np.median(self.state.rank_ms) if self.state.rank_ms else float("nan"), ".1f")),
        ]
        for k, v in rows:
            t.add_row(k, v)
        return t

    def _report(self, t0: float, sc: dict[str, Scrape]) -> dict:
        from model.registry import LocalDirRegistry

        reg = LocalDirRegistry(self.settings.registry)
        auc_curve = []
        for v in reg.list_versions():
            try:
                m = reg.read_manifest(v)
            except Exception:  # noqa: BLE001 - a pruned or partial version simply has no point
                continue
            w = m.extra.get("prequential_window", {})
            if m.created_ms / 1000 >= t0 and w:
                auc_curve.append({"version": v, "t_s": round(m.created_ms / 1000 - t0, 1),
                                  "samples_trained": m.samples_trained, **w})
        freshness = {}
        for stage, proc, hist in STAGES:
            s = sc.get(proc, Scrape())
            freshness[stage] = {"p50_s": _r(s.quantile(hist, 0.5)), "p99_s": _r(s.quantile(hist, 0.99))}
        st, tr = sc.get("stream", Scrape()), sc.get("trainer", Scrape())
        rank = np.array(self.state.rank_ms) if self.state.rank_ms else np.array([np.nan])
        return {
            "duration_s": round(time.time() - t0, 1),
            "events": self.state.events,
            "samples_emitted": _count(st.value("zenith_stream_samples_total")),
            "samples_trained": _count(tr.value("zenith_trainer_samples_total")),
            "duplicates_dropped": _count(tr.value("zenith_trainer_duplicate_samples_total")),
            "dead_letters": _count(st.value("zenith_stream_deadletters_total")),
            "late_engagements": _count(st.value("zenith_stream_engagements_total", outcome="late")),
            "prequential_auc_over_time": auc_curve,
            "freshness": freshness,
            "ranking_latency_ms": {"p50": _r(np.nanpercentile(rank, 50)), "p99": _r(np.nanpercentile(rank, 99)),
                                   "requests": len(self.state.rank_ms), "errors": self.state.rank_errors,
                                   "candidates": self.cfg.candidates},
            "versions_served": [v for _, v in self.state.served],
        }

    def _write(self, report: dict) -> None:
        out = self.cfg.report_dir or Path(self.settings.home) / "reports"
        out.mkdir(parents=True, exist_ok=True)
        (out / "up-report.json").write_text(json.dumps(report, indent=1))
        print_report(report)
        plot_report(report, out / "up-report.png")
        console.print(f"report: {out / 'up-report.json'}, plot: {out / 'up-report.png'}")


def print_report(r: dict) -> None:
    c = Console()
    c.print(f"[bold]events[/] {r['events']}  [bold]samples[/] emitted {r['samples_emitted']}, trained "
            f"{r['samples_trained']}, duplicates dropped {r['duplicates_dropped']}, dead letters {r['dead_letters']}")
    t = Table(title="prequential AUC (trailing window) over time")
    for col in ("t (s)", "version", "samples", "AUC", "UAUC", "logloss"):
        t.add_column(col, justify="right")
    curve = r["prequential_auc_over_time"]
    for p in curve[:: max(len(curve) // 12, 1)] + curve[-1:]:
        t.add_row(str(p["t_s"]), str(p["version"]), f"{p['samples_trained']:,}", f"{p['auc']:.4f}",
                  f"{p['uauc']:.4f}", f"{p['logloss']:.4f}")
    c.print(t)
    f = Table(title="freshness per stage (Prometheus histograms)")
    for col in ("stage", "p50 (s)", "p99 (s)"):
        f.add_column(col)
    for stage, q in r["freshness"].items():
        f.add_row(stage, str(q["p50_s"]), str(q["p99_s"]))
    c.print(f)
    lat = r["ranking_latency_ms"]
    c.print(f"[bold]ranking[/] {lat['requests']} requests x {lat['candidates']} candidates: p50 {lat['p50']} ms, "
            f"p99 {lat['p99']} ms, errors {lat['errors']}; versions served: {len(r['versions_served'])} "
            f"({r['versions_served'][:1]}..{r['versions_served'][-1:]})")


def plot_report(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    curve = r["prequential_auc_over_time"]
    if curve:
        a.plot([p["t_s"] for p in curve], [p["auc"] for p in curve], marker="o", label="AUC")
        a.plot([p["t_s"] for p in curve], [p["uauc"] for p in curve], marker=".", label="UAUC")
    a.set(title="prequential AUC (trailing window), enter", xlabel="seconds since start", ylabel="AUC")
    a.legend()
    a.grid(alpha=0.3)
    stages = list(r["freshness"])
    p50 = [r["freshness"][s]["p50_s"] or 0 for s in stages]
    p99 = [r["freshness"][s]["p99_s"] or 0 for s in stages]
    y = np.arange(len(stages))
    b.barh(y - 0.2, p50, 0.4, label="p50")
    b.barh(y + 0.2, p99, 0.4, label="p99")
    b.set_yticks(y, stages, fontsize=8)
    b.set(title="freshness per stage", xlabel="seconds (log)", xscale="log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _post_json(url: str, body: dict) -> dict | None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _fmt(x: float, spec: str = ",.0f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _count(x: float) -> int:
    """A counter that has no series yet (e.g. no dead letter so far) counts zero."""
    return 0 if x is None or np.isnan(x) else int(x)


def _r(x: float) -> float | None:
    return None if x is None or np.isnan(x) else round(float(x), 4)
