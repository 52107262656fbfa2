"""Process and port helpers shared by the local Kafka and Redis launchers.

Linux-only on purpose (reads /proc): these launchers run the real servers on the developer machine or in CI.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


class InfraError(RuntimeError):
    """A local server could not be started, reached or stopped; the message says what to do about it."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so the kernel cannot hand out the same one twice)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could listen on ``host:port``.

    SO_REUSEADDR mirrors what Java and redis-server do, so a port in TIME_WAIT counts as free and only a
    real listener (or a bound socket) counts as taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def require_free_port(port: int, what: str, option: str) -> None:
    if not port_is_free(port):
        raise InfraError(
            f"port {port} on {LOOPBACK} is already taken by another process, so {what} cannot listen there. "
            f"Stop that process, or pick another port ({option} PORT, or 0 for any free port)."
        )


def tcp_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # Field 3 is the state; field 2 (comm) may hold spaces, so split after its closing paren.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_matches(pid: int, *needles: str) -> bool:
    """True when ``pid`` runs and its command line contains every needle.

    Guards against pid reuse: a pidfile from yesterday may name some unrelated process today.
    """
    if not pid_alive(pid):
        return False
    cmd = " ".join(pid_cmdline(pid))
    return all(n in cmd for n in needles)


def _reap(pid: int) -> None:
    # Our own child must be reaped or it stays a zombie; someone else's child is not ours to wait on.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def terminate(pid: int, timeout: float = 20.0, *, group: bool = True) -> bool:
    """SIGTERM ``pid`` (its whole process group when it leads one), SIGKILL after ``timeout`` seconds.

    Returns True when the process is gone. Waiting on the group catches helpers a server may have forked.
    """
    if not pid_alive(pid):
        _reap(pid)
        return True
    use_group = group and _is_group_leader(pid)
    _signal(pid, signal.SIGTERM, use_group)
    if _wait_gone(pid, timeout):
        return True
    _signal(pid, signal.SIGKILL, use_group)
    return _wait_gone(pid, 5.0)


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


try:  # loaded here, not in the forked child: dlopen between fork and exec can deadlock
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # prctl(PR_SET_PDEATHSIG, SIGTERM): an ephemeral server must not outlive a test run that was killed
    # before its teardown could run. (Linux ties this to the parent *thread*: start ephemeral servers
    # from a thread that lives as long as you need them, e.g. the main thread.)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(argv: Sequence[str], *, log_path: Path, cwd: Path | None = None, detach: bool,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own session, stdout and stderr appended to ``log_path``.

    ``detach=True``: it outlives this Python process (``zenith infra up``). ``detach=False``: it gets
    SIGTERM when this process dies (fixtures, benchmarks), on top of the explicit teardown.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    preexec: Callable[[], None] | None = None if detach else _die_with_parent
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,  # own process group: Ctrl-C in the terminal does not reach it
            preexec_fn=preexec,
            close_fds=True,
        )


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none (for error messages)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    body = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{body}" if body else f"({path} is empty)"
