"""``zenith serve --workers N``: N scorer processes sharing one port (``SO_REUSEPORT``), one supervisor.

``workers == 1`` is the plain ``service.run``: this process serves, nothing is spawned. With ``N > 1`` this
process becomes a supervisor that serves nothing itself:

* It starts N worker processes (multiprocessing's "spawn" context: torch after ``fork`` is unsafe). Each
  binds its own listening socket to ``host:port`` with ``SO_REUSEPORT``, and the kernel spreads incoming
  *connections* over them (a keep-alive connection stays on the worker that accepted it).
* Each worker is a whole scorer: its own model copy, registry watcher, room/author snapshot, Redis client and
  torch threads (``torch_threads``; unset, ``cpu_count // N`` each, so N workers do not oversubscribe the
  cores). Each hot-swaps independently: for up to about one ``poll_s`` after a publish, two workers may
  serve different versions (each request still sees exactly one version, named in its response).
* SIGTERM/SIGINT to the supervisor are forwarded to the workers (SIGTERM; each finishes its in-flight
  requests); a second signal kills them. Workers sit in their own process group, so a terminal's Ctrl-C
  reaches the supervisor only, and each exits on its own if the supervisor dies (a pipe from it closes).
* A worker that dies unexpectedly (or fails to start, e.g. the port is taken) is logged with its exit
  code; the supervisor stops the others and exits 1. No restarts: leave that to the process manager.

Per-worker endpoints: ``/healthz``, ``/v1/model`` and ``/metrics`` answer for the worker that got the
connection, not for the group; there is no way to scrape "each worker" through the shared port. To tell
them apart, every response carries ``X-Zenith-Worker`` (index) and ``X-Zenith-Worker-Pid`` headers,
``/v1/model`` has ``"worker": {"index", "pid", "workers"}``, and ``/metrics`` has
``zenith_scorer_worker_info{index, pid, workers}``. Counters therefore restart per worker; sum over
``pid`` when aggregating scrapes, and expect any one scrape to cover a single worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import orjson
from aiohttp import web

from .config import ScorerConfig
from .service import Scorer, Serving, build_app, run

log = logging.getLogger("zenith.scorer.workers")

SHUTDOWN_GRACE_S = 70.0  # aiohttp's own shutdown_timeout (60 s for in-flight requests) plus some slack
_WORKER: tuple[int, int] | None = None  # (index, count) inside a worker process; None elsewhere


def worker_index() -> int | None:
    """This process's worker index under a ``--workers N`` supervisor, else None."""
    return _WORKER[0] if _WORKER else None


def run_workers(config: ScorerConfig, on_swap: Callable[[Serving, Serving | None], None] | None = None,
                on_ready: Callable[[], None] | None = None) -> int:
    """Serve until interrupted, with ``config.workers`` processes; returns the exit code (0: a clean stop).

    ``on_swap`` runs inside each worker, so with N > 1 it must be picklable (a module-level function);
    ``on_ready`` runs here, once every worker listens.
    """
    if config.workers == 1:
        run(config, on_swap=on_swap, on_ready=on_ready)
        return 0
    return _supervise(config, on_swap, on_ready)


# ---- the supervisor ---------------------------------------------------------------------------------------------
def _supervise(config: ScorerConfig, on_swap: Callable[[Serving, Serving | None], None] | None,
               on_ready: Callable[[], None] | None) -> int:
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers > 1 needs SO_REUSEPORT, which this platform lacks; run one worker per port instead")
        return 2
    busy = _port_in_use(config.host, config.port)
    if busy:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, busy)
        return 2
    ctx = mp.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    signals: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)  # acted on by the loop below (a handler must not reap or kill mid-poll)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    procs: list[Any] = []
    keep_alive: list[Connection] = []  # the workers' ends close when this process dies: they then exit
    ready: dict[Connection, int] = {}
    failed = False
    try:
        for i in range(config.workers):
            ready_r, ready_w = ctx.Pipe(duplex=False)
            alive_r, alive_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, args=(config, i, on_swap, level, ready_w, alive_r),
                               name=f"zenith-scorer-{i}", daemon=True)
            proc.start()
            ready_w.close()
            alive_r.close()
            procs.append(proc)
            keep_alive.append(alive_w)
            ready[ready_r] = i
            log.info("worker %d started: pid %d", i, proc.pid)
            if signals:
                break
        announced, listening = False, set[int]()
        while not signals:
            done = wait([p.sentinel for p in procs] + list(ready), timeout=0.2)
            for conn in [c for c in ready if c in done]:
                with contextlib.suppress(EOFError):  # EOF: it died before listening; its sentinel says so
                    listening.add(conn.recv())
                ready.pop(conn)
                conn.close()
            if len(listening) == config.workers and not announced:
                announced = True
                if on_ready is not None:
                    on_ready()
            dead = [(i, p) for i, p in enumerate(procs) if p.exitcode is not None]
            if dead:
                for i, p in dead:
                    log.error("worker %d (pid %d) %s unexpectedly; stopping the others", i, p.pid,
                              _exit_reason(p.exitcode))
                failed = True
                break
        if signals:
            log.info("%s: stopping %d workers", signal.Signals(signals[0]).name, len(procs))
        _stop(procs, signals)
        unclean = [(i, p) for i, p in enumerate(procs) if p.exitcode != 0]
        if not failed:
            for i, p in unclean:
                log.error("worker %d (pid %d) did not stop cleanly: %s", i, p.pid, _exit_reason(p.exitcode))
        return 1 if failed or unclean else 0
    finally:
        for p in procs:  # only after an error above: _stop has reaped them otherwise
            if p.exitcode is None:
                p.kill()
                p.join()
        for conn in keep_alive + list(ready):
            conn.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(procs: list[Any], signals: list[int]) -> None:
    """SIGTERM to every live worker; SIGKILL after the grace period or on a second signal."""
    seen = len(signals)
    for p in procs:
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while any(p.exitcode is None for p in procs):
        if len(signals) > seen or time.monotonic() > deadline:
            log.warning("killing the workers still running (%s)",
                        "second signal" if time.monotonic() <= deadline else f"{SHUTDOWN_GRACE_S:.0f} s passed")
            for p in procs:
                if p.exitcode is None:
                    p.kill()
            break
        wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
    for p in procs:
        p.join()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (a plain bind, without SO_REUSEPORT, fails), else None; so a
    port held by another server -- even another ``--workers`` group -- is an error, not silently shared."""
    for family, kind, proto, _, addr in _addresses(host, port):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                return str(exc)
    return None


def _addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys(infos))


# ---- a worker ---------------------------------------------------------------------------------------------------
def _listen(host: str, port: int) -> list[socket.socket]:
    socks = []
    for family, kind, proto, _, addr in _addresses(host, port):
        s = socket.socket(family, kind, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr)
        s.listen(128)
        s.setblocking(False)
        socks.append(s)
    return socks


def _worker_main(config: ScorerConfig, index: int, on_swap: Callable[[Serving, Serving | None], None] | None,
                 level: int, ready: Connection, alive: Connection) -> None:
    """One worker: ``service.run`` on a socket of its own bound with SO_REUSEPORT."""
    global _WORKER
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only; it forwards one SIGTERM
    _WORKER = (index, config.workers)
    pid = os.getpid()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [worker {index} pid {pid}]: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(alive,), name="zenith-supervisor-watch", daemon=True).start()
    try:
        socks = _listen(config.host, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        sys.exit(2)

    def _ready() -> None:
        ready.send(index)
        ready.close()

    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.workers)
    app, scorer = build_app(config, on_swap, _ready, torch_threads=threads)
    _label(app, scorer, index, config.workers, pid)
    log.info("listening on %s:%s (SO_REUSEPORT), %d torch threads", config.host, config.port, threads)
    web.run_app(app, sock=socks, print=None, access_log=None, handle_signals=True)


def _exit_with_parent(alive: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        alive.recv()  # nothing is ever sent: this returns (EOFError) when the supervisor is gone
    os.kill(os.getpid(), signal.SIGTERM)


def _label(app: web.Application, scorer: Scorer, index: int, workers: int, pid: int) -> None:
    """Which worker answered: headers on every response, ``worker`` in /v1/model, an info metric."""
    from prometheus_client import Info

    Info("zenith_scorer_worker", "This scorer worker (the one that answered this scrape)",
         registry=scorer.metrics.registry).info({"index": str(index), "pid": str(pid), "workers": str(workers)})
    headers = {"X-Zenith-Worker": str(index), "X-Zenith-Worker-Pid": str(pid)}

    async def add_headers(_: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(headers)

    @web.middleware
    async def model_worker(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        response = await handler(request)
        if (request.match_info.route.name == "model" and isinstance(response, web.Response)
                and response.status == 200 and isinstance(response.body, bytes)):
            out = orjson.loads(response.body)
            out["worker"] = {"index": index, "pid": pid, "workers": workers}
            response.body = orjson.dumps(out)
        return response

    app.on_response_prepare.append(add_headers)
    app.middlewares.append(model_worker)
