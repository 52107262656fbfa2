"""The scoring worker: an HTTP ranking API over the newest model version, hot-swapped while it serves.

Endpoints::

    POST /v1/rank   {"user_id": "u1", "candidates": [{"room_id": "r1", "author_id": "a1", "category": "c"}],
                     "context": {"hour": 20, "device": "ios", "tab": "live", "ts_ms": 1700000000000}}
                 -> {"model_version": 12, "results": [{"room_id": "r1", "score": 0.41,
                                                       "scores": {"enter": 0.2, ...}}]}   (score desc)
    GET  /healthz   200 {"status": "ok", "model_version": 12}; 503 until a model is loaded
    GET  /v1/model  the served version: watermark, data age, how it was loaded, refused versions
    GET  /metrics   Prometheus text (``zenith_scorer_*``, ``zenith_freshness_*_to_served_seconds``)

Per request: the user read from Redis (one pipelined round trip) while the candidates' rooms and authors come
from the shared snapshot (``items.ItemCache``; rooms it has never seen are read meanwhile); then, on an
inference thread, the user's part once and every candidate's features at once (``stream.features``: the
code the stream builds training samples with, so there is no train/serve skew) and the version's ranking
forward (``model.serving``: TorchScript, the user's sequences given once, run without the GIL). Two
inference threads by default, so two requests score on two cores while the event loop keeps accepting
requests, answering health checks and awaiting Redis.

Hot swap: a watcher polls the registry (``poll_s``) for the pinned version, else the latest; it builds the
new model off the request path (a loader thread: deltas applied to a deep copy of the served model, or a
full load), verifies it (checksums, shapes, spec, finite values) and builds its ranking forward (verified
against the model). Then ``self.serving`` -- an immutable ``Serving(version, model, manifest, forward)`` --
is replaced by one attribute assignment. A request reads ``self.serving`` once and finishes on that object,
so requests in flight during a swap never see a mix. A corrupt version is refused, logged and counted
once; the last good version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from model.ranker import Ranker, combined_score
from model.registry import (
    CorruptVersion,
    LocalDirRegistry,
    Manifest,
    ModelRegistry,
    RegistryError,
    VersionNotFound,
    apply_version,
    load_version,
    newest_verifiable,
)
from model.serving import ForwardBuilder, RankingForward
from model.spec import FeatureSpec
from state.store import AsOf, LiveState, Snapshot
from stream.features import ItemSide, RequestContext, assemble_batch, default_live_spec, user_side
from stream.gc_tuning import tune_gc

from .config import ScorerConfig
from .items import ItemCache
from .metrics import ScorerMetrics
from .request import BadRequest, RankRequest, parse_rank_request

log = logging.getLogger("zenith.scorer")

HOUR_MS = 3_600_000
LOADER_NICE = 10


@dataclass(frozen=True)
class Serving:
    """What one request is scored with. Never mutated: a swap replaces the whole object."""

    version: int
    model: Ranker
    manifest: Manifest
    served_at: float  # wall time (s) it started serving
    how: str  # "full" (built from the chain) or "delta" (applied to a copy of the previous model)
    load_s: float  # load, verify, and build the ranking forward
    forward: RankingForward  # what scores a request (model/serving.py)


# ---- the scorer ----------------------------------------------------------------------------------------------------
class Scorer:
    """The ranking service. ``app()`` is the aiohttp application; ``run(config)`` serves it.

    ``registry`` and ``state`` default to ones built from ``config``; tests pass their own.
    ``on_swap(new, old)`` callbacks run on the event loop after each swap (the CLI logs a progress line).
    """

    def __init__(self, config: ScorerConfig, *, registry: ModelRegistry | None = None,
                 state: LiveState | None = None, spec: FeatureSpec | None = None,
                 on_swap: list[Callable[[Serving, Serving | None], None]] | None = None) -> None:
        self.config = config
        self.registry = registry or LocalDirRegistry(config.registry_dir)
        self.spec = spec or default_live_spec(seq_len=config.seq_len)
        self.device = torch.device(config.device)
        self.metrics = ScorerMetrics()
        self.metrics.data_age.set_function(self._data_age)
        self.on_swap = list(on_swap or [])
        self.serving: Serving | None = None  # THE swap point: replaced whole, never mutated
        self.refused: dict[int, str] = {}  # version -> reason; never retried
        self._verified: set[int] = set()  # versions whose files verified (walk-back cache)
        self._state, self._own_state = state, state is None
        self._items: ItemCache | None = None
        self._forwards = ForwardBuilder(config.forward)  # used by the loader thread only
        self._infer = ThreadPoolExecutor(config.infer_threads, thread_name_prefix="zenith-infer")
        # Loading a version (files, checksums, a model copy, its TorchScript build) is background work that
        # must not take the CPU from requests when cores are busy: the loader thread runs at a lower priority.
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="zenith-loader", initializer=_lower_priority)
        self._refresh_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._last_error = ""
        self._state_error: str | None = None  # why the state store last failed; None while it answers
        self._state_checked = -math.inf

    # ---- model versions ------------------------------------------------------------------------------------
    def _data_age(self) -> float:
        s = self.serving
        return max(time.time() - s.manifest.watermark_ms / 1000, 0.0) if s else math.nan

    def _build(self, version: int, current: Serving | None) -> tuple[Ranker, Manifest, str, float, RankingForward]:
        """Loader thread: the model of ``version``, verified, and its ranking forward; never touches
        ``current.model`` itself."""
        t0 = time.perf_counter()
        if current is None:
            model, manifest = load_version(self.registry, version, self.spec, self.device)
        else:  # deltas on a deep copy when the version extends the served one, else a full load
            model, manifest = apply_version(current.model, self.registry, version, held_version=current.version)
        extends = current is not None and version > current.version and self._on_chain(version, current.version)
        how = "delta" if extends else "full"
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # serving never trains; also makes forward skip autograd bookkeeping
        forward = self._forwards.build(model)
        if forward.fallback:
            self.metrics.forward_fallbacks.inc()
            log.warning("version %s: serving the eager forward (%s failed: %s)", version, self.config.forward.value,
                        forward.fallback)
        return model, manifest, how, time.perf_counter() - t0, forward

    def _on_chain(self, version: int, held: int) -> bool:
        try:
            return any(m.version == held for m in self.registry.chain(version))
        except RegistryError:
            return False

    async def refresh(self) -> Serving | None:
        """One watcher step: if the target version (pinned, else latest) is new and not refused, load it off
        the event loop and swap it in. Returns the new ``Serving`` if a swap happened."""
        async with self._refresh_lock:
            loop = asyncio.get_running_loop()
            target = await loop.run_in_executor(self._loader, self.registry.target)
            current = self.serving
            if current is None and target is not None and await loop.run_in_executor(
                    self._loader, self.registry.pinned) is None:
                # Nothing served yet: start on the newest version that verifies, walking back the chain,
                # rather than waiting (up to a whole chain) for a good full snapshot after a bad latest.
                before = dict(self.refused)
                target = await loop.run_in_executor(self._loader, newest_verifiable, self.registry, self.spec,
                                                    self.refused, self._verified)
                for version in sorted(set(self.refused) - set(before)):
                    self._refuse(version, self.refused[version], current)
            if target is None or target in self.refused or (current is not None and current.version == target):
                return None
            try:
                model, manifest, how, load_s, forward = await loop.run_in_executor(
                    self._loader, self._build, target, current)
            except CorruptVersion as exc:
                if target not in await loop.run_in_executor(self._loader, self.registry.list_versions):
                    log.info("version %s vanished while loading (pruned?): %s", target, exc.reason)
                    return None  # not corrupt, just gone: the next poll looks again
                self.refused[target] = exc.reason
                self._refuse(target, exc.reason, current)
                return None
            except VersionNotFound as exc:  # pruned between listing and reading: the next poll sees newer
                log.info("%s", exc)
                return None
            serving = Serving(version=manifest.version, model=model, manifest=manifest, served_at=time.time(),
                              how=how, load_s=load_s, forward=forward)
            self.serving = serving  # the swap: one reference assignment; in-flight requests keep theirs
            if current is None:
                tune_gc()  # start-up is done: imports, the first model
            m = self.metrics
            m.model_version.set(serving.version)
            m.load_seconds.labels(how).observe(load_s)
            m.swaps.labels(how).inc()
            m.published_to_served.observe(max(serving.served_at - manifest.created_ms / 1000, 0.0))
            m.event_to_served.observe(max(serving.served_at - manifest.watermark_ms / 1000, 0.0))
            for callback in self.on_swap:
                try:
                    callback(serving, current)
                except Exception:  # a logging hook must never break the watcher
                    log.exception("on_swap callback failed")
            return serving

    def _refuse(self, version: int, reason: str, current: Serving | None) -> None:
        """Count and log a refused version, and record it in the registry so the trainer heals the chain."""
        self.metrics.refused.inc()
        log.error("refused model version %s: %s; still serving %s", version, reason,
                  current.version if current else "nothing")
        try:
            self.registry.mark_unusable(version, reason)
        except OSError as exc:  # a read-only registry mount: the refusal still holds here
            log.warning("could not record version %s as unusable in the registry: %s", version, exc)

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
                self._last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # transient (I/O, a garbled PINNED file): retried next poll, logged once
                self.metrics.load_errors.inc()
                if str(exc) != self._last_error:
                    log.warning("model watcher: %s (retrying every %.1fs)", exc, self.config.poll_s)
                    self._last_error = str(exc)
            await asyncio.sleep(self.config.poll_s)

    # ---- ranking --------------------------------------------------------------------------------------------
    def _score(self, serving: Serving, req: RankRequest, ts_ms: int, user_snapshot: Snapshot,
               items: list[ItemSide]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Inference thread: the user's part once, every candidate's features at once (the stream's assembly
        code), then one forward pass with the user's sequences embedded once for all candidates."""
        t0 = time.perf_counter()
        hour = req.hour if req.hour is not None else int(ts_ms // HOUR_MS) % 24  # the simulator's convention
        user = user_side(self.spec, req.user_id, user_snapshot)
        t1 = time.perf_counter()
        ctx = RequestContext(user=req.user_id, ts_ms=ts_ms, hour=hour, device=req.device, tab=req.tab)
        features = assemble_batch(self.spec, ctx, user, items)
        t2 = time.perf_counter()
        dev = self.device
        with torch.inference_mode():
            probs = torch.sigmoid(serving.forward.fn(torch.from_numpy(features.ids).to(dev),
                                                     torch.from_numpy(features.seqs)[None].to(dev),
                                                     torch.from_numpy(features.dense).to(dev)))
            score = combined_score(probs, self.spec)
            probs_np, score_np = probs.cpu().numpy(), score.cpu().numpy()
        return probs_np, score_np, {"user": t1 - t0, "assemble": t2 - t1, "forward": time.perf_counter() - t2}

    async def rank(self, req: RankRequest, serving: Serving) -> dict[str, Any]:
        ts_ms = req.ts_ms if req.ts_ms is not None else int(time.time() * 1000)
        if not req.candidates:
            return {"model_version": serving.version, "results": []}
        state, items = self._state, self._items
        assert state is not None and items is not None, "the scorer's Redis client is opened when the app starts"
        t0 = time.perf_counter()
        rooms, authors, categories = (list(col) for col in zip(*req.candidates, strict=True))
        # The user from Redis and the candidates from the shared cache (misses read meanwhile), concurrently.
        (user_snapshot,), found = await asyncio.gather(
            state.read([AsOf(req.user_id, "", "", ts_ms)], categories=items.categories()),
            items.lookup(rooms, authors, categories, ts_ms))
        read_s = time.perf_counter() - t0
        loop = asyncio.get_running_loop()
        probs, score, stages = await loop.run_in_executor(
            self._infer, self._score, serving, req, ts_ms, user_snapshot, found.items)
        m = self.metrics
        m.stage_seconds.labels("read").observe(read_s)
        for stage, seconds in stages.items():
            m.stage_seconds.labels(stage).observe(seconds)
        m.item_lookups.labels("hit").inc(found.hits)
        m.item_lookups.labels("miss").inc(found.misses)
        tasks = [t.name for t in self.spec.tasks]
        order = np.argsort(-score, kind="stable")  # ties keep request order
        plist, slist = probs.tolist(), score.tolist()
        results = [{"room_id": rooms[i], "score": slist[i], "scores": dict(zip(tasks, plist[i], strict=True))}
                   for i in order.tolist()]
        return {"model_version": serving.version, "results": results}

    # ---- HTTP ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")

    async def handle_rank(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BadRequest(413, f"body is {request.content_length} bytes, more than max_body_bytes={limit}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(413, f"body is more than max_body_bytes={limit}") from None
        req = parse_rank_request(body, self.config.max_candidates)
        serving = self.serving  # read once: this request finishes on this version whatever swaps meanwhile
        if serving is None:
            raise BadRequest(503, self._not_ready())
        try:
            out = await self.rank(req, serving)
        except (RedisConnectionError, RedisTimeoutError, BusyLoadingError) as exc:
            # The state store is down or restarting: a retryable condition of a dependency, not our bug.
            self._state_failed(exc)
            raise BadRequest(503, f"state store unavailable ({type(exc).__name__}: {exc}); retry shortly") from None
        self._state_ok()
        self.metrics.candidates.inc(len(req.candidates))
        self.metrics.candidates_per_request.observe(len(req.candidates))
        self.metrics.request_seconds.observe(time.perf_counter() - t0)
        return self._json(out)

    def _not_ready(self) -> str:
        if self.refused:
            return (f"no model version loaded yet: refused {sorted(self.refused)} "
                    f"({next(iter(self.refused.values()))}); waiting for a good one in {self.registry}")
        return f"no model version loaded yet: waiting for one in {self.registry}"

    def _state_failed(self, exc: Exception) -> None:
        if self._state_error is None:
            log.error("state store unreachable (%s: %s): answering 503 until it is back", type(exc).__name__, exc)
        self._state_error = f"{type(exc).__name__}: {exc}"
        self.metrics.state_up.set(0)

    def _state_ok(self) -> None:
        if self._state_error is not None:
            log.warning("state store reachable again")
        self._state_error = None
        self.metrics.state_up.set(1)

    async def _check_state(self) -> None:
        """PING the state store, at most once per ``health_ping_s`` (health checks may come often)."""
        now = time.monotonic()
        if now - self._state_checked < self.config.health_ping_s:
            return
        self._state_checked = now
        assert self._state is not None, "the scorer's Redis client is opened when the app starts"
        try:
            await asyncio.wait_for(self._state.r.ping(), timeout=self.config.health_ping_s)
        except (TimeoutError, RedisError, OSError) as exc:
            self._state_failed(exc)
        else:
            self._state_ok()

    async def handle_healthz(self, request: web.Request) -> web.Response:
        s = self.serving
        if s is None:
            return self._json({"status": "loading", "error": self._not_ready()}, 503)
        await self._check_state()
        if self._state_error is not None:
            return self._json({"status": "degraded", "model_version": s.version,
                               "reason": f"state store unreachable: {self._state_error}"}, 503)
        return self._json({"status": "ok", "model_version": s.version})

    async def handle_model(self, request: web.Request) -> web.Response:
        s = self.serving
        if s is None:
            raise BadRequest(503, self._not_ready())
        m = s.manifest
        try:
            pinned = self.registry.pinned()
        except RegistryError as exc:
            pinned = f"unreadable: {exc}"
        return self._json({
            "model_version": s.version, "kind": m.kind.value, "parent": m.parent, "base": m.base,
            "loaded_as": s.how, "load_s": round(s.load_s, 4), "forward": s.forward.kind.value,
            "forward_build_s": round(s.forward.build_s, 4), "forward_fallback": s.forward.fallback or None,
            "created_ms": m.created_ms,
            "watermark_ms": m.watermark_ms, "served_at_ms": int(s.served_at * 1000),
            "data_age_s": round(self._data_age(), 3), "samples_trained": m.samples_trained,
            "arch": m.config.arch.value, "size": m.config.size.value, "pinned": pinned,
            "refused": {str(v): r for v, r in sorted(self.refused.items())},
        })

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """Every error as JSON ``{"error": ...}``, and every response counted by endpoint and status."""
        endpoint = request.match_info.route.name or "other"
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = self._json({"error": exc.message}, exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = self._json({"error": f"{exc.reason}: {request.method} {request.path}" +
                                   (f" (allowed: {', '.join(sorted(exc.allowed_methods))})"  # type: ignore[attr-defined]
                                    if exc.status == 405 else "")}, exc.status)
        except Exception:
            log.exception("ranking request failed")
            response = self._json({"error": "internal error while ranking; see the scorer's log"}, 500)
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        return response

    async def _lifespan(self, app: web.Application) -> AsyncIterator[None]:
        if self._state is None:
            self._state = LiveState.from_url(self.config.redis_url, self.config.state)
        self._items = ItemCache(self._state, self.spec, refresh_s=self.config.item_refresh_s,
                                on_refresh=self.metrics.item_refresh_seconds.observe)
        self.metrics.item_cache_age.set_function(self._items.age_s)
        config = self._state.cfg
        self._items.start(lambda: LiveState.from_url(self.config.redis_url, config))
        self._watcher = asyncio.create_task(self._watch(), name="zenith-model-watcher")
        yield
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher
        await asyncio.get_running_loop().run_in_executor(None, self._items.stop)
        if self._own_state and self._state is not None:
            await self._state.aclose()
            self._state = None

    def app(self) -> web.Application:
        # client_max_size: aiohttp itself refuses bodies over the limit even without a Content-Length.
        app = web.Application(middlewares=[self._errors], client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/rank", self.handle_rank, name="rank")
        app.router.add_get("/healthz", self.handle_healthz, name="healthz")
        app.router.add_get("/v1/model", self.handle_model, name="model")
        app.router.add_get("/metrics", self.handle_metrics, name="metrics")
        app.cleanup_ctx.append(self._lifespan)
        app.on_shutdown.append(self._shutdown_pools)
        return app

    async def _shutdown_pools(self, app: web.Application) -> None:
        self._infer.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """Nice the calling thread (Linux schedules threads individually; elsewhere this is a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)


def build_app(config: ScorerConfig, on_swap: Callable[[Serving, Serving | None], None] | None = None,
              on_ready: Callable[[], None] | None = None, torch_threads: int | None = None
              ) -> tuple[web.Application, Scorer]:
    """The process-wide set-up a scoring process needs, then its app (``run`` serves it; so does a worker
    of ``zenith serve --workers N`` on its own socket)."""
    threads = torch_threads or config.torch_threads
    if threads:
        torch.set_num_threads(threads)
    scorer = Scorer(config, on_swap=[on_swap] if on_swap else None)
    app = scorer.app()
    if on_ready is not None:
        async def _ready(_: web.Application) -> None:
            on_ready()
        app.on_startup.append(_ready)
    return app, scorer


def run(config: ScorerConfig, on_swap: Callable[[Serving, Serving | None], None] | None = None,
        on_ready: Callable[[], None] | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM)."""
    app, _ = build_app(config, on_swap, on_ready)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None, handle_signals=True)
