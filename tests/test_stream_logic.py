"""Pure stream logic: event validation, the label join, the watermark, the sample codec, the simulator."""

from __future__ import annotations

import random

import numpy as np
import pytest

from model.spec import default_live_spec
from stream.events import (
    Engagement,
    EngagementKind,
    Impression,
    LiveEvent,
    MalformedEvent,
    decode_event,
    encode_event,
)
from stream.features import Candidate, FeatureRow
from stream.join import Attribution, HeldEngagement, LabelJoiner, PendingImpression, UserJoinState
from stream.processor import Watermark
from stream.samples import Labels, SampleCodec, SampleFormatError
from stream.simulator import SimConfig, Simulator

WINDOW = 10_000


def imp(i: str, room: str, ts: int) -> PendingImpression:
    return PendingImpression(i, Candidate("u1", room, "a1", "c1", ts, 12, "ios", "live", 0))


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{nope", "not JSON"),
        (b"[1,2]", "expected a JSON object"),
        (b'{"v": 9, "type": "impression"}', "unsupported schema version"),
        (b'{"v": 1, "type": "purchase"}', "unknown event type 'purchase'"),
        (b'{"v": 1, "type": "engagement", "event_id": "e", "user_id": "u", "room_id": "r", "kind": "hug",'
         b' "ts_ms": 1700000000000}', "kind='hug' is not one of"),
        (b'{"v": 1, "type": "engagement", "event_id": "e", "user_id": "u", "room_id": "r", "kind": "watch",'
         b' "ts_ms": 1700000000}', "send epoch milliseconds"),
        (b'{"v": 1, "type": "engagement", "event_id": "e", "user_id": "", "room_id": "r", "kind": "enter",'
         b' "ts_ms": 1700000000000}', "user_id must not be empty"),
        (b'{"v": 1, "type": "engagement", "event_id": "e", "user_id": "u", "room_id": "r", "kind": "watch",'
         b' "ts_ms": 1700000000000, "watch_seconds": -3}', "watch_seconds must be a finite non-negative number"),
    ],
)
def test_malformed_events_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent, match=reason):
        decode_event(raw)


def test_events_round_trip() -> None:
    sim = Simulator(SimConfig(n_users=30, n_authors=10, seed=4))
    events = list(sim.events(max_impressions=300))
    assert [decode_event(encode_event(e)) for e in events] == events


def test_join_credits_the_latest_impression_regardless_of_arrival_order() -> None:
    """Two impressions of one room; the engagements must land on the latest one shown before each,
    whatever order the topics deliver them in."""
    j = LabelJoiner(window_ms=WINDOW, lateness_ms=0)
    impressions = [imp("i1", "r1", 1_000), imp("i2", "r1", 3_000), imp("i3", "r2", 3_500)]
    engagements = [
        HeldEngagement("e1", "r1", "enter", 2_000, 0.0),  # i1
        HeldEngagement("e2", "r1", "watch", 4_000, 40.0),  # i2 (latest r1 impression before it)
        HeldEngagement("e3", "r2", "like", 9_000, 0.0),  # i3
        HeldEngagement("e4", "r2", "follow", 20_000, 0.0),  # after i3's window: nobody's
    ]
    results = set()
    for seed in range(20):
        items: list = impressions + engagements
        random.Random(seed).shuffle(items)
        st = UserJoinState()
        for x in items:
            if isinstance(x, PendingImpression):
                j.add_impression(st, x)
            else:
                j.add_engagement(st, x)
        due = j.due(st, watermark_ms=30_000)
        results.add(tuple(sorted((p.impression_id, lab.entered, lab.watch_s, lab.liked, lab.followed)
                                 for p, lab in due)))
        assert j.close(st, {p.impression_id for p, _ in due}, watermark_ms=40_000) == 1  # e4 unmatched
    assert results == {(("i1", True, 0.0, False, False), ("i2", True, 40.0, False, False),
                        ("i3", False, 0.0, True, False))}


def test_join_ignores_replays_and_counts_late_engagements() -> None:
    j = LabelJoiner(window_ms=WINDOW, lateness_ms=0)
    st = UserJoinState()
    assert j.add_impression(st, imp("i1", "r1", 1_000))
    assert not j.add_impression(st, imp("i1", "r1", 1_000))
    assert j.add_engagement(st, HeldEngagement("w", "r1", "watch", 2_000, 20.0)) is Attribution.HELD
    assert j.add_engagement(st, HeldEngagement("w", "r1", "watch", 2_000, 20.0)) is Attribution.DUPLICATE
    [(p, labels)] = j.due(st, watermark_ms=11_000)
    assert labels.watch_s == 20.0  # not doubled by the replay
    j.close(st, {"i1"}, watermark_ms=11_000)
    assert not j.add_impression(st, imp("i1", "r1", 1_000))  # a replay after close opens nothing
    assert j.add_engagement(st, HeldEngagement("late", "r1", "like", 9_000, 0.0)) is Attribution.LATE
    assert UserJoinState.decode(st.encode()) == st


def test_watermark_is_the_slowest_partition_and_idle_partitions_stop_holding_it() -> None:
    w = Watermark(idle_s=5)
    w.expect(["imp/0", "eng/0"], wall_s=0)
    w.observe("imp/0", 50_000, wall_s=1)
    assert w.current(wall_s=1) == 0  # eng/0 assigned but silent: hold
    w.observe("eng/0", 20_000, wall_s=2)
    assert w.current(wall_s=2) == 20_000
    w.observe("imp/0", 60_000, wall_s=9)  # eng/0 silent for 7 s while imp/0 delivers
    assert w.current(wall_s=9) == 60_000
    assert w.current(wall_s=20) == 60_000 + 11_000  # everything quiet: follow the wall clock


def test_watermark_after_a_restart_where_only_some_partitions_deliver() -> None:
    """A restarted worker whose other partitions were already fully consumed must still close windows."""
    w = Watermark(idle_s=2)
    w.expect(["imp/0", "imp/1", "eng/0", "eng/1"], wall_s=0)
    w.observe("imp/0", 50_000, wall_s=1)
    assert w.current(wall_s=1.5) == 0  # the others may still deliver
    assert w.current(wall_s=10) == 50_000 + 9_000  # all quiet since wall 1: time flows from what came


def test_sample_codec_round_trip_and_refuses_another_spec() -> None:
    spec = default_live_spec()
    codec = SampleCodec(spec)
    rng = np.random.default_rng(0)
    rows = [FeatureRow(rng.integers(1, 1 << 62, spec.n_ids), rng.integers(0, 1 << 62, (spec.n_seqs, spec.seq_len)),
                       rng.random(spec.n_dense).astype(np.float32)) for _ in range(5)]
    raw = [codec.encode(f"i{k}", r, Labels(entered=k % 2 == 0, watch_s=31.0 * k), 1000 + k, 2000 + k)
           for k, r in enumerate(rows)]
    d = codec.decode(raw)
    assert d.impression_ids == [f"i{k}" for k in range(5)]
    np.testing.assert_array_equal(d.arrays.ids, np.stack([r.ids for r in rows]))
    np.testing.assert_array_equal(d.arrays.seqs, np.stack([r.seqs for r in rows]))
    assert d.arrays.labels[:, 0].tolist() == [1, 0, 1, 0, 1]
    assert d.arrays.labels[:, 1].tolist() == [0, 1, 1, 1, 1]  # long view: watch >= 30 s
    other = SampleCodec(default_live_spec(seq_len=10))
    with pytest.raises(SampleFormatError, match="another feature spec"):
        other.decode(raw)


def test_simulator_is_deterministic_and_its_planted_affinities_move_engagement() -> None:
    def run(seed: int) -> list:
        return list(Simulator(SimConfig(n_users=300, n_authors=60, seed=seed)).events(max_impressions=20_000))

    a, b = run(7), run(7)
    assert a == b
    assert a != run(8)
    sim = Simulator(SimConfig(n_users=300, n_authors=60, seed=7))
    events = list(sim.events(max_impressions=20_000))
    imps = [e for e in events if isinstance(e, Impression)]
    entered = {(e.user_id, e.room_id) for e in events if isinstance(e, Engagement) and e.kind is EngagementKind.ENTER}
    # Engagement arrives after its impression, with the configured delay.
    shown_at: dict[tuple[str, str], list[int]] = {}
    for e in imps:
        shown_at.setdefault((e.user_id, e.room_id), []).append(e.ts_ms)
    delays = [e.ts_ms - max(t for t in shown_at[(e.user_id, e.room_id)] if t <= e.ts_ms) for e in events
              if isinstance(e, Engagement) and e.kind is EngagementKind.ENTER and e.ts_ms < imps[-1].ts_ms]
    lo, hi = sim.cfg.enter_delay_s
    assert min(delays) >= 0
    # (a room shown again before the enter makes a shorter delay; the deliberately late ones a longer one)
    assert lo * 1000 <= np.median(delays) <= hi * 1000
    assert np.quantile(delays, 0.9) <= hi * 1000
    # Rooms of a user's favourite authors are entered far more often than others.
    fav, other = [], []
    for e in imps:
        user, author = int(e.user_id[1:]), int(e.author_id[1:])
        (fav if author in sim.user_favourites[user] else other).append((e.user_id, e.room_id) in entered)
    assert np.mean(fav) > 1.5 * np.mean(other), (np.mean(fav), np.mean(other))
    # The rate of impressions follows the configured request rate (6 rooms per request).
    span_s = (imps[-1].ts_ms - imps[0].ts_ms) / 1000
    assert 0.8 < len(imps) / span_s / (sim.cfg.requests_per_s * sim.cfg.rooms_per_request) < 1.2
    live_at_start = sum(isinstance(e, LiveEvent) and e.ts_ms == sim.cfg.start_ms for e in events)
    assert sim.stats.rooms_ended > 0 and sim.stats.rooms_started > live_at_start  # rooms come and go


def test_validation_bounds_time_against_the_wall_clock_and_stream_time() -> None:
    from stream.events import EventLimits

    now = 1_800_000_000_000
    ok = Impression(event_id="e", request_id="q", user_id="u", room_id="r", author_id="a", position=0,
                    ts_ms=now, hour=1, device="ios", tab="live")
    raw = encode_event(ok)
    assert decode_event(raw, now_ms=now, stream_ms=now) == ok
    with pytest.raises(MalformedEvent, match="in the future"):
        decode_event(raw, now_ms=now - 301_000)
    with pytest.raises(MalformedEvent, match="behind stream time"):
        decode_event(raw, now_ms=now, stream_ms=now + 3_601_000)
    assert decode_event(raw, now_ms=now + 10 * 86_400_000) == ok  # an old log replays: no wall-clock age bound
    with pytest.raises(MalformedEvent, match="old"):
        decode_event(raw, EventLimits(max_age_ms=86_400_000), now_ms=now + 10 * 86_400_000)
    with pytest.raises(MalformedEvent, match="oversized"):
        decode_event(raw, EventLimits(max_message_bytes=100), now_ms=now)
    with pytest.raises(ValueError, match="must be positive"):
        EventLimits(max_future_skew_ms=0)


def test_the_lag_bound_measures_from_partitions_not_from_the_wall_clock() -> None:
    w = Watermark(idle_s=2)
    w.observe("a/0", 5_000, wall_s=0)
    w.observe("b/0", 3_000, wall_s=0)
    assert w.current(wall_s=100) > 90_000  # a quiet stream's time follows the wall clock ...
    assert w.floor() == 3_000  # ... the validation's reference does not
    w.touch(wall_s=100)
    assert w.current(wall_s=101) == 3_000  # after an outage the input counts as held, not quiet


def test_the_join_index_holds_about_one_entry_per_user_and_finds_what_is_due() -> None:
    """Closing costs what closes: users are found by due time, and re-touching a user in every batch does
    not grow the index (one live entry per user)."""
    from stream.features import Candidate
    from stream.join_store import JoinPartition

    j = LabelJoiner(window_ms=10_000, lateness_ms=0)
    part = JoinPartition(0)
    for step in range(200):  # every user gets an impression in every batch
        for u in range(50):
            shown = Candidate(f"u{u}", "r1", "a1", "c1", ts_ms=step * 100, hour=0, device="ios", tab="live",
                              position=0)
            j.add_impression(part.get(f"u{u}"), PendingImpression(f"i{step}-{u}", shown))
            part.touched(f"u{u}")
        part.reindex(j)
        part.dirty.clear()
    assert len(part._due) <= 2 * 50
    assert part.due_users(9_999, j, limit=10**9) == []  # the first window ends at 10 s
    assert sorted(part.due_users(10_000, j, limit=10**9)) == sorted(f"u{u}" for u in range(50))
    assert len(part.due_users(10_000, j, limit=3)) == 3  # bounded by the impressions a tick may close


def test_a_user_whose_due_time_moves_earlier_and_back_is_due_once() -> None:
    """A held engagement moves the user's due time earlier; once it is gone the due time is back where it
    was, so the index holds two entries at that time. The user must still be closed once, not twice."""
    from stream.features import Candidate
    from stream.join_store import JoinPartition

    j = LabelJoiner(window_ms=10_000, lateness_ms=0)
    part = JoinPartition(0)
    st = part.get("u1")
    j.add_impression(st, PendingImpression("i1", Candidate("u1", "r1", "a1", "c1", ts_ms=50_000, hour=0,
                                                           device="ios", tab="live", position=0)))
    part.touched("u1")
    part.reindex(j)  # due at 60 s
    st.held.append(HeldEngagement("e0", "r9", "enter", 1_000, 0.0))  # expires at 11 s: due earlier
    part.touched("u1")
    part.reindex(j)
    assert part.due_users(11_000, j, limit=10) == ["u1"]
    j.close(st, set(), 11_000)  # the engagement expires: due at 60 s again
    part.touched("u1")
    part.reindex(j)
    assert part.due_users(11_000, j, limit=10) == []  # re-indexed at 60 s, next to the first entry
    assert part.due_users(60_000, j, limit=10) == ["u1"]
