"""The live state against a real Redis (one server and a Redis Cluster): point-in-time reads with their stated
bound, idempotence by input position, and dedup memory that does not grow with the events."""

from __future__ import annotations

import asyncio
import random

import pytest

from model.spec import default_live_spec
from state.store import AsOf, LiveState, Position, StateConfig
from stream.audit import expected_user_counters
from stream.events import Engagement, EngagementKind, Event, Impression
from stream.join import LabelJoiner
from stream.join_store import JoinStore
from stream.processor import Input, StreamProcessor

BUCKET_MS = 1000


def _events(n: int, seed: int, users: int = 6, rooms: int = 4, span_ms: int = 60_000) -> list[Event]:
    rng = random.Random(seed)
    out: list[Event] = []
    for i in range(n):
        ts = 1_700_000_000_000 + rng.randrange(span_ms)
        user, room = f"u{rng.randrange(users)}", f"r{rng.randrange(rooms)}"
        if rng.random() < 0.6:
            out.append(Impression(event_id=f"i{seed}-{i}", request_id="q", user_id=user, room_id=room,
                                  author_id=f"a{room}", position=0, ts_ms=ts, hour=1, device="ios", tab="live"))
        else:
            out.append(Engagement(event_id=f"e{seed}-{i}", user_id=user, room_id=room, kind=EngagementKind.WATCH,
                                  ts_ms=ts, author_id=f"a{room}", watch_seconds=round(rng.uniform(1, 90), 3)))
    return sorted(out, key=lambda e: e.ts_ms)


def _exact(events: list[Event], user: str, before_ms: int) -> dict[str, float]:
    """Brute force: the user's counters from the events strictly before ``before_ms``."""
    mine = [e for e in events if e.user_id == user and e.ts_ms < before_ms]
    return {k: round(v, 6) for k, v in expected_user_counters(mine).items()}


async def _apply_in_batches(state: LiveState, events: list[Event], sizes: list[int], shuffle: random.Random | None
                            ) -> None:
    from stream.processor import state_change

    order = list(range(len(events)))
    if shuffle is not None:  # another arrival order: topics are consumed independently
        shuffle.shuffle(order)
    k = 0
    for size in sizes:
        chunk = order[k:k + size]
        k += size
        await state.apply([state_change(state, events[i]) for i in chunk], [Position("t/0", i) for i in chunk])
    assert k >= len(events)


@pytest.mark.parametrize("shuffled", [False, True])
def test_as_of_reads_see_exactly_the_events_before_the_bucket_whatever_the_batching(redis_client, redis_url,
                                                                                     shuffled: bool) -> None:
    """The stated approximation, checked exactly: a read as of t counts the events before the start of t's
    bucket -- never one at or after t (no leakage), at most one bucket of history left out -- and the same
    whichever batches (and, shuffled, arrival order) the events came in."""
    events = _events(600, seed=1)
    times = [e.ts_ms for e in events[::7]] + [events[0].ts_ms - 1, events[-1].ts_ms + 5_000]

    async def run(prefix: str, sizes: list[int]) -> list[dict[str, float]]:
        state = LiveState.from_url(redis_url, StateConfig(prefix=prefix, log_bucket_ms=BUCKET_MS))
        try:
            rng = random.Random(3) if shuffled else None
            # unordered input needs one batch per offset range: positions are per call, not per event
            await _apply_in_batches(state, events, sizes if not shuffled else [len(events)], rng)
            snaps = await state.read([AsOf(f"u{i % 6}", "r1", "ar1", t) for i, t in enumerate(times)])
            return [s.user for s in snaps]
        finally:
            await state.aclose()

    one = asyncio.run(run("a:", [len(events)]))
    many = asyncio.run(run("b:", [37, 1, 200, 362]))
    assert one == many, "the batching changed what a read sees"
    for i, (t, got) in enumerate(zip(times, one, strict=True)):
        user = f"u{i % 6}"
        want = _exact(events, user, t - t % BUCKET_MS)
        assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if v}, (t, user)
        upper = _exact(events, user, t)
        assert all(got.get(k, 0) <= upper.get(k, 0) + 1e-6 for k in upper)  # nothing from t on


def test_the_scorer_s_item_read_equals_the_general_read(redis_client, redis_url) -> None:
    """``read_items`` (one script call for many rooms and authors, the scorer's shared snapshot) gives the
    rooms, room metadata and authors that ``read`` gives, at times inside and after the events."""
    events = _events(400, seed=4, rooms=5)

    async def run() -> None:
        state = LiveState.from_url(redis_url, StateConfig(prefix="items:", log_bucket_ms=BUCKET_MS))
        try:
            await _apply_in_batches(state, events, [400], None)
            await state.apply([state.start_room(events[0].ts_ms - 10, "r2", "ar2", "c9", "a title")])
            rooms, authors = [f"r{i}" for i in range(6)], [f"ar{i}" for i in range(6)]  # r5/ar5: never seen
            for t in (events[100].ts_ms, events[300].ts_ms + 1, events[-1].ts_ms + 5_000):
                got_rooms, got_authors = await state.read_items(rooms, authors, t)
                want = await state.read([AsOf("", r, a, t) for r, a in zip(rooms, authors, strict=True)])
                assert [(s.room, s.room_meta) for s in got_rooms] == [(s.room, s.room_meta) for s in want]
                assert got_authors == [s.author for s in want]
                assert got_rooms[2].room_meta["category"] == "c9" and any(s.room for s in got_rooms)
        finally:
            await state.aclose()

    asyncio.run(run())


def test_a_redelivered_batch_changes_nothing_even_split_differently(redis_client, redis_url) -> None:
    events = _events(400, seed=2)

    async def run() -> tuple[dict, dict]:
        state = LiveState.from_url(redis_url)
        try:
            from stream.processor import state_change

            changes = [state_change(state, e) for e in events]
            pos = [Position(f"t/{i % 4}", i // 4) for i in range(len(events))]
            first = await state.apply(changes[:250], pos[:250])
            # A restart redelivers from an older offset with other batch boundaries: overlapping, straddling.
            again = await state.apply(changes[100:320], pos[100:320])
            rest = await state.apply(changes[300:], pos[300:])
            assert (first.applied, again.applied, again.replayed, rest.replayed) == (250, 70, 150, 20)
            return await state.positions(), {k: v for k, v in (await state.read(
                [AsOf(f"u{i}", "", "", 2**62) for i in range(6)]))[0].user.items()}
        finally:
            await state.aclose()

    positions, u0 = asyncio.run(run())
    assert positions == {f"t/{p}": 99 for p in range(4)}
    assert u0 == pytest.approx(_exact(events, "u0", 2**62))


def _dedup_footprint(client: object) -> tuple[int, int]:
    """(keys that are not a user's, room's, author's or join partition's state, fields in them)."""
    keys = [k for k in client.scan_iter(match="zl:*") if not k.startswith((b"zl:{u:", b"zl:{r:", b"zl:{a:"))
            and not k.endswith(b":join")]
    return len(keys), sum(client.hlen(k) for k in keys)


def test_dedup_memory_does_not_grow_with_the_events(redis_client, redis_url) -> None:
    """Ten times the events through the stream's state writes and label join (positions, id guard included):
    the same number of dedup keys and fields; the id guard holds at most its bound per user."""
    async def run(n: int) -> tuple[tuple[int, int], int]:
        redis_client.flushdb()
        state = LiveState.from_url(redis_url)
        joins = JoinStore(LabelJoiner(10_000, 1_000), state.r)
        proc = StreamProcessor(state, default_live_spec(), joins.joiner, joins)
        try:
            for part in range(4):
                await joins.load(part)
            events = _events(n, seed=n, users=40, rooms=10, span_ms=n * 50)
            offsets = [0, 0, 0, 0]
            for k in range(0, n, 500):
                batch = []
                for e in events[k:k + 500]:
                    p = int(e.user_id[1:]) % 4
                    batch.append(Input(e, Position(f"{'imp' if isinstance(e, Impression) else 'eng'}/{p}",
                                                   offsets[p]), p))
                    offsets[p] += 1
                await proc.on_events(proc.admit(batch))
                await proc.close_due(events[min(k + 499, n - 1)].ts_ms)
            seen = sum(len(st.seen) for part in joins.partitions.values() for st in part.users.values())
            return _dedup_footprint(redis_client), seen
        finally:
            await state.aclose()

    small, seen_small = asyncio.run(run(1_000))
    large, seen_large = asyncio.run(run(10_000))
    assert small == large and small[0] <= 1 + 4, (small, large)  # the state's pos hash + one meta per partition
    assert seen_large <= 64 * 40


def test_the_state_on_a_redis_cluster_matches_one_server(redis_cluster_url, redis_client, redis_url) -> None:
    """Same writes, replays and reads on a three-master Cluster (positions per entity there) as on one server."""
    events = _events(300, seed=4)

    async def run(url: str) -> list:
        state = LiveState.from_url(url, StateConfig(prefix=f"c{random.randrange(10**9)}:"))
        try:
            from stream.processor import state_change

            changes = [state_change(state, e) for e in events]
            pos = [Position("t/0", i) for i in range(len(events))]
            await state.apply(changes[:200], pos[:200])
            report = await state.apply(changes[150:], pos[150:])  # straddles
            assert report.replayed == 50 and report.applied == 100
            assert (await state.apply(changes, pos)).applied == 0
            snaps = await state.read([AsOf(f"u{i % 6}", f"r{i % 4}", f"ar{i % 4}", e.ts_ms)
                                      for i, e in enumerate(events[::10])])
            return [(s.user, s.room, s.author, [h.room for h in s.history]) for s in snaps]
        finally:
            await state.aclose()

    on_cluster = asyncio.run(run(redis_cluster_url))
    assert LiveState.from_url(redis_cluster_url).cluster
    assert on_cluster == asyncio.run(run(redis_url))
