"""``bench stream``: ``zenith stream worker`` as a subprocess, its Prometheus counters polled, drain rates."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

POLL_S = 0.2


class WorkerProc:
    """``zenith stream worker`` as a subprocess; with ``profile_path`` it runs under cProfile (the stats are
    written when it exits on SIGTERM)."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int, profile_path: Path | None = None) -> None:
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}/metrics"
        self._log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        prof = ["-m", "cProfile", "-o", str(profile_path)] if profile_path else []
        self.proc = subprocess.Popen([sys.executable, *prof, "-m", "deploy.cli", "stream", "worker"], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def scrape(self) -> Any:
        from deploy.promscrape import scrape

        if self.proc.poll() is not None:
            raise RuntimeError(f"the stream worker exited with {self.proc.returncode}:\n"
                               f"{self.log_path.read_text(errors='replace')[-3000:]}")
        return scrape(self.url, timeout_s=2.0)

    def stop(self) -> None:
        from deploy.infra.process import terminate

        terminate(self.proc.pid, timeout=30.0, group=False)
        self.proc.wait()
        self._log.close()


def counts(s: Any) -> tuple[float, float]:
    ev, sa = s.value("zenith_stream_events_total"), s.value("zenith_stream_samples_total")
    return (0.0 if math.isnan(ev) else ev), (0.0 if math.isnan(sa) else sa)


def hist(s: Any, name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for (n, ls), v in s.samples.items():
        if n == f"{name}_bucket":
            le = float(dict(ls)["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def delta_quantiles(before: Any, after: Any, name: str) -> dict:
    from deploy.promscrape import histogram_quantile

    b, a = hist(before, name), hist(after, name)
    buckets = sorted((le, a[le] - b.get(le, 0.0)) for le in a)
    n = buckets[-1][1] if buckets else 0
    return {"count": int(n), "p50_s": histogram_quantile(0.5, buckets), "p99_s": histogram_quantile(0.99, buckets)}


def wait(worker: WorkerProc, cond, timeout_s: float, what: str) -> list[tuple[float, float, float]]:
    """Poll the worker's counters until ``cond(events, samples)``; returns the (wall, events, samples) trace."""
    trace = []
    deadline = time.monotonic() + timeout_s
    while True:
        ev, sa = counts(worker.scrape())
        trace.append((time.perf_counter(), ev, sa))
        if cond(ev, sa):
            return trace
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what} (events {ev:.0f}, samples "
                               f"{sa:.0f}); worker log:\n{worker.log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(POLL_S)


def drain_rates(trace: list[tuple[float, float, float]], total: int, impressions: int) -> dict:
    """From the first event processed to the last backlog sample out (state writes, join, reads, assembly
    and sends all inside), and the consume-only rate up to the last event in."""
    first = next(i for i, (_, ev, _) in enumerate(trace) if ev > 0)
    last_in = next(i for i, (_, ev, _) in enumerate(trace) if ev >= total)
    t0, ev0, sa0 = trace[first]
    t_in, ev_in, sa_in = trace[last_in]
    t_out, ev_out, sa_out = trace[-1]
    wall = max(t_out - t0, 1e-9)
    return {"events": int(total), "impressions": impressions, "wall_s": wall,
            "events_per_s": (total - ev0) / wall, "samples_per_s": (sa_out - sa0) / wall,
            "consume_wall_s": t_in - t0, "events_per_s_consumed": (ev_in - ev0) / max(t_in - t0, 1e-9),
            "samples_when_consumed": int(sa_in), "last_sample_after_last_event_s": t_out - t_in}
