"""Room and author state shared by every request: read once, refreshed in the background, not per request.

Every feed request asks about the same few thousand live rooms, so reading each candidate's room and author
from Redis per request is the same work done hundreds of times a second. ``ItemCache`` holds one snapshot of
every room and author a request named in the last ``idle_s`` seconds, and re-reads all of them every
``refresh_s`` seconds, together with each candidate's ``ItemSide`` (its part of the features). The re-read
runs on its own thread with its own Redis connection: parsing a few thousand entities is tens of ms of
Python, which on the event loop would stall every request in flight (it did: p99 several times p50). A
request then reads only its user from Redis; a room or author seen for the first time is read in the
request's own round trip and joins the cache.

Staleness: a cached snapshot is the state as of its last refresh, so a request sees room/author counters
``refresh_s`` (0.5 s) plus one refresh's duration old at most, and never older than ``bound_ms`` (1 s): past
that (Redis slow or down, the refresher behind) requests read their candidates themselves, which is slow
(all of a request's rooms parsed on the event loop), so the interval leaves a refresh half a second to land.
``zenith_scorer_item_cache_age_seconds`` exports the snapshot's age. Why a periodic
re-read rather than the stream pushing changes (pub/sub, keyspace notifications, a compacted topic): at
live-streaming rates nearly every live room changes every second, so a push would carry about as much as a
re-read, and would add a second delivery path whose gaps (a dropped subscription, a restart) go unnoticed;
a re-read cannot miss anything and its staleness is bounded by construction.

Requests about another time than now (``context.ts_ms`` further than the bound from the refresh: replays,
backtests) bypass the cache and read as of their own time, exactly as the stream does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from model.spec import FeatureSpec
from state.store import LiveState, Snapshot
from stream.features import ItemSide, item_side

log = logging.getLogger("zenith.scorer")

# A refresh is tens of ms of Python for a few thousand rooms. In one piece it holds the GIL long enough to
# stall the event loop (each of a request's many GIL hand-backs waits): it was the scorer's p99 (3x p50).
# In chunks with a pause between them, a request waits for a chunk at most.
READ_CHUNK = 100  # entities per read (one script call each)
CHUNK_PAUSE_S = 0.004


@dataclass
class _Generation:
    """One refresh's snapshots, as of ``as_of_ms``. Built whole, then swapped in by one assignment."""

    as_of_ms: int
    rooms: dict[str, Snapshot] = field(default_factory=dict)  # room, room_meta filled
    authors: dict[str, dict[str, float]] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)  # room -> category
    sides: dict[tuple[str, str, str], ItemSide] = field(default_factory=dict)  # (room, author, category) asked


@dataclass(frozen=True)
class ItemLookup:
    items: list[ItemSide]
    hits: int  # candidates whose room and author were both cached
    misses: int


class ItemCache:
    """``lookup(rooms, authors, categories, ts_ms)`` -> each candidate's ``ItemSide``.

    ``start(open_state)`` runs the refresher thread (``open_state()`` gives it its own ``LiveState``);
    ``stop()`` ends it. ``state`` is the event loop's, for the misses a request reads itself.
    """

    bound_ms = 1000.0  # a snapshot older than this is not used: requests read for themselves instead

    def __init__(self, state: LiveState, spec: FeatureSpec, refresh_s: float = 0.5, idle_s: float = 120.0,
                 on_refresh: Callable[[float], None] | None = None) -> None:
        self.state, self.spec, self.refresh_s, self.idle_s = state, spec, refresh_s, idle_s
        self.current = _Generation(as_of_ms=0)  # replaced whole by the refresher; read once per request
        # Written by the event loop, read by the refresher: single dict operations are atomic under the GIL.
        self._used_rooms: dict[str, float] = {}  # room -> last request time (monotonic s)
        self._used_authors: dict[str, float] = {}
        self.refreshes = 0
        self._on_refresh = on_refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, open_state: Callable[[], LiveState]) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._refresh_loop(open_state),),
                                        name="zenith-item-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _refresh_loop(self, open_state: Callable[[], LiveState]) -> None:
        state, last_error = open_state(), ""
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    await self.refresh(state)
                    if self._on_refresh is not None:
                        self._on_refresh(time.perf_counter() - t0)
                    last_error = ""
                except Exception as exc:  # Redis down or restarting: retried every interval, logged once
                    if str(exc) != last_error:
                        log.warning("room/author cache refresh failed: %s (retrying every %.1fs; requests read "
                                    "for themselves meanwhile)", exc, self.refresh_s)
                        last_error = str(exc)
                await asyncio.sleep(max(self.refresh_s - (time.perf_counter() - t0), 0.0))
        finally:
            await state.aclose()

    def age_s(self) -> float:
        return max(time.time() - self.current.as_of_ms / 1000, 0.0) if self.current.as_of_ms else float("nan")

    def categories(self) -> dict[str, str]:
        """Room -> category for every cached room (a user's history needs them; they never change). Read-only."""
        return self.current.categories

    async def lookup(self, rooms: Sequence[str], authors: Sequence[str], categories: Sequence[str],
                     ts_ms: int) -> ItemLookup:
        if abs(ts_ms - time.time() * 1000) <= self.bound_ms:  # a request about now: its items are live
            now = time.monotonic()
            for room in rooms:
                self._used_rooms[room] = now
            for author in authors:
                if author:
                    self._used_authors[author] = now
        gen = self.current
        cached = bool(gen.as_of_ms) and abs(ts_ms - gen.as_of_ms) <= self.bound_ms
        if not cached:
            gen = _Generation(as_of_ms=ts_ms)  # no snapshot of that time: read as of ts, keep nothing
        missing_rooms = [r for r in dict.fromkeys(rooms) if r not in gen.rooms]
        missing_authors = [a for a in dict.fromkeys(authors) if a and a not in gen.authors]
        if missing_rooms or missing_authors:
            await self._read_into(gen, missing_rooms, missing_authors, gen.as_of_ms)
        misses = 0
        if cached:
            lost_rooms, lost_authors = set(missing_rooms), set(missing_authors)
            misses = sum(1 for r, a in zip(rooms, authors, strict=True) if r in lost_rooms or a in lost_authors)
        sides, items = gen.sides, []
        for key in zip(rooms, authors, categories, strict=True):
            side = sides.get(key) or self._side(gen, *key)
            assert side is not None, "every candidate's room was read above"
            items.append(side)
        return ItemLookup(items, hits=len(rooms) - misses if cached else 0, misses=misses if cached else len(rooms))

    async def _read_into(self, gen: _Generation, rooms: list[str], authors: list[str], as_of_ms: int,
                         state: LiveState | None = None) -> None:
        state = state or self.state
        room_snaps, author_counters = await state.read_items(rooms, authors, as_of_ms)
        for room, snap in zip(rooms, room_snaps, strict=True):
            gen.rooms[room] = snap
            gen.categories[room] = snap.room_meta.get("category", "")
        gen.authors.update(zip(authors, author_counters, strict=True))
        # A room's own author (a candidate may leave author_id empty) is needed too.
        extra = [a for a in dict.fromkeys(s.room_meta.get("author", "") for s in room_snaps)
                 if a and a not in gen.authors]
        if extra:
            gen.authors.update(zip(extra, (await state.read_items([], extra, as_of_ms))[1], strict=True))

    async def refresh(self, state: LiveState | None = None) -> None:
        """Re-read every room and author used in the last ``idle_s`` seconds, rebuild the candidates' parts
        asked for last time, then swap the new snapshot in."""
        now = time.monotonic()
        for used in (self._used_rooms, self._used_authors):
            for key in [k for k, t in list(used.items()) if now - t > self.idle_s]:
                used.pop(key, None)  # ended rooms stop being refreshed
        old, gen = self.current, _Generation(as_of_ms=int(time.time() * 1000))
        rooms, authors = list(self._used_rooms), list(self._used_authors)
        for lo in range(0, max(len(rooms), len(authors)), READ_CHUNK):
            await self._read_into(gen, rooms[lo:lo + READ_CHUNK], authors[lo:lo + READ_CHUNK], gen.as_of_ms, state)
            await asyncio.sleep(CHUNK_PAUSE_S)
        keys = list(old.sides)
        for lo in range(0, len(keys), READ_CHUNK):
            for key in keys[lo:lo + READ_CHUNK]:
                self._side(gen, *key)
            await asyncio.sleep(CHUNK_PAUSE_S)
        self.current = gen
        self.refreshes += 1

    def _side(self, gen: _Generation, room: str, author: str, category: str) -> ItemSide | None:
        """The candidate's part from ``gen`` (built once per generation); None if its room is not in ``gen``."""
        side = gen.sides.get((room, author, category))
        if side is None:
            snap = gen.rooms.get(room)
            if snap is None:
                return None
            own = author or snap.room_meta.get("author", "")
            if own:
                snap = Snapshot(as_of_ms=snap.as_of_ms, room=snap.room, room_meta=snap.room_meta,
                                author=gen.authors.get(own, {}))
            side = gen.sides[(room, author, category)] = item_side(self.spec, room, author, category, snap)
        return side
