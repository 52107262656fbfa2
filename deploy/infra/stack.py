"""The local stack: one Kafka broker and one redis-server, as a unit other code can ask for.

Three ways to get one, all returning :class:`Endpoints`:

- :func:`ensure_running` — the long-lived stack of ``zenith infra up`` / ``zenith up``: processes detached
  from the caller, state (ports, pids, data, logs) under one state dir (``$ZENITH_HOME`` or ``./.zenith``).
- :func:`ephemeral_stack` / :func:`ephemeral_redis` / :func:`ephemeral_kafka` — throwaway servers on free
  ports in a temp dir, always torn down (tests, benchmarks).
- ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` in the environment: use those servers, start nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.infra.kafka import KAFKA_VERSION, LocalKafka, broker_answers
from deploy.infra.process import LOOPBACK, InfraError, free_port, free_ports
from deploy.infra.redis import LocalRedis, redis_answers

ENV_KAFKA = "KAFKA_BOOTSTRAP_SERVERS"
ENV_REDIS = "REDIS_URL"
ENV_HOME = "ZENITH_HOME"

DEFAULT_KAFKA_PORT = 9092
DEFAULT_KAFKA_CONTROLLER_PORT = 9093
DEFAULT_REDIS_PORT = 6379
STATE_FILE = "stack.json"


@dataclass(frozen=True)
class Endpoints:
    """Where the running Kafka and Redis answer."""

    kafka_bootstrap: str
    redis_url: str

    def as_env(self) -> dict[str, str]:
        """The environment that points a child process (``zenith stream worker`` …) at these servers."""
        return {ENV_KAFKA: self.kafka_bootstrap, ENV_REDIS: self.redis_url}


@dataclass(frozen=True)
class ComponentStatus:
    """One row of ``zenith infra status``."""

    name: str  # "kafka" | "redis"
    source: str  # "local" (started by us) | "env" (from the environment) | "stopped"
    address: str
    pid: int | None
    healthy: bool
    detail: str  # data dir or log path, or the env var used


def default_state_dir() -> Path:
    return Path(os.environ.get(ENV_HOME) or ".zenith").expanduser().resolve()


def env_endpoints() -> tuple[str | None, str | None]:
    """Explicit servers from the environment (empty counts as unset)."""
    return os.environ.get(ENV_KAFKA) or None, os.environ.get(ENV_REDIS) or None


class LocalStack:
    """The detached stack kept under ``state_dir``: ``kafka/``, ``redis/`` and ``stack.json`` (ports, pids).

    Each component independently: taken from the environment when its variable is set, else adopted when
    the recorded process still runs, else started.
    """

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()

    # -- state file ----------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise InfraError(f"{self.state_path} is not valid JSON ({exc}); delete it after making sure no "
                             "zenith Kafka or redis-server from this state dir still runs.") from exc

    def _save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)  # atomic: a reader never sees half a file

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `zenith infra up` at once must not both start a broker on the same data dir.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _kafka(self, rec: dict[str, Any] | None) -> LocalKafka | None:
        if not rec:
            return None
        return LocalKafka(port=rec["port"], controller_port=rec["controller_port"],
                          data_dir=self.state_dir / "kafka", version=rec.get("version", KAFKA_VERSION),
                          heap=rec.get("heap", "512m"), pid=rec.get("pid"))

    def _redis(self, rec: dict[str, Any] | None) -> LocalRedis | None:
        if not rec:
            return None
        return LocalRedis(port=rec["port"], data_dir=self.state_dir / "redis", pid=rec.get("pid"))

    # -- commands ------------------------------------------------------------------------------------
    def up(self, *, kafka_port: int | None = None, kafka_controller_port: int | None = None,
           redis_port: int | None = None, kafka_heap: str = "512m", timeout: float = 90.0) -> Endpoints:
        """Bring the stack up and wait until both answer; idempotent. Ports: ``None`` keeps the recorded
        (else default) port, ``0`` picks a free one. A failed start stops what this call started."""
        env_kafka, env_redis = env_endpoints()
        with self._locked():
            state = self._load()
            started: list[LocalKafka | LocalRedis] = []
            adopted: list[LocalKafka | LocalRedis] = []
            try:
                redis_url = env_redis or self._up_redis(state, redis_port, started, adopted)
                kafka_bootstrap = env_kafka or self._up_kafka(state, kafka_port, kafka_controller_port,
                                                              kafka_heap, started, adopted)
                # Wait after launching both, so the two start-ups overlap.
                deadline = time.monotonic() + timeout
                for comp in [*started, *adopted]:
                    comp.wait_ready(max(1.0, deadline - time.monotonic()))
            except BaseException:
                for comp in started:
                    with contextlib.suppress(Exception):
                        comp.stop()
                    state.pop("kafka" if isinstance(comp, LocalKafka) else "redis", None)
                self._save(state)
                raise
            return Endpoints(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url)

    def _up_redis(self, state: dict[str, Any], port: int | None, started: list[Any], adopted: list[Any]) -> str:
        current = self._redis(state.get("redis"))
        if current is not None and current.is_running():
            _check_same_port("redis-server", current.port, port, "--redis-port")
            adopted.append(current)
            return current.url
        chosen = _pick_port(port, current.port if current else None, DEFAULT_REDIS_PORT)
        redis = LocalRedis(port=chosen, data_dir=self.state_dir / "redis")
        redis.start(detach=True)
        started.append(redis)
        state["redis"] = {"pid": redis.pid, "port": redis.port, "started_at": time.time()}
        self._save(state)  # recorded before waiting, so `down` can always find it
        return redis.url

    def _up_kafka(self, state: dict[str, Any], port: int | None, cport: int | None, heap: str,
                  started: list[Any], adopted: list[Any]) -> str:
        current = self._kafka(state.get("kafka"))
        if current is not None and current.is_running():
            _check_same_port("the Kafka broker", current.port, port, "--kafka-port")
            adopted.append(current)
            return current.bootstrap
        chosen = _pick_port(port, current.port if current else None, DEFAULT_KAFKA_PORT)
        if cport is None and port is not None:  # a new broker port without a controller port: pick with it
            cport = 0 if port == 0 else (DEFAULT_KAFKA_CONTROLLER_PORT if port == DEFAULT_KAFKA_PORT else port + 1)
        chosen_c = _pick_port(cport, current.controller_port if current else None, DEFAULT_KAFKA_CONTROLLER_PORT,
                              avoid=chosen)
        kafka = LocalKafka(port=chosen, controller_port=chosen_c, data_dir=self.state_dir / "kafka", heap=heap)
        kafka.start(detach=True)
        started.append(kafka)
        state["kafka"] = {"pid": kafka.pid, "port": kafka.port, "controller_port": kafka.controller_port,
                          "version": kafka.version, "heap": heap, "started_at": time.time()}
        self._save(state)
        return kafka.bootstrap

    def down(self, *, timeout: float = 30.0, purge: bool = False) -> list[str]:
        """Stop what this state dir started (never env-provided servers). Returns what was stopped."""
        stopped: list[str] = []
        with self._locked():
            state = self._load()
            for name, comp in (("kafka", self._kafka(state.get("kafka"))),
                               ("redis", self._redis(state.get("redis")))):
                if comp is None:
                    continue
                if comp.is_running():
                    pid = comp.pid
                    comp.stop(timeout)
                    stopped.append(f"{name} (pid {pid})")
                # Keep the ports, drop the pid: the next `up` comes back on the same addresses.
                state[name]["pid"] = None
            if purge:
                for sub in ("kafka", "redis"):
                    shutil.rmtree(self.state_dir / sub, ignore_errors=True)
                state.clear()
            self._save(state)
        return stopped

    def status(self) -> list[ComponentStatus]:
        env_kafka, env_redis = env_endpoints()
        state = self._load()
        rows: list[ComponentStatus] = []
        if env_kafka:
            rows.append(ComponentStatus("kafka", "env", env_kafka, None, broker_answers(env_kafka), ENV_KAFKA))
        else:
            kafka = self._kafka(state.get("kafka"))
            if kafka is not None and kafka.is_running():
                rows.append(ComponentStatus("kafka", "local", kafka.bootstrap, kafka.pid,
                                            broker_answers(kafka.bootstrap), str(kafka.logs_dir)))
            else:
                rows.append(ComponentStatus("kafka", "stopped", "-", None, False, str(self.state_dir / "kafka")))
        if env_redis:
            rows.append(ComponentStatus("redis", "env", env_redis, None, redis_answers(env_redis), ENV_REDIS))
        else:
            redis = self._redis(state.get("redis"))
            if redis is not None and redis.is_running():
                rows.append(ComponentStatus("redis", "local", redis.url, redis.pid, redis_answers(redis.url),
                                            str(redis.log_path)))
            else:
                rows.append(ComponentStatus("redis", "stopped", "-", None, False, str(self.state_dir / "redis")))
        return rows

    def recorded_pids(self) -> dict[str, int]:
        """Pids in the state file (for tests and diagnostics)."""
        return {k: v["pid"] for k, v in self._load().items() if isinstance(v, dict) and v.get("pid")}


def _pick_port(requested: int | None, recorded: int | None, default: int, avoid: int | None = None) -> int:
    if requested == 0:  # "any free port"
        while True:
            port = free_port()
            if port != avoid:
                return port
    if requested is not None:
        return requested
    return recorded if recorded is not None else default


def _check_same_port(what: str, running: int, requested: int | None, option: str) -> None:
    if requested not in (None, 0, running):
        raise InfraError(f"{what} of this stack already runs on port {running}; run `zenith infra down` "
                         f"before starting it on another port ({option} {requested}).")


def ensure_running(state_dir: Path | str | None = None, *, timeout: float = 90.0) -> Endpoints:
    """Endpoints for the main job: env vars if set, else the running stack in ``state_dir``, else start it
    (detached, so it outlives the caller; ``zenith infra down`` stops it)."""
    return LocalStack(state_dir).up(timeout=timeout)


# -- ephemeral servers (tests, benchmarks) -------------------------------------------------------------
@contextlib.contextmanager
def ephemeral_redis(tmpdir: Path | str, *, timeout: float = 15.0) -> Iterator[str]:
    """A redis-server on a free port with its data in ``tmpdir``; yields its URL; always stopped.

    Start it from a long-lived thread (e.g. the main thread): the server gets SIGTERM when the thread that
    started it ends, so a killed test run leaves nothing behind.
    """
    redis = LocalRedis(port=free_port(), data_dir=Path(tmpdir) / "redis")
    try:
        redis.start()
        redis.wait_ready(timeout)
        yield redis.url
    finally:
        redis.stop()


@contextlib.contextmanager
def ephemeral_kafka(tmpdir: Path | str, *, heap: str = "512m", timeout: float = 60.0) -> Iterator[str]:
    """A Kafka broker on free ports with its data in ``tmpdir``; yields ``host:port``; always stopped."""
    port, cport = free_ports(2)
    kafka = LocalKafka(port=port, controller_port=cport, data_dir=Path(tmpdir) / "kafka", heap=heap)
    try:
        kafka.start()
        kafka.wait_ready(timeout)
        yield kafka.bootstrap
    finally:
        kafka.stop()


@contextlib.contextmanager
def ephemeral_stack(tmpdir: Path | str, *, kafka_heap: str = "512m", timeout: float = 60.0) -> Iterator[Endpoints]:
    """Kafka and Redis on free ports under ``tmpdir``, started together; both always torn down."""
    kport, cport, rport = free_ports(3)
    tmp = Path(tmpdir)
    redis = LocalRedis(port=rport, data_dir=tmp / "redis")
    kafka = LocalKafka(port=kport, controller_port=cport, data_dir=tmp / "kafka", heap=kafka_heap)
    try:
        redis.start()
        kafka.start()
        redis.wait_ready(timeout)
        kafka.wait_ready(timeout)
        yield Endpoints(kafka_bootstrap=kafka.bootstrap, redis_url=redis.url)
    finally:
        try:
            kafka.stop()
        finally:
            redis.stop()


__all__ = [
    "DEFAULT_KAFKA_PORT", "DEFAULT_REDIS_PORT", "ENV_HOME", "ENV_KAFKA", "ENV_REDIS", "LOOPBACK",
    "ComponentStatus", "Endpoints", "LocalStack", "default_state_dir", "ensure_running", "env_endpoints",
    "ephemeral_kafka", "ephemeral_redis", "ephemeral_stack",
]
