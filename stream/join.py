"""The delayed-label join, as pure logic over one user's join state.

An impression opens an attribution window of ``window_ms``. An engagement of the same user in the same
room belongs to the *latest* impression of that room shown at or before it, if that impression's window
still covers it. Labels are computed when the window closes, i.e. when stream time (the minimum over
input partitions, see ``processor.Watermark``) passes the window's end plus ``lateness_ms``; by then every
impression and engagement that could matter has been read, so the result does not depend on the order in
which the impression and engagement topics happened to be consumed.

Engagements are held in the join state until no open window can claim them. One that arrives for an
already-closed window is *late* (counted, not silently lost); one no impression ever claimed is
*unmatched*.

The stream worker keeps a ``UserJoinState`` per user in memory for the partitions it owns, durable in Redis
(``stream/join_store.py``); this module knows nothing about either, so it is tested directly.

>>> j = LabelJoiner(window_ms=60_000, lateness_ms=0)
>>> st = UserJoinState()
>>> shown = Candidate("u1", "r1", "a1", "c1", ts_ms=1_000, hour=20, device="ios", tab="live", position=0)
>>> j.add_impression(st, PendingImpression("i1", shown))
True
>>> j.add_engagement(st, HeldEngagement("e1", "r1", "enter", 5_000, 0.0))
<Attribution.HELD: 'held'>
>>> [(p.impression_id, labels.entered) for p, labels in j.due(st, watermark_ms=61_000)]
[('i1', True)]
>>> j.close(st, {"i1"}, watermark_ms=61_000)
0
>>> j.add_engagement(st, HeldEngagement("w1", "r1", "watch", 58_000, 40.0))
<Attribution.LATE: 'late'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import orjson

from stream.features import Candidate
from stream.samples import Labels

CLOSED_MEMORY = 64  # closed impressions remembered per user: to spot late engagements and replays
CLOSED_HORIZON_WINDOWS = 10  # ... for this many windows
SEEN_MEMORY = 64  # event ids remembered per user by the duplicate guard


class Attribution(enum.StrEnum):
    HELD = "held"  # kept until the windows that may claim it close
    LATE = "late"  # its impression's window had already closed
    DUPLICATE = "duplicate"  # the same engagement id again (a replay)
    UNMATCHED = "unmatched"  # expired without any impression claiming it


@dataclass
class PendingImpression:
    """An impression waiting for its window to close, with what its features will be assembled for."""

    impression_id: str
    candidate: Candidate

    @property
    def room(self) -> str:
        return self.candidate.room

    @property
    def ts_ms(self) -> int:
        return self.candidate.ts_ms


@dataclass
class ClosedImpression:
    impression_id: str
    room: str
    ts_ms: int


@dataclass
class HeldEngagement:
    event_id: str
    room: str
    kind: str
    ts_ms: int
    value: float  # watch seconds or gift value


@dataclass
class UserJoinState:
    pending: list[PendingImpression] = field(default_factory=list)
    closed: list[ClosedImpression] = field(default_factory=list)
    held: list[HeldEngagement] = field(default_factory=list)
    seen: list[tuple[str, int]] = field(default_factory=list)  # recent event ids (id, event ms): the id guard

    def encode(self) -> bytes:
        return orjson.dumps({"p": self.pending, "c": self.closed, "h": self.held, "s": self.seen})

    @staticmethod
    def decode(raw: bytes | None) -> UserJoinState:
        if not raw:
            return UserJoinState()
        obj = orjson.loads(raw)
        pending = [PendingImpression(p["impression_id"], Candidate(**p["candidate"])) for p in obj["p"]]
        closed = [ClosedImpression(**c) for c in obj["c"]]
        return UserJoinState(pending, closed, [HeldEngagement(**h) for h in obj["h"]],
                             [(i, t) for i, t in obj.get("s", ())])

    def empty(self) -> bool:
        return not self.pending and not self.closed and not self.held and not self.seen


@dataclass(frozen=True)
class LabelJoiner:
    window_ms: int = 120_000
    lateness_ms: int = 5_000
    # The event-id guard: an id this user sent within this much event time (at most SEEN_MEMORY ids) is a
    # producer's duplicate. Replays by the stream itself are caught by input position, not here.
    dedup_horizon_ms: int = 300_000

    def first_sight(self, st: UserJoinState, event_id: str, ts_ms: int) -> bool:
        """Remember ``event_id``; False when it was seen within the horizon (a duplicate: ignore the event)."""
        if any(i == event_id for i, _ in st.seen):
            return False
        st.seen.append((event_id, ts_ms))
        if len(st.seen) > SEEN_MEMORY:
            del st.seen[: len(st.seen) - SEEN_MEMORY]
        return True

    def closes_by(self, impression_ms: int, watermark_ms: int) -> bool:
        """Whether an impression's window (plus lateness) has ended by ``watermark_ms``."""
        return impression_ms + self.window_ms + self.lateness_ms <= watermark_ms

    def next_due_ms(self, st: UserJoinState) -> int:
        """When stream time next makes ``close`` or ``due`` change this state: the first window to end, held
        engagement to expire, or closed impression to leave the memory."""
        end = self.window_ms + self.lateness_ms
        return min([p.ts_ms + end for p in st.pending] + [e.ts_ms + end for e in st.held]
                   + [c.ts_ms + CLOSED_HORIZON_WINDOWS * self.window_ms for c in st.closed]
                   + [t + self.dedup_horizon_ms for _, t in st.seen], default=2**62)

    def add_impression(self, st: UserJoinState, imp: PendingImpression) -> bool:
        """Open a window; False when this impression id is already pending or closed (a replay)."""
        if any(p.impression_id == imp.impression_id for p in st.pending) or any(
            c.impression_id == imp.impression_id for c in st.closed
        ):
            return False
        st.pending.append(imp)
        return True

    def add_engagement(self, st: UserJoinState, e: HeldEngagement) -> Attribution:
        if any(h.event_id == e.event_id for h in st.held):
            return Attribution.DUPLICATE
        owner = self._owner(st, e)
        if isinstance(owner, ClosedImpression):
            return Attribution.LATE
        st.held.append(e)
        return Attribution.HELD

    def due(self, st: UserJoinState, watermark_ms: int) -> list[tuple[PendingImpression, Labels]]:
        """Impressions whose window (plus lateness) ended by ``watermark_ms``, with their labels.
        Changes nothing: the caller closes them with ``close`` once their samples are safe."""
        closing = {id(p): (p, Labels()) for p in st.pending if self.closes_by(p.ts_ms, watermark_ms)}
        if closing:
            for e in st.held:  # each engagement's owner once, not once per closing impression
                owner = closing.get(id(self._owner(st, e)))
                if owner is not None:
                    _credit(owner[1], e)
        return list(closing.values())

    def close(self, st: UserJoinState, impression_ids: set[str], watermark_ms: int) -> int:
        """Move impressions to the closed memory and drop engagements no open window can claim any more.
        Returns the number of dropped engagements that no impression ever claimed (unmatched)."""
        closing = [p for p in st.pending if p.impression_id in impression_ids]
        st.pending = [p for p in st.pending if p.impression_id not in impression_ids]
        st.closed.extend(ClosedImpression(p.impression_id, p.room, p.ts_ms) for p in closing)
        st.closed = st.closed[-CLOSED_MEMORY:]
        end = self.window_ms + self.lateness_ms
        # An engagement can only belong to an impression at most one window older; when stream time is
        # a window (plus lateness) past it, every such impression has closed or never existed.
        unmatched = sum(1 for e in st.held if e.ts_ms + end <= watermark_ms and self._owner(st, e) is None)
        st.held = [e for e in st.held if e.ts_ms + end > watermark_ms]
        horizon = CLOSED_HORIZON_WINDOWS * self.window_ms
        st.closed = [c for c in st.closed if c.ts_ms + horizon > watermark_ms]
        st.seen = [(i, t) for i, t in st.seen if t + self.dedup_horizon_ms > watermark_ms]
        return unmatched

    def _owner(self, st: UserJoinState, e: HeldEngagement) -> PendingImpression | ClosedImpression | None:
        """The latest impression of e's room at or before e, if its window covers e."""
        best: PendingImpression | ClosedImpression | None = None
        for imp in (*st.pending, *st.closed):
            if imp.room == e.room and imp.ts_ms <= e.ts_ms and (best is None or imp.ts_ms > best.ts_ms):
                best = imp
        if best is not None and e.ts_ms <= best.ts_ms + self.window_ms:
            return best
        return None


def _credit(labels: Labels, e: HeldEngagement) -> None:
    if e.kind == "enter":
        labels.entered = True
    elif e.kind == "watch":
        labels.entered = True  # a watch implies the user was in the room
        labels.watch_s += e.value
    elif e.kind == "like":
        labels.liked = True
    elif e.kind == "comment":
        labels.commented = True
    elif e.kind == "follow":
        labels.followed = True
    elif e.kind == "gift":
        labels.gifted, labels.gift_value = True, labels.gift_value + e.value
