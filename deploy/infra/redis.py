"""A real redis-server (Debian's package on these machines) on loopback, data and log under ``data_dir``."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.infra.process import LOOPBACK, InfraError, pid_matches, require_free_port, spawn, tail, terminate


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
        ] + (["--requirepass", self.password] if self.password else [])

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
