"""Fault drills on real processes: kill a dependency with SIGKILL mid-run, restart it, count what survived.

A drill starts its own redis-server and (unless given one) its own Kafka broker, a ``zenith stream worker``
and a ``zenith trainer`` as separate processes, produces a simulator workload, and half way through kills the
chosen dependency with SIGKILL and restarts it on the same port and data directory after ``outage_s``. It
then reads the topics back and counts, for every impression produced:

* its samples on the ``samples`` topic: at least one, and when the at-least-once stream sent it more than
  once, every copy carries the same labels (the trainer drops the repeats), so there is exactly one final
  sample;
* whether the trainer's last published version counts each impression once (``samples_trained``);
* whether every event produced reached Redis exactly once (the users' counters sum to what the events
  imply, ``stream/audit.py``): no acknowledgement without effect, no replay applied twice.

``zenith drill redis --repeat 3`` / ``zenith drill broker`` run it from the command line; tests/test_faults.py
runs one repetition of each in the suite.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.infra import LocalKafka, LocalRedis, free_port, free_ports

log = logging.getLogger("zenith.drill")


class Fault(enum.StrEnum):
    REDIS = "redis"
    BROKER = "broker"
    NONE = "none"  # the same run without a fault: a baseline for the counts


@dataclass(frozen=True)
class DrillConfig:
    fault: Fault
    workdir: Path
    impressions: int = 1_500
    impressions_per_s: float = 50.0  # wall-clock production rate: slow enough to outlast start-up
    kill_at: float = 0.3  # fraction of the events the worker has processed when the dependency is killed
    outage_s: float = 5.0
    window_s: float = 3.0
    with_trainer: bool = True
    timeout_s: float = 240.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.impressions < 1 or self.impressions_per_s <= 0 or not 0 < self.kill_at < 1 or self.outage_s < 0:
            raise ValueError(f"bad drill config: {self}")


@dataclass
class DrillReport:
    fault: str
    impressions: int = 0
    events: int = 0
    samples: int = 0  # records on the samples topic
    with_sample: int = 0  # impressions with at least one sample
    lost: int = 0  # impressions with no sample
    repeats: int = 0  # extra identical copies (at-least-once; dropped by the trainer)
    conflicting: int = 0  # impressions whose copies disagree: two different "final" samples
    stray: int = 0  # samples of impressions never produced
    state_gap: dict[str, float] = field(default_factory=dict)  # user counters: expected - stored, where != 0
    dead_letters: int = 0
    trained: int | None = None  # samples_trained of the trainer's last version
    outages_seen: float = 0.0  # the stream's own outage counter for the killed dependency
    outage_s: float = 0.0
    killed_after_events: int = 0  # events the worker had processed when the dependency was killed
    seconds: float = 0.0
    died: list[str] = field(default_factory=list)  # processes that exited during the drill (must be none)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.conflicting == 0 and self.stray == 0 and not self.state_gap
                and self.dead_letters == 0 and not self.died
                and (self.trained is None or self.trained == self.impressions))

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


# ---- servers we own (so we may kill them) -------------------------------------------------------------------
class _Server:
    def __init__(self, server: LocalRedis | LocalKafka, timeout_s: float) -> None:
        self.server, self.timeout_s = server, timeout_s

    def start(self) -> None:
        self.server.start()
        self.server.wait_ready(self.timeout_s)

    def kill(self) -> None:
        """SIGKILL the pid we started (no clean shutdown, no flush)."""
        pid = self.server.pid
        assert pid is not None, "kill() before start()"
        os.kill(pid, signal.SIGKILL)
        proc = self.server._proc  # noqa: SLF001 - our own child: reap it so the port is free again
        if proc is not None:
            proc.wait(30)
        self.server._proc, self.server.pid = None, None  # noqa: SLF001

    def stop(self) -> None:
        self.server.stop()


@contextmanager
def _servers(cfg: DrillConfig, bootstrap: str | None) -> Iterator[tuple[str, str, dict[Fault, _Server]]]:
    owned: dict[Fault, _Server] = {}
    with ExitStack() as stack:
        redis = _Server(LocalRedis(port=free_port(), data_dir=cfg.workdir / "redis"), 15.0)
        redis.start()
        stack.callback(redis.stop)
        owned[Fault.REDIS] = redis
        if bootstrap is None or cfg.fault is Fault.BROKER:
            port, cport = free_ports(2)
            kafka = _Server(LocalKafka(port=port, controller_port=cport, data_dir=cfg.workdir / "kafka"), 90.0)
            kafka.start()
            stack.callback(kafka.stop)
            owned[Fault.BROKER] = kafka
            bootstrap = kafka.server.bootstrap  # type: ignore[union-attr]
        yield bootstrap, redis.server.url, owned  # type: ignore[union-attr]


# ---- the processes under test ---------------------------------------------------------------------------------
class _Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.log_path = name, logdir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def _scrape(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    from deploy.promscrape import Scrape

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return float("nan")
    scrape = Scrape()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            scrape.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return scrape.value(name, **labels)


# ---- the workload ------------------------------------------------------------------------------------------------
def _workload(cfg: DrillConfig) -> list:
    from stream.simulator import SimConfig, Simulator

    # Event time starts now (live validation bounds apply); no deliberately late engagements, short watches,
    # so the run ends seconds after the last impression.
    sim = Simulator(SimConfig(n_users=300, n_authors=60, seed=cfg.seed, start_ms=int(time.time() * 1000),
                              late_fraction=0.0, mean_watch_s=5.0, max_watch_s=15.0))
    return list(sim.events(max_impressions=cfg.impressions))


class _Producer(threading.Thread):
    """Sends the workload at ``impressions_per_s`` (engagements and room events in between, unpaced)."""

    def __init__(self, bootstrap: str, topics: object, events: list, per_s: float) -> None:
        super().__init__(name="drill-producer", daemon=True)
        from stream.producer import EventProducer

        self.producer = EventProducer(bootstrap, topics)  # type: ignore[arg-type]
        self.events, self.per_s = events, per_s
        self.impressions_sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from stream.events import Impression

        try:
            t0 = time.monotonic()
            for ev in self.events:
                if isinstance(ev, Impression):
                    wait = self.impressions_sent / self.per_s - (time.monotonic() - t0)
                    if wait > 0:
                        time.sleep(wait)
                    self.impressions_sent += 1
                self.producer.send(ev)
            report = self.producer.flush(180)
            if report.failed:
                raise RuntimeError(f"{report.failed} events failed to deliver: {report.first_error}")
        except BaseException as exc:  # reported by the drill
            self.error = exc


def _read_topic(bootstrap: str, topic: str, stop_when: object, timeout_s: float, linger_s: float = 3.0
                ) -> list[tuple[bytes | None, dict]]:
    """All records of ``topic`` from the start until ``stop_when(records)`` holds (then ``linger_s`` more)."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"drill-check-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    got: list[tuple[bytes | None, dict]] = []
    deadline = time.monotonic() + timeout_s
    done_at: float | None = None
    try:
        while time.monotonic() < deadline:
            for m in c.consume(1000, timeout=0.5):
                if not m.error():
                    got.append((m.value(), dict(m.headers() or [])))
            if done_at is None and stop_when(got):  # type: ignore[operator]
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= linger_s:
                break
    finally:
        c.close()
    return got


# ---- the drill --------------------------------------------------------------------------------------------------
def run_drill(cfg: DrillConfig, bootstrap: str | None = None) -> DrillReport:
    """One drill; ``bootstrap``: an existing broker to use (only for a Redis or no-fault drill)."""
    from model.registry import LocalDirRegistry
    from model.spec import default_live_spec
    from stream.audit import state_gap
    from stream.events import Impression
    from stream.samples import SampleCodec
    from stream.topics import Topics, ensure_topics

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    report = DrillReport(fault=cfg.fault.value)
    t_start = time.monotonic()
    prefix = f"d{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix)
    registry_dir = cfg.workdir / "registry"
    with _servers(cfg, bootstrap) as (kafka, redis_url, owned):
        ensure_topics(kafka, topics, partitions=4)
        stream_port, trainer_port = free_ports(2)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "REDIS_URL": redis_url,
               "ZENITH_TOPIC_PREFIX": prefix, "ZENITH_WINDOW_S": str(cfg.window_s), "ZENITH_LATENESS_S": "1",
               "ZENITH_IDLE_ADVANCE_S": "2", "ZENITH_RETRY_MAX_S": "1", "ZENITH_REGISTRY_DIR": str(registry_dir),
               "ZENITH_STREAM_METRICS_PORT": str(stream_port), "ZENITH_TRAINER_METRICS_PORT": str(trainer_port),
               "ZENITH_HOME": str(cfg.workdir)}
        events = _workload(cfg)
        imp_ids = {e.event_id for e in events if isinstance(e, Impression)}
        report.impressions, report.events = len(imp_ids), len(events)
        procs = [_Proc("stream", ["stream", "worker", "--loglevel", "warning"], env, cfg.workdir)]
        if cfg.with_trainer:
            procs.append(_Proc("trainer", ["trainer", "--publish-every-s", "1", "--batch-size", "256"], env,
                               cfg.workdir))
        producer = _Producer(kafka, topics, events, cfg.impressions_per_s)
        try:
            producer.start()
            victim = owned.get(cfg.fault) if cfg.fault is not Fault.NONE else None
            if victim is not None:
                # Kill while the worker is mid-stream: it has processed part of the input, not all of it.
                # A broker drill with a trainer: also once it has published, so its commits meet the outage.
                target = cfg.kill_at * len(events)
                registry = LocalDirRegistry(registry_dir)
                while time.monotonic() - t_start < cfg.timeout_s and procs[0].alive():
                    done = _scrape(stream_port, "zenith_stream_events_total")
                    trainer_up = not cfg.with_trainer or cfg.fault is not Fault.BROKER or registry.list_versions()
                    if done >= target and trainer_up:
                        break
                    time.sleep(0.1)
                processed = _scrape(stream_port, "zenith_stream_events_total")
                report.killed_after_events = int(processed) if processed == processed else 0  # nan: none yet
                t_kill = time.monotonic()
                victim.kill()
                log.warning("drill: killed %s (SIGKILL) after the worker processed %s of %s events",
                            cfg.fault.value, report.killed_after_events, len(events))
                time.sleep(cfg.outage_s)
                victim.start()
                report.outage_s = round(time.monotonic() - t_kill, 2)
                log.warning("drill: %s back after %.1fs", cfg.fault.value, report.outage_s)
            producer.join(cfg.timeout_s)
            if producer.error is not None:
                report.notes.append(f"producer: {producer.error}")
            left = max(cfg.timeout_s - (time.monotonic() - t_start), 10.0)
            codec = SampleCodec(default_live_spec())

            def complete(records: list) -> bool:
                if len(records) < len(imp_ids):
                    return False
                ids = set(codec.decode([v for v, _ in records if v is not None]).impression_ids)
                return imp_ids <= ids

            samples = _read_topic(kafka, topics.samples, complete, left)
            decoded = codec.decode([v for v, _ in samples if v is not None])
            by_id: dict[str, set[tuple]] = defaultdict(set)
            for k, imp in enumerate(decoded.impression_ids):
                by_id[imp].add(tuple(decoded.arrays.labels[k].tolist()))
            report.samples = len(samples)
            report.with_sample = len(imp_ids & set(by_id))
            report.lost = len(imp_ids - set(by_id))
            report.stray = len(set(by_id) - imp_ids)
            report.repeats = len(samples) - len(by_id)
            report.conflicting = sum(1 for labels in by_id.values() if len(labels) > 1)
            report.outages_seen = _scrape(stream_port, "zenith_stream_outages_total",
                                          dependency="redis" if cfg.fault is Fault.REDIS else "kafka")
            report.died = [p.name for p in procs if not p.alive()]
            if cfg.with_trainer:
                registry = LocalDirRegistry(registry_dir)
                deadline = time.monotonic() + max(cfg.timeout_s - (time.monotonic() - t_start), 30.0)
                while time.monotonic() < deadline and procs[1].alive():
                    latest = registry.latest()
                    if latest is not None and registry.read_manifest(latest).samples_trained >= report.with_sample:
                        break
                    time.sleep(0.5)
                procs[1].stop()
                latest = registry.latest()
                report.trained = registry.read_manifest(latest).samples_trained if latest is not None else 0
            letters = _read_topic(kafka, topics.deadletter, lambda r: False, 3.0, linger_s=0)
            report.dead_letters = len(letters)
            report.state_gap = state_gap(redis_url, events)
            for p in procs:
                if p.name in report.died:
                    report.notes.append(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        finally:
            for p in procs:
                p.stop()
    report.seconds = round(time.monotonic() - t_start, 1)
    return report
