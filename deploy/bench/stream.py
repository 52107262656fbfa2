"""``zenith bench stream``: events/s through the stream worker, next to the Kafka clients' own speed.

Set-up: an ephemeral Kafka broker and redis-server on free ports (or ``KAFKA_BOOTSTRAP_SERVERS`` /
``REDIS_URL`` when both are set, read through ``deploy.config.Settings``), topics under a fresh prefix, and
``--impressions`` simulated impressions with their engagements and room lifecycle events pre-produced to the
input topics (a backlog). Then, in one run:

* baselines on the same topics, so the app's numbers read as ratios to the client's own speed:
  a raw confluent-kafka consumer reading the three input topics to the end (partitions assigned, connection
  up before the clock starts; best of 3); the same plus ``decode_event`` (JSON -> typed event) on every
  message; a raw aiokafka consumer (the client inside Faust).
* references (``deploy/bench/stream_references.py``), each a subprocess with its own consumer group over the
  same backlog, timed from its first event to its last like the worker: a Faust agent that only counts
  (``take_events(500)``; Faust's per-message ceiling) and a Quix Streams app doing comparable stateful work
  (JSON decode, per-user counters and recent rooms in RocksDB, one output record per impression,
  at-least-once; skipped with a note without ``quixstreams``, the ``bench`` extra).
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
* Redis memory (``deploy/bench/redis_cost.py``, ``redis_memory``) after the backlog and again at the end of the
  live phase (its last windows still open, so impressions are pending): bytes per live user, room, author,
  pending impression and dedup key (SCAN + MEMORY USAGE), and what bounds each (TTLs, caps).

``--profile`` runs the offline path under cProfile and attributes self time to groups (Redis round trips,
Lua/state writes, feature assembly, join, (de)serialization); time in builtins and libraries is charged to the
project function that called them. ``--profile-worker`` also runs the worker itself under cProfile (Faust and
aiokafka get groups of their own; its rate is then a profiled rate).

Modules, one job each: ``stream_workload`` (events, sentinels, live phase, exact delays), ``stream_baselines``
(raw clients, offline processor), ``stream_references`` (+ ``faust_noop``, ``quix_app``, ``progress``),
``stream_worker`` (the worker subprocess and its counters), ``redis_cost`` (commands, server time, memory),
``stream_profile`` (cProfile attribution), ``stream_report`` (tables); this one runs the phases.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from deploy.bench import stream_references as refs
from deploy.bench.redis_cost import commandstats, redis_delta, redis_memory
from deploy.bench.stream_baselines import decode_rate, offline, offline_redis, raw_aiokafka, raw_confluent
from deploy.bench.stream_profile import profile_breakdown
from deploy.bench.stream_report import print_table
from deploy.bench.stream_worker import WorkerProc, delta_quantiles, drain_rates, wait
from deploy.bench.stream_workload import exact_delays, live_phase, produce, sentinels, sim_events

WINDOW_S = 10.0
LATENESS_S = 1.0
IDLE_ADVANCE_S = 2.0


@contextlib.contextmanager
def _stack(tmp: Path) -> Iterator[tuple[str, str, str, bool]]:
    """(bootstrap, redis url, where, shared): the given servers when both are set, else throwaway ones."""
    from deploy.config import Settings

    s = Settings()
    if s.kafka_bootstrap_servers and s.redis_url:
        yield s.kafka_bootstrap_servers, s.redis_url, "given servers (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL)", True
        return
    from deploy.infra import ephemeral_stack

    with ephemeral_stack(tmp) as ep:
        yield ep.kafka_bootstrap, ep.redis_url, "ephemeral (local broker + redis-server on free ports)", False


def _state_prefix() -> str:
    from state.store import StateConfig

    return StateConfig().prefix


def run_bench(impressions: int, offline_impressions: int, window_s: float, live_seconds: float,
              live_requests_per_s: float, partitions: int, seed: int, profile: bool,
              timeout_s: float, profile_worker: bool = False, references: bool = True) -> dict[str, Any]:
    from deploy.infra import delete_topics
    from stream.events import Impression, encode_event
    from stream.topics import Topics, ensure_topics

    run = uuid.uuid4().hex[:8]
    topics = Topics(f"bench{run}.")
    inputs = [topics.impression, topics.engagement, topics.live]
    result: dict[str, Any] = {"bench": "stream", "cpus": os.cpu_count(), "window_s": window_s,
                              "lateness_s": LATENESS_S, "idle_advance_s": IDLE_ADVANCE_S, "partitions": partitions,
                              "seed": seed, "rows": [], "notes": []}
    echo = lambda msg: typer.echo(f"  {msg}", err=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="zenith-bench-stream-") as tmpdir:
        tmp = Path(tmpdir)
        with _stack(tmp) as (bootstrap, redis_url, where, shared):
            result["servers"] = where
            echo(f"servers: {where}: Kafka {bootstrap}, Redis {redis_url}; topic prefix {topics.prefix}")
            ensure_topics(bootstrap, topics, partitions)
            events = sim_events(impressions, seed, run)
            n_imp = sum(isinstance(e, Impression) for e in events)
            by_type: dict[str, int] = {}
            for e in events:
                by_type[e.TYPE] = by_type.get(e.TYPE, 0) + 1
            last_imp_ms = max(e.ts_ms for e in events if isinstance(e, Impression))
            marks = sentinels(topics, partitions, last_imp_ms + int((window_s + LATENESS_S + 2) * 1000), run)
            total = len(events) + len(marks)
            result["workload"] = {"events": len(events), "impressions": n_imp, "by_type": by_type,
                                  "sentinels": len(marks)}
            produce_s = produce(bootstrap, topics, events + marks)
            echo(f"produced {len(events):,} events ({n_imp:,} impressions) in {produce_s:.1f}s")
            result["workload"]["produce_s"] = produce_s
            app_ids: list[str] = []  # the references' group ids: their internal topics are named after them
            try:
                # (a) baselines: the clients alone on the same topics.
                raw, values = raw_confluent(bootstrap, inputs, total, 3, timeout_s)
                echo(f"raw confluent-kafka: {raw['events_per_s']:,.0f} events/s")
                dec = decode_rate(values, raw["wall_s"])
                aio = raw_aiokafka(bootstrap, inputs, total, 3, timeout_s)
                echo(f"raw aiokafka: {aio['events_per_s']:,.0f} events/s")
                base = raw["events_per_s"]
                result["rows"] += [
                    {"case": "baseline: raw confluent-kafka consumer", "kind": "baseline", **raw},
                    {"case": "baseline: raw confluent-kafka + decode_event", "kind": "baseline", **dec},
                    {"case": "baseline: raw aiokafka consumer (Faust's client)", "kind": "baseline", **aio},
                ]
                # (b) references: other stream apps over the same backlog, each with its own group.
                if references:
                    result["rows"] += _references(bootstrap, topics, inputs, partitions, total, n_imp, tmp,
                                                  timeout_s, app_ids, result["notes"], echo)
                # (c) the stream worker draining the backlog, then fed live.
                try:
                    _worker_phases(result, bootstrap, redis_url, topics, partitions, window_s, total, n_imp, base,
                                   live_seconds, live_requests_per_s, seed, run, tmp, timeout_s, profile_worker,
                                   echo)
                except Exception as e:  # noqa: BLE001 - reported as a failed row; the CLI exits non-zero
                    _failed(result, "zenith stream worker: backlog drain", "app", total, e, echo)
            finally:
                if shared:  # shared broker: leave nothing behind
                    with contextlib.suppress(Exception):
                        from confluent_kafka.admin import AdminClient

                        names = [t for t in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
                                 if t.startswith(topics.prefix) or any(a in t for a in app_ids)]
                        delete_topics(bootstrap, names)

        # (d) the processor alone (no Kafka, no Faust), timed; then under cProfile.
        sub = sim_events(offline_impressions, seed + 2, run + "O")
        raw_sub = [encode_event(e) for e in sub]
        case = "offline processor (build_samples, Redis, no Kafka/Faust)"
        try:
            with offline_redis(tmp) as (url, prefix):
                off = offline(url, prefix, raw_sub, int(window_s * 1000), profile=False)
        except Exception as e:  # noqa: BLE001 - reported as a failed row; the CLI exits non-zero
            _failed(result, case, "offline", len(raw_sub), e, echo)
            result["rows"].insert(3, result["rows"].pop())
            profile = False
        else:
            echo(f"offline processor: {off['events_per_s']:,.0f} events/s")
            result["rows"].insert(3, {"case": case, "kind": "offline", "x_raw": off["events_per_s"] / base, **off})
        if profile:
            with offline_redis(tmp) as (url, prefix):
                prof = offline(url, prefix, raw_sub, int(window_s * 1000), profile=True)
            result["profile"] = {"events": len(raw_sub), "events_per_s_under_profiler": prof["events_per_s"],
                                 **prof["profile"]}
    for r in result["rows"]:
        eps = r.get("events_per_s")
        r.setdefault("x_raw", eps / base if base and eps is not None else None)
    result["ceiling"] = _ceiling(result)
    return result


def _failed(result: dict, case: str, kind: str, events: int, e: Exception, echo: Any) -> None:
    """A row that could not be measured: kept in the table and the JSON with its error, and noted."""
    msg = f"{type(e).__name__}: {e}"
    echo(f"{case}: FAILED: {msg[:3000]}")
    result["rows"].append({"case": case, "kind": kind, "events": events, "events_per_s": None, "error": msg[:5000]})
    result["notes"].append(f"{case}: failed: {msg.splitlines()[0][:300] if msg else ''}")
    result["failed"] = [*result.get("failed", []), case]


def _references(bootstrap: str, topics: Any, inputs: list[str], partitions: int, total: int, n_imp: int,
                tmp: Path, timeout_s: float, app_ids: list[str], notes: list[str], echo: Any) -> list[dict]:
    """The reference rows; a reference that fails is reported as a row with ``error`` and no rate."""
    rows = []
    for case, fn in ((refs.FAUST_CASE, lambda: refs.faust_noop(bootstrap, inputs, partitions, total, tmp, timeout_s,
                                                               app_ids)),
                     (refs.QUIX_CASE, lambda: refs.quix_stateful(bootstrap, topics, total, n_imp, tmp, timeout_s,
                                                                 app_ids))):
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - one reference failing must not lose the rest of the run
            row = {"case": case, "kind": "reference", "events": total, "events_per_s": None,
                   "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        if row.get("events_per_s") is not None:
            echo(f"{case}: {row['events_per_s']:,.0f} events/s (first event after {row['startup_s']:.1f}s)")
        else:
            what = row.get("skipped") or row.get("error", "")
            echo(f"{case}: no rate: {what[:300]}")
            notes.append(f"{case}: {'skipped' if 'skipped' in row else 'failed'}: {what.splitlines()[0][:300]}")
        rows.append(row)
    return rows


def _worker_phases(result: dict, bootstrap: str, redis_url: str, topics: Any, partitions: int, window_s: float,
                   total: int, n_imp: int, base: float, live_seconds: float, live_requests_per_s: float, seed: int,
                   run: str, tmp: Path, timeout_s: float, profile_worker: bool, echo: Any) -> None:
    from deploy.infra import free_port

    port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url,
           "ZENITH_TOPIC_PREFIX": topics.prefix, "ZENITH_WINDOW_S": str(window_s),
           "ZENITH_LATENESS_S": str(LATENESS_S), "ZENITH_IDLE_ADVANCE_S": str(IDLE_ADVANCE_S),
           "ZENITH_STREAM_METRICS_PORT": str(port), "ZENITH_PARTITIONS": str(partitions)}
    redis_before = commandstats(redis_url)
    t_spawn = time.perf_counter()
    worker_prof = tmp / "worker.prof" if profile_worker else None
    worker = WorkerProc(env, tmp / "worker.log", port, worker_prof)
    try:
        trace = wait(worker, lambda ev, sa: sa >= n_imp, timeout_s, "the backlog's samples")
        drain = drain_rates(trace, total, n_imp)
        drain["startup_s"] = next(t for t, ev, _ in trace if ev > 0) - t_spawn
        drain["redis"] = redis_delta(redis_before, commandstats(redis_url), total)
        echo(f"worker: {drain['events_per_s']:,.0f} events/s, {drain['samples_per_s']:,.0f} samples/s "
             f"(first event after {drain['startup_s']:.1f}s)")
        # The sentinels' own windows close once stream time passes them (idle advance).
        wait(worker, lambda ev, sa: sa >= n_imp + partitions, window_s + LATENESS_S + IDLE_ADVANCE_S + 30,
             "the sentinels' samples")
        s_before = worker.scrape()
        # One write round trip per consumed batch, one read per close tick (+1 history-category read).
        drain["redis_round_trips_per_event"] = s_before.value("zenith_stream_redis_seconds_count") / total
        result["rows"].append({"case": "zenith stream worker: backlog drain"
                                       + (" (under cProfile)" if profile_worker else ""), "kind": "app",
                               "x_raw": drain["events_per_s"] / base, **drain})
        try:
            result["redis_memory"] = redis_memory(redis_url, _state_prefix())
        except Exception as e:  # noqa: BLE001 - a report, not a reason to lose the run
            result["redis_memory"] = {"error": f"{type(e).__name__}: {e}"}
        if live_seconds > 0:
            echo(f"live phase: {live_seconds:.0f}s at {live_requests_per_s:g} feed requests/s")
            live = live_phase(bootstrap, topics, live_seconds, live_requests_per_s, seed + 1, run + "L")
            # The last live windows are still open: pending impressions exist now (after a drain they do not).
            try:
                result["redis_memory_live"] = redis_memory(redis_url, _state_prefix())
            except Exception as e:  # noqa: BLE001 - a report, not a reason to lose the run
                result["redis_memory_live"] = {"error": f"{type(e).__name__}: {e}"}
            want = n_imp + partitions + live["impressions"]
            wait(worker, lambda ev, sa: sa >= want, window_s + LATENESS_S + 60, "the live samples")
            time.sleep(1.0)
            s_after = worker.scrape()
            exact = exact_delays(bootstrap, topics.samples, f"{run}L-", window_s)
            live.update(
                histogram_event_to_sample=delta_quantiles(s_before, s_after,
                                                          "zenith_freshness_event_to_sample_seconds"),
                histogram_close_delay=delta_quantiles(s_before, s_after, "zenith_stream_close_delay_seconds"),
                exact=exact,
                event_to_sample={"p50_s": exact.get("event_to_sample_p50_s"),
                                 "p99_s": exact.get("event_to_sample_p99_s")},
                close_delay={"p50_s": exact.get("close_delay_p50_s"), "p99_s": exact.get("close_delay_p99_s")},
                events_per_s=live["events"] / live_seconds,
                samples_per_s=live["impressions"] / live_seconds)
            result["rows"].append({"case": f"zenith stream worker: live, {live['events'] / live_seconds:.0f} "
                                           f"events/s offered", "kind": "live", "wall_s": live_seconds, **live})
    finally:
        worker.stop()
    if worker_prof is not None and worker_prof.exists():
        live_events = sum(r["events"] for r in result["rows"] if r["kind"] == "live")
        result["worker_profile"] = {
            "events": total + live_events,
            **profile_breakdown(str(worker_prof), time.perf_counter() - t_spawn, worker=True)}


def _ceiling(result: dict) -> dict:
    """Upper bounds implied by the measurements: one worker is bound by its own CPU per event; scaling out
    over partitions is bound by the single-threaded Redis server's CPU per event and by the client."""
    rows = {r["kind"]: r for r in result["rows"] if r["kind"] in ("app", "offline") and r.get("events_per_s")}
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
        references: bool = typer.Option(True, "--references/--no-references",
                                        help="the reference rows (no-op Faust agent, Quix Streams app)"),
        timeout_s: float = typer.Option(600.0, "--timeout-s", help="give up on a phase after this long"),
        json_path: Path | None = typer.Option(None, "--json", help="write all numbers here"),
    ) -> None:
        """Events/s through the stream worker vs a raw Kafka consumer, delays, Redis ops per event."""
        if impressions < 100:
            raise typer.BadParameter("--impressions must be at least 100")
        result = run_bench(impressions, offline_impressions, window_s, live_seconds, live_requests_per_s,
                           partitions, seed, profile, timeout_s, profile_worker, references)
        print_table(result)
        if json_path:
            json_path.write_text(json.dumps(result, indent=1, default=str))
            typer.echo(f"wrote {json_path}")
        if result.get("failed"):
            raise typer.Exit(1)


__all__ = ["register", "run_bench", "print_table"]
