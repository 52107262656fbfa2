"""``zenith bench stream``: events/s through the stream worker, next to the Kafka clients' own speed.

Set-up: an ephemeral Kafka broker and redis-server on free ports (or ``KAFKA_BOOTSTRAP_SERVERS`` /
``REDIS_URL`` when set), topics under a fresh prefix, and ``--impressions`` simulated impressions with their
engagements and room lifecycle events pre-produced to the input topics (a backlog). Then, in one run:

* baselines on the same topics, so the app's numbers read as ratios to the client's own speed:
  a raw confluent-kafka consumer reading the three input topics to the end (partitions assigned, connection
  up before the clock starts; best of 3); the same plus ``decode_event`` (JSON -> typed event) on every
  message; a raw aiokafka consumer (the client inside Faust).
* ``offline processor``: ``stream.offline.build_samples`` on a throwaway Redis for ``--offline-impressions``
  (the stream's own state writes, label join and feature assembly, no Kafka, no Faust).
* the stream worker (``python -m deploy.cli stream worker``, window ``--window-s``, lateness 1 s, idle advance
  2 s) as a subprocess draining the backlog. The backlog ends with one "sentinel" impression and engagement per
  input partition stamped past the last window, so stream time passes every backlog window as soon as the
  backlog is read. Progress comes from the worker's Prometheus ``zenith_stream_events_total`` and
  ``zenith_stream_samples_total`` (polled every 0.2 s); the rate runs from the first event processed to the
  last backlog sample out, so Faust's start-up (5-10 s) is excluded and sample building is included. Redis work
  per event comes from the server itself (INFO commandstats deltas: commands the worker sent, commands run
  inside the Lua script, and server CPU microseconds).
* the same worker fed live: ``--live-seconds`` of events stamped "now", paced in real time at
  ``--live-requests-per-s`` feed requests/s. p50/p99 event-to-sample delay and window-close delay are exact,
  from the live samples' own records (``emitted_ms - event_ms``); the worker's histograms
  (``zenith_freshness_event_to_sample_seconds``, ``zenith_stream_close_delay_seconds``, bucket deltas over the
  live phase, quantiles as Prometheus computes them) are printed next to them. A backlog has no meaningful
  event-to-sample delay (it measures how long the events sat in Kafka), so those columns are empty there.

``--profile`` runs the offline path under cProfile and attributes self time to groups (Redis round trips,
Lua/state writes, feature assembly, join, (de)serialization); time in builtins and libraries is charged to the
project function that called them. ``--profile-worker`` also runs the worker itself under cProfile (Faust and
aiokafka get groups of their own; its rate is then a profiled rate).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

WINDOW_S = 10.0
LATENESS_S = 1.0
IDLE_ADVANCE_S = 2.0
POLL_S = 0.2
CLIENT_NOISE = {"info", "hello", "ping", "client|setinfo", "client|setname", "select", "script|load", "command",
                "command|docs"}


# ---- workload ------------------------------------------------------------------------------------------------
def _sim_events(impressions: int, seed: int, run: str, start_ms: int | None = None,
                requests_per_s: float = 40.0) -> list:
    """Simulated events, time-ordered, with event ids made unique to this run (a shared Redis remembers
    event ids for a day and would treat a rerun as replays)."""
    from stream.simulator import SimConfig, Simulator

    cfg = SimConfig(seed=seed, requests_per_s=requests_per_s)
    span_ms = int(1000 * impressions / (cfg.requests_per_s * cfg.rooms_per_request))
    cfg = dataclasses.replace(cfg, start_ms=start_ms or int(time.time() * 1000) - span_ms - 60_000)
    events = Simulator(cfg).events(max_impressions=impressions)
    return [dataclasses.replace(e, event_id=f"{run}-{e.event_id}") for e in events]


def _produce(bootstrap: str, topics: Any, events: list) -> float:
    from stream.producer import EventProducer

    t0 = time.perf_counter()
    p = EventProducer(bootstrap, topics, **{"linger.ms": 20, "batch.num.messages": 10_000})
    for ev in events:
        p.send(ev)
    report = p.flush(120)
    if report.failed:
        raise RuntimeError(f"{report.failed} events not delivered: {report.first_error}")
    return time.perf_counter() - t0


# ---- baselines -----------------------------------------------------------------------------------------------
def _partitions(bootstrap: str, topic_names: list[str]) -> list[tuple[str, int]]:
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return [(t, p) for t in topic_names for p in sorted(md[t].partitions)]


def _raw_confluent(bootstrap: str, topic_names: list[str], total: int, reps: int, timeout_s: float
                   ) -> tuple[dict, list]:
    """Read every input message, ``reps`` times with a fresh consumer each; best pass. Partitions are
    assigned (no group join) and the connection is up before the clock starts, so the time is fetching and
    handing out messages only."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    parts = _partitions(bootstrap, topic_names)
    passes, values = [], []
    for _ in range(reps):
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                      "enable.auto.commit": False, "fetch.max.bytes": 52_428_800,
                      "queued.max.messages.kbytes": 262_144})
        try:
            c.list_topics(timeout=10)
            values = []
            deadline = time.monotonic() + timeout_s
            t0 = time.perf_counter()
            c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in parts])
            while len(values) < total and time.monotonic() < deadline:
                # consume(n) waits for n messages or the timeout: never ask for more than remain
                want = min(10_000, total - len(values))
                values += [m.value() for m in c.consume(want, timeout=0.5) if not m.error()]
            passes.append(time.perf_counter() - t0)
        finally:
            c.close()
    wall = min(passes)
    return {"events": len(values), "wall_s": wall, "events_per_s": len(values) / wall, "passes_s": passes}, values


def _decode_rate(values: list[bytes], consume_s: float) -> dict:
    from stream.events import decode_event

    t0 = time.perf_counter()
    for v in values:
        decode_event(v)
    decode_s = time.perf_counter() - t0
    wall = consume_s + decode_s
    return {"events": len(values), "wall_s": wall, "decode_s": decode_s, "events_per_s": len(values) / wall}


def _raw_aiokafka(bootstrap: str, topic_names: list[str], total: int, reps: int, timeout_s: float) -> dict:
    """The same with aiokafka, the client inside Faust."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    parts = [TopicPartition(t, p) for t, p in _partitions(bootstrap, topic_names)]

    async def one() -> tuple[int, float]:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=10_000,
                             fetch_max_bytes=52_428_800, max_partition_fetch_bytes=10_485_760)
        await c.start()
        try:
            await c.topics()  # connected, metadata known
            n = 0
            deadline = time.monotonic() + timeout_s
            t0 = time.perf_counter()
            c.assign(parts)
            await c.seek_to_beginning(*parts)
            while n < total and time.monotonic() < deadline:
                got = await c.getmany(timeout_ms=500, max_records=10_000)
                n += sum(len(v) for v in got.values())
            return n, time.perf_counter() - t0
        finally:
            await c.stop()

    passes = [asyncio.run(one()) for _ in range(reps)]
    n, wall = min(passes, key=lambda p: p[1])
    return {"events": n, "wall_s": wall, "events_per_s": n / wall, "passes_s": [w for _, w in passes]}


# ---- Redis accounting ----------------------------------------------------------------------------------------
def _lua_inner_commands() -> set[str]:
    """Commands the state script runs inside EVALSHA (their time is already inside EVALSHA's)."""
    from importlib import resources

    lua = resources.files("state").joinpath("lua/apply.lua").read_text()
    return {m.lower() for m in re.findall(r"redis\.call\('(\w+)'", lua)}


def _commandstats(redis_url: str) -> dict[str, tuple[int, int]]:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for k, v in r.info("commandstats").items()}
    finally:
        r.close()


def _redis_delta(before: dict, after: dict, events: int) -> dict:
    inner = _lua_inner_commands()
    delta = {k: (c - before.get(k, (0, 0))[0], u - before.get(k, (0, 0))[1]) for k, (c, u) in after.items()}
    delta = {k: v for k, v in delta.items() if v[0] > 0 and k not in CLIENT_NOISE}
    sent = {k: v for k, v in delta.items() if k not in inner}
    per = max(events, 1)
    return {
        "client_commands_per_event": sum(c for c, _ in sent.values()) / per,
        "all_commands_per_event": sum(c for c, _ in delta.values()) / per,  # incl. those inside Lua
        "server_usec_per_event": sum(u for _, u in sent.values()) / per,  # EVALSHA's usec includes its calls
        "by_command_per_event": {k: round(c / per, 3) for k, (c, _) in sorted(delta.items(), key=lambda kv: -kv[1][0])},
        "lua_inner": sorted(inner),
    }


# ---- the worker ----------------------------------------------------------------------------------------------
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _counts(s: Any) -> tuple[float, float]:
    ev, sa = s.value("zenith_stream_events_total"), s.value("zenith_stream_samples_total")
    return (0.0 if math.isnan(ev) else ev), (0.0 if math.isnan(sa) else sa)


def _hist(s: Any, name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for (n, ls), v in s.samples.items():
        if n == f"{name}_bucket":
            le = float(dict(ls)["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def _delta_quantiles(before: Any, after: Any, name: str) -> dict:
    from deploy.promscrape import histogram_quantile

    b, a = _hist(before, name), _hist(after, name)
    buckets = sorted((le, a[le] - b.get(le, 0.0)) for le in a)
    n = buckets[-1][1] if buckets else 0
    return {"count": int(n), "p50_s": histogram_quantile(0.5, buckets), "p99_s": histogram_quantile(0.99, buckets)}


def _wait(worker: WorkerProc, cond, timeout_s: float, what: str) -> list[tuple[float, float, float]]:
    """Poll the worker's counters until ``cond(events, samples)``; returns the (wall, events, samples) trace."""
    trace = []
    deadline = time.monotonic() + timeout_s
    while True:
        ev, sa = _counts(worker.scrape())
        trace.append((time.perf_counter(), ev, sa))
        if cond(ev, sa):
            return trace
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what} (events {ev:.0f}, samples "
                               f"{sa:.0f}); worker log:\n{worker.log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(POLL_S)


def _drain_rates(trace: list[tuple[float, float, float]], total: int, impressions: int) -> dict:
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


def _sentinels(topics: Any, partitions: int, ts_ms: int, run: str) -> list:
    """One impression and one engagement per input partition at ``ts_ms``, so stream time passes every
    backlog window as soon as the backlog is read (no wait for the idle advance). Keys are picked with the
    producers' partitioner (murmur2) so each partition gets one."""
    from aiokafka.partitioner import DefaultPartitioner

    from stream.events import Engagement, EngagementKind, Impression

    part = DefaultPartitioner()
    users: dict[int, str] = {}
    i = 0
    while len(users) < partitions:
        key = f"{run}-sentinel-{i}"
        users.setdefault(part(key.encode(), list(range(partitions)), list(range(partitions))), key)
        i += 1
    out: list = []
    for p, user in sorted(users.items()):
        out.append(Impression(event_id=f"{run}-si{p}", request_id="sentinel", user_id=user, room_id="r-sentinel",
                              author_id="a-sentinel", position=0, ts_ms=ts_ms, hour=0, device="web", tab="live"))
        out.append(Engagement(event_id=f"{run}-se{p}", user_id=user, room_id="r-sentinel",
                              kind=EngagementKind.LIKE, ts_ms=ts_ms, author_id="a-sentinel"))
    return out


def _exact_delays(bootstrap: str, topic: str, id_prefix: str, window_s: float, timeout_s: float = 20.0) -> dict:
    """Exact per-sample delays from the records on the samples topic: emitted_ms - event_ms."""
    import numpy as np
    from confluent_kafka import Consumer

    from model.spec import default_live_spec
    from stream.samples import SampleCodec

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-check-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    raw: list[bytes] = []
    idle_since = time.monotonic()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and time.monotonic() - idle_since < 3.0:
            got = [m.value() for m in c.consume(10_000, timeout=0.5) if not m.error()]
            if got:
                raw += got
                idle_since = time.monotonic()
    finally:
        c.close()
    d = SampleCodec(default_live_spec()).decode(raw)
    mask = np.array([i.startswith(id_prefix) for i in d.impression_ids], dtype=bool)
    delay = (d.emitted_ms[mask] - d.arrays.event_ms[mask]) / 1000.0
    if not len(delay):
        return {"count": 0}
    close = np.maximum(delay - window_s, 0.0)
    return {"count": int(len(delay)),
            "event_to_sample_p50_s": float(np.percentile(delay, 50)),
            "event_to_sample_p99_s": float(np.percentile(delay, 99)),
            "event_to_sample_max_s": float(delay.max()),
            "close_delay_p50_s": float(np.percentile(close, 50)),
            "close_delay_p99_s": float(np.percentile(close, 99))}


def _live_phase(bootstrap: str, topics: Any, seconds: float, requests_per_s: float, seed: int, run: str) -> dict:
    """Produce events stamped now, paced at real time, for ``seconds``; in-flight engagements are cut."""
    from stream.events import Impression
    from stream.producer import EventProducer, paced
    from stream.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(seed=seed, start_ms=int(time.time() * 1000), requests_per_s=requests_per_s))
    p = EventProducer(bootstrap, topics)
    n = imps = 0
    t_end = time.monotonic() + seconds
    for ev in paced(sim.events(duration_s=seconds), speed=1.0):
        if time.monotonic() > t_end:
            break
        p.send(dataclasses.replace(ev, event_id=f"{run}-{ev.event_id}"))
        n += 1
        imps += isinstance(ev, Impression)
    p.flush(30)
    return {"events": n, "impressions": imps, "seconds": seconds}


# ---- offline path and profile --------------------------------------------------------------------------------
@contextlib.contextmanager
def _offline_redis(tmp: Path) -> Iterator[tuple[str, str]]:
    """(url, key prefix): a throwaway redis-server; without one, the given REDIS_URL under a fresh prefix."""
    from deploy.infra import InfraError, ephemeral_redis

    try:
        with ephemeral_redis(tmp / "offline-redis") as url:
            yield url, "zl:"
    except InfraError:
        if not os.environ.get("REDIS_URL"):
            raise
        yield os.environ["REDIS_URL"], f"zlbench:{uuid.uuid4().hex[:8]}:"


def _offline(redis_url: str, prefix: str, raw_events: list[bytes], window_ms: int, profile: bool) -> dict:
    """``stream.offline.build_samples`` over events decoded from their wire bytes (as the app gets them)."""
    import cProfile

    from model.spec import default_live_spec
    from state.store import LiveState, StateConfig
    from stream.events import decode_event
    from stream.join import LabelJoiner
    from stream.offline import build_samples

    async def run() -> tuple[int, float]:
        state = LiveState.from_url(redis_url, StateConfig(prefix=prefix))
        try:
            await state.r.ping()
            t0 = time.perf_counter()
            arrays, _ = await build_samples((decode_event(v) for v in raw_events), state, default_live_spec(),
                                            LabelJoiner(window_ms, 0), batch_size=500)
            return len(arrays), time.perf_counter() - t0
        finally:
            await state.aclose()

    before = _commandstats(redis_url)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    samples, wall = asyncio.run(run())
    if prof:
        prof.disable()
    out = {"events": len(raw_events), "samples": samples, "wall_s": wall, "events_per_s": len(raw_events) / wall,
           "samples_per_s": samples / wall, "redis": _redis_delta(before, _commandstats(redis_url), len(raw_events))}
    if prof:
        out["profile"] = _profile_breakdown(prof, wall)
    return out


# Fine-grained owners of self time, and the group each belongs to.
GROUPS = {
    "redis wait": "Redis round trips", "redis client": "Redis round trips",
    "state writes": "Lua/state writes", "state reads": "feature assembly", "features": "feature assembly",
    "join": "join", "decode events": "(de)serialization", "encode samples": "(de)serialization",
    "join state codec": "(de)serialization", "asyncio": "other", "metrics": "other", "driver": "other",
    "faust": "Faust + Kafka client", "kafka client": "Faust + Kafka client",
}
NOT_WORK = {"startup (imports)"}  # reported, left out of the shares
OWNER_HELP = {
    "redis wait": "event loop blocked on Redis replies (network + server-side Lua and reads)",
    "redis client": "redis-py: pack pipelined commands, parse replies (incl. its per-reply asyncio timeouts)",
    "state writes": "state_write / LiveState.record_*: build each event's Lua arguments (orjson)",
    "state reads": "LiveState.read: as-of subtraction of later increments, history parsing",
    "features": "stream.features.assemble: hashing ids, dense features",
    "join": "label join: pending impressions, held engagements, due/close",
    "decode events": "decode_event: JSON -> validated typed event",
    "encode samples": "SampleCodec.encode: feature row -> binary sample record",
    "join state codec": "UserJoinState encode/decode (the Faust table's value format)",
    "asyncio": "asyncio event loop (scheduling callbacks)", "metrics": "prometheus_client counters and histograms",
    "driver": "offline driver loop",
    "faust": "Faust/mode runtime: streams, take_events buffering, table + changelog, offset acks, timers",
    "kafka client": "aiokafka: fetch, decode record batches, produce samples and changelog records",
}


def _owner(func: tuple[str, int, str]) -> str | None:
    file, _, name = func
    f = file.replace("\\", "/")
    if name == "<method 'poll' of 'select.epoll' objects>" or name.startswith("<method 'select' of"):
        return "redis wait"
    if "importlib" in f or name in ("<built-in method builtins.exec>", "<built-in method marshal.loads>",
                                    "<built-in method _imp.create_dynamic>"):
        return "startup (imports)"
    if "/faust/" in f or "/mode/" in f:
        return "faust"
    if "/aiokafka/" in f or "/kafka/" in f:
        return "kafka client"
    if "/redis/" in f:
        return "redis client"
    if "/asyncio/" in f:
        # The loop itself is overhead of its own; timeouts, futures and streams are charged to their users.
        return "asyncio" if f.rsplit("/", 1)[-1] in ("base_events.py", "events.py", "runners.py") else None
    if "/prometheus_client/" in f:
        return "metrics"
    if f.endswith("stream/events.py"):
        return "decode events"
    if f.endswith("stream/samples.py"):
        return "offline-only" if name == "decode" else "encode samples"
    if f.endswith("stream/join.py"):
        return "join state codec" if name in ("encode", "decode") else "join"
    if f.endswith("stream/features.py"):
        return "features"
    if f.endswith("state/store.py"):
        return "state reads" if name in ("read", "read_for_ranking", "_fill_categories", "_as_of",
                                         "_history_item") else "state writes"
    if f.endswith("stream/processor.py"):
        if name in ("state_write", "apply_state"):
            return "state writes"
        if name == "build_samples":
            return "features"
        if name == "observe_emitted":
            return "metrics"
        return "join"
    if f.endswith("stream/offline.py") or f.endswith("deploy/bench/stream.py"):
        return "driver"
    return None  # builtins, numpy, stdlib: charged to whoever called them


def _profile_breakdown(prof: Any, wall_s: float, worker: bool = False, top: int = 18) -> dict:
    """Self time per owner (see ``_owner``); time in builtins and libraries without an owner is charged to
    their callers in proportion to the calls' self time, recursively. In the worker the epoll wait is idle
    time as well as I/O, and start-up imports are not stream work: both are reported but left out of the shares."""
    import pstats

    stats = pstats.Stats(prof).stats  # func -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})
    memo: dict[tuple, dict[str, float]] = {}

    def owners_of(func: tuple, visiting: frozenset = frozenset()) -> dict[str, float]:
        """Fractions of ``func``'s self time per owner: its own, or its callers' mix (memoized; cycles and
        callers outside the profile count as unattributed)."""
        own = _owner(func)
        if own is not None:
            return {own: 1.0}
        if func in memo:
            return memo[func]
        callers = stats[func][4] if func in stats else {}
        total = sum(v[2] for v in callers.values())
        if func in visiting or total <= 0:
            return {"unattributed": 1.0}
        mix: dict[str, float] = {}
        for caller, v in callers.items():
            for k, f in owners_of(caller, visiting | {func}).items():
                mix[k] = mix.get(k, 0.0) + f * v[2] / total
        memo[func] = mix
        return mix

    owner_time: dict[str, float] = {}
    for func, (_cc, _nc, tt, _ct, _callers) in stats.items():
        if tt > 0:
            for k, f in owners_of(func).items():
                owner_time[k] = owner_time.get(k, 0.0) + tt * f
    left_out = {"offline result decode (not stream work)": owner_time.pop("offline-only", 0.0)}
    for k in NOT_WORK | ({"redis wait"} if worker else set()):
        left_out["idle + I/O wait (epoll)" if k == "redis wait" else k] = owner_time.pop(k, 0.0)
    total = sum(owner_time.values())
    owners = [{"owner": k, "group": GROUPS.get(k, "other"), "seconds": v, "share": v / total,
               "what": OWNER_HELP.get(k, "")} for k, v in sorted(owner_time.items(), key=lambda kv: -kv[1])]
    groups: dict[str, float] = {}
    for o in owners:
        groups[o["group"]] = groups.get(o["group"], 0.0) + o["seconds"]
    boring = ("/asyncio/", "runners.py", "importlib", "cProfile", "/mode/utils/", "/typer/", "/click/")
    cum = sorted(((ct, tt, nc, f) for f, (_cc, nc, tt, ct, _) in stats.items()), key=lambda x: -x[0])
    top_cum = [{"function": f"{'/'.join(Path(f[0]).parts[-2:])}:{f[1]}({f[2]})", "cumulative_s": ct, "self_s": tt,
                "calls": nc}
               for ct, tt, nc, f in cum
               if f[0] != "~" and not any(b in f[0] for b in boring) and "<module>" not in f[2]][:top]
    return {"profiled_wall_s": wall_s, "attributed_s": total, "left_out_s": left_out,
            "groups": [{"group": g, "seconds": s, "share": s / total}
                       for g, s in sorted(groups.items(), key=lambda kv: -kv[1])],
            "owners": owners, "top_cumulative": top_cum}


# ---- the run -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stack(tmp: Path) -> Iterator[tuple[str, str, str]]:
    kafka, redis_url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("REDIS_URL")
    if kafka and redis_url:
        yield kafka, redis_url, "given servers (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL)"
        return
    from deploy.infra import ephemeral_stack

    with ephemeral_stack(tmp) as ep:
        yield ep.kafka_bootstrap, ep.redis_url, "ephemeral (local broker + redis-server on free ports)"


def run_bench(impressions: int, offline_impressions: int, window_s: float, live_seconds: float,
              live_requests_per_s: float, partitions: int, seed: int, profile: bool,
              timeout_s: float, profile_worker: bool = False) -> dict[str, Any]:
    from deploy.infra import delete_topics, free_port
    from stream.events import Impression, encode_event
    from stream.topics import Topics, ensure_topics

    run = uuid.uuid4().hex[:8]
    topics = Topics(f"bench{run}.")
    inputs = [topics.impression, topics.engagement, topics.live]
    result: dict[str, Any] = {"bench": "stream", "cpus": os.cpu_count(), "window_s": window_s,
                              "lateness_s": LATENESS_S, "idle_advance_s": IDLE_ADVANCE_S, "partitions": partitions,
                              "seed": seed, "rows": []}
    echo = lambda msg: typer.echo(f"  {msg}", err=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="zenith-bench-stream-") as tmpdir:
        tmp = Path(tmpdir)
        with _stack(tmp) as (bootstrap, redis_url, where):
            result["servers"] = where
            echo(f"servers: {where}: Kafka {bootstrap}, Redis {redis_url}; topic prefix {topics.prefix}")
            ensure_topics(bootstrap, topics, partitions)
            events = _sim_events(impressions, seed, run)
            n_imp = sum(isinstance(e, Impression) for e in events)
            by_type: dict[str, int] = {}
            for e in events:
                by_type[e.TYPE] = by_type.get(e.TYPE, 0) + 1
            last_imp_ms = max(e.ts_ms for e in events if isinstance(e, Impression))
            sentinels = _sentinels(topics, partitions, last_imp_ms + int((window_s + LATENESS_S + 2) * 1000), run)
            total = len(events) + len(sentinels)
            result["workload"] = {"events": len(events), "impressions": n_imp, "by_type": by_type,
                                  "sentinels": len(sentinels)}
            produce_s = _produce(bootstrap, topics, events + sentinels)
            echo(f"produced {len(events):,} events ({n_imp:,} impressions) in {produce_s:.1f}s")
            result["workload"]["produce_s"] = produce_s

            # (a) baselines: the clients alone on the same topics.
            raw, values = _raw_confluent(bootstrap, inputs, total, 3, timeout_s)
            echo(f"raw confluent-kafka: {raw['events_per_s']:,.0f} events/s")
            dec = _decode_rate(values, raw["wall_s"])
            aio = _raw_aiokafka(bootstrap, inputs, total, 3, timeout_s)
            echo(f"raw aiokafka: {aio['events_per_s']:,.0f} events/s")
            base = raw["events_per_s"]
            result["rows"] += [
                {"case": "baseline: raw confluent-kafka consumer", "kind": "baseline", **raw},
                {"case": "baseline: raw confluent-kafka + decode_event", "kind": "baseline", **dec},
                {"case": "baseline: raw aiokafka consumer (Faust's client)", "kind": "baseline", **aio},
            ]

            # (b) the stream worker draining the backlog, then fed live.
            port = free_port()
            env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url,
                   "ZENITH_TOPIC_PREFIX": topics.prefix, "ZENITH_WINDOW_S": str(window_s),
                   "ZENITH_LATENESS_S": str(LATENESS_S), "ZENITH_IDLE_ADVANCE_S": str(IDLE_ADVANCE_S),
                   "ZENITH_STREAM_METRICS_PORT": str(port), "ZENITH_PARTITIONS": str(partitions)}
            redis_before = _commandstats(redis_url)
            t_spawn = time.perf_counter()
            worker_prof = tmp / "worker.prof" if profile_worker else None
            worker = WorkerProc(env, tmp / "worker.log", port, worker_prof)
            try:
                trace = _wait(worker, lambda ev, sa: sa >= n_imp, timeout_s, "the backlog's samples")
                drain = _drain_rates(trace, total, n_imp)
                drain["startup_s"] = next(t for t, ev, _ in trace if ev > 0) - t_spawn
                drain["redis"] = _redis_delta(redis_before, _commandstats(redis_url), total)
                echo(f"worker: {drain['events_per_s']:,.0f} events/s, {drain['samples_per_s']:,.0f} samples/s "
                     f"(first event after {drain['startup_s']:.1f}s)")
                # The sentinels' own windows close once stream time passes them (idle advance).
                _wait(worker, lambda ev, sa: sa >= n_imp + partitions, window_s + LATENESS_S + IDLE_ADVANCE_S + 30,
                      "the sentinels' samples")
                s_before = worker.scrape()
                # One write round trip per consumed batch, one read per close tick (+1 history-category read).
                drain["redis_round_trips_per_event"] = s_before.value("zenith_stream_redis_seconds_count") / total
                result["rows"].append({"case": "zenith stream worker: backlog drain"
                                               + (" (under cProfile)" if profile_worker else ""), "kind": "app",
                                       "x_raw": drain["events_per_s"] / base, **drain})
                if live_seconds > 0:
                    echo(f"live phase: {live_seconds:.0f}s at {live_requests_per_s:g} feed requests/s")
                    live = _live_phase(bootstrap, topics, live_seconds, live_requests_per_s, seed + 1, run + "L")
                    want = n_imp + partitions + live["impressions"]
                    _wait(worker, lambda ev, sa: sa >= want, window_s + LATENESS_S + 60, "the live samples")
                    time.sleep(1.0)
                    s_after = worker.scrape()
                    exact = _exact_delays(bootstrap, topics.samples, f"{run}L-", window_s)
                    live.update(
                        histogram_event_to_sample=_delta_quantiles(s_before, s_after,
                                                                   "zenith_freshness_event_to_sample_seconds"),
                        histogram_close_delay=_delta_quantiles(s_before, s_after, "zenith_stream_close_delay_seconds"),
                        exact=exact,
                        event_to_sample={"p50_s": exact.get("event_to_sample_p50_s"),
                                         "p99_s": exact.get("event_to_sample_p99_s")},
                        close_delay={"p50_s": exact.get("close_delay_p50_s"), "p99_s": exact.get("close_delay_p99_s")},
                        events_per_s=live["events"] / live_seconds,
                        samples_per_s=live["impressions"] / live_seconds)
                    result["rows"].append({"case": f"zenith stream worker: live, {live['events'] / live_seconds:.0f} "
                                                   f"events/s offered", "kind": "live",
                                           "wall_s": live_seconds, **live})
            finally:
                worker.stop()
            if worker_prof is not None and worker_prof.exists():
                live_events = sum(r["events"] for r in result["rows"] if r["kind"] == "live")
                result["worker_profile"] = {
                    "events": total + live_events,
                    **_profile_breakdown(str(worker_prof), time.perf_counter() - t_spawn, worker=True)}
            if "KAFKA_BOOTSTRAP_SERVERS" in os.environ:  # shared broker: leave nothing behind
                with contextlib.suppress(Exception):
                    from confluent_kafka.admin import AdminClient

                    names = [t for t in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
                             if t.startswith(topics.prefix)]
                    delete_topics(bootstrap, names)

        # (c) the processor alone (no Kafka, no Faust), timed; then under cProfile.
        sub = _sim_events(offline_impressions, seed + 2, run + "O")
        raw_sub = [encode_event(e) for e in sub]
        with _offline_redis(tmp) as (url, prefix):
            off = _offline(url, prefix, raw_sub, int(window_s * 1000), profile=False)
        echo(f"offline processor: {off['events_per_s']:,.0f} events/s")
        result["rows"].insert(3, {"case": "offline processor (build_samples, Redis, no Kafka/Faust)",
                                  "kind": "offline", "x_raw": off["events_per_s"] / base, **off})
        if profile:
            with _offline_redis(tmp) as (url, prefix):
                prof = _offline(url, prefix, raw_sub, int(window_s * 1000), profile=True)
            result["profile"] = {"events": len(raw_sub), "events_per_s_under_profiler": prof["events_per_s"],
                                 **prof["profile"]}
    for r in result["rows"]:
        r.setdefault("x_raw", r["events_per_s"] / base if base else math.nan)
    result["ceiling"] = _ceiling(result)
    return result


def _ceiling(result: dict) -> dict:
    """Upper bounds implied by the measurements: one worker is bound by its own CPU per event; scaling out
    over partitions is bound by the single-threaded Redis server's CPU per event and by the client."""
    rows = {r["kind"]: r for r in result["rows"] if r["kind"] in ("app", "offline")}
    out: dict[str, float] = {}
    app = rows.get("app")
    if app:
        out["one_worker_events_per_s"] = app["events_per_s"]
        usec = app["redis"]["server_usec_per_event"]
        out["redis_server_usec_per_event"] = usec
        out["redis_bound_events_per_s"] = 1e6 / usec if usec else math.nan
        out["partitions"] = result["partitions"]
        out["workers_to_redis_bound"] = out["redis_bound_events_per_s"] / app["events_per_s"]
    if "offline" in rows:
        out["processor_only_events_per_s"] = rows["offline"]["events_per_s"]
    return out


# ---- output --------------------------------------------------------------------------------------------------
def _s(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    w = result["workload"]
    t = Table(title=f"zenith bench stream: {w['events']:,} events ({w['impressions']:,} impressions) pre-produced, "
                    f"{result['partitions']} partitions, window {result['window_s']:g}s, {result['cpus']} CPUs, "
                    f"{result['servers']}")
    cols = ["case", "events", "seconds", "events/s", "x raw client", "samples/s", "event->sample p50/p99 s",
            "close delay p50/p99 s", "Redis cmds/event (sent / incl. Lua)", "Redis server µs/event"]
    for c in cols:
        t.add_column(c, justify="left" if c == "case" else "right")
    for r in result["rows"]:
        rd = r.get("redis")
        e2s, cd = r.get("event_to_sample"), r.get("close_delay")
        name = f"[dim]{r['case']}[/]" if r["kind"] == "baseline" else r["case"]
        t.add_row(name, f"{r['events']:,}", _s(r.get("wall_s"), ".1f"), f"{r['events_per_s']:,.0f}",
                  "-" if r["kind"] == "live" else f"{r['x_raw']:.3f}x", _s(r.get("samples_per_s"), ",.0f"),
                  f"{_s(e2s['p50_s'])} / {_s(e2s['p99_s'])}" if e2s else "-",
                  f"{_s(cd['p50_s'])} / {_s(cd['p99_s'])}" if cd else "-",
                  f"{rd['client_commands_per_event']:.2f} / {rd['all_commands_per_event']:.2f}" if rd else "-",
                  _s(rd["server_usec_per_event"], ".1f") if rd else "-")
    con = Console(width=220)
    con.print(t)
    app = next((r for r in result["rows"] if r["kind"] == "app"), None)
    if app:
        con.print(f"backlog: worker start-up {app['startup_s']:.1f}s excluded; rate from the first event processed to "
                  f"the last sample out; consuming alone ran at {app['events_per_s_consumed']:,.0f} events/s and "
                  f"{app['samples_when_consumed']:,} samples were out when the last event was in (the rest "
                  f"{app['last_sample_after_last_event_s']:.1f}s later). Pipelined Redis round trips per event "
                  f"{app['redis_round_trips_per_event']:.3f}; commands per event: "
                  + ", ".join(f"{k} {v}" for k, v in list(app["redis"]["by_command_per_event"].items())[:9]))
    live = next((r for r in result["rows"] if r["kind"] == "live"), None)
    if live:
        h, hc = live["histogram_event_to_sample"], live["histogram_close_delay"]
        con.print(f"live: delays exact from the {live['exact'].get('count', 0):,} sample records "
                  f"(emitted_ms - event_ms; close delay = that - window). The worker's own histograms say "
                  f"event->sample p50/p99 "
                  f"{_s(h['p50_s'])}/{_s(h['p99_s'])} s and close delay {_s(hc['p50_s'])}/{_s(hc['p99_s'])} s "
                  f"(bucket interpolation; the event->sample buckets are coarse around the window).")
    c = result.get("ceiling", {})
    if c.get("redis_bound_events_per_s"):
        con.print(f"ceiling: one worker {c['one_worker_events_per_s']:,.0f} events/s (CPU-bound in Python); the "
                  f"Redis server spends {c['redis_server_usec_per_event']:.0f} µs/event, so a single redis-server "
                  f"caps the stream near {c['redis_bound_events_per_s']:,.0f} events/s "
                  f"(~{c['workers_to_redis_bound']:.1f} workers' worth, partitions permitting: "
                  f"{c['partitions']} now)")
    if "profile" in result:
        op = result["profile"]
        print_profile(op, con, f"cProfile of the offline path (build_samples), {op['events']:,} events, "
                      f"{op['profiled_wall_s']:.1f}s under the profiler")
    if "worker_profile" in result:
        wp = result["worker_profile"]
        print_profile(wp, con, f"cProfile of the stream worker process, {wp['events']:,} events, "
                      + ", ".join(f"{k} {v:.1f}s" for k, v in wp["left_out_s"].items() if v) + " left out")


def print_profile(p: dict, con: Any, what: str) -> None:
    from rich.table import Table

    t = Table(title=f"where the stream's time goes: {what} (self time; library/builtin time charged to the project "
                    f"code that called it)")
    for c in ("group", "share", "seconds", "part", "part share", "what"):
        t.add_column(c, justify="left" if c in ("group", "part", "what") else "right")
    for g in p["groups"]:
        parts = [o for o in p["owners"] if o["group"] == g["group"]]
        for i, o in enumerate(parts):
            t.add_row(g["group"] if i == 0 else "", f"{g['share']:.0%}" if i == 0 else "",
                      f"{g['seconds']:.2f}" if i == 0 else "", o["owner"], f"{o['share']:.0%}", o["what"])
    con.print(t)
    top = Table(title="top cumulative entries")
    for c in ("function", "cumulative s", "self s", "calls"):
        top.add_column(c, justify="left" if c == "function" else "right")
    for e in p["top_cumulative"][:12]:
        top.add_row(e["function"], f"{e['cumulative_s']:.2f}", f"{e['self_s']:.2f}", f"{e['calls']:,}")
    con.print(top)


def register(bench: typer.Typer) -> None:
    @bench.command("stream")
    def stream_bench(
        impressions: int = typer.Option(30_000, "--impressions", help="simulated impressions pre-produced"),
        offline_impressions: int = typer.Option(3_000, "--offline-impressions",
                                                help="impressions through the offline path (and the profile)"),
        window_s: float = typer.Option(WINDOW_S, "--window-s", help="attribution window of the worker"),
        live_seconds: float = typer.Option(15.0, "--live-seconds", help="live phase length (0: skip)"),
        live_requests_per_s: float = typer.Option(20.0, "--live-requests-per-s",
                                                  help="live phase feed requests/s (~6 impressions each)"),
        partitions: int = typer.Option(4, "--partitions"),
        seed: int = typer.Option(0, "--seed"),
        profile: bool = typer.Option(False, "--profile", help="cProfile the offline path and group the time"),
        profile_worker: bool = typer.Option(False, "--profile-worker",
                                            help="also run the worker under cProfile (its rate is then slower)"),
        timeout_s: float = typer.Option(600.0, "--timeout-s", help="give up on a phase after this long"),
        json_path: Path | None = typer.Option(None, "--json", help="write all numbers here"),
    ) -> None:
        """Events/s through the stream worker vs a raw Kafka consumer, delays, Redis ops per event."""
        if impressions < 100:
            raise typer.BadParameter("--impressions must be at least 100")
        result = run_bench(impressions, offline_impressions, window_s, live_seconds, live_requests_per_s,
                           partitions, seed, profile, timeout_s, profile_worker)
        print_table(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=1, default=str))
            typer.echo(f"wrote {json_path}")


__all__ = ["register", "run_bench", "print_table"]
