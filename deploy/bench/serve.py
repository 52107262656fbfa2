"""``zenith bench serve``: ranking latency and throughput of a real scorer process, with and without hot swaps.

Set-up (all throwaway, loopback only): a redis-server on a free port seeded with users, rooms, authors and
viewing history; a fresh Zenith model published to a temp registry; ``zenith serve`` started as its own
process on a free port. Then, per candidate count (100/500/1000 by default) and per case:

* ``steady``: concurrent clients POST /v1/rank; no new versions appear.
* ``swap``:   the same, while a publisher thread (the trainer stand-in: one training step on 256 random
  samples, then ``VersionWriter.publish``) writes a new version every ``--swap-every`` seconds, so the
  scorer loads deltas (and a periodic full) and swaps them in while serving.

Each cell runs ``--requests`` requests or ``--max-seconds``, whichever comes first, and reports p50/p99
latency as the client sees it (and the scorer's own, from its histogram's buckets), requests/s, failed
requests, the model versions seen, the shared room/author cache's hit rate, and the scorer's mean stage
times from its /metrics: read (the user from Redis, cache misses), user (the user's part, once), assemble
(every candidate's features), forward. In-run baselines, so the numbers read as ratios: an empty
``GET /healthz`` round trip (HTTP + event loop floor), and the model alone on one user's candidates in this
process, interleaved: the reference (today's eager forward, every row carrying the user's sequences, as
the trainer runs it) and the scorer's optimised forward (``model/serving.py``). The load generator shares
the machine with the scorer: on few cores the latencies include its CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import typer

from deploy.bench.stats import percentile

CANDIDATES = (100, 500, 1000)
N_USERS, N_ROOMS, N_AUTHORS, N_CATEGORIES = 64, 1200, 300, 12


def _pct(values: list[float], q: float) -> float:
    """Nearest rank, no interpolation (what this bench has always reported)."""
    return percentile(values, q, method="rank", empty=float("nan"))


async def _seed(redis_url: str, now_ms: int, seed: int = 0) -> None:
    """Rooms (started in the last hours), authors, and users with enter/watch/like history."""
    import random

    from state.store import LiveState

    rng = random.Random(seed)
    state = LiveState.from_url(redis_url)
    writes = []
    for i in range(N_ROOMS):
        writes.append(state.start_room(now_ms - rng.randint(60_000, 4 * 3_600_000), f"r{i}",
                                       f"a{i % N_AUTHORS}", f"c{i % N_CATEGORIES}", f"room {i}"))
    ev = 0
    for u in range(N_USERS):
        for _ in range(40):
            room = rng.randrange(N_ROOMS)
            ts = now_ms - rng.randint(1_000, 3_600_000)
            args = (f"u{u}", f"r{room}", f"a{room % N_AUTHORS}")
            writes.append(state.record_impression(ts, *args, f"c{room % N_CATEGORIES}"))
            writes.append(state.record_enter(f"ent-{ev}", ts + 500, *args))
            writes.append(state.record_watch(f"wat-{ev}", ts + 1000, *args, rng.uniform(1, 600)))
            if rng.random() < 0.2:
                writes.append(state.record_interaction(ts + 800, *args, "like"))
            ev += 1
    try:
        for lo in range(0, len(writes), 2000):
            await state.apply(writes[lo:lo + 2000])
    finally:
        await state.aclose()


STAGES = ("read", "user", "assemble", "forward")


def _scorer_series(metrics_text: str) -> dict[str, float]:
    """Every ``zenith_scorer_*`` series of a /metrics page, by its name with labels (as printed)."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(zenith_scorer_\S+) ([0-9.e+-]+)$", metrics_text, re.MULTILINE)}


def _scorer_view(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the scorer saw between two scrapes: stage means, cache hit rate, its own p50/p99 (histogram
    buckets' upper bounds: what the client adds is queueing and HTTP)."""
    def delta(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    stages = {}
    for stage in STAGES:
        n = delta(f'zenith_scorer_stage_seconds_count{{stage="{stage}"}}')
        stages[stage] = 1e3 * delta(f'zenith_scorer_stage_seconds_sum{{stage="{stage}"}}') / n if n else float("nan")
    hits, misses = (delta(f'zenith_scorer_item_cache_lookups_total{{result="{r}"}}') for r in ("hit", "miss"))
    prefix = 'zenith_scorer_request_seconds_bucket{le="'
    buckets = sorted((float(k[len(prefix):-2]), delta(k)) for k in after if k.startswith(prefix))
    total = buckets[-1][1] if buckets else 0.0
    server = {f"server_p{int(q * 100)}_le_ms": 1e3 * next(le for le, c in buckets if c >= q * total) if total
              else float("nan") for q in (0.5, 0.99)}
    return {"stage_mean_ms": stages, "cache_hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
            **server}


async def _load(base: str, n: int, requests: int, max_s: float, concurrency: int, seed: int) -> dict[str, Any]:
    """Concurrent clients POSTing /v1/rank with ``n`` candidates until ``requests`` are done or time is up."""
    import random

    import aiohttp

    rng = random.Random(seed)
    bodies = []
    for i in range(32):
        rooms = rng.sample(range(N_ROOMS), n)
        bodies.append(json.dumps({
            "user_id": f"u{i % N_USERS}", "context": {"device": "ios", "tab": "live"},
            "candidates": [{"room_id": f"r{r}", "author_id": f"a{r % N_AUTHORS}", "category": f"c{r % N_CATEGORIES}"}
                           for r in rooms]}).encode())
    latencies: list[float] = []
    versions: list[int] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + max_s
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as session:
        before = _scorer_series(await (await session.get(f"{base}/metrics")).text())

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                body = bodies[issued % len(bodies)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{base}/v1/rank", data=body) as resp:
                        payload = await resp.read()
                        if resp.status != 200:
                            errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                            continue
                except aiohttp.ClientError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                versions.append(json.loads(payload)["model_version"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = _scorer_series(await (await session.get(f"{base}/metrics")).text())
    return {"requests": len(latencies), "errors": errors, "wall_s": wall,
            "p50_ms": 1e3 * _pct(latencies, 0.5), "p99_ms": 1e3 * _pct(latencies, 0.99),
            "mean_ms": 1e3 * statistics.fmean(latencies) if latencies else float("nan"),
            "req_per_s": len(latencies) / wall if wall > 0 else float("nan"),
            "versions_seen": sorted(set(versions)), **_scorer_view(before, after)}


async def _healthz(base: str, requests: int, concurrency: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        async def worker(k: int) -> None:
            for _ in range(k):
                t0 = time.perf_counter()
                async with session.get(f"{base}/healthz") as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(latencies), "p50_ms": 1e3 * _pct(latencies, 0.5), "p99_ms": 1e3 * _pct(latencies, 0.99),
            "req_per_s": len(latencies) / wall}


def _forward_only(model: Any, spec: Any, n: int, reps: int) -> dict[str, Any]:
    """The model alone on one user's ``n`` candidates, in this process: the reference (today's forward, as the
    trainer runs it: eager, every row carrying the user's sequences) and the scorer's (``build_forward``:
    TorchScript, the sequences given once), interleaved so both see the same machine; FLOPs counted by torch
    (on the eager graph of each input layout; TorchScript runs the same arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deploy.bench.model_speed import one_user_candidates
    from model.batch import Batch
    from model.serving import ForwardKind, build_forward

    per_row = Batch.from_arrays(one_user_candidates(spec, n))
    model.eval()
    optimised = build_forward(model, ForwardKind.TORCHSCRIPT)
    eager = build_forward(model, ForwardKind.EAGER).fn
    inputs = {"reference": (eager, (per_row.ids, per_row.seqs, per_row.dense)),
              "optimised": (optimised.fn, (per_row.ids, per_row.seqs[:1].contiguous(), per_row.dense))}
    times: dict[str, list[float]] = {case: [] for case in inputs}
    flops = {}
    with torch.inference_mode():
        for case, (_, args) in inputs.items():
            with FlopCounterMode(display=False) as counter:
                eager(*args)
            flops[case] = counter.get_total_flops()
        for i in range(reps + 3):
            for case, (fn, args) in inputs.items():
                t0 = time.perf_counter()
                torch.sigmoid(fn(*args))
                if i >= 3:
                    times[case].append(time.perf_counter() - t0)
    model.train()
    seq_items = {case: args[1].numel() for case, (_, args) in inputs.items()}  # sequence ids embedded per request
    return {case: {"p50_ms": 1e3 * _pct(t, 0.5), "p99_ms": 1e3 * _pct(t, 0.99), "flops": flops[case],
                   "seq_items_embedded": seq_items[case],
                   "forward": optimised.kind.value if case == "optimised" else "eager"}
            for case, t in times.items()}


class Publisher(threading.Thread):
    """The trainer stand-in: a training step, then a new version, every ``every`` seconds until stopped."""

    def __init__(self, learner: Any, writer: Any, every: float) -> None:
        super().__init__(daemon=True)
        self.learner, self.writer, self.every = learner, writer, every
        self.stop_event = threading.Event()
        self.published: list[tuple[int, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        from model.factory import random_arrays

        i = 0
        try:
            while not self.stop_event.wait(self.every):
                self.learner.step(random_arrays(self.learner.spec, 256, seed=1000 + i))
                i += 1
                m = self.writer.publish(self.learner.model, watermark_ms=int(time.time() * 1000),
                                        offsets={"samples:0": self.learner.samples},
                                        samples_trained=self.learner.samples)
                self.published.append((m.version, m.kind.value))
        except BaseException as exc:  # surfaced by the bench after join
            self.error = exc


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 90.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the scorer exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the scorer did not become healthy in {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def run_bench(candidates: list[int], requests: int, max_seconds: float, concurrency: int, swap_every: float,
              threads: int, arch: str, size: str, forward_reps: int, workers: int = 1) -> dict[str, Any]:
    import torch

    from deploy.infra import ephemeral_redis, free_port
    from model.config import preset
    from model.factory import build_model, count_params, random_arrays
    from model.learner import OnlineLearner
    from model.registry import LocalDirRegistry, VersionWriter, WriterConfig
    from model.spec import default_live_spec

    torch.set_num_threads(threads)
    spec = default_live_spec()
    result: dict[str, Any] = {
        "bench": "serve", "arch": arch, "size": size, "threads": threads, "concurrency": concurrency,
        "swap_every_s": swap_every, "workers": workers,
        "cpus": os.cpu_count(), "torch": torch.__version__, "rows": [], "baselines": [],
    }
    with tempfile.TemporaryDirectory(prefix="zenith-bench-serve-") as tmp, ephemeral_redis(tmp) as redis_url:
        asyncio.run(_seed(redis_url, int(time.time() * 1000)))
        model = build_model(spec, preset(arch, size, spec), device="cpu")
        learner = OnlineLearner(model, spec)
        learner.step(random_arrays(spec, 256, seed=1))
        writer = VersionWriter(LocalDirRegistry(Path(tmp) / "registry"), WriterConfig(full_every=10, keep_fulls=2))
        writer.publish(model, watermark_ms=int(time.time() * 1000), offsets={}, samples_trained=learner.samples)
        result["dense_params"] = count_params(model).dense
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "scorer.log"
        env = {**os.environ, "REDIS_URL": redis_url}
        cmd = [sys.executable, "-c", "from deploy.cli import main; main()", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--registry", str(Path(tmp) / "registry"), "--redis-url", redis_url,
               "--threads", str(threads), "--poll-s", "0.5", "--workers", str(workers), "--loglevel", "warning"]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(base, proc, log_path)
            asyncio.run(_load(base, candidates[0], 20, 10.0, concurrency, seed=99))  # warm-up
            hz = asyncio.run(_healthz(base, 400, concurrency))
            result["baselines"].append({"case": "GET /healthz round trip", "candidates": 0, **hz})
            typer.echo(f"  baseline /healthz p50 {hz['p50_ms']:.2f} ms", err=True)
            for n in candidates:
                fw = _forward_only(model, spec, n, forward_reps)
                result["baselines"].append({"case": "reference forward (in-process, per-row batch)", "candidates": n,
                                            **fw["reference"]})
                result["baselines"].append({"case": "optimised forward (in-process: TorchScript, user's sequences "
                                                    "once)",
                                            "candidates": n, **fw["optimised"],
                                            "speedup": fw["reference"]["p50_ms"] / fw["optimised"]["p50_ms"]})
                fw = fw["reference"]
                for case in ("steady", "swap"):
                    pub = Publisher(learner, writer, swap_every) if case == "swap" else None
                    if pub:
                        pub.start()
                    row = asyncio.run(_load(base, n, requests, max_seconds, concurrency, seed=n))
                    if pub:
                        pub.stop_event.set()
                        pub.join()
                        if pub.error:
                            raise pub.error
                    if workers > 1:  # /metrics answers for one worker per connection: its diffs mean nothing
                        row.update(stage_mean_ms={}, cache_hit_rate=float("nan"))
                    row.update(case=case, candidates=n, forward_p50_ms=fw["p50_ms"],
                               published=len(pub.published) if pub else 0,
                               published_full=sum(k == "full" for _, k in pub.published) if pub else 0)
                    result["rows"].append(row)
                    typer.echo(f"  {n:>5} cand {case:<6} p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  "
                               f"{row['req_per_s']:.1f} req/s  errors {sum(row['errors'].values())}  "
                               f"versions {row['versions_seen']}", err=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            result["scorer_log_tail"] = log_path.read_text()[-2000:]
    return result


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"zenith bench serve: {result['arch']} {result['size']} ({result['dense_params']:,} dense params), "
                    f"CPU, {result['workers']} worker process(es), {result['threads']} torch thread(s) each, "
                    f"{result['concurrency']} concurrent clients, loopback; "
                    f"swap case: a new version every {result['swap_every_s']}s")
    cols = ["case", "candidates", "requests", "errors", "p50 ms", "p99 ms", "req/s", "cand/s",
            "p50 / ref fwd", "p99 / ref fwd", "versions served", "cache hit", "read / user / assemble / forward ms",
            "user share"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("case", "versions served") else "right")
    for b in result["baselines"]:
        if b["candidates"] == 0:
            t.add_row(f"[dim]baseline: {b['case']}[/]", "-", str(b["requests"]), "0", f"{b['p50_ms']:.2f}",
                      f"{b['p99_ms']:.2f}", f"{b['req_per_s']:.0f}", "-", "-", "-", "-", "-", "-", "-")
    for n in sorted({r["candidates"] for r in result["rows"]}):
        ref = next(b for b in result["baselines"] if b["candidates"] == n and b["case"].startswith("reference"))
        for b in result["baselines"]:
            if b["candidates"] == n:
                note = (f"{b['flops'] / 1e6:,.0f} MFLOP, {b['seq_items_embedded']:,} seq ids embedded"
                        + (f"; {b['speedup']:.2f}x faster" if "speedup" in b else ""))
                t.add_row(f"[dim]baseline: {b['case']}[/]", str(n), "-", "-", f"{b['p50_ms']:.2f}",
                          f"{b['p99_ms']:.2f}", "-", f"{n / (b['p50_ms'] / 1e3):,.0f}",
                          f"{b['p50_ms'] / ref['p50_ms']:.2f}x", f"{b['p99_ms'] / ref['p50_ms']:.2f}x", note,
                          "-", "-", "-")
        for r in (r for r in result["rows"] if r["candidates"] == n):
            st = r["stage_mean_ms"]
            seen = r["versions_seen"]
            served = f"{len(seen)} (v{seen[0]}..v{seen[-1]})" if len(seen) > 1 else (f"v{seen[0]}" if seen else "-")
            if r["case"] == "swap":
                served += f"; {r['published']} published ({r['published_full']} full)"
            t.add_row(r["case"], str(n), str(r["requests"]), str(sum(r["errors"].values())), f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['req_per_s']:.1f}", f"{n * r['req_per_s']:,.0f}",
                      f"{r['p50_ms'] / ref['p50_ms']:.2f}x", f"{r['p99_ms'] / ref['p50_ms']:.2f}x", served,
                      f"{r.get('cache_hit_rate', float('nan')):.1%}",
                      " / ".join(f"{st.get(k, float('nan')):.1f}" for k in STAGES),
                      f"{st.get('user', float('nan')) / r['mean_ms']:.1%}")
    Console(width=230).print(t)


def register(bench: typer.Typer) -> None:
    @bench.command("serve")
    def serve_bench(
        candidates: str = typer.Option(",".join(map(str, CANDIDATES)), "--candidates", help="candidate counts"),
        requests: int = typer.Option(150, "--requests", help="requests per cell (upper bound)"),
        max_seconds: float = typer.Option(15.0, "--max-seconds", help="time bound per cell"),
        concurrency: int = typer.Option(2, "--concurrency", help="concurrent client connections"),
        swap_every: float = typer.Option(0.5, "--swap-every", help="seconds between published versions (swap case)"),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads in the scorer and the baseline"),
        arch: str = typer.Option("zenith", "--arch"),
        size: str = typer.Option("S", "--size"),
        forward_reps: int = typer.Option(30, "--forward-reps", help="repeats of the forward-only baseline"),
        workers: int = typer.Option(1, "--workers", help="scorer processes sharing the port (zenith serve --workers)"),
        json_path: Path | None = typer.Option(None, "--json", help="write all numbers here"),
    ) -> None:
        """Ranking latency p50/p99 and requests/s for 100/500/1000 candidates, steady and during hot swaps."""
        counts = [int(c) for c in candidates.split(",") if c.strip()]
        if not counts or min(counts) < 1 or max(counts) > 1000:
            raise typer.BadParameter("--candidates must be counts in 1..1000 (the scorer's default limit)")
        result = run_bench(counts, requests, max_seconds, concurrency, swap_every, threads, arch, size, forward_reps,
                           workers)
        print_table(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=1))
            typer.echo(f"wrote {json_path}")
