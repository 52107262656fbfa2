"""Where the label join keeps its per-user state: in memory per owned input partition, durable in Redis.

A stream worker owns some input partitions (impressions and engagements are co-partitioned by user). For each
it holds every user's ``UserJoinState`` in memory, indexed by the time the user next needs attention (a
window to close, an engagement or closed memory to expire), so closing windows costs what closes, not what is
pending. After each batch and each close, the users that changed are written to Redis in one Lua call per
partition, together with the input offsets the join has applied (``pos:<topic>/<partition>``): a batch
redelivered after a crash is recognised by position and changes nothing. A worker that is assigned a partition
loads its state from Redis; every write is fenced by an epoch, so a worker that lost the partition in a
rebalance cannot overwrite its new owner's state (its write is refused and it reloads).

Keys (one Redis Cluster slot per partition, by the ``{jp:...}`` hash tag; ``group`` is the consumer group, so
apps sharing a Redis keep their join state apart)::

    {jp:<group>/<n>}:join   hash user -> encoded UserJoinState
    {jp:<group>/<n>}:meta   hash epoch, pos:<topic>/<partition> -> last offset applied to the join

Offline (``stream/offline.py``) the same class runs without Redis.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import orjson

from state.scripts import LuaScript
from stream.join import LabelJoiner, UserJoinState


class JoinFenced(RuntimeError):
    """Another worker wrote these partitions' join state since we loaded it (a rebalance moved them)."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"join partitions {partitions} were written by another worker since they were loaded")
        self.partitions = partitions


@dataclass
class JoinPartition:
    """One input partition's join state, in memory."""

    number: int
    users: dict[str, UserJoinState] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)  # source -> last offset applied to the join
    epoch: int = 0
    pending: int = 0  # impressions waiting for their window
    dirty: set[str] = field(default_factory=set)
    _due: list[tuple[int, str]] = field(default_factory=list)  # (ms the user next needs attention, user)
    _indexed: dict[str, int] = field(default_factory=dict)  # user -> the time of its live entry in _due

    def get(self, user: str) -> UserJoinState:
        st = self.users.get(user)
        if st is None:
            st = self.users[user] = UserJoinState()
        return st

    def touched(self, user: str) -> None:
        """Record that ``user``'s state changed: it is re-indexed and written at the next commit."""
        self.dirty.add(user)

    def reindex(self, joiner: LabelJoiner) -> None:
        """Index the changed users by when they next need attention; forget the emptied ones.

        A user has one live heap entry, at ``_indexed[user]``; a new one is pushed only when the user's due
        time moved earlier. One that moved later keeps its entry, which is pushed again at its actual time
        when popped. So the heap holds about one entry per user, however often users change.
        """
        for user in self.dirty:
            st = self.users.get(user)
            if st is None:
                continue
            if st.empty():
                del self.users[user]
                self._indexed.pop(user, None)  # its entry is skipped when popped
                continue
            due = joiner.next_due_ms(st)
            if due < self._indexed.get(user, 2**63):
                heapq.heappush(self._due, (due, user))
                self._indexed[user] = due

    def due_users(self, watermark_ms: int, joiner: LabelJoiner, limit: int) -> list[str]:
        """Users with something due at ``watermark_ms``, oldest first, until ``limit`` impressions are due.
        Leaves their index entries in place (the caller closes them only once their samples are safe)."""
        out: dict[str, None] = {}  # insertion-ordered set
        n = 0
        while self._due and self._due[0][0] <= watermark_ms and n < limit:
            at, user = heapq.heappop(self._due)
            st = self.users.get(user)
            if st is None or self._indexed.get(user) != at or user in out:
                # superseded by an earlier entry, the user went, or a second entry at the same time (a user
                # whose due time moved earlier and back again): each user is due once
                continue
            due = joiner.next_due_ms(st)
            if due > watermark_ms:  # the user changed since: it is due later
                heapq.heappush(self._due, (due, user))
                self._indexed[user] = due
                continue
            out[user] = None
            n += sum(1 for p in st.pending if joiner.closes_by(p.ts_ms, watermark_ms))
        for user in out:
            heapq.heappush(self._due, (self._indexed[user], user))
        return list(out)

    def newest_pending_ms(self) -> int:
        return max((p.ts_ms for st in self.users.values() for p in st.pending), default=0)


class JoinStore:
    """The owned partitions' join state; ``redis`` None keeps it in memory only (offline)."""

    def __init__(self, joiner: LabelJoiner, redis: Any = None, prefix: str = "zl:", group: str = "") -> None:
        self.joiner = joiner
        self.r = redis
        self.prefix = prefix
        self.group = group  # the consumer group: apps sharing a Redis keep their join state apart
        self.partitions: dict[int, JoinPartition] = {}
        self._commit = LuaScript(redis, "join_commit.lua") if redis is not None else None

    def keys(self, number: int) -> tuple[str, str]:
        tag = f"{self.prefix}{{jp:{self.group}/{number}}}"
        return tag + ":join", tag + ":meta"

    def partition(self, number: int) -> JoinPartition:
        part = self.partitions.get(number)
        if part is None:
            part = self.partitions[number] = JoinPartition(number)
        return part

    async def load(self, number: int) -> JoinPartition:
        """(Re)load a partition from Redis: its users, the offsets it has applied and its epoch."""
        part = JoinPartition(number)
        if self.r is not None:
            join_key, meta_key = self.keys(number)
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.hgetall(join_key)
                pipe.hgetall(meta_key)
                users, meta = await pipe.execute()
            part.epoch = int(meta.get(b"epoch", 0))
            part.positions = {k.decode()[4:]: int(v) for k, v in meta.items() if k.startswith(b"pos:")}
            for user, raw in users.items():
                st = UserJoinState.decode(raw)
                part.users[user.decode()] = st
                part.pending += len(st.pending)
                part.touched(user.decode())
            part.reindex(self.joiner)
            part.dirty.clear()
        self.partitions[number] = part
        return part

    def drop(self, number: int) -> None:
        self.partitions.pop(number, None)

    async def commit(self, numbers: list[int] | None = None, positions: dict[int, dict[str, int]] | None = None
                     ) -> None:
        """Write the changed users (and the given applied offsets) of each partition, one fenced Lua call
        each, all in one pipelined round trip. Raises ``JoinFenced`` when another worker has written one."""
        positions = positions or {}
        todo = [self.partitions[n] for n in (numbers if numbers is not None else list(self.partitions))
                if n in self.partitions and (self.partitions[n].dirty or positions.get(n))]
        for part in todo:
            part.reindex(self.joiner)
        if self.r is None or not todo:
            for part in todo:
                part.dirty.clear()
                part.positions.update(positions.get(part.number, {}))
            return
        calls = []
        for part in todo:
            sets, dels = [], []
            for user in part.dirty:
                st = part.users.get(user)
                if st is None:
                    dels.append(user)
                else:
                    sets += [user, st.encode().decode()]
            pos = [x for src, off in positions.get(part.number, {}).items() for x in (f"pos:{src}", str(off))]
            calls.append((self.keys(part.number), [part.epoch, orjson.dumps({"set": sets, "del": dels, "pos": pos})]))
        assert self._commit is not None
        results = await self._commit.run_many(calls)
        fenced = []
        for part, epoch in zip(todo, results, strict=True):
            if int(epoch) < 0:
                fenced.append(part.number)
                continue
            part.epoch = int(epoch)
            part.dirty.clear()
            part.positions.update(positions.get(part.number, {}))
        if fenced:
            raise JoinFenced(fenced)
