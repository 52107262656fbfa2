"""The scoring worker against a real Redis: ranking, input limits, hot swap under load, refusal of corrupt
versions, pin/rollback, and scores identical to the model's on features built by the stream's own code."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from deploy.scorer import Scorer, ScorerConfig
from model.batch import Batch
from model.config import preset
from model.factory import build_model
from model.learner import OnlineLearner
from model.ranker import combined_score
from model.registry import ROWS_FILE, LocalDirRegistry, VersionWriter, load_version
from model.spec import default_live_spec
from model.synthetic import SynthConfig, make_synthetic
from state.store import AsOf, LiveState, StateConfig
from stream.features import Candidate, assemble

torch.set_num_threads(2)
SPEC = default_live_spec()
DATA = make_synthetic(SPEC, 1024, seed=5, config=SynthConfig(n_users=40, n_authors=30)).arrays
NOW_MS = 1_700_000_000_000
ROOMS = [(f"r{i}", f"a{i % 7}", f"c{i % 4}") for i in range(40)]


def _learner() -> OnlineLearner:
    learner = OnlineLearner(build_model(SPEC, preset("zenith", "S", SPEC, emb_buckets=2048), "cpu"), SPEC)
    learner.step(DATA[:128])
    return learner


def _publish(writer: VersionWriter, learner: OnlineLearner, step: int | None = None, **kw: Any):
    if step is not None:
        learner.step(DATA[(step * 64) % 896:(step * 64) % 896 + 64])
    return writer.publish(learner.model, watermark_ms=int(time.time() * 1000) - 2_000,
                          offsets={"samples:0": learner.samples}, samples_trained=learner.samples, **kw)


async def seed_state(state: LiveState, now_ms: int = NOW_MS) -> None:
    """Rooms, authors and two users with history, all in the hour before ``now_ms``."""
    t, writes = now_ms - 3_600_000, []
    for i, (room, author, cat) in enumerate(ROOMS):
        writes.append(state.start_room(t + i, room, author, cat, f"title {i}"))
    for j, (room, author, _) in enumerate(ROOMS[:25]):
        for user in ("u1", "u2") if j % 2 else ("u1",):
            ts = t + 60_000 + 1000 * j
            writes.append(state.record_impression(ts, user, room, author, ""))
            writes.append(state.record_enter(f"e{j}{user}", ts + 100, user, room, author))
            writes.append(state.record_watch(f"w{j}{user}", ts + 200, user, room, author, 10.0 + j))
            if j % 3 == 0:
                writes.append(state.record_interaction(ts + 300, user, room, author, "like"))
    await state.apply(writes)


class Harness:
    """A scorer on a real port (aiohttp's TestServer), a real Redis with a private key prefix, a registry."""

    def __init__(self, tmp_path: Path, redis_url: str, **config: Any) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:8]}:"
        self.registry = LocalDirRegistry(tmp_path / "registry")
        self.config = ScorerConfig(registry_dir=self.registry.root, redis_url=redis_url,
                                   state=StateConfig(prefix=self.prefix), **{"poll_s": 0.05, **config})
        self.redis_url = redis_url

    async def run(self, body: Callable[[Scorer, TestClient], Awaitable[None]]) -> None:
        state = LiveState.from_url(self.redis_url, StateConfig(prefix=self.prefix))
        try:
            await seed_state(state)
            scorer = Scorer(self.config)
            async with TestServer(scorer.app()) as server, TestClient(server) as client:
                await body(scorer, client)
        finally:
            await state.aclose()


async def _until(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _request(n: int = 10, user: str = "u1", **ctx: Any) -> dict[str, Any]:
    cands = [{"room_id": r, "author_id": a, "category": c} for r, a, c in (ROOMS * 100)[:n]]
    return {"user_id": user, "candidates": cands, "context": {"device": "ios", "tab": "live", **ctx}}


def test_rank_is_sorted_versioned_and_equals_the_model_on_stream_features(tmp_path: Path, redis_url: str) -> None:
    h = Harness(tmp_path, redis_url)
    learner = _learner()
    _publish(VersionWriter(h.registry), learner)
    ts = NOW_MS - 60_000

    async def body(scorer: Scorer, client: TestClient) -> None:
        await _until(lambda: scorer.serving is not None, what="first version")
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json()) == {"status": "ok", "model_version": 1}
        req = _request(30, ts_ms=ts, hour=21)
        resp = await client.post("/v1/rank", json=req)
        assert resp.status == 200, await resp.text()
        out = await resp.json()
        assert out["model_version"] == 1 and len(out["results"]) == 30
        scores = [r["score"] for r in out["results"]]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
        assert set(out["results"][0]["scores"]) == {t.name for t in SPEC.tasks}

        # per-candidate reads and the stream's per-row assembly, scored by the trainer's model: the scorer's
        # user-once read, shared item snapshots, batched assembly and shared-sequence forward give the same
        state = LiveState.from_url(redis_url, StateConfig(prefix=h.prefix))
        try:
            snaps = await state.read([AsOf("u1", c["room_id"], c["author_id"], ts) for c in req["candidates"]])
        finally:
            await state.aclose()
        assert snaps[3].history and snaps[3].room  # the seeded state is really there
        rows = [assemble(SPEC, Candidate("u1", c["room_id"], c["author_id"], c["category"], ts, 21, "ios", "live", i),
                         s) for i, (c, s) in enumerate(zip(req["candidates"], snaps, strict=True))]
        n = len(rows)
        stack = [torch.from_numpy(np.stack([getattr(r, f) for r in rows])) for f in ("ids", "seqs", "dense")]
        batch = Batch(*stack, torch.zeros(n, len(SPEC.tasks)), torch.zeros(n, dtype=torch.long))
        probs = learner.model.predict(batch)
        combined = combined_score(probs, SPEC)
        by_room = {r["room_id"]: r for r in out["results"]}
        for i, c in enumerate(req["candidates"]):
            got = by_room[c["room_id"]]
            assert got["score"] == pytest.approx(float(combined[i]), abs=1e-6)
            assert list(got["scores"].values()) == pytest.approx(probs[i].tolist(), abs=1e-6)

        resp = await client.get("/v1/model")
        info = await resp.json()
        assert info["model_version"] == 1 and info["kind"] == "full" and 0 < info["data_age_s"] < 60
        metrics = await (await client.get("/metrics")).text()
        for line in ("zenith_scorer_model_version 1.0", "zenith_scorer_candidates_total 30.0",
                     'zenith_scorer_requests_total{code="200",endpoint="rank"} 1.0',
                     "zenith_freshness_published_to_served_seconds_count 1.0",
                     "zenith_freshness_event_to_served_seconds_count 1.0", "zenith_scorer_model_data_age_seconds",
                     'zenith_scorer_stage_seconds_count{stage="forward"} 1.0', "zenith_scorer_request_seconds_bucket"):
            assert line in metrics, line

    asyncio.run(h.run(body))


def test_rooms_come_from_the_shared_snapshot_and_changes_arrive_within_the_bound(tmp_path: Path,
                                                                             redis_url: str) -> None:
    h = Harness(tmp_path, redis_url, item_refresh_s=0.2)
    learner = _learner()
    _publish(VersionWriter(h.registry), learner)

    async def body(scorer: Scorer, client: TestClient) -> None:
        await _until(lambda: scorer.serving is not None, what="first version")

        async def scores() -> dict[str, float]:
            resp = await client.post("/v1/rank", json=_request(40))  # about now: the cache's business
            assert resp.status == 200, await resp.text()
            return {r["room_id"]: r["score"] for r in (await resp.json())["results"]}

        first = await scores()  # the cache is empty: every candidate is read in the request
        assert scorer._items is not None
        await _until(lambda: scorer._items.refreshes >= 2, what="two refreshes")
        assert await scores() == first  # nothing changed: the cached snapshot scores the same
        metrics = await (await client.get("/metrics")).text()
        assert 'zenith_scorer_item_cache_lookups_total{result="miss"} 40.0' in metrics
        assert 'zenith_scorer_item_cache_lookups_total{result="hit"} 40.0' in metrics
        assert 0 <= scorer._items.age_s() < scorer._items.bound_ms / 1000

        # the stream changes one room; the scorer sees it within the staleness bound, without a miss
        state = LiveState.from_url(redis_url, StateConfig(prefix=h.prefix))
        try:
            now = int(time.time() * 1000) - 5000
            await state.apply([state.record_impression(now + i, f"v{i}", "r3", "a3", "c3") for i in range(300)])
        finally:
            await state.aclose()
        t0 = time.monotonic()
        while (after := await scores())["r3"] == first["r3"]:
            assert time.monotonic() - t0 < 2.0, "a room's change did not reach the scorer in 2 s (bound: 0.4 s)"
            await asyncio.sleep(0.05)
        assert {r: v for r, v in after.items() if r != "r3"} == {r: v for r, v in first.items() if r != "r3"}
        metrics = await (await client.get("/metrics")).text()
        assert 'zenith_scorer_item_cache_lookups_total{result="miss"} 40.0' in metrics  # no new misses

    asyncio.run(h.run(body))


def test_bad_input_gets_a_4xx_that_says_what_is_wrong(tmp_path: Path, redis_url: str) -> None:
    h = Harness(tmp_path, redis_url, max_candidates=50, max_body_bytes=8192)

    async def body(scorer: Scorer, client: TestClient) -> None:
        # before any model: 503 with a reason
        resp = await client.get("/healthz")
        assert resp.status == 503 and "no model version loaded yet" in (await resp.json())["error"]
        resp = await client.post("/v1/rank", json=_request(3))
        assert resp.status == 503 and "no model version" in (await resp.json())["error"]
        _publish(VersionWriter(h.registry), _learner())
        await _until(lambda: scorer.serving is not None, what="first version")

        async def expect(status: int, fragment: str, **kw: Any) -> None:
            resp = await client.post("/v1/rank", **kw)
            out = await resp.json()
            assert resp.status == status and fragment in out["error"], (status, fragment, resp.status, out)

        await expect(400, "body is not valid JSON", data=b'{"user_id": "u1", "candidates": [')
        await expect(422, "body must be a JSON object", json=[1, 2])
        await expect(422, "user_id is required", json={"candidates": []})
        await expect(422, "user_id must be a non-empty string, got 5 (int)", json={"user_id": 5, "candidates": []})
        await expect(422, "candidates is required", json={"user_id": "u1"})
        await expect(422, "candidates[1] must be an object", json={"user_id": "u1", "candidates": [
            {"room_id": "r1", "author_id": "a1"}, "r2"]})
        await expect(422, "candidates[0].room_id must be a non-empty string", json={"user_id": "u1", "candidates": [
            {"room_id": "", "author_id": "a1"}]})
        await expect(422, "candidates[0].author_id is required", json={"user_id": "u1", "candidates": [
            {"room_id": "r1"}]})
        await expect(422, "context.hour must be an integer in 0..23, got 24", json=_request(2, hour=24))
        await expect(422, "context.ts_ms must be an integer >= 0", json=_request(2, ts_ms="now"))
        await expect(422, "context.device must be a string", json=_request(2, device=3))
        await expect(413, "too many candidates: 51 > max_candidates=50", json=_request(51))
        await expect(413, "max_body_bytes=8192", data=b'{"user_id": "' + b"x" * 9000 + b'"}')
        resp = await client.get("/v1/rank")
        assert resp.status == 405 and "Method Not Allowed" in (await resp.json())["error"]
        resp = await client.post("/v1/rank", json={"user_id": "u1", "candidates": []})
        assert resp.status == 200 and (await resp.json()) == {"model_version": 1, "results": []}
        metrics = await (await client.get("/metrics")).text()
        assert 'zenith_scorer_requests_total{code="422",endpoint="rank"} 10.0' in metrics

    asyncio.run(h.run(body))


def test_swap_under_concurrent_requests_fails_none_and_advances(tmp_path: Path, redis_url: str) -> None:
    h = Harness(tmp_path, redis_url)
    writer, learner = VersionWriter(h.registry), _learner()
    _publish(writer, learner)

    async def body(scorer: Scorer, client: TestClient) -> None:
        await _until(lambda: scorer.serving is not None, what="first version")
        published: list[int] = []

        def publisher() -> None:  # the trainer: a training step and a new version every ~0.15 s
            for step in range(5):
                time.sleep(0.15)
                published.append(_publish(writer, learner, step=step).version)

        thread = threading.Thread(target=publisher)
        thread.start()
        statuses: list[int] = []
        versions: list[int] = []
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                resp = await client.post("/v1/rank", json=_request(20 + i % 30, user=f"u{1 + i % 2}"))
                statuses.append(resp.status)
                if resp.status == 200:
                    versions.append((await resp.json())["model_version"])
                if i % 25 == 0:
                    await asyncio.sleep(0.05)  # spread the 200 requests over the publishing period

        await asyncio.gather(*(one(i) for i in range(200)))
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        assert statuses.count(200) == 200, f"failed requests: {[s for s in statuses if s != 200]}"
        assert published == [2, 3, 4, 5, 6]
        await _until(lambda: scorer.serving is not None and scorer.serving.version == 6, what="version 6")
        assert len(set(versions)) >= 2, f"no swap happened while requests ran: {set(versions)}"
        # the served model is exactly the trainer's (deltas applied to copies, chain intact)
        eval_batch = Batch.from_arrays(DATA[900:])
        assert torch.allclose(scorer.serving.model.predict(eval_batch), learner.model.predict(eval_batch), atol=1e-6)
        metrics = await (await client.get("/metrics")).text()
        assert 'zenith_scorer_swaps_total{how="delta"}' in metrics and "zenith_scorer_model_version 6.0" in metrics

        # rollback: pin an old version, then unpin
        h.registry.pin(3)
        await _until(lambda: scorer.serving.version == 3, what="pinned version 3")
        resp = await client.post("/v1/rank", json=_request(5))
        assert (await resp.json())["model_version"] == 3
        assert (await (await client.get("/v1/model")).json())["pinned"] == 3
        h.registry.unpin()
        await _until(lambda: scorer.serving.version == 6, what="back to latest")

    asyncio.run(h.run(body))


def test_a_corrupt_version_is_refused_and_serving_continues(tmp_path: Path, redis_url: str) -> None:
    h = Harness(tmp_path, redis_url)
    writer, learner = VersionWriter(h.registry), _learner()
    _publish(writer, learner)

    async def body(scorer: Scorer, client: TestClient) -> None:
        await _until(lambda: scorer.serving is not None, what="first version")
        # v2 is written elsewhere, damaged, then moved in atomically (so the watcher cannot see it undamaged)
        staging = LocalDirRegistry(tmp_path / "staging")
        writer.registry = staging
        _publish(writer, learner, step=1)
        path = staging.root / "v00000002" / ROWS_FILE
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        os.rename(staging.root / "v00000002", h.registry.root / "v00000002")
        writer.registry = h.registry

        await _until(lambda: 2 in scorer.refused, what="refusal of version 2")
        assert "checksum mismatch" in scorer.refused[2]
        resp = await client.post("/v1/rank", json=_request(10))
        assert resp.status == 200 and (await resp.json())["model_version"] == 1
        await asyncio.sleep(0.3)  # several polls: the bad version is not retried in a loop
        metrics = await (await client.get("/metrics")).text()
        assert "zenith_scorer_refused_versions_total 1.0" in metrics and "zenith_scorer_model_version 1.0" in metrics
        info = await (await client.get("/v1/model")).json()
        assert info["model_version"] == 1 and "checksum" in info["refused"]["2"]

        # The refusal is recorded in the registry, so the trainer's next version is a full snapshot (not a
        # delta on the corrupt v2) and the chain heals at once.
        assert 2 in h.registry.unusable()
        healed = _publish(writer, learner, step=2)
        assert healed.kind.value == "full"
        await _until(lambda: scorer.serving.version == 3, what="version 3")
        resp = await client.post("/v1/rank", json=_request(10))
        assert resp.status == 200 and (await resp.json())["model_version"] == 3
        expected, _ = load_version(h.registry, 3, SPEC)
        eval_batch = Batch.from_arrays(DATA[900:])
        assert torch.equal(scorer.serving.model.predict(eval_batch), expected.predict(eval_batch))

    asyncio.run(h.run(body))


def _damage(registry: LocalDirRegistry, version: int) -> None:
    path = registry.root / f"v{version:08d}" / ROWS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_fresh_scorer_starts_on_the_newest_verifiable_version(tmp_path: Path, redis_url: str) -> None:
    """Latest chain 1(full) 2 3 4 5 with 3 corrupt: a new scorer serves 2 at once (not 503 until the next
    full snapshot), refuses 3..5 once, and the trainer's next version, a full snapshot, heals the chain."""
    h = Harness(tmp_path, redis_url)
    writer, learner = VersionWriter(h.registry), _learner()
    for step in range(5):
        _publish(writer, learner, step=step)
    _damage(h.registry, 3)

    async def body(scorer: Scorer, client: TestClient) -> None:
        t0 = time.monotonic()
        await _until(lambda: scorer.serving is not None, what="a served version")
        assert scorer.serving.version == 2 and time.monotonic() - t0 < 5
        assert sorted(scorer.refused) == [3, 4, 5] and "checksum mismatch" in scorer.refused[3]
        assert "version 3" in scorer.refused[5]
        resp = await client.post("/v1/rank", json=_request(10))
        assert resp.status == 200 and (await resp.json())["model_version"] == 2
        assert (await client.get("/healthz")).status == 200
        assert sorted(h.registry.unusable()) == [3, 4, 5]
        healed = _publish(writer, learner, step=5)  # writer.last is 5: its chain holds the refused 3
        assert healed.kind.value == "full" and healed.version == 6
        await _until(lambda: scorer.serving.version == 6, what="the healing full snapshot")
        metrics = await (await client.get("/metrics")).text()
        assert "zenith_scorer_refused_versions_total 3.0" in metrics

    asyncio.run(h.run(body))


def test_redis_outage_answers_503_with_a_reason_and_healthz_degraded(tmp_path: Path) -> None:
    """A real redis-server killed with SIGKILL under a serving scorer, then restarted on its port."""
    from deploy.infra import free_port
    from deploy.infra.redis import LocalRedis

    server = LocalRedis(free_port(), tmp_path / "redis")
    server.start()
    try:
        server.wait_ready()
        h = Harness(tmp_path, server.url, health_ping_s=0.1)
        _publish(VersionWriter(h.registry), _learner())

        async def body(scorer: Scorer, client: TestClient) -> None:
            await _until(lambda: scorer.serving is not None, what="first version")
            assert (await client.post("/v1/rank", json=_request(10))).status == 200
            os.kill(server.pid, 9)
            server._proc.wait(10)
            codes, reasons = [], []
            for _ in range(5):
                resp = await client.post("/v1/rank", json=_request(10))
                codes.append(resp.status)
                reasons.append((await resp.json())["error"])
            assert codes == [503] * 5, codes
            assert all(r.startswith("state store unavailable") for r in reasons), reasons
            await asyncio.sleep(0.15)
            health = await client.get("/healthz")
            assert health.status == 503 and (await health.json())["status"] == "degraded"
            metrics = await (await client.get("/metrics")).text()
            assert "zenith_scorer_state_up 0.0" in metrics
            assert 'code="500"' not in metrics
            assert 'zenith_scorer_requests_total{code="503",endpoint="rank"} 5.0' in metrics
            server.stop()
            server.start()
            server.wait_ready()
            await asyncio.sleep(0.15)
            assert (await client.get("/healthz")).status == 200
            resp = await client.post("/v1/rank", json=_request(10))
            assert resp.status == 200, await resp.text()

        asyncio.run(h.run(body))
    finally:
        server.stop()
