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
from dataclasses import dataclass

from model.spec import FeatureSpec
from state.store import AsOf, LiveState, Write
from stream import metrics
from stream.events import EngagementKind, Event, Impression, LiveAction, LiveEvent
from stream.features import Candidate, assemble
from stream.join import LabelJoiner, PendingImpression, UserJoinState
from stream.samples import SampleCodec

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


class StreamProcessor:
    def __init__(self, state: LiveState, spec: FeatureSpec, joiner: LabelJoiner) -> None:
        self.state = state
        self.spec = spec
        self.joiner = joiner
        self.codec = SampleCodec(spec)
        self.watermark_ms = 0

    async def apply_state(self, events: list[Event]) -> None:
        t0 = time.perf_counter()
        applied = await self.state.apply([state_write(self.state, ev) for ev in events])
        metrics.REDIS_LATENCY.labels("write").observe(time.perf_counter() - t0)
        metrics.REPLAYED.inc(applied.count(False))
        for ev in events:
            metrics.EVENTS_IN.labels(ev.TYPE).inc()
            self.watermark_ms = max(self.watermark_ms, ev.ts_ms)
        metrics.WATERMARK.set(self.watermark_ms)

    async def on_events(self, events: list[Event], table: JoinTable) -> None:
        """State first (so engagements count even when unattributed), then the label join."""
        await self.apply_state(events)
        touched: dict[str, UserJoinState] = {}
        for ev in events:
            if isinstance(ev, LiveEvent):
                continue
            st = touched.get(ev.user_id) or UserJoinState.decode(table.get(ev.user_id))
            touched[ev.user_id] = st
            if isinstance(ev, Impression):
                self.joiner.add_impression(st, PendingImpression(
                    ev.event_id, ev.room_id, ev.author_id, ev.category, ev.ts_ms, ev.hour, ev.device, ev.tab,
                    ev.position,
                ))
            else:
                value = ev.watch_seconds if ev.kind is EngagementKind.WATCH else ev.gift_value
                outcome = self.joiner.attribute(st, ev.room_id, ev.kind.value, ev.ts_ms, value)
                metrics.ENGAGEMENTS.labels(outcome.value).inc()
        for user, st in touched.items():
            table[user] = st.encode()

    def due(self, table: JoinTable, watermark_ms: int) -> list[tuple[str, PendingImpression]]:
        """Impressions whose window (plus lateness) ended by ``watermark_ms``. Changes nothing."""
        out: list[tuple[str, PendingImpression]] = []
        pending = 0
        end = self.joiner.window_ms + self.joiner.lateness_ms
        for user, raw in list(table.items()):
            st = UserJoinState.decode(raw)
            pending += len(st.pending)
            out.extend((user, p) for p in st.pending if p.ts_ms + end <= watermark_ms)
        metrics.PENDING.set(pending - len(out))
        return out

    async def build_samples(self, due: list[tuple[str, PendingImpression]]) -> list[OutgoingSample]:
        """Read state as of each impression (one Redis round trip), assemble and encode its sample."""
        if not due:
            return []
        t0 = time.perf_counter()
        snaps = await self.state.read([AsOf(u, p.room, p.author, p.ts_ms) for u, p in due])
        metrics.REDIS_LATENCY.labels("read").observe(time.perf_counter() - t0)
        now_ms = int(time.time() * 1000)
        samples = []
        for (user, p), snap in zip(due, snaps, strict=True):
            row = assemble(self.spec, candidate_of(user, p), snap)
            value = self.codec.encode(p.impression_id, row, p.labels, event_ms=p.ts_ms, emitted_ms=now_ms)
            samples.append(OutgoingSample(user.encode(), value, p.impression_id, p.ts_ms, p.labels.entered))
        return samples

    def commit_closed(self, table: JoinTable, due: list[tuple[str, PendingImpression]], watermark_ms: int) -> None:
        """After the samples are acknowledged: mark their impressions closed in the join state.

        Re-reads each user's current state rather than writing back a copy taken before the awaits, so
        impressions and engagements the agent added meanwhile are kept.
        """
        by_user: dict[str, set[str]] = {}
        for user, p in due:
            by_user.setdefault(user, set()).add(p.impression_id)
        for user, ids in by_user.items():
            st = UserJoinState.decode(table.get(user))
            self.joiner.close(st, ids)
            self.joiner.forget_closed(st, watermark_ms, horizon_ms=10 * self.joiner.window_ms)
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


def candidate_of(user: str, p: PendingImpression) -> Candidate:
    return Candidate(user=user, room=p.room, author=p.author, category=p.category, ts_ms=p.ts_ms,
                     hour=p.hour, device=p.device, tab=p.tab, position=p.position)
