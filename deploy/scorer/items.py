"""Room and author state shared by every request: read once, refreshed in the background, not per request.

Every feed request asks about the same few thousand live rooms, so reading each candidate's room and author
from Redis per request is the same work done hundreds of times a second. ``ItemCache`` holds one snapshot of
every room and author a request named in the last ``idle_s`` seconds, and re-reads all of them every
``refresh_s`` seconds (pipelined, in chunks so the event loop is never held for long). A request then reads
only its user from Redis; a room or author seen for the first time is read in the request's own round trip
and joins the cache.

Staleness: a cached snapshot is the state as of its last refresh, so a request sees room/author counters at
most ``refresh_s`` plus one refresh's duration old (``zenith_scorer_item_cache_age_seconds`` exports the age
of the snapshot a request used; the bound is the config's ``item_refresh_s``, 1 s at most). Why a periodic
re-read rather than the stream pushing changes (pub/sub, keyspace notifications, a compacted topic): at
live-streaming rates nearly every live room changes every second, so a push would carry about as much as a
re-read, and would add a second delivery path whose gaps (a dropped subscription, a restart) go unnoticed;
a re-read cannot miss anything and its staleness is bounded by construction.

Requests about another time than now (``context.ts_ms`` further than the bound from the refresh: replays,
backtests) bypass the cache and read as of their own time, exactly as the stream does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from model.spec import FeatureSpec
from state.store import LiveState, Snapshot
from stream.features import ItemSide, item_side

READ_CHUNK = 500  # entities per pipelined refresh read: a few ms of event-loop time each


@dataclass
class _Generation:
    """One refresh's snapshots, as of ``as_of_ms``. Built whole, then swapped in by one assignment."""

    as_of_ms: int
    rooms: dict[str, Snapshot] = field(default_factory=dict)  # room, room_meta filled
    authors: dict[str, dict[str, float]] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)  # room -> category
    sides: dict[tuple[str, str, str], ItemSide] = field(default_factory=dict)  # built on first use


@dataclass(frozen=True)
class ItemLookup:
    items: list[ItemSide]
    hits: int  # candidates whose room and author were both cached
    misses: int
    age_s: float  # age of the cached snapshot used (0 when the request read everything itself)


class ItemCache:
    """``lookup(rooms, authors, categories, ts_ms)`` -> each candidate's ``ItemSide``; ``run()`` refreshes."""

    def __init__(self, state: LiveState, spec: FeatureSpec, refresh_s: float = 0.5, idle_s: float = 120.0) -> None:
        self.state, self.spec, self.refresh_s, self.idle_s = state, spec, refresh_s, idle_s
        self.current = _Generation(as_of_ms=0)
        self._used_rooms: dict[str, float] = {}  # room -> last request time (monotonic s)
        self._used_authors: dict[str, float] = {}
        self.refreshes = 0

    @property
    def bound_ms(self) -> float:
        return 1000 * 2 * self.refresh_s  # a refresh's own duration is well under its interval

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
        sides, spec, items = gen.sides, self.spec, []
        for room, author, category in zip(rooms, authors, categories, strict=True):
            side = sides.get((room, author, category))
            if side is None:
                snap = gen.rooms[room]
                if author or snap.room_meta.get("author"):
                    snap = Snapshot(as_of_ms=snap.as_of_ms, room=snap.room, room_meta=snap.room_meta,
                                    author=gen.authors.get(author or snap.room_meta.get("author", ""), {}))
                side = sides[(room, author, category)] = item_side(spec, room, author, category, snap)
            items.append(side)
        return ItemLookup(items, hits=len(rooms) - misses if cached else 0, misses=misses if cached else len(rooms),
                          age_s=self.age_s() if cached else 0.0)

    async def _read_into(self, gen: _Generation, rooms: list[str], authors: list[str], as_of_ms: int) -> None:
        room_snaps, author_counters = await self.state.read_items(rooms, authors, as_of_ms)
        for room, snap in zip(rooms, room_snaps, strict=True):
            gen.rooms[room] = snap
            gen.categories[room] = snap.room_meta.get("category", "")
        gen.authors.update(zip(authors, author_counters, strict=True))
        # A room's own author (a candidate may leave author_id empty) is needed too.
        extra = [a for a in dict.fromkeys(s.room_meta.get("author", "") for s in room_snaps)
                 if a and a not in gen.authors]
        if extra:
            gen.authors.update(zip(extra, (await self.state.read_items([], extra, as_of_ms))[1], strict=True))

    async def refresh(self) -> None:
        """Re-read every room and author used in the last ``idle_s`` seconds, then swap the new snapshot in."""
        now = time.monotonic()
        for used in (self._used_rooms, self._used_authors):
            for key in [k for k, t in used.items() if now - t > self.idle_s]:
                del used[key]  # ended rooms stop being refreshed
        gen = _Generation(as_of_ms=int(time.time() * 1000))
        rooms, authors = list(self._used_rooms), list(self._used_authors)
        for lo in range(0, max(len(rooms), len(authors)), READ_CHUNK):
            await self._read_into(gen, rooms[lo:lo + READ_CHUNK], authors[lo:lo + READ_CHUNK], gen.as_of_ms)
            await asyncio.sleep(0)  # let requests in between chunks
        self.current = gen
        self.refreshes += 1
