"""A live-streaming world with a planted signal: the project's built-in workload.

Authors go live and offline over time; a room's popularity rises and falls during its life; users have
planted affinities to categories and a few favourite authors; each feed request shows a handful of rooms
that are live at that moment; engagements (enter, watch, like, comment, follow, gift) arrive after a
delay with probabilities driven by the planted affinities. Everything is drawn from one seeded
``numpy.random.Generator``, so a seed gives the same stream.

The planted enter probability is (``true_enter_logit``)::

    logit = base + w_cat * affinity(user, category) + w_fav * [author is a favourite]
            + w_quality * quality(author) + w_pop * popularity(room, t) - w_pos * position

>>> sim = Simulator(SimConfig(n_users=50, n_authors=20, seed=1))
>>> events = list(sim.events(max_impressions=200))
>>> sum(isinstance(e, Impression) for e in events)
200
>>> all(a.ts_ms <= b.ts_ms for a, b in zip(events, events[1:]))
True
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from stream.events import Engagement, EngagementKind, Event, Impression, LiveAction, LiveEvent

DEVICES = ("ios", "android", "web")
TABS = ("live", "follow", "explore")


@dataclass(frozen=True)
class SimConfig:
    n_users: int = 2_000
    n_authors: int = 300
    n_categories: int = 12
    seed: int = 0
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00Z; `zenith simulate` passes "now"
    requests_per_s: float = 40.0  # feed requests per simulated second, all users together
    rooms_per_request: int = 6
    live_fraction: float = 0.35  # share of authors live at any moment, in steady state
    mean_room_minutes: float = 30.0
    favourites_per_user: int = 3
    # planted-signal weights (logit scale)
    base_logit: float = -2.6
    w_category: float = 2.2
    w_favourite: float = 2.0
    w_quality: float = 0.8
    w_popularity: float = 0.8
    w_position: float = 0.15
    # engagement timing: enter after a short delay; the watch event arrives when the user leaves
    enter_delay_s: tuple[float, float] = (0.3, 4.0)
    mean_watch_s: float = 35.0
    max_watch_s: float = 100.0
    late_fraction: float = 0.01  # engagements deliberately delivered after any sensible attribution window
    late_delay_s: float = 900.0


@dataclass
class _Room:
    room_id: str
    author: int
    start_ms: int
    end_ms: int

    def popularity(self, t_ms: int) -> float:
        """A hump over the room's life: 0 at start and end, 1 in the middle."""
        life = max(self.end_ms - self.start_ms, 1)
        x = min(max((t_ms - self.start_ms) / life, 0.0), 1.0)
        return math.sin(math.pi * x) ** 0.5


@dataclass
class SimStats:
    """Counters the tests use to check the simulator's statistics."""

    impressions: int = 0
    enters: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    late: int = 0
    rooms_started: int = 0
    rooms_ended: int = 0


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.cfg = c = config
        self.rng = rng = np.random.default_rng(c.seed)
        self.author_category = rng.integers(0, c.n_categories, c.n_authors)
        self.author_quality = rng.normal(0.0, 1.0, c.n_authors)
        # Sparse category tastes: most mass on one or two categories.
        self.user_affinity = rng.dirichlet(np.full(c.n_categories, 0.3), c.n_users)
        self.user_favourites = np.stack(
            [rng.choice(c.n_authors, c.favourites_per_user, replace=False) for _ in range(c.n_users)]
        )
        self.user_device = rng.integers(0, len(DEVICES), c.n_users)
        self.user_activity = rng.lognormal(0.0, 0.8, c.n_users)
        self.user_activity /= self.user_activity.sum()
        self.stats = SimStats()
        self._live: dict[int, _Room] = {}  # author -> live room
        self._room_seq = itertools.count()
        self._event_seq = itertools.count()

    # ---- the planted signal -------------------------------------------------------------------------
    def true_enter_logit(self, user: int, author: int, popularity: float, position: int) -> float:
        c = self.cfg
        cat = self.author_category[author]
        affinity = self.user_affinity[user, cat] * c.n_categories / 4.0  # ~0..3 for a strong taste
        favourite = float(author in self.user_favourites[user])
        return (c.base_logit + c.w_category * min(affinity, 1.5) + c.w_favourite * favourite
                + c.w_quality * self.author_quality[author] + c.w_popularity * popularity
                - c.w_position * position)

    def live_rooms(self) -> list[tuple[str, str, str]]:
        """(room, author, category) of the rooms live at the simulator's current time."""
        return [(r.room_id, f"a{r.author}", f"c{self.author_category[r.author]}") for r in self._live.values()]

    # ---- the stream ----------------------------------------------------------------------------------
    def events(self, max_impressions: int | None = None, duration_s: float | None = None) -> Iterator[Event]:
        """Yield events in timestamp order until either limit is reached (at least one must be given)."""
        assert max_impressions is not None or duration_s is not None, "give max_impressions or duration_s"
        c, rng = self.cfg, self.rng
        end_ms = c.start_ms + int(duration_s * 1000) if duration_s is not None else None
        heap: list[tuple[int, int, Event]] = []

        def push(ev: Event) -> None:
            heapq.heappush(heap, (ev.ts_ms, next(self._event_seq), ev))

        mean_live_ms = c.mean_room_minutes * 60_000
        mean_off_ms = mean_live_ms * (1 - c.live_fraction) / c.live_fraction
        # Steady state at t0: a live_fraction of authors are mid-room.
        for author in range(c.n_authors):
            if rng.random() < c.live_fraction:
                started = c.start_ms - int(rng.uniform(0, mean_live_ms))
                self._schedule_room(author, started, mean_live_ms, push, announce=True, now=c.start_ms)
            else:
                self._schedule_offline(author, c.start_ms, mean_off_ms, push)

        t_ms = float(c.start_ms)
        while True:
            t_ms += rng.exponential(1000.0 / c.requests_per_s)
            # Release everything scheduled before this request (room changes, delayed engagements).
            while heap and heap[0][0] <= t_ms:
                ev = heapq.heappop(heap)[2]
                if isinstance(ev, _OfflineUntil):
                    self._schedule_room(ev.author, ev.ts_ms, mean_live_ms, push, announce=True, now=ev.ts_ms)
                    continue
                if isinstance(ev, LiveEvent) and ev.action is LiveAction.END:
                    self._live.pop(int(ev.author_id[1:]), None)
                    self.stats.rooms_ended += 1
                    self._schedule_offline(int(ev.author_id[1:]), ev.ts_ms, mean_off_ms, push)
                yield ev
            if (end_ms is not None and t_ms >= end_ms) or (
                max_impressions is not None and self.stats.impressions >= max_impressions
            ):
                break
            yield from self._feed_request(int(t_ms), push, max_impressions)
        # Drain engagements still in flight so that every planted label is delivered.
        for _, _, ev in sorted(heap):
            if isinstance(ev, Engagement):
                yield ev

    def _schedule_offline(self, author: int, now_ms: int, mean_off_ms: float, push) -> None:
        push(_OfflineUntil(ts_ms=now_ms + int(self.rng.exponential(mean_off_ms)) + 1, author=author))

    def _schedule_room(self, author: int, start_ms: int, mean_live_ms: float, push, *, announce: bool,
                       now: int) -> None:
        length = max(int(self.rng.exponential(mean_live_ms)), 5 * 60_000)
        room = _Room(f"r{author}-{next(self._room_seq)}", author, start_ms, max(start_ms + length, now + 60_000))
        self._live[author] = room
        self.stats.rooms_started += 1
        cat = f"c{self.author_category[author]}"
        meta = dict(room_id=room.room_id, author_id=f"a{author}", category=cat, title=f"{cat} live by a{author}")
        if announce:
            push(LiveEvent(event_id=self._eid(), action=LiveAction.START, ts_ms=max(start_ms, now), **meta))
        push(LiveEvent(event_id=self._eid(), action=LiveAction.END, ts_ms=room.end_ms, **meta))

    def _feed_request(self, t_ms: int, push, max_impressions: int | None) -> Iterator[Event]:
        c, rng = self.cfg, self.rng
        live = list(self._live.values())
        if not live:
            return
        user = int(rng.choice(c.n_users, p=self.user_activity))
        k = min(c.rooms_per_request, len(live))
        # Exposure mixes popularity and chance, not the user's taste, so the signal must be learned.
        pops = np.array([r.popularity(t_ms) + 0.2 for r in live])
        shown = rng.choice(len(live), k, replace=False, p=pops / pops.sum())
        request_id = f"q{self._eid()}"
        hour = (t_ms // 3_600_000) % 24
        tab = TABS[int(rng.integers(0, len(TABS)))]
        for position, idx in enumerate(shown):
            if max_impressions is not None and self.stats.impressions >= max_impressions:
                return
            room = live[int(idx)]
            imp = Impression(
                event_id=self._eid(), request_id=request_id, user_id=f"u{user}", room_id=room.room_id,
                author_id=f"a{room.author}", position=position, ts_ms=t_ms, hour=int(hour),
                device=DEVICES[self.user_device[user]], tab=tab, category=f"c{self.author_category[room.author]}",
            )
            self.stats.impressions += 1
            yield imp
            logit = self.true_enter_logit(user, room.author, room.popularity(t_ms), position)
            if rng.random() < 1.0 / (1.0 + math.exp(-logit)):
                self._plant_engagements(imp, user, room, logit, push)

    def _plant_engagements(self, imp: Impression, user: int, room: _Room, logit: float, push) -> None:
        c, rng = self.cfg, self.rng
        self.stats.enters += 1
        late = rng.random() < c.late_fraction
        shift = int(c.late_delay_s * 1000) if late else 0
        self.stats.late += int(late)
        enter_ms = imp.ts_ms + int(rng.uniform(*c.enter_delay_s) * 1000) + shift
        # Engaged users (high logit) watch longer and interact more.
        p_engaged = 1.0 / (1.0 + math.exp(-(logit - 0.5)))
        watch_s = float(min(rng.exponential(c.mean_watch_s * (0.4 + 1.2 * p_engaged)), c.max_watch_s))
        watch_s = max(round(watch_s, 1), 1.0)
        common = dict(user_id=imp.user_id, room_id=imp.room_id, author_id=imp.author_id)

        def emit(kind: EngagementKind, at_ms: int, **extra: float) -> None:
            self.stats.by_kind[kind.value] = self.stats.by_kind.get(kind.value, 0) + 1
            push(Engagement(event_id=self._eid(), kind=kind, ts_ms=at_ms, **common, **extra))

        emit(EngagementKind.ENTER, enter_ms)
        leave_ms = enter_ms + int(watch_s * 1000)
        emit(EngagementKind.WATCH, leave_ms, watch_seconds=watch_s)
        during = lambda: enter_ms + int(rng.uniform(0.2, 1.0) * watch_s * 1000)  # noqa: E731
        if rng.random() < 0.35 * p_engaged:
            emit(EngagementKind.LIKE, during())
        if rng.random() < 0.12 * p_engaged:
            emit(EngagementKind.COMMENT, during())
        if rng.random() < 0.08 * p_engaged:
            emit(EngagementKind.FOLLOW, during())
        if rng.random() < 0.04 * p_engaged:
            emit(EngagementKind.GIFT, during(), gift_value=float(rng.choice([1, 5, 10, 50])))

    def _eid(self) -> str:
        return f"s{self.cfg.seed}-{next(self._event_seq)}"


@dataclass(frozen=True)
class _OfflineUntil:
    """Internal heap marker: the author goes live again at ``ts_ms``. Never yielded."""

    ts_ms: int
    author: int
