"""The delayed-label join, as pure logic over one user's pending impressions.

An impression opens an attribution window; engagements of the same user in the same room inside the
window are credited to the latest such impression; when stream time passes the window's end (plus an
allowed lateness for cross-topic skew) the impression closes and yields exactly one sample, negative
when nothing came. Engagements for a closed impression are *late*, for none at all *unmatched*.

The Faust app stores a ``UserJoinState`` per user in a changelog-backed table; this module knows
nothing about Faust, so it is tested directly.

>>> j = LabelJoiner(window_ms=60_000, lateness_ms=0)
>>> st = UserJoinState()
>>> j.add_impression(st, PendingImpression("i1", "r1", "a1", "c1", 1_000, 20, "ios", "live", 0))
True
>>> j.attribute(st, room="r1", kind="enter", ts_ms=5_000, value=0.0)
<Attribution.CREDITED: 'credited'>
>>> [p.impression_id for p in j.close_due(st, watermark_ms=61_000)], st.pending
(['i1'], [])
>>> j.attribute(st, room="r1", kind="watch", ts_ms=62_000, value=40.0)
<Attribution.LATE: 'late'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import orjson

from stream.samples import Labels

CLOSED_MEMORY = 64  # closed impressions remembered per user, to tell late engagements and replays apart


class Attribution(enum.StrEnum):
    CREDITED = "credited"
    LATE = "late"  # its impression's window already closed
    UNMATCHED = "unmatched"  # no impression of this room for this user in memory


@dataclass
class PendingImpression:
    impression_id: str
    room: str
    author: str
    category: str
    ts_ms: int
    hour: int
    device: str
    tab: str
    position: int
    labels: Labels = field(default_factory=Labels)


@dataclass
class ClosedImpression:
    impression_id: str
    room: str
    deadline_ms: int


@dataclass
class UserJoinState:
    pending: list[PendingImpression] = field(default_factory=list)
    closed: list[ClosedImpression] = field(default_factory=list)

    def encode(self) -> bytes:
        return orjson.dumps({"p": self.pending, "c": self.closed})  # orjson serializes dataclasses natively

    @staticmethod
    def decode(raw: bytes | None) -> UserJoinState:
        if not raw:
            return UserJoinState()
        obj = orjson.loads(raw)
        pending = [PendingImpression(**{**p, "labels": Labels(**p["labels"])}) for p in obj["p"]]
        return UserJoinState(pending, [ClosedImpression(**c) for c in obj["c"]])

    def empty(self) -> bool:
        return not self.pending and not self.closed


@dataclass(frozen=True)
class LabelJoiner:
    window_ms: int = 120_000
    lateness_ms: int = 5_000

    def add_impression(self, st: UserJoinState, imp: PendingImpression) -> bool:
        """Open a window; False when this impression id is already pending or closed (a replay)."""
        known = {p.impression_id for p in st.pending} | {c.impression_id for c in st.closed}
        if imp.impression_id in known:
            return False
        st.pending.append(imp)
        return True

    def attribute(self, st: UserJoinState, room: str, kind: str, ts_ms: int, value: float) -> Attribution:
        """Credit an engagement to the latest impression of ``room`` shown at or before ``ts_ms``
        whose window is still open at ``ts_ms``."""
        candidates = [p for p in st.pending if p.room == room and p.ts_ms <= ts_ms <= p.ts_ms + self.window_ms]
        if not candidates:
            if any(c.room == room for c in st.closed):
                return Attribution.LATE
            return Attribution.UNMATCHED
        labels = max(candidates, key=lambda p: p.ts_ms).labels
        if kind == "enter":
            labels.entered = True
        elif kind == "watch":
            labels.entered = True  # a watch implies the user was in the room
            labels.watch_s += value
        elif kind == "like":
            labels.liked = True
        elif kind == "comment":
            labels.commented = True
        elif kind == "follow":
            labels.followed = True
        elif kind == "gift":
            labels.gifted, labels.gift_value = True, labels.gift_value + value
        return Attribution.CREDITED

    def close_due(self, st: UserJoinState, watermark_ms: int) -> list[PendingImpression]:
        """Remove and return the impressions whose window (plus lateness) ended by ``watermark_ms``."""
        due = [p for p in st.pending if p.ts_ms + self.window_ms + self.lateness_ms <= watermark_ms]
        self.close(st, {p.impression_id for p in due})
        return due

    def close(self, st: UserJoinState, impression_ids: set[str]) -> None:
        """Move these impressions from pending to the closed memory (ids not pending are ignored)."""
        closing = [p for p in st.pending if p.impression_id in impression_ids]
        if closing:
            st.pending = [p for p in st.pending if p.impression_id not in impression_ids]
            st.closed.extend(ClosedImpression(p.impression_id, p.room, p.ts_ms + self.window_ms) for p in closing)
            st.closed = st.closed[-CLOSED_MEMORY:]

    def forget_closed(self, st: UserJoinState, watermark_ms: int, horizon_ms: int) -> None:
        """Drop closed-impression memory older than ``horizon_ms`` so idle users' entries can be deleted."""
        st.closed = [c for c in st.closed if c.deadline_ms + horizon_ms > watermark_ms]
