"""``zenith serve --workers 2`` as a real process against a real Redis: both workers take traffic on one port,
a new model version every 0.3 s under concurrent load fails no request, both workers end on the last version,
and SIGTERM to the supervisor stops every worker (no orphans)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import torch

from deploy.infra import free_port
from model.config import preset
from model.factory import build_model
from model.learner import OnlineLearner
from model.registry import LocalDirRegistry, VersionWriter
from model.spec import default_live_spec
from model.synthetic import SynthConfig, make_synthetic
from state.store import LiveState, StateConfig
from tests.test_scorer import ROOMS, seed_state

torch.set_num_threads(1)  # two cores: leave the other to the workers
SPEC = default_live_spec()
DATA = make_synthetic(SPEC, 1024, seed=5, config=SynthConfig(n_users=40, n_authors=30)).arrays


def _learner() -> OnlineLearner:
    learner = OnlineLearner(build_model(SPEC, preset("zenith", "S", SPEC, emb_buckets=2048), "cpu"), SPEC)
    learner.step(DATA[:128])
    return learner


def _publish(writer: VersionWriter, learner: OnlineLearner, step: int | None = None) -> int:
    if step is not None:
        learner.step(DATA[(step * 64) % 896:(step * 64) % 896 + 64])
    return writer.publish(learner.model, watermark_ms=int(time.time() * 1000) - 2_000,
                          offsets={"samples:0": learner.samples}, samples_trained=learner.samples).version


async def _seed(redis_url: str, prefix: str) -> None:
    state = LiveState.from_url(redis_url, StateConfig(prefix=prefix))
    try:
        await seed_state(state, now_ms=int(time.time() * 1000))
    finally:
        await state.aclose()


def _request(i: int) -> dict[str, Any]:
    cands = [{"room_id": r, "author_id": a, "category": c} for r, a, c in ROOMS[: 10 + i % 20]]
    return {"user_id": f"u{1 + i % 2}", "candidates": cands, "context": {"device": "ios", "tab": "live"}}


async def _models(base: str, n: int = 8) -> dict[int, int]:
    """worker pid -> served version, from /v1/model over ``n`` fresh connections (the kernel picks a worker
    per connection)."""
    seen: dict[int, int] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(n):
            try:
                async with session.get(f"{base}/v1/model") as resp:
                    if resp.status == 200:
                        out = await resp.json()
                        assert out["worker"]["pid"] == int(resp.headers["X-Zenith-Worker-Pid"])
                        assert out["worker"]["workers"] == 2
                        seen[out["worker"]["pid"]] = out["model_version"]
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
    return seen


async def _until_both_serve(base: str, version: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    seen: dict[int, int] = {}
    while True:
        assert proc.poll() is None, f"zenith serve exited with {proc.returncode}"
        seen.update(await _models(base))
        if len(seen) == 2 and all(v == version for v in seen.values()):
            return seen
        assert len(seen) <= 2, seen
        assert time.monotonic() < deadline, f"both workers did not serve v{version} within {timeout}s: {seen}"
        await asyncio.sleep(0.2)


async def _load(base: str, stop: threading.Event) -> tuple[int, list[str], list[tuple[int, int]]]:
    """Concurrent clients until ``stop``: 4 on keep-alive connections, 4 opening a connection per request.
    Returns (requests, failures, [(worker pid, model_version)] per response)."""
    failures: list[str] = []
    seen: list[tuple[int, int]] = []
    count = 0

    async def client(c: int, force_close: bool) -> None:
        nonlocal count
        connector = aiohttp.TCPConnector(limit=1, force_close=force_close)
        async with aiohttp.ClientSession(connector=connector) as session:
            i = c
            while not stop.is_set():
                i += 8
                count += 1
                try:
                    async with session.post(f"{base}/v1/rank", json=_request(i)) as resp:
                        body = await resp.json()
                        if resp.status != 200:
                            failures.append(f"{resp.status}: {body}")
                            continue
                        assert len(body["results"]) == 10 + i % 20
                        seen.append((int(resp.headers["X-Zenith-Worker-Pid"]), body["model_version"]))
                except (TimeoutError, aiohttp.ClientError, AssertionError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(client(c, force_close=c >= 4) for c in range(8)))
    return count, failures, seen


def test_two_workers_share_a_port_swap_under_load_without_failures_and_stop_together(tmp_path: Path,
                                                                                     redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    asyncio.run(_seed(redis_url, prefix))
    registry = LocalDirRegistry(tmp_path / "registry")
    writer, learner = VersionWriter(registry), _learner()
    first = _publish(writer, learner)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ZENITH_STATE_PREFIX": prefix, "ZENITH_HOME": str(tmp_path / "home")}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from deploy.cli import main; main()", "serve", "--workers", "2",
             "--registry", str(registry.root), "--redis-url", redis_url, "--port", str(port), "--poll-s", "0.2",
             "--threads", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    worker_pids: list[int] = []
    try:
        started = asyncio.run(_until_both_serve(base, first, proc, timeout=30.0))
        worker_pids = sorted(started)
        assert proc.pid not in worker_pids  # the supervisor serves nothing itself

        stop = threading.Event()
        published: list[int] = []

        def publisher() -> None:  # the trainer stand-in: a training step and a new version every 0.3 s
            try:
                for step in range(13):
                    time.sleep(0.3)
                    published.append(_publish(writer, learner, step=step))
            finally:
                time.sleep(0.5)  # some load after the last publish too
                stop.set()

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            count, failures, seen = asyncio.run(_load(base, stop))
        finally:
            stop.set()
            thread.join()
        assert not failures, f"{len(failures)} of {count} requests failed: {failures[:5]}"
        assert count >= 50, count
        by_worker = {pid: sorted({v for p, v in seen if p == pid}) for pid in worker_pids}
        assert set(p for p, _ in seen) == set(worker_pids), f"not both workers got traffic: {by_worker}"
        for pid, versions in by_worker.items():  # each worker swapped while serving
            assert len(versions) >= 2 and versions[-1] > first, (pid, versions)
        assert published and published[-1] > first

        final = asyncio.run(_until_both_serve(base, published[-1], proc, timeout=15.0))
        assert sorted(final) == worker_pids  # the same two processes served throughout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        for pid in worker_pids:  # reaped by the supervisor before it exited: gone, not orphaned
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            raise AssertionError(f"worker pid {pid} outlived the supervisor")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = log_path.read_text(errors="replace")
        print(output[-4000:])
    assert "2 workers on one port" in output and "worker 1: serving v" in output, output[-4000:]
