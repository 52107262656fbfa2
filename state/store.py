"""Live state in Redis, in domain terms: record what happened, read what was known at a moment.

Key schema (``prefix`` defaults to ``zl:``; the braces are Redis Cluster hash tags, so all keys of one user,
room or author live in one slot and each atomic step touches one slot)::

    {u:<user>}        hash of user counters          {u:<user>}:log   bucketed increments (zset by time,
                                                                      member "<tag>|{json increments}")
    {u:<user>}:seq    zset of the user's recent enters/watches, member "kind|room|author|secs|id"
    {r:<room>}        hash of room counters + meta   {r:<room>}:log
    {a:<author>}      hash of author counters        {a:<author>}:log
    pos               hash "pos:<topic>/<partition>" -> the last input offset applied (one Redis)

**Idempotent by position, not by event.** Writes carry the input position (topic/partition, offset) of the
event that made them. A batch's writes and the positions they cover are applied in one Lua call, all or
nothing; a call that covers offsets already applied is refused and resent without them, so a redelivered
batch (also one cut at other boundaries) changes nothing, and the dedup memory is one field per input
partition, not one key per event. On Redis Cluster a call cannot span slots: the writes are grouped per
entity and each entity's hash keeps its own ``pos:`` fields (a few per entity, expiring with it). Events a
producer really sent twice (same id, new offset) are not caught here: the stream's id guard
(``StreamProcessor.admit``) drops them before they are written.

**Batch-level work.** Within a call, increments are merged per key (one HINCRBYFLOAT per key and field, one
EXPIRE per key), so Redis work grows with the distinct users, rooms and authors of a batch rather than its
events; a batch of events is one pipelined round trip.

**Point in time, bucketed.** Kafka topics are consumed independently, so an engagement that happened after
an impression can reach Redis before the impression's window closes. Reads are therefore *as of* a time: a
counter is its total minus the logged increments after it. The logs hold increments merged per
``log_bucket_ms`` time bucket, scored by the bucket's end, so a read as of ``t`` sees exactly the increments
of events before ``bucket_start(t)`` (the start of t's bucket), whatever the batching: the approximation is
that up to one bucket of the most recent history is left out, never anything from the future
(tests/test_state_store.py checks the bound). Logs keep ``asof_keep_ms`` of history, so point-in-time reads are
exact (to the bucket) for events processed up to that long out of order. Histories are exact (one entry per
enter/watch, strictly before ``t``).
"""

from __future__ import annotations

import enum
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import redis.asyncio as aioredis

from state.scripts import LuaScript

ROOM_META = ("author", "category", "title", "start_ms", "end_ms")
TRIM_EVERY = 8  # logs are trimmed to asof_keep_ms on about one write in this many
POSITION_FIELD = "pos:"  # prefix of the position fields ("pos:<topic>/<partition>"); never a counter


class Entity(enum.StrEnum):
    USER = "u"
    ROOM = "r"
    AUTHOR = "a"


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
    user_ttl_s: int = 7 * 24 * 3600  # idle users' state expires
    room_ttl_s: int = 6 * 3600  # refreshed by every room event while it is live
    ended_room_ttl_s: int = 3600  # an ended room lingers for late impressions, then goes
    author_ttl_s: int = 30 * 24 * 3600
    asof_keep_ms: int = 3600 * 1000
    log_bucket_ms: int = 1000  # increments logged per bucket of this width (see the module docstring)
    history_cap: int = 64  # user sequence entries kept (enters and watches)
    events_per_call: int = 2000  # one Lua call blocks Redis for its duration: a few ms at most
    cluster: bool | None = None  # Redis Cluster: None asks the server (INFO cluster) on connect
    # A dead server must fail a call fast (callers retry or answer 503), not hang it.
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    auth: RedisAuth = field(default_factory=RedisAuth)

    def __post_init__(self) -> None:
        if self.log_bucket_ms <= 0 or self.asof_keep_ms < self.log_bucket_ms:
            raise ValueError("log_bucket_ms must be > 0 and at most asof_keep_ms")


# Target and Change are built for every event of the stream: slotted, not frozen (a frozen dataclass pays an
# object.__setattr__ per field), and treated as immutable all the same.
@dataclass(slots=True)
class Target:
    """What one event changes on one user, room or author."""

    entity: Entity
    ident: str
    ttl_s: int
    incr: dict[str, float] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Change:
    """One event's state change (pure). Built by ``LiveState.record_*``, applied by ``LiveState.apply``."""

    ts_ms: int
    targets: tuple[Target, ...]
    history: tuple[str, str] | None = None  # (user, sequence member) for enters and watches


@dataclass(frozen=True)
class Position:
    """Where an event sits in its input: ``source`` is "topic/partition"; offsets grow within a source."""

    source: str
    offset: int


UNPOSITIONED = Position("", 0)
"""For writes with no input position (tools, seeding): always applied, never recognised as replays."""


@dataclass(frozen=True)
class ApplyReport:
    applied: int = 0  # events applied
    replayed: int = 0  # events skipped because their position had been applied before


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
    """Typed writes and reads over Redis (one server or a Cluster). Knows nothing about Kafka or event classes."""

    def __init__(self, client: Any, config: StateConfig | None = None, *, cluster: bool = False) -> None:
        self.r = client
        self.cfg = config or StateConfig()
        self.cluster = cluster
        self._apply = LuaScript(client, "apply_batch.lua")
        self._read_many = LuaScript(client, "read_many.lua")
        self._rng = random.Random(0)

    @classmethod
    def from_url(cls, url: str, config: StateConfig | None = None) -> LiveState:
        """A client for ``url``: a single server, or (``config.cluster``, or asked when None) a Redis Cluster
        reached through any of its nodes."""
        config = config or StateConfig()
        url = config.auth.url(url)
        kwargs = dict(socket_timeout=config.socket_timeout_s, socket_connect_timeout=config.connect_timeout_s,
                      **config.auth.client_kwargs())
        cluster = config.cluster if config.cluster is not None else is_cluster(url, **kwargs)
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            return cls(RedisCluster.from_url(url, **kwargs), config, cluster=True)
        return cls(aioredis.from_url(url, **kwargs), config)

    async def aclose(self) -> None:
        await self.r.aclose()

    # ---- keys ----------------------------------------------------------------------------------------
    def key(self, entity: Entity, ident: str, suffix: str = "") -> str:
        return f"{self.cfg.prefix}{{{entity}:{ident}}}{suffix}"  # a StrEnum formats as its value

    @property
    def position_key(self) -> str:
        return self.cfg.prefix + "pos"

    # ---- writes (pure: build a Change; `apply` sends them) ------------------------------------------
    def record_impression(self, ts_ms: int, user: str, room: str, author: str, category: str) -> Change:
        c = self.cfg
        room_set = {"author": author, "category": category} if category else {"author": author}
        return Change(ts_ms, (Target(Entity.USER, user, c.user_ttl_s, {"impressions": 1}),
                              Target(Entity.ROOM, room, c.room_ttl_s, {"impressions": 1}, room_set)))

    def record_enter(self, event_id: str, ts_ms: int, user: str, room: str, author: str) -> Change:
        c = self.cfg
        return Change(ts_ms, (Target(Entity.USER, user, c.user_ttl_s, {"enters": 1}),
                              Target(Entity.ROOM, room, c.room_ttl_s, {"enters": 1, "audience": 1}),
                              Target(Entity.AUTHOR, author, c.author_ttl_s, {"enters": 1})),
                      history=(user, f"enter|{room}|{author}|0|{event_id}"))

    def record_watch(self, event_id: str, ts_ms: int, user: str, room: str, author: str,
                     seconds: float) -> Change:
        c = self.cfg
        return Change(ts_ms, (
            Target(Entity.USER, user, c.user_ttl_s, {"watch_s": seconds, "watches": 1}),
            Target(Entity.ROOM, room, c.room_ttl_s, {"watch_s": seconds, "watches": 1, "audience": -1}),
            Target(Entity.AUTHOR, author, c.author_ttl_s, {"watch_s": seconds, "watches": 1}),
        ), history=(user, f"watch|{room}|{author}|{seconds}|{event_id}"))

    def record_interaction(self, ts_ms: int, user: str, room: str, author: str, what: str,
                           value: float = 1.0) -> Change:
        """Likes, comments, follows, gifts: counted on the user, the room and (follows) the author."""
        c = self.cfg
        counter = {"like": "likes", "comment": "comments", "follow": "follows", "gift": "gifts"}[what]
        room_incr: dict[str, float] = {counter: 1}
        if what == "gift":
            room_incr["gift_value"] = value
        targets = [Target(Entity.USER, user, c.user_ttl_s, {counter: 1}),
                   Target(Entity.ROOM, room, c.room_ttl_s, room_incr)]
        if what == "follow":
            targets.append(Target(Entity.AUTHOR, author, c.author_ttl_s, {"followers": 1}))
        return Change(ts_ms, tuple(targets))

    def start_room(self, ts_ms: int, room: str, author: str, category: str, title: str) -> Change:
        c = self.cfg
        meta = {"author": author, "category": category, "title": title, "start_ms": str(ts_ms)}
        return Change(ts_ms, (Target(Entity.ROOM, room, c.room_ttl_s, {}, meta),
                              Target(Entity.AUTHOR, author, c.author_ttl_s, {"rooms": 1})))

    def end_room(self, ts_ms: int, room: str, author: str) -> Change:
        return Change(ts_ms, (Target(Entity.ROOM, room, self.cfg.ended_room_ttl_s, {},
                                     {"author": author, "end_ms": str(ts_ms)}),))

    async def apply(self, changes: Sequence[Change], positions: Sequence[Position] | None = None) -> ApplyReport:
        """Apply ``changes`` (in input order) atomically per call, skipping positions applied before.

        ``positions[i]`` is where ``changes[i]`` came from; None: unpositioned writes (always applied). All
        calls go in one pipelined round trip; a call whose range straddles its recorded offset (a batch
        redelivered with other boundaries after a restart) is resent with only the events after it.
        """
        if not changes:
            return ApplyReport()
        positions = positions or [UNPOSITIONED] * len(changes)
        if len(positions) != len(changes):
            raise ValueError(f"{len(changes)} changes but {len(positions)} positions")
        items = list(zip(positions, changes, strict=True))
        calls = [call for group in self._groups(items) for call in _chunks(group, self.cfg.events_per_call)]
        replayed: set[Position] = set()
        while calls:
            built = [self._build(marker, group) for marker, group in calls]
            results = await self._apply.run_many([(c.keys, [c.payload()]) for c in built])
            retry = []
            for (marker, group), call, res in zip(calls, built, results, strict=True):
                status, rest = int(res[0]), res[1:]
                if status == 1:
                    continue
                if status == -1:  # straddle: keep only that partition's events after its recorded offset
                    source, recorded = call.sources[int(rest[0]) - 1], int(rest[1])
                    done = {p for p, _ in group if p.source == source and p.offset <= recorded}
                else:  # 0: all applied before; -2: some were: resend the others
                    skipped = {call.sources[int(i) - 1] for i in rest}
                    done = {p for p, _ in group if p.source in skipped}
                replayed |= done
                if status != 0:
                    retry.append((marker, [(p, c) for p, c in group if p not in done]))
            calls = retry
        return ApplyReport(applied=len(changes) - len(replayed), replayed=len(replayed))

    def _groups(self, items: list[tuple[Position, Change]]) -> list[tuple[str, list[tuple[Position, Change]]]]:
        """Calls by atomic unit: the whole batch on one server; one per entity on a Cluster (the entity's hash
        holds its positions there)."""
        if not self.cluster:
            return [(self.position_key, items)]
        by_entity: dict[str, list[tuple[Position, Change]]] = defaultdict(list)
        for pos, change in items:
            for t in change.targets:
                if t.ident:
                    by_entity[self.key(t.entity, t.ident)].append((pos, Change(change.ts_ms, (t,))))
            if change.history is not None:
                user = self.key(Entity.USER, change.history[0])
                by_entity[user].append((pos, Change(change.ts_ms, (), change.history)))
        return list(by_entity.items())

    def _build(self, marker: str, group: list[tuple[Position, Change]]) -> _Call:
        """One call's payload: every key's changes merged (increments summed, log increments per time bucket)."""
        c = self.cfg
        call = _Call(marker)
        token = uuid.uuid4().hex[:12]  # makes unpositioned log members unique
        merged: dict[str, _Merged] = {}
        histories: dict[str, list[str]] = {}
        for n, (pos, change) in enumerate(group):
            call.cover(pos)
            tag = f"{pos.source}:{pos.offset}" if pos.source else f"~{token}:{n}"
            bucket_end = (change.ts_ms // c.log_bucket_ms + 1) * c.log_bucket_ms - 1
            for t in change.targets:
                if not t.ident:
                    continue  # e.g. an engagement without author id: nothing to count there
                key = self.key(t.entity, t.ident)
                m = merged.get(key)
                if m is None:
                    m = merged[key] = _Merged()
                m.add(t, bucket_end, tag, change.ts_ms)
            if change.history is not None:
                user, member = change.history
                histories.setdefault(self.key(Entity.USER, user, ":seq"), []).extend((str(change.ts_ms), member))
        for key, m in merged.items():
            # Trimming a log is a command of its own; a log trimmed on 1 write in TRIM_EVERY keeps a little more
            # than asof_keep_ms (reads select by time anyway) and saves most of them.
            floor = str(m.newest_ms - c.asof_keep_ms) if self._rng.random() < 1 / TRIM_EVERY else ""
            call.targets.append([call.index(key), str(m.ttl), m.flat_incr(), m.flat_sets(),
                                 call.index(key + ":log") if m.log else 0, m.flat_log(), floor])
        for key, entries in histories.items():
            call.histories.append([call.index(key), str(c.user_ttl_s), str(c.history_cap), entries])
        return call

    async def positions(self) -> dict[str, int]:
        """The last applied offset per input partition ("topic/partition"), as recorded with the writes (one
        server; on a Cluster positions live per entity and this returns {})."""
        if self.cluster:
            return {}
        raw = await self.r.hgetall(self.position_key)
        return {k.decode().removeprefix(POSITION_FIELD): int(v) for k, v in raw.items()}

    # ---- reads ---------------------------------------------------------------------------------------
    async def read(self, queries: Sequence[AsOf], categories: Mapping[str, str] | None = None) -> list[Snapshot]:
        """Snapshots as of each query's time, in one pipelined round trip (plus one for history categories
        that ``categories``, room -> category, does not already know).

        Each user, room and author is read once however many queries name it: its hash, its log from the
        earliest time asked, and (users) the whole capped history; each query then subtracts what came after
        its own time. Snapshots of the same (entity, time) share their dicts: treat them as read-only.
        """
        if not queries:
            return []
        times: dict[tuple[Entity, str], set[int]] = defaultdict(set)  # the times each entity is asked at
        for q in queries:
            for ent, ident in ((Entity.USER, q.user), (Entity.ROOM, q.room), (Entity.AUTHOR, q.author)):
                if ident:
                    times[(ent, ident)].add(q.as_of_ms)
        entities = list(times)
        async with self.r.pipeline(transaction=False) as pipe:
            for ent, ident in entities:
                pipe.hgetall(self.key(ent, ident))
                pipe.zrangebyscore(self.key(ent, ident, ":log"), min(times[(ent, ident)]), "+inf", withscores=True)
                if ent is Entity.USER:
                    pipe.zrange(self.key(ent, ident, ":seq"), 0, -1, withscores=True)
            raw = iter(await pipe.execute())
        counters: dict[tuple[Entity, str], dict[int, dict[str, float]]] = {}
        meta: dict[str, dict[str, str]] = {}
        seqs: dict[str, list[tuple[bytes, float]]] = {}
        for ent, ident in entities:
            totals, log = next(raw), next(raw)
            if ent is Entity.ROOM:
                meta[ident] = {f.decode(): v.decode() for f, v in totals.items() if f.decode() in ROOM_META}
            elif ent is Entity.USER:
                seqs[ident] = next(raw)
            counters[(ent, ident)] = _as_of_each(totals, log, times[(ent, ident)])
        histories: dict[tuple[str, int], list[HistoryItem]] = {}

        def history(user: str, as_of: int) -> list[HistoryItem]:
            if (user, as_of) not in histories:
                histories[(user, as_of)] = [_history_item(m, sc) for m, sc in reversed(seqs[user])
                                            if sc < as_of][: self.cfg.history_cap]
            return histories[(user, as_of)]

        out = []
        for q in queries:
            t = q.as_of_ms
            out.append(Snapshot(
                as_of_ms=t,
                user=counters[(Entity.USER, q.user)][t] if q.user else {},
                history=history(q.user, t) if q.user else [],
                room=counters[(Entity.ROOM, q.room)][t] if q.room else {},
                room_meta=meta[q.room] if q.room else {},
                author=counters[(Entity.AUTHOR, q.author)][t] if q.author else {},
            ))
        await self._fill_categories(out, categories or {})
        return out

    async def read_items(self, rooms: Sequence[str], authors: Sequence[str], as_of_ms: int
                         ) -> tuple[list[Snapshot], list[dict[str, float]]]:
        """Rooms (``room``, ``room_meta`` filled) and authors' counters as of ``as_of_ms``: what ``read`` gives
        for them, in one read-only script call per ``events_per_call`` entities on a single server (a pipeline
        costs two client-side commands per entity, ten times what Redis spends; on a Cluster it is ``read``)."""
        if self.cluster:
            snaps = await self.read([AsOf("", r, "", as_of_ms) for r in rooms] + [AsOf("", "", a, as_of_ms)
                                                                                  for a in authors])
            return snaps[: len(rooms)], [s.author for s in snaps[len(rooms):]]
        entities = [(Entity.ROOM, r) for r in rooms] + [(Entity.AUTHOR, a) for a in authors]
        step = self.cfg.events_per_call
        calls = [([k for ent, ident in entities[lo:lo + step]
                   for k in (self.key(ent, ident), self.key(ent, ident, ":log"))], [as_of_ms])
                 for lo in range(0, len(entities), step)]
        raw = [part for reply in await self._read_many.run_many(calls) for part in reply]
        room_snaps, author_counters = [], []
        for k, (ent, _) in enumerate(entities):
            flat, log = raw[2 * k], raw[2 * k + 1]
            totals = dict(zip(flat[::2], flat[1::2], strict=True))
            counters = _as_of_each(totals, list(zip(log[::2], map(float, log[1::2]), strict=True)), {as_of_ms})
            if ent is Entity.ROOM:
                meta = {f.decode(): v.decode() for f, v in totals.items() if f.decode() in ROOM_META}
                room_snaps.append(Snapshot(as_of_ms=as_of_ms, room=counters[as_of_ms], room_meta=meta))
            else:
                author_counters.append(counters[as_of_ms])
        return room_snaps, author_counters

    async def _fill_categories(self, snaps: list[Snapshot], known: Mapping[str, str]) -> None:
        """History rooms' categories, looked up at read time in one more round trip. (Resolving them when
        the engagement is written would depend on whether the room's start event was processed first.)"""
        rooms = sorted({h.room for s in snaps for h in s.history} - known.keys())
        cats: dict[str, str] = {}
        if rooms:
            async with self.r.pipeline(transaction=False) as pipe:
                for room in rooms:
                    pipe.hget(self.key(Entity.ROOM, room), "category")
                cats = {room: (c or b"").decode() for room, c in zip(rooms, await pipe.execute(), strict=True)}
        filled: dict[int, list[HistoryItem]] = {}  # snapshots share history lists: fill each list once
        for s in snaps:
            if id(s.history) not in filled:
                filled[id(s.history)] = [replace(h, category=cats[h.room] if h.room in cats else known[h.room])
                                         for h in s.history]
            s.history = filled[id(s.history)]


@dataclass
class _Merged:
    """One key's changes within one call: increments summed, last write of a field wins."""

    ttl: int = 0
    newest_ms: int = 0
    incr: dict[str, float] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)
    log: dict[int, tuple[str, dict[str, float]]] = field(default_factory=dict)  # bucket end -> (tag, increments)

    def add(self, t: Target, bucket_end: int, tag: str, ts_ms: int) -> None:
        self.ttl = t.ttl_s  # the latest event's TTL wins, as if each event had set it
        if ts_ms > self.newest_ms:
            self.newest_ms = ts_ms
        if t.incr:
            totals, entry = self.incr, self.log.get(bucket_end)
            bucket = entry[1] if entry is not None else {}
            for f, d in t.incr.items():
                totals[f] = totals.get(f, 0.0) + d
                bucket[f] = bucket.get(f, 0.0) + d
            self.log[bucket_end] = (tag, bucket)
        if t.sets:
            self.sets.update(t.sets)

    def flat_incr(self) -> list[str]:
        return [x for f, d in self.incr.items() for x in (f, repr(d))]

    def flat_sets(self) -> list[str]:
        return [x for f, v in self.sets.items() for x in (f, v)]

    def flat_log(self) -> list[str]:
        # JSON after the tag: a reader parses a member with one C call (orjson), not field by field
        return [x for end, (tag, inc) in self.log.items() for x in (str(end), tag + "|" + orjson.dumps(inc).decode())]


@dataclass
class _Call:
    marker: str
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # input partitions; index i+1 in the payload
    ranges: list[list[int]] = field(default_factory=list)
    targets: list[list[Any]] = field(default_factory=list)
    histories: list[list[Any]] = field(default_factory=list)
    unpositioned: int = 0  # 1: the call also carries changes without a position (always applied)
    _index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index(self.marker)

    def index(self, key: str) -> int:
        if key not in self._index:
            self.keys.append(key)
            self._index[key] = len(self.keys)
        return self._index[key]

    def cover(self, pos: Position) -> None:
        """Widen the offset range the call covers in ``pos``'s input partition."""
        if not pos.source:
            self.unpositioned = 1
            return
        if pos.source not in self.sources:
            self.sources.append(pos.source)
            self.ranges.append([pos.offset, pos.offset])
        r = self.ranges[self.sources.index(pos.source)]
        r[0], r[1] = min(r[0], pos.offset), max(r[1], pos.offset)

    def payload(self) -> bytes:
        src = [[s, str(lo), str(hi)] for s, (lo, hi) in zip(self.sources, self.ranges, strict=True)]
        return orjson.dumps({"src": src, "u": self.unpositioned, "t": self.targets, "q": self.histories})


def _chunks(group: tuple[str, list[tuple[Position, Change]]], size: int
            ) -> Iterable[tuple[str, list[tuple[Position, Change]]]]:
    marker, items = group
    for i in range(0, len(items), size):
        yield marker, items[i:i + size]


def is_cluster(url: str, **kwargs: Any) -> bool:
    """Whether the server at ``url`` is a Redis Cluster node (INFO cluster)."""
    import redis

    client = redis.Redis.from_url(url, **kwargs)
    try:
        return client.info("cluster").get("cluster_enabled") == 1
    finally:
        client.close()


_META_FIELDS = frozenset(m.encode() for m in ROOM_META)


def _as_of_each(totals: dict[bytes, bytes], log: list[tuple[bytes, float]], times: set[int]
                ) -> dict[int, dict[str, float]]:
    """Counters as of each time in ``times``: totals minus the logged increments scored at or after it.

    One pass over the log from the newest entry down, the times visited newest first, so an entity asked at
    many times costs O(log length + times) rather than their product.
    """
    base = {k.decode(): float(v) for k, v in totals.items() if k not in _META_FIELDS and not k.startswith(b"pos:")}
    later: dict[str, float] = {}
    out: dict[int, dict[str, float]] = {}
    entries = reversed(log)  # ZRANGEBYSCORE answers oldest first
    pending = next(entries, None)
    for t in sorted(times, reverse=True):
        while pending is not None and pending[1] >= t:
            member = pending[0]
            for name, delta in orjson.loads(member[member.index(b"|") + 1:]).items():
                later[name] = later.get(name, 0.0) + delta
            pending = next(entries, None)
        if later:
            values = {k: v - later.get(k, 0.0) for k, v in base.items()}
            for k, d in later.items():
                values.setdefault(k, -d)
        else:
            values = base
        # Float increments (watch seconds) leave 1e-13 residues after subtraction; they are not signal.
        out[t] = {k: round(v, 6) for k, v in values.items()}
    return out


def _history_item(member: bytes, score: float) -> HistoryItem:
    kind, room, author, secs, _ = member.decode().split("|")
    return HistoryItem(int(score), kind, room, author, "", float(secs))
