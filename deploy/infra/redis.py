"""A real redis-server (Debian's package on these machines) on loopback, data and log under ``data_dir``;
and a three-master Redis Cluster of such servers (``LocalRedisCluster``), formed with ``redis-cli --cluster``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.infra.process import (
    LOOPBACK,
    InfraError,
    free_ports,
    pid_alive,
    pid_matches,
    port_is_free,
    require_free_port,
    spawn,
    tail,
    terminate,
)

CLUSTER_SLOTS = 16384


def redis_executable() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise InfraError(
            "`redis-server` is not on PATH. Run `make setup` (it installs it), or "
            "`apt-get install -y redis-server`; or set REDIS_URL to a Redis you already run."
        )
    return exe


def redis_answers(url: str, timeout: float = 1.0, password: str | None = None) -> bool:
    """True when PING at ``url`` returns PONG."""
    import redis  # keep `zenith --help` fast

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                  **({"password": password} if password else {}))
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


@dataclass
class LocalRedis:
    """redis-server with append-only persistence (fsync every second) and no RDB snapshots.

    Why AOF: the stream's state lives here; a restarted server must come back with it, and ``everysec``
    bounds the loss to about a second without fsync on every write.
    """

    port: int
    data_dir: Path
    password: str | None = field(default=None, repr=False)  # AUTH required when set (``--requirepass``)
    extra_args: Sequence[str] = ()  # more ``--option value`` pairs, e.g. the cluster settings
    pid: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _argv(self) -> list[str]:
        return [
            redis_executable(), "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
            # The pid file would land in /var/run by default with --daemonize; we keep the pid ourselves.
            "--logfile", "",
        ] + (["--requirepass", self.password] if self.password else []) + list(self.extra_args)

    def start(self, *, detach: bool = False) -> None:
        if self.is_running():
            return
        redis_executable()
        require_free_port(self.port, "redis-server", "--redis-port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc = spawn(self._argv(), log_path=self.log_path, cwd=self.data_dir, detach=detach)
        self.pid = self._proc.pid

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        if self._proc is not None:  # our own child: poll() is exact (its cmdline changes after exec)
            return self._proc.poll() is None
        # An adopted pid: redis-server rewrites its argv to "redis-server 127.0.0.1:PORT".
        return pid_matches(self.pid, "redis-server", f"{LOOPBACK}:{self.port}")

    def healthy(self, timeout: float = 1.0) -> bool:
        return self.is_running() and redis_answers(self.url, timeout, self.password)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                code = self._proc.poll() if self._proc is not None else None
                raise InfraError(f"redis-server exited during start-up (exit code {code}).\n{tail(self.log_path)}")
            if redis_answers(self.url, timeout=0.5, password=self.password):
                return
            if time.monotonic() >= deadline:
                raise InfraError(f"redis-server at {self.url} did not answer PING within {timeout:.0f} s.\n"
                                 f"{tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid is None:
            return
        if (self._proc is not None or self.is_running()) and not terminate(self.pid, timeout):
            raise InfraError(f"redis-server (pid {self.pid}) did not exit even after SIGKILL")
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=1)
        self._proc = None
        self.pid = None

    def kill(self) -> None:
        """SIGKILL, no shutdown: a crashed server. (What it wrote to the AOF survives in the page cache; only a
        machine crash would lose the last second that ``everysec`` had not fsynced.)"""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while pid_alive(self.pid):
            if time.monotonic() >= deadline:
                raise InfraError(f"redis-server (pid {self.pid}) still runs after SIGKILL")
            time.sleep(0.02)
        if self._proc is not None:  # reap our child, or it stays a zombie
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=1)
        self._proc = None
        self.pid = None
        # The kernel may release the listening port a moment after the process is gone; a restart on the
        # same port right away would otherwise be refused by the free-port check in start().
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)


# -- Redis Cluster -------------------------------------------------------------------------------------
def redis_cli_executable() -> str:
    exe = shutil.which("redis-cli")
    if exe is None:
        raise InfraError(
            "`redis-cli` is not on PATH; it forms the Redis Cluster (`redis-cli --cluster create`). Run "
            "`make setup` (it installs it), or `apt-get install -y redis-tools`."
        )
    return exe


def cluster_info(url: str, timeout: float = 1.0) -> dict[str, str]:
    """``CLUSTER INFO`` of the one node at ``url`` as a dict; empty when it does not answer."""
    import redis  # keep `zenith --help` fast

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        raw = client.execute_command("CLUSTER INFO")
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        return {}
    finally:
        client.close()
    if isinstance(raw, dict):  # some redis-py versions parse it already
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def cluster_node_ok(url: str, nodes: int, timeout: float = 1.0) -> bool:
    """True when the node at ``url`` reports cluster_state:ok, all 16384 slots assigned and ``nodes`` known."""
    info = cluster_info(url, timeout)
    return (info.get("cluster_state") == "ok"
            and info.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
            and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and info.get("cluster_known_nodes") == str(nodes))


@dataclass
class LocalRedisCluster:
    """A Redis Cluster of masters only (no replicas), one redis-server per port, on loopback.

    Each node is a :class:`LocalRedis` (AOF every second, no RDB) in ``data_dir/node-<port>`` with
    ``--cluster-enabled yes`` and its own ``nodes.conf`` there, so a node killed and started again on the same
    port and dir comes back with the same id and slots. ``bus_ports`` are the cluster-bus ports
    (``--cluster-port``); by default ``port + 10000``, which must then be free too and below 65536.
    """

    ports: Sequence[int]
    data_dir: Path
    bus_ports: Sequence[int] | None = None
    node_timeout_ms: int = 2000
    nodes: list[LocalRedis] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.ports = [int(p) for p in self.ports]
        if len(self.ports) < 3:
            raise InfraError(f"a Redis Cluster needs at least 3 masters; got ports {self.ports}")
        if self.bus_ports is None:
            self.bus_ports = [p + 10000 for p in self.ports]
        self.bus_ports = [int(p) for p in self.bus_ports]
        if len(self.bus_ports) != len(self.ports):
            raise InfraError(f"{len(self.ports)} ports but {len(self.bus_ports)} cluster-bus ports")
        self.nodes = [
            LocalRedis(port=port, data_dir=self.data_dir / f"node-{port}", extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-port", str(bus),
            ))
            for port, bus in zip(self.ports, self.bus_ports, strict=True)
        ]

    @property
    def url(self) -> str:
        """The first node; a cluster client (``redis.cluster.RedisCluster.from_url``) discovers the others."""
        return self.nodes[0].url

    @property
    def node_urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def create_log_path(self) -> Path:
        return self.data_dir / "cluster-create.log"

    def start(self, timeout: float = 30.0, *, detach: bool = False) -> None:
        """Start every node, form the cluster if it is new (slots split evenly), wait until it is ok.

        Started again on the same ``data_dir`` (nodes.conf kept), the nodes rejoin without a new create.
        """
        redis_executable()
        redis_cli_executable()
        for node, bus in zip(self.nodes, self.bus_ports or (), strict=True):
            if not node.is_running():
                require_free_port(bus, "redis-server (cluster bus)", "--cluster-port")
        for node in self.nodes:
            node.start(detach=detach)
        for node in self.nodes:
            node.wait_ready(timeout)
        if self._is_new():
            self._create(timeout)
        self.wait_ready(timeout)

    def _is_new(self) -> bool:
        infos = [cluster_info(u) for u in self.node_urls]
        return all(i.get("cluster_slots_assigned") == "0" and i.get("cluster_known_nodes") == "1" for i in infos)

    def _create(self, timeout: float) -> None:
        argv = [redis_cli_executable(), "--cluster", "create",
                *(f"{LOOPBACK}:{p}" for p in self.ports), "--cluster-replicas", "0", "--cluster-yes"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=max(timeout, 10.0))
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") if isinstance(e.stdout, bytes) else (e.stdout or "").encode()
            self.create_log_path.write_bytes(out)
            raise InfraError(f"`{' '.join(argv)}` did not finish within {max(timeout, 10.0):.0f} s.\n"
                             f"{tail(self.create_log_path)}\n{self._node_logs()}") from e
        self.create_log_path.write_text(f"$ {' '.join(argv)}\n{run.stdout}{run.stderr}")
        if run.returncode != 0 or "[OK] All 16384 slots covered" not in run.stdout:
            raise InfraError(f"`redis-cli --cluster create` failed (exit code {run.returncode}).\n"
                             f"{tail(self.create_log_path)}\n{self._node_logs()}")

    def _node_logs(self, lines: int = 10) -> str:
        return "\n".join(tail(n.log_path, lines) for n in self.nodes)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok with all 16384 slots assigned and every node known."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if not node.is_running():
                    code = node._proc.poll() if node._proc is not None else None
                    raise InfraError(f"cluster node redis-server on port {node.port} exited (exit code {code}).\n"
                                     f"{tail(node.log_path)}")
            if all(cluster_node_ok(u, len(self.nodes), timeout=0.5) for u in self.node_urls):
                return
            if time.monotonic() >= deadline:
                states = "; ".join(
                    f"{n.port}: " + " ".join(f"{k}={v}" for k, v in cluster_info(n.url).items()
                                             if k in ("cluster_state", "cluster_slots_assigned",
                                                      "cluster_slots_ok", "cluster_known_nodes"))
                    for n in self.nodes)
                raise InfraError(f"the Redis Cluster on ports {self.ports} was not ok within {timeout:.0f} s "
                                 f"(CLUSTER INFO: {states}).\n{self._node_logs()}")
            time.sleep(0.1)

    def is_running(self) -> bool:
        return all(n.is_running() for n in self.nodes)

    def kill_node(self, index: int) -> None:
        """SIGKILL one node (a crashed master: its slots go uncovered and the cluster turns to fail)."""
        self.nodes[index].kill()

    def restart_node(self, index: int, timeout: float = 30.0) -> None:
        """Start one (killed or stopped) node again on its port and dir; wait until the cluster is ok again."""
        node = self.nodes[index]
        if not node.is_running():
            node.start()
            node.wait_ready(timeout)
        self.wait_ready(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        errors: list[str] = []
        for node in self.nodes:
            try:
                node.stop(timeout)
            except InfraError as e:
                errors.append(str(e))
        if errors:
            raise InfraError("; ".join(errors))


@contextlib.contextmanager
def ephemeral_redis_cluster(tmpdir: Path | str, *, masters: int = 3, timeout: float = 30.0) -> Iterator[str]:
    """A ``masters``-node Redis Cluster on free ports with its data in ``tmpdir``; yields the first node's URL
    (``redis://127.0.0.1:PORT/0``, enough for a cluster client); always stopped.

    Like :func:`deploy.infra.ephemeral_redis`, start it from a long-lived thread (e.g. the main thread).
    """
    ports = free_ports(2 * masters)  # client ports and cluster-bus ports, all distinct
    cluster = LocalRedisCluster(ports=ports[:masters], bus_ports=ports[masters:],
                                data_dir=Path(tmpdir) / "redis-cluster")
    try:
        cluster.start(timeout)
        yield cluster.url
    finally:
        cluster.stop()
