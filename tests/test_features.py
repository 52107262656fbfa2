"""Feature assembly: the scorer's batched path gives exactly the stream's per-row features, and a forward pass
with the user's sequences given once gives the per-row forward's scores, for every architecture."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from model.batch import Batch
from model.config import Arch, preset
from model.factory import build_model
from state.store import HistoryItem, Snapshot
from stream.features import (
    Candidate,
    RequestContext,
    assemble,
    assemble_batch,
    default_live_spec,
    item_side,
    user_side,
)

SPEC = default_live_spec()
TS = 5_000_000


def _user_snapshot(rng: random.Random) -> Snapshot:
    history = [HistoryItem(TS - 1000 * k - 1, rng.choice(["enter", "watch"]), f"r{rng.randrange(12)}",
                           rng.choice([f"a{rng.randrange(6)}", ""]), rng.choice([f"c{rng.randrange(4)}", ""]),
                           rng.uniform(0, 600)) for k in range(rng.randrange(0, 50))]
    return Snapshot(as_of_ms=TS, user={"impressions": rng.randrange(60), "enters": rng.randrange(20),
                                       "watch_s": rng.uniform(0, 5e3), "watches": rng.randrange(20)}, history=history)


def _room_snapshot(rng: random.Random, room: int) -> Snapshot:
    start = rng.choice([0, TS - rng.randrange(1, 3_600_000), TS + 5000])  # unknown, earlier, (clock skew) later
    return Snapshot(as_of_ms=TS, room={"audience": rng.randrange(-1, 300), "impressions": rng.randrange(99),
                                       "enters": rng.randrange(30), "watch_s": rng.uniform(0, 1e4),
                                       "watches": rng.randrange(9), "likes": rng.randrange(5), "gifts": 1.0},
                    room_meta={"category": f"c{room % 4}", "author": f"a{room % 6}", "start_ms": str(start)},
                    author={"enters": rng.randrange(50), "watch_s": 70.0, "followers": rng.randrange(1000)})


@pytest.mark.parametrize("seed", range(5))
def test_batched_assembly_equals_the_per_row_assembly_exactly(seed: int) -> None:
    rng = random.Random(seed)
    user = _user_snapshot(rng)
    rooms = [rng.randrange(12) for _ in range(60)]
    snaps = {r: _room_snapshot(rng, r) for r in set(rooms)}
    # a candidate may name its author and category, or leave them to the room's state
    cands = [(f"r{r}", rng.choice([f"a{r % 6}", f"a{rng.randrange(8)}", ""]), rng.choice([f"c{r % 4}", ""]))
             for r in rooms]
    ctx = RequestContext(user="u7", ts_ms=TS, hour=21, device="ios", tab="live")
    items = [item_side(SPEC, room, author, cat, snaps[int(room[1:])]) for room, author, cat in cands]
    batch = assemble_batch(SPEC, ctx, user_side(SPEC, "u7", user), items)
    assert batch.ids.shape == (60, SPEC.n_ids) and batch.dense.shape == (60, SPEC.n_dense)
    crosses_seen = 0
    for i, (room, author, cat) in enumerate(cands):
        r = snaps[int(room[1:])]
        whole = Snapshot(as_of_ms=TS, user=user.user, history=user.history, room=r.room, room_meta=r.room_meta,
                         author=r.author)
        row = assemble(SPEC, Candidate("u7", room, author, cat, TS, 21, "ios", "live", i), whole)
        np.testing.assert_array_equal(batch.row(i).ids, row.ids)
        np.testing.assert_array_equal(batch.row(i).seqs, row.seqs)
        np.testing.assert_array_equal(batch.row(i).dense, row.dense)
        crosses_seen += int(row.dense[SPEC.dense_index("ua_watch_count")] > 0)
    assert crosses_seen or not user.history  # the user x author crosses were really exercised


def test_the_user_x_author_crosses_count_what_the_history_says() -> None:
    history = [HistoryItem(TS - 60_000, "enter", "r1", "a1", "c1", 0.0),
               HistoryItem(TS - 120_000, "watch", "r1", "a1", "c1", 30.0),
               HistoryItem(TS - 180_000, "enter", "r2", "a1", "c2", 0.0),
               HistoryItem(TS - 240_000, "enter", "r3", "a2", "c1", 0.0)]
    user = user_side(SPEC, "u", Snapshot(as_of_ms=TS, history=history))
    room = Snapshot(as_of_ms=TS, room_meta={"category": "c1", "author": "a1"})
    ctx = RequestContext(user="u", ts_ms=TS, hour=1, device="", tab="")
    dense = assemble_batch(SPEC, ctx, user, [item_side(SPEC, "r9", "", "", room),
                                             item_side(SPEC, "r9", "a3", "c3", room)]).dense
    col = {d.name: j for j, d in enumerate(SPEC.dense)}
    np.testing.assert_allclose(np.expm1(dense[0, [col["ua_watch_count"], col["ua_watch_seconds"],
                                                  col["ua_last_watch_age_min"], col["uc_watch_count"]]]),
                               [2, 30, 1, 2], rtol=1e-5)
    np.testing.assert_allclose(np.expm1(dense[1, [col["ua_watch_count"], col["uc_watch_count"]]]), [0, 0])


@pytest.mark.parametrize("arch", list(Arch))
def test_sequences_given_once_score_like_sequences_per_row(arch: Arch) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, preset(arch, "S", SPEC, emb_buckets=4096), "cpu").eval()
    n = 64
    ids = torch.randint(1, 1 << 40, (n, SPEC.n_ids))
    seqs = torch.randint(0, 1 << 40, (1, SPEC.n_seqs, SPEC.seq_len))
    seqs[0, :, 15:] = 0  # padding
    ids[:, 2] = seqs[0, 0, 3]  # some candidates' author is in the user's sequence: attention really matches
    dense = torch.randn(n, SPEC.n_dense)
    empty = (torch.zeros(n, 0), torch.zeros(n, dtype=torch.long))
    with torch.inference_mode():
        per_row = model(Batch(ids, seqs.expand(n, -1, -1).contiguous(), dense, *empty))[0]
        shared = model(Batch(ids, seqs, dense, *empty))[0]
    torch.testing.assert_close(shared, per_row, rtol=1e-5, atol=1e-5)


def test_the_torchscript_forward_matches_eager_across_versions_and_batch_sizes() -> None:
    from model.serving import ForwardBuilder, ForwardKind, probe_inputs

    torch.manual_seed(0)
    v1 = build_model(SPEC, preset("zenith", "S", SPEC, emb_buckets=4096), "cpu").eval()
    v2 = copy.deepcopy(v1)  # the next version: every weight moved (what deltas + dense weights do)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    builder = ForwardBuilder(ForwardKind.TORCHSCRIPT)
    f1, f2 = builder.build(v1), builder.build(v2)  # v2 re-binds its weights into v1's trace
    assert (f1.kind, f2.kind) == (ForwardKind.TORCHSCRIPT, ForwardKind.TORCHSCRIPT), (f1.fallback, f2.fallback)
    eager1, eager2 = ForwardBuilder(ForwardKind.EAGER).build(v1), ForwardBuilder(ForwardKind.EAGER).build(v2)
    with torch.inference_mode():
        for n in (1, 7, 500):
            x = probe_inputs(v1, n, seed=n)
            torch.testing.assert_close(f2.fn(*x), eager2.fn(*x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(f1.fn(*x), eager1.fn(*x), rtol=1e-5, atol=1e-5)  # v1 untouched by v2
            assert (eager1.fn(*x) - eager2.fn(*x)).abs().max() > 1e-3  # the versions really differ


def test_a_forward_that_does_not_match_is_served_eager() -> None:
    from model.serving import ForwardBuilder, ForwardKind

    model = build_model(SPEC, preset("zenith", "S", SPEC, emb_buckets=4096), "cpu").eval()
    built = ForwardBuilder(ForwardKind.TORCHSCRIPT, tolerance=-1.0).build(model)  # nothing can match
    assert built.kind is ForwardKind.EAGER and "differs from eager" in built.fallback


def test_assemble_many_groups_a_feed_request_and_equals_row_by_row() -> None:
    from stream.features import assemble_many

    rng = random.Random(9)
    users = {u: _user_snapshot(rng) for u in ("u1", "u2")}
    cands, snaps = [], []
    for k in range(40):  # feed requests of a few impressions each, interleaved across users and times
        user, ts = rng.choice(["u1", "u2"]), TS + 1000 * rng.randrange(3)
        room = rng.randrange(12)
        r = _room_snapshot(rng, room)
        cands.append(Candidate(user, f"r{room}", "", "", ts, 20, "ios", "live", k % 6))
        snaps.append(Snapshot(as_of_ms=ts, user=users[user].user, history=users[user].history, room=r.room,
                              room_meta=r.room_meta, author=r.author))
    for got, c, s in zip(assemble_many(SPEC, cands, snaps), cands, snaps, strict=True):
        want = assemble(SPEC, c, s)
        for field in ("ids", "seqs", "dense"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
