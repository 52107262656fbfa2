"""What the stream does with a batch of events, independent of the runtime that feeds it.

The stream worker (``stream/worker.py``) and the offline dataset builder both drive this class, so training
samples built offline and online come out of the same code.

Order of effects, chosen for "nothing lost" under at-least-once delivery:

1. state writes for the batch, recorded with the input positions they cover (a redelivered batch is
   recognised by position and changes nothing);
2. the label join for the batch, in memory, then its changed users and applied positions written to Redis
   (again recognised by position on redelivery);
3. at window close: read state *as of* each impression, assemble, encode; the caller sends the samples,
   waits for the broker to acknowledge them, and only then closes the impressions in the join state.
A crash between 3's send and its join write re-emits those samples after restart; the trainer drops them by
impression id (``model``-side dedup), which makes training exactly-once per impression.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from model.spec import FeatureSpec
from state.store import UNPOSITIONED, AsOf, Change, LiveState, Position
from stream import metrics
from stream.events import EngagementKind, Event, Impression, LiveAction, LiveEvent
from stream.features import Candidate, assemble_many
from stream.join import Attribution, HeldEngagement, LabelJoiner, PendingImpression
from stream.join_store import JoinFenced, JoinStore
from stream.samples import Labels, SampleCodec

LIVE_IDS = 10_000  # room lifecycle event ids remembered (in memory) by the duplicate guard


@dataclass(frozen=True, slots=True)
class Input:
    """An accepted event, where it came from, and the input partition whose join state it belongs to."""

    event: Event
    pos: Position = UNPOSITIONED
    partition: int = 0


@dataclass(frozen=True)
class OutgoingSample:
    key: bytes  # user id, so a user's samples stay ordered in one partition
    value: bytes
    impression_id: str
    event_ms: int
    entered: bool


def state_change(state: LiveState, ev: Event) -> Change:
    """The state change one event makes (pure)."""
    if isinstance(ev, Impression):
        return state.record_impression(ev.ts_ms, ev.user_id, ev.room_id, ev.author_id, ev.category)
    if isinstance(ev, LiveEvent):
        if ev.action is LiveAction.START:
            return state.start_room(ev.ts_ms, ev.room_id, ev.author_id, ev.category, ev.title)
        return state.end_room(ev.ts_ms, ev.room_id, ev.author_id)
    if ev.kind is EngagementKind.ENTER:
        return state.record_enter(ev.event_id, ev.ts_ms, ev.user_id, ev.room_id, ev.author_id)
    if ev.kind is EngagementKind.WATCH:
        return state.record_watch(ev.event_id, ev.ts_ms, ev.user_id, ev.room_id, ev.author_id, ev.watch_seconds)
    return state.record_interaction(ev.ts_ms, ev.user_id, ev.room_id, ev.author_id, ev.kind.value,
                                    ev.gift_value or 1.0)


@dataclass
class Due:
    """What closing at a watermark involves: impressions with their labels, and the users to close or tidy."""

    items: list[tuple[int, str, PendingImpression, Labels]] = field(default_factory=list)  # (partition, user, ..)
    users: dict[int, list[str]] = field(default_factory=dict)


class Watermark:
    """Stream time: the minimum over input partitions of the newest event time each has delivered.

    Taking the minimum (not the maximum) keeps a fast partition, e.g. impressions read ahead of their
    engagements, from closing windows whose engagements are still unread. A partition that has delivered
    nothing for ``idle_s`` while others did stops holding time back (an empty partition must not stall
    the stream); when the whole input has been quiet for ``idle_s``, time follows the wall clock so a
    quiet stream still closes its windows. ``idle_s`` = 0: pure event time.

    >>> w = Watermark(idle_s=0)
    >>> w.observe("impressions/0", 5_000, wall_s=0); w.observe("engagements/0", 2_000, wall_s=0)
    >>> w.current(wall_s=0)
    2000
    """

    def __init__(self, idle_s: float, started_wall_s: float = 0.0) -> None:
        self.idle_s = idle_s
        self.started_wall_s = started_wall_s
        self._latest: dict[str, tuple[int, float]] = {}  # source -> (newest event ms, wall s when seen)

    def expect(self, sources: list[str], wall_s: float) -> None:
        """Newly assigned partitions hold time back until they deliver or turn out idle."""
        for src in sources:
            self._latest.setdefault(src, (0, wall_s))

    def sources(self) -> list[str]:
        return list(self._latest)

    def forget(self, sources: list[str]) -> None:
        for src in sources:
            self._latest.pop(src, None)

    def touch(self, wall_s: float) -> None:
        """After an outage: the input was held, not quiet, so no partition counts as idle from it."""
        self._latest = {src: (ts, max(w, wall_s)) for src, (ts, w) in self._latest.items()}
        self.started_wall_s = max(self.started_wall_s, wall_s)

    def floor(self) -> int:
        """The oldest of the partitions' newest event times, without any wall-clock advance (0: none yet).

        What the validation's lag bound measures against: an in-order partition's next event is never older
        than this, so only a genuinely late event falls more than the bound behind it -- also after a quiet
        spell, e.g. between two replays of an old log.
        """
        return min((ts for ts, _ in self._latest.values() if ts), default=0)

    def observe(self, source: str, ts_ms: int, wall_s: float) -> None:
        prev = self._latest.get(source, (0, 0.0))[0]
        self._latest[source] = (max(prev, ts_ms), wall_s)

    def current(self, wall_s: float, recovered_ms: int = 0) -> int:
        """``recovered_ms``: newest event time known from recovered state, for a worker restarted after its
        input was fully consumed: with nothing delivered it would otherwise never close a window."""
        if self.idle_s and recovered_ms and not any(ts for ts, _ in self._latest.values()):
            quiet_s = wall_s - self.started_wall_s
            return recovered_ms + int(quiet_s * 1000) if quiet_s > self.idle_s else 0
        seen = [(ts, w) for ts, w in self._latest.values() if ts > 0 or self.idle_s]
        if not seen:
            return 0
        if not self.idle_s:
            return min(ts for ts, _ in seen)
        last_any = max(w for _, w in seen)
        active = [ts for ts, w in seen if last_any - w <= self.idle_s]
        quiet_s = wall_s - last_any
        if quiet_s > self.idle_s:
            # The whole input is quiet: follow the wall clock from the slowest partition that delivered
            # (a partition that never delivered has nothing to wait for).
            delivered = [ts for ts in active if ts] or [ts for ts, _ in seen if ts]
            return min(delivered) + int(quiet_s * 1000) if delivered else 0
        return min(active)  # 0 while an assigned partition has not delivered yet


class StreamProcessor:
    def __init__(self, state: LiveState, spec: FeatureSpec, joiner: LabelJoiner, joins: JoinStore | None = None
                 ) -> None:
        self.state = state
        self.spec = spec
        self.joiner = joiner
        self.joins = joins if joins is not None else JoinStore(joiner)
        self.codec = SampleCodec(spec)
        self._live_ids: OrderedDict[str, None] = OrderedDict()

    async def apply_state(self, batch: list[Input]) -> None:
        t0 = time.perf_counter()
        report = await self.state.apply([state_change(self.state, i.event) for i in batch], [i.pos for i in batch])
        metrics.REDIS_LATENCY.labels("write").observe(time.perf_counter() - t0)
        metrics.REPLAYED.inc(report.replayed)
        for kind, n in Counter(i.event.TYPE for i in batch).items():  # one metric update per type, not per event
            metrics.EVENTS_IN.labels(kind).inc(n)

    async def on_events(self, batch: list[Input]) -> None:
        """Duplicates out, then state (so engagements count even when unattributed), then the label join."""
        batch = self.admit(batch)
        await self.apply_state(batch)
        await self.join_and_commit(batch)

    def admit(self, batch: list[Input]) -> list[Input]:
        """Drop events whose id was seen recently: a producer that sent an event twice (e.g. retried a whole
        batch) must not count it twice. User events are checked against the user's recent ids in the join
        state (bounded per user, durable with it); room lifecycle events against the last ``LIVE_IDS`` ids in
        memory. Events at or below their partition's join position are kept: they were admitted before, and
        state and join skip them by position."""
        out = []
        for i in batch:
            ev = i.event
            if isinstance(ev, LiveEvent):
                fresh = ev.event_id not in self._live_ids
                self._live_ids[ev.event_id] = None
                if len(self._live_ids) > LIVE_IDS:
                    self._live_ids.popitem(last=False)
            else:
                part = self.joins.partition(i.partition)
                if i.pos.source and i.pos.offset <= part.positions.get(i.pos.source, -1):
                    out.append(i)
                    continue
                fresh = self.joiner.first_sight(part.get(ev.user_id), ev.event_id, ev.ts_ms)
                part.touched(ev.user_id)
            if fresh:
                out.append(i)
            else:
                metrics.DUPLICATES.labels(ev.TYPE).inc()
        return out

    async def join_and_commit(self, batch: list[Input]) -> None:
        """``join`` then write its changes with the positions they cover; a partition fenced by another
        worker is reloaded and the batch's events for it joined again (those it already holds are skipped)."""
        positions = self.join(batch)
        while True:
            try:
                await self.joins.commit(list(positions), positions)
                return
            except JoinFenced as fenced:
                for n in fenced.partitions:
                    await self.joins.load(n)
                positions = self.join([i for i in batch if i.partition in fenced.partitions])

    def join(self, batch: list[Input]) -> dict[int, dict[str, int]]:
        """The label join, in memory; returns per partition the newest offset it applied per source. Events
        at or below the partition's recorded position for their source were joined before: skipped. (Every
        partition the batch names is in the result, possibly with no offsets: unpositioned input.)"""
        applied: dict[int, dict[str, int]] = {}
        outcomes: Counter[Attribution] = Counter()
        for i in batch:
            ev = i.event
            if isinstance(ev, LiveEvent):
                continue
            part = self.joins.partition(i.partition)
            offsets = applied.setdefault(i.partition, {})
            if i.pos.source:
                if i.pos.offset <= part.positions.get(i.pos.source, -1):
                    continue
                offsets[i.pos.source] = i.pos.offset
            st = part.get(ev.user_id)
            if isinstance(ev, Impression):
                part.pending += self.joiner.add_impression(st, PendingImpression(ev.event_id, Candidate(
                    user=ev.user_id, room=ev.room_id, author=ev.author_id, category=ev.category, ts_ms=ev.ts_ms,
                    hour=ev.hour, device=ev.device, tab=ev.tab, position=ev.position,
                )))
            else:
                value = ev.watch_seconds if ev.kind is EngagementKind.WATCH else ev.gift_value
                held = HeldEngagement(ev.event_id, ev.room_id, ev.kind.value, ev.ts_ms, value)
                outcomes[self.joiner.add_engagement(st, held)] += 1
            part.touched(ev.user_id)
        for outcome, n in outcomes.items():
            metrics.ENGAGEMENTS.labels(outcome.value).inc(n)
        return applied

    def newest_pending_ms(self) -> int:
        return max((p.newest_pending_ms() for p in self.joins.partitions.values()), default=0)

    def due(self, watermark_ms: int, limit: int | None = None) -> Due:
        """What closing at ``watermark_ms`` involves, found through the due-time index (O(due)). Changes
        nothing: ``commit_closed`` does, once the samples are acknowledged."""
        due = Due()
        budget = limit if limit is not None else 2**62
        for n, part in self.joins.partitions.items():
            users = part.due_users(watermark_ms, self.joiner, budget - len(due.items))
            if users:
                due.users[n] = users
            for user in users:
                due.items.extend((n, user, p, labels) for p, labels in self.joiner.due(part.users[user], watermark_ms))
        metrics.PENDING.set(sum(p.pending for p in self.joins.partitions.values()) - len(due.items))
        return due

    async def build_samples(self, due: Due) -> list[OutgoingSample]:
        """Read state as of each impression (one Redis round trip), assemble and encode its sample."""
        if not due.items:
            return []
        t0 = time.perf_counter()
        snaps = await self.state.read([AsOf(u, p.room, p.candidate.author, p.ts_ms) for _, u, p, _ in due.items])
        metrics.REDIS_LATENCY.labels("read").observe(time.perf_counter() - t0)
        now_ms = int(time.time() * 1000)
        samples = []
        rows = assemble_many(self.spec, [p.candidate for _, _, p, _ in due.items], snaps)
        for (_, user, p, labels), row in zip(due.items, rows, strict=True):
            value = self.codec.encode(p.impression_id, row, labels, event_ms=p.ts_ms, emitted_ms=now_ms)
            samples.append(OutgoingSample(user.encode(), value, p.impression_id, p.ts_ms, labels.entered))
        return samples

    def commit_closed(self, due: Due, watermark_ms: int) -> None:
        """After the samples are acknowledged: close their impressions (and tidy the due users) in memory;
        ``joins.commit`` then writes the changed users."""
        closing: dict[tuple[int, str], set[str]] = {}
        for n, user, p, _ in due.items:
            closing.setdefault((n, user), set()).add(p.impression_id)
        for n, users in due.users.items():
            part = self.joins.partitions.get(n)
            if part is None:
                continue  # revoked meanwhile: its new owner closes them from the stored state
            for user in users:
                st = part.users.get(user)
                if st is None:
                    continue
                ids = closing.get((n, user), set())
                before = len(st.pending)
                metrics.ENGAGEMENTS.labels(Attribution.UNMATCHED.value).inc(self.joiner.close(st, ids, watermark_ms))
                part.pending -= before - len(st.pending)
                part.touched(user)

    async def commit_joins(self) -> None:
        """Write the closes (and tidying) of ``commit_closed``. A partition another worker has written since is
        reloaded instead: its impressions closed here close again there (the trainer drops the repeats)."""
        try:
            await self.joins.commit()
        except JoinFenced as fenced:
            for n in fenced.partitions:
                await self.joins.load(n)

    async def close_due(self, watermark_ms: int) -> list[OutgoingSample]:
        """All steps at once, for callers whose "send" is synchronous (offline building)."""
        due = self.due(watermark_ms)
        samples = await self.build_samples(due)
        self.commit_closed(due, watermark_ms)
        await self.commit_joins()
        return samples

    def observe_emitted(self, samples: list[OutgoingSample]) -> None:
        """Count samples the broker acknowledged, and how long after their impression they left."""
        now_ms = time.time() * 1000
        for entered, n in Counter(s.entered for s in samples).items():
            metrics.SAMPLES_OUT.labels(str(entered).lower()).inc(n)
        for s in samples:
            metrics.EVENT_TO_SAMPLE.observe(max(now_ms - s.event_ms, 0) / 1000)
            metrics.CLOSE_DELAY.observe(max(now_ms - s.event_ms - self.joiner.window_ms, 0) / 1000)
