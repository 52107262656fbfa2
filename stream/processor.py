"""What the stream does with a batch of events, independent of the Faust runtime that feeds it.

The Faust app (``stream/app.py``) and the offline dataset builder both drive this class, so training
samples built offline and online come out of the same code.

Order of effects, chosen for "nothing lost" under at-least-once delivery:

1. state writes for the batch (idempotent per event id, so a replayed batch changes nothing);
2. join-state updates for the batch (``add_impression`` ignores an impression it has seen);
3. at window close: read state *as of* each impression, assemble, encode; the caller sends the samples,
   waits for the broker to acknowledge them, and only then stores the shrunken join state.
A crash between 3's send and store re-emits those samples after restart; the trainer drops them by
impression id (``model``-side dedup), which makes training exactly-once per impression.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from model.spec import FeatureSpec
from state.store import AsOf, LiveState, Write
from stream import metrics
from stream.events import EngagementKind, Event, Impression, LiveAction, LiveEvent
from stream.features import Candidate, assemble
from stream.join import Attribution, HeldEngagement, LabelJoiner, PendingImpression, UserJoinState
from stream.samples import Labels, SampleCodec

JoinTable = MutableMapping[str, bytes]
"""user id -> encoded ``UserJoinState``: a Faust table online, a dict offline."""


@dataclass(frozen=True)
class OutgoingSample:
    key: bytes  # user id, so a user's samples stay ordered in one partition
    value: bytes
    impression_id: str
    event_ms: int
    entered: bool


def state_write(state: LiveState, ev: Event) -> Write:
    """The state change one event makes (pure)."""
    if isinstance(ev, Impression):
        return state.record_impression(ev.event_id, ev.ts_ms, ev.user_id, ev.room_id, ev.author_id, ev.category)
    if isinstance(ev, LiveEvent):
        if ev.action is LiveAction.START:
            return state.start_room(ev.event_id, ev.ts_ms, ev.room_id, ev.author_id, ev.category, ev.title)
        return state.end_room(ev.event_id, ev.ts_ms, ev.room_id, ev.author_id)
    if ev.kind is EngagementKind.ENTER:
        return state.record_enter(ev.event_id, ev.ts_ms, ev.user_id, ev.room_id, ev.author_id)
    if ev.kind is EngagementKind.WATCH:
        return state.record_watch(ev.event_id, ev.ts_ms, ev.user_id, ev.room_id, ev.author_id, ev.watch_seconds)
    return state.record_interaction(ev.event_id, ev.ts_ms, ev.user_id, ev.room_id, ev.author_id,
                                    ev.kind.value, ev.gift_value or 1.0)


@dataclass
class Due:
    items: list[tuple[str, PendingImpression, Labels]] = field(default_factory=list)
    tidy: set[str] = field(default_factory=set)


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
    def __init__(self, state: LiveState, spec: FeatureSpec, joiner: LabelJoiner) -> None:
        self.state = state
        self.spec = spec
        self.joiner = joiner
        self.codec = SampleCodec(spec)

    async def apply_state(self, events: list[Event]) -> None:
        t0 = time.perf_counter()
        applied = await self.state.apply([state_write(self.state, ev) for ev in events])
        metrics.REDIS_LATENCY.labels("write").observe(time.perf_counter() - t0)
        metrics.REPLAYED.inc(applied.count(False))
        for ev in events:
            metrics.EVENTS_IN.labels(ev.TYPE).inc()

    async def on_events(self, events: list[Event], table: JoinTable) -> None:
        """State first (so engagements count even when unattributed), then the label join."""
        await self.apply_state(events)
        self.join(events, table)

    def join(self, events: list[Event], table: JoinTable) -> None:
        """The label-join part of ``on_events``: in memory, so it cannot fail half way on a dependency."""
        touched: dict[str, UserJoinState] = {}
        for ev in events:
            if isinstance(ev, LiveEvent):
                continue
            st = touched.get(ev.user_id) or UserJoinState.decode(table.get(ev.user_id))
            touched[ev.user_id] = st
            if isinstance(ev, Impression):
                self.joiner.add_impression(st, PendingImpression(ev.event_id, Candidate(
                    user=ev.user_id, room=ev.room_id, author=ev.author_id, category=ev.category, ts_ms=ev.ts_ms,
                    hour=ev.hour, device=ev.device, tab=ev.tab, position=ev.position,
                )))
            else:
                value = ev.watch_seconds if ev.kind is EngagementKind.WATCH else ev.gift_value
                held = HeldEngagement(ev.event_id, ev.room_id, ev.kind.value, ev.ts_ms, value)
                metrics.ENGAGEMENTS.labels(self.joiner.add_engagement(st, held).value).inc()
        for user, st in touched.items():
            table[user] = st.encode()

    @staticmethod
    def newest_pending_ms(table: JoinTable) -> int:
        return max((p.ts_ms for raw in table.values() for p in UserJoinState.decode(raw).pending), default=0)

    def due(self, table: JoinTable, watermark_ms: int, limit: int | None = None) -> Due:
        """What closing at ``watermark_ms`` involves: impressions with their labels, and users whose
        state only needs tidying (expired engagements, old closed memory). Changes nothing."""
        due = Due()
        pending = 0
        stale_before = watermark_ms - self.joiner.window_ms - self.joiner.lateness_ms
        for user, raw in list(table.items()):
            st = UserJoinState.decode(raw)
            pending += len(st.pending)
            if limit is None or len(due.items) < limit:
                due.items.extend((user, p, labels) for p, labels in self.joiner.due(st, watermark_ms))
            if any(e.ts_ms <= stale_before for e in st.held) or (not st.pending and not st.held):
                due.tidy.add(user)
        metrics.PENDING.set(pending - len(due.items))
        return due

    async def build_samples(self, due: Due) -> list[OutgoingSample]:
        """Read state as of each impression (one Redis round trip), assemble and encode its sample."""
        if not due.items:
            return []
        t0 = time.perf_counter()
        snaps = await self.state.read([AsOf(u, p.room, p.candidate.author, p.ts_ms) for u, p, _ in due.items])
        metrics.REDIS_LATENCY.labels("read").observe(time.perf_counter() - t0)
        now_ms = int(time.time() * 1000)
        samples = []
        for (user, p, labels), snap in zip(due.items, snaps, strict=True):
            row = assemble(self.spec, p.candidate, snap)
            value = self.codec.encode(p.impression_id, row, labels, event_ms=p.ts_ms, emitted_ms=now_ms)
            samples.append(OutgoingSample(user.encode(), value, p.impression_id, p.ts_ms, labels.entered))
        return samples

    def commit_closed(self, table: JoinTable, due: Due, watermark_ms: int) -> None:
        """After the samples are acknowledged: mark their impressions closed in the join state.

        Re-reads each user's current state rather than writing back a copy taken before the awaits, so
        impressions and engagements the agent added meanwhile are kept.
        """
        by_user: dict[str, set[str]] = {u: set() for u in due.tidy}
        for user, p, _ in due.items:
            by_user.setdefault(user, set()).add(p.impression_id)
        for user, ids in by_user.items():
            st = UserJoinState.decode(table.get(user))
            unmatched = self.joiner.close(st, ids, watermark_ms)
            metrics.ENGAGEMENTS.labels(Attribution.UNMATCHED.value).inc(unmatched)
            if st.empty():
                table.pop(user, None)
            else:
                table[user] = st.encode()

    async def close_due(self, table: JoinTable, watermark_ms: int) -> list[OutgoingSample]:
        """All three steps at once, for callers whose "send" is synchronous (offline building)."""
        due = self.due(table, watermark_ms)
        samples = await self.build_samples(due)
        self.commit_closed(table, due, watermark_ms)
        return samples

    def observe_emitted(self, samples: list[OutgoingSample]) -> None:
        """Count samples the broker acknowledged, and how long after their impression they left."""
        now_ms = time.time() * 1000
        for s in samples:
            metrics.SAMPLES_OUT.labels(str(s.entered).lower()).inc()
            metrics.EVENT_TO_SAMPLE.observe(max(now_ms - s.event_ms, 0) / 1000)
            metrics.CLOSE_DELAY.observe(max(now_ms - s.event_ms - self.joiner.window_ms, 0) / 1000)
