"""Live state in Redis, in domain terms: record what happened, read what was known at a moment.

Key schema (``prefix`` defaults to ``zl:``)::

    ev:{event_id}     dedup marker (SET NX): a replayed event changes nothing
    u:{user}          hash of user counters         u:{user}:log   increments log (zset by event time)
    u:{user}:seq      zset of the user's recent enters/watches, member "kind|room|author|secs|id"
    r:{room}          hash of room counters + meta  r:{room}:log   increments log
    a:{author}        hash of author counters       a:{author}:log increments log

Why the increment logs: Kafka topics are consumed independently, so an engagement that happened after an
impression can reach Redis before the impression is processed (or again, after a restart). Reads are
therefore *as of* a time: a counter is its total minus the logged increments at or after that time, and
the sequence is read strictly before it. Approximation, stated: logs keep ``asof_keep_ms`` of history, so
point-in-time reads are exact for events processed up to that long out of order.

Every event's writes run in one Lua script (atomic, idempotent by event id); a batch of events and a
batch of reads each go to Redis in one pipelined round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis

ROOM_META = ("author", "category", "title", "start_ms", "end_ms")


@dataclass(frozen=True)
class RedisAuth:
    """Credentials and TLS for the Redis connection (typed here, filled from ``deploy/config.py``).

    Explicit settings win over anything in the URL; ``tls`` turns ``redis://`` into ``rediss://``.
    """

    username: str | None = None  # Redis 6 ACL user (None: the default user)
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def __post_init__(self) -> None:
        if not self.tls and (self.tls_ca_file or self.tls_cert_file or self.tls_key_file):
            raise ValueError("Redis TLS files are set but TLS is off: set ZENITH_REDIS_TLS=true")

    def url(self, url: str) -> str:
        return "rediss://" + url.removeprefix("redis://") if self.tls and url.startswith("redis://") else url

    def client_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.username is not None:
            out["username"] = self.username
        if self.password is not None:
            out["password"] = self.password
        if self.tls:
            out |= {k: v for k, v in (("ssl_ca_certs", self.tls_ca_file), ("ssl_certfile", self.tls_cert_file),
                                      ("ssl_keyfile", self.tls_key_file)) if v}
        return out


@dataclass(frozen=True)
class StateConfig:
    prefix: str = "zl:"
    dedup_ttl_s: int = 24 * 3600
    user_ttl_s: int = 7 * 24 * 3600  # idle users' state expires
    room_ttl_s: int = 6 * 3600  # refreshed by every room event while it is live
    ended_room_ttl_s: int = 3600  # an ended room lingers for late impressions, then goes
    author_ttl_s: int = 30 * 24 * 3600
    asof_keep_ms: int = 3600 * 1000
    history_cap: int = 64  # user sequence entries kept (enters and watches)
    # A dead server must fail a call fast (callers retry or answer 503), not hang it.
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    auth: RedisAuth = field(default_factory=RedisAuth)


@dataclass(frozen=True)
class Write:
    """One event's state change, ready for the Lua script. Built by ``LiveState.record_*``."""

    keys: tuple[str, ...]
    args: bytes


@dataclass(frozen=True)
class HistoryItem:
    ts_ms: int
    kind: str  # "enter" | "watch"
    room: str
    author: str
    category: str
    watch_s: float


@dataclass
class Snapshot:
    """What was known about a (user, room, author) at ``as_of_ms``: counters with later increments removed."""

    as_of_ms: int
    user: dict[str, float] = field(default_factory=dict)
    history: list[HistoryItem] = field(default_factory=list)  # newest first, strictly before as_of_ms
    room: dict[str, float] = field(default_factory=dict)
    room_meta: dict[str, str] = field(default_factory=dict)
    author: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AsOf:
    user: str
    room: str
    author: str
    as_of_ms: int


class LiveState:
    """Typed writes and reads over Redis. Knows nothing about Kafka or event classes."""

    def __init__(self, client: aioredis.Redis, config: StateConfig | None = None) -> None:
        self.r = client
        self.cfg = config or StateConfig()
        lua = resources.files("state").joinpath("lua/apply.lua").read_text()
        self._apply = client.register_script(lua)

    @classmethod
    def from_url(cls, url: str, config: StateConfig | None = None) -> LiveState:
        config = config or StateConfig()
        return cls(aioredis.from_url(config.auth.url(url), socket_timeout=config.socket_timeout_s,
                                     socket_connect_timeout=config.connect_timeout_s, **config.auth.client_kwargs()),
                   config)

    async def aclose(self) -> None:
        await self.r.aclose()

    # ---- keys ----------------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return self.cfg.prefix + ":".join(parts)

    # ---- writes (pure: build a Write; `apply` sends them) -------------------------------------------
    def record_impression(self, event_id: str, ts_ms: int, user: str, room: str, author: str,
                          category: str) -> Write:
        c = self.cfg
        room_set = {"author": author, "category": category} if category else {"author": author}
        return self._write(event_id, ts_ms, [
            ("u", user, c.user_ttl_s, {"impressions": 1}, {}),
            ("r", room, c.room_ttl_s, {"impressions": 1}, room_set),
        ])

    def record_enter(self, event_id: str, ts_ms: int, user: str, room: str, author: str) -> Write:
        c = self.cfg
        return self._write(event_id, ts_ms, [
            ("u", user, c.user_ttl_s, {"enters": 1}, {}),
            ("r", room, c.room_ttl_s, {"enters": 1, "audience": 1}, {}),
            ("a", author, c.author_ttl_s, {"enters": 1}, {}),
        ], seq=(user, f"enter|{room}|{author}|0|{event_id}"))

    def record_watch(self, event_id: str, ts_ms: int, user: str, room: str, author: str,
                     seconds: float) -> Write:
        c = self.cfg
        return self._write(event_id, ts_ms, [
            ("u", user, c.user_ttl_s, {"watch_s": seconds, "watches": 1}, {}),
            ("r", room, c.room_ttl_s, {"watch_s": seconds, "watches": 1, "audience": -1}, {}),
            ("a", author, c.author_ttl_s, {"watch_s": seconds, "watches": 1}, {}),
        ], seq=(user, f"watch|{room}|{author}|{seconds}|{event_id}"))

    def record_interaction(self, event_id: str, ts_ms: int, user: str, room: str, author: str,
                           what: str, value: float = 1.0) -> Write:
        """Likes, comments, follows, gifts: counted on the user, the room and (follows) the author."""
        c = self.cfg
        counter = {"like": "likes", "comment": "comments", "follow": "follows", "gift": "gifts"}[what]
        room_incr: dict[str, float] = {counter: 1}
        if what == "gift":
            room_incr["gift_value"] = value
        targets = [("u", user, c.user_ttl_s, {counter: 1}, {}), ("r", room, c.room_ttl_s, room_incr, {})]
        if what == "follow" and author:
            targets.append(("a", author, c.author_ttl_s, {"followers": 1}, {}))
        return self._write(event_id, ts_ms, targets)

    def start_room(self, event_id: str, ts_ms: int, room: str, author: str, category: str,
                   title: str) -> Write:
        c = self.cfg
        meta = {"author": author, "category": category, "title": title, "start_ms": ts_ms}
        return self._write(event_id, ts_ms, [
            ("r", room, c.room_ttl_s, {}, meta),
            ("a", author, c.author_ttl_s, {"rooms": 1}, {}),
        ])

    def end_room(self, event_id: str, ts_ms: int, room: str, author: str) -> Write:
        c = self.cfg
        return self._write(event_id, ts_ms, [
            ("r", room, c.ended_room_ttl_s, {}, {"author": author, "end_ms": ts_ms}),
        ])

    def _write(self, event_id: str, ts_ms: int,
               targets: Sequence[tuple[str, str, int, dict[str, float], dict[str, Any]]],
               seq: tuple[str, str] | None = None) -> Write:
        keys = [self._k("ev", event_id)]
        specs = []
        for kind, ident, ttl, incr, sets in targets:
            if not ident:
                continue  # e.g. an engagement without author id: nothing to count there
            keys += [self._k(kind, ident), self._k(kind, ident, "log")]
            specs.append({"h": len(keys) - 1, "log": len(keys), "ttl": ttl, "incr": incr or {},
                          "set": {k: str(v) for k, v in sets.items()} or {}})
        body: dict[str, Any] = {"dedup_ttl": self.cfg.dedup_ttl_s, "ts": ts_ms, "id": event_id,
                                "keep_ms": self.cfg.asof_keep_ms, "targets": specs}
        if seq is not None:
            user, member = seq
            keys.append(self._k("u", user, "seq"))
            body["seq"] = {"key": len(keys), "member": member, "cap": self.cfg.history_cap, "ttl": self.cfg.user_ttl_s}
        # cjson turns an empty Python dict into an empty table either way; JSON arrays stay arrays.
        return Write(tuple(keys), orjson.dumps(body))

    async def apply(self, writes: Sequence[Write]) -> list[bool]:
        """Run each write atomically; the batch in one pipelined round trip. True = applied, False = replay."""
        if not writes:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for w in writes:
                await self._apply(keys=list(w.keys), args=[w.args], client=pipe)
            return [bool(x) for x in await pipe.execute()]

    # ---- reads ---------------------------------------------------------------------------------------
    async def read(self, queries: Sequence[AsOf]) -> list[Snapshot]:
        """Snapshots as of each query's time, all in one pipelined round trip (7 commands per query)."""
        if not queries:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for q in queries:
                after = q.as_of_ms  # increments at or after as_of are removed
                pipe.hgetall(self._k("u", q.user))
                pipe.zrangebyscore(self._k("u", q.user, "log"), after, "+inf")
                pipe.zrevrangebyscore(self._k("u", q.user, "seq"), f"({after}", "-inf", start=0,
                                      num=self.cfg.history_cap, withscores=True)
                pipe.hgetall(self._k("r", q.room))
                pipe.zrangebyscore(self._k("r", q.room, "log"), after, "+inf")
                pipe.hgetall(self._k("a", q.author))
                pipe.zrangebyscore(self._k("a", q.author, "log"), after, "+inf")
            raw = await pipe.execute()
        out = []
        for i, q in enumerate(queries):
            u, ulog, useq, r, rlog, a, alog = raw[7 * i : 7 * i + 7]
            room_meta = {k.decode(): v.decode() for k, v in r.items() if k.decode() in ROOM_META}
            out.append(Snapshot(
                as_of_ms=q.as_of_ms,
                user=_as_of(u, ulog),
                history=[_history_item(m, s) for m, s in useq],
                room=_as_of({k: v for k, v in r.items() if k.decode() not in ROOM_META}, rlog),
                room_meta=room_meta,
                author=_as_of(a, alog),
            ))
        await self._fill_categories(out)
        return out

    async def read_for_ranking(self, user: str, candidates: Sequence[tuple[str, str]], as_of_ms: int
                               ) -> list[Snapshot]:
        """``read`` for one user against many (room, author) candidates, with each key read once: the user's
        3 commands, then 2 per distinct room and 2 per distinct author, in one pipelined round trip.
        Equal to ``read([AsOf(user, room, author, as_of_ms) ...])`` (tests/test_scorer.py checks it)."""
        rooms = sorted({r for r, _ in candidates if r})
        authors = sorted({a for _, a in candidates if a})
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._k("u", user))
            pipe.zrangebyscore(self._k("u", user, "log"), as_of_ms, "+inf")
            pipe.zrevrangebyscore(self._k("u", user, "seq"), f"({as_of_ms}", "-inf", start=0,
                                  num=self.cfg.history_cap, withscores=True)
            for kind, ids in (("r", rooms), ("a", authors)):
                for ident in ids:
                    pipe.hgetall(self._k(kind, ident))
                    pipe.zrangebyscore(self._k(kind, ident, "log"), as_of_ms, "+inf")
            raw = await pipe.execute()
        u, ulog, useq = raw[:3]
        pairs = iter(zip(raw[3::2], raw[4::2], strict=True))
        room_part = {}
        for room in rooms:
            r, rlog = next(pairs)
            room_part[room] = (_as_of({k: v for k, v in r.items() if k.decode() not in ROOM_META}, rlog),
                               {k.decode(): v.decode() for k, v in r.items() if k.decode() in ROOM_META})
        author_part = {a: _as_of(*next(pairs)) for a in authors}
        user_vals, history = _as_of(u, ulog), [_history_item(m, sc) for m, sc in useq]
        probe = Snapshot(as_of_ms, history=history)
        await self._fill_categories([probe])
        out = []
        for room, author in candidates:
            counters, meta = room_part.get(room, ({}, {}))
            out.append(Snapshot(as_of_ms=as_of_ms, user=user_vals, history=probe.history, room=counters,
                                room_meta=meta, author=author_part.get(author, {})))  # shared, read-only
        return out

    async def _fill_categories(self, snaps: list[Snapshot]) -> None:
        """History rooms' categories, looked up at read time in one more round trip. (Resolving them when
        the engagement is written would depend on whether the room's start event was processed first.)"""
        rooms = sorted({h.room for s in snaps for h in s.history})
        if not rooms:
            return
        async with self.r.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.hget(self._k("r", room), "category")
            cats = {room: (c or b"").decode() for room, c in zip(rooms, await pipe.execute(), strict=True)}
        for s in snaps:
            s.history = [replace(h, category=cats[h.room]) for h in s.history]


def _as_of(totals: dict[bytes, bytes], later_increments: list[bytes]) -> dict[str, float]:
    values = {k.decode(): float(v) for k, v in totals.items()}
    for entry in later_increments:
        for part in entry.split(b"|", 1)[1].split(b","):
            name, delta = part.split(b":")
            values[name.decode()] = values.get(name.decode(), 0.0) - float(delta)
    # Float increments (watch seconds) leave 1e-13 residues after subtraction; they are not signal.
    return {k: round(v, 6) for k, v in values.items()}


def _history_item(member: bytes, score: float) -> HistoryItem:
    kind, room, author, secs, _ = member.decode().split("|")
    return HistoryItem(int(score), kind, room, author, "", float(secs))
