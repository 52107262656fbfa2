"""A self-contained, time-ordered sample stream with a planted signal, for tests and benchmarks.

It needs no Redis, Kafka or simulator process: it draws a small live-streaming world (users with category
tastes and favourite streamers, authors with a quality and a category, rooms that start and end) and
builds feature records *point in time* from the history it has generated so far, in the layout of
:func:`model.spec.default_live_spec`. The planted enter logit is::

    base + w_cat * taste(user, category) + w_fav * [favourite author] + w_quality * quality(author)
         + w_pop * popularity(room, t) - w_pos * position + w_follow_tab * [tab == follow and favourite]

and it is returned with the samples (``oracle_logit``), so a test can compare a model's AUC to the
Bayes-optimal one on the same rows. Other tasks follow the enter label (long view = watched > 30 s; like,
follow, gift with engagement-driven rates).

>>> from model.spec import default_live_spec
>>> data = make_synthetic(default_live_spec(), n=600, seed=1)
>>> len(data.arrays), data.arrays.labels.shape[1], bool(np.all(np.diff(data.arrays.event_ms) >= 0))
(600, 5, True)
>>> bool(0.05 < data.arrays.labels[:, 0].mean() < 0.5)
True
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from model.batch import SampleArrays
from model.spec import FeatureSpec

_REQUIRED = ("user_id", "room_id", "author_id", "category", "hour", "device", "tab", "position")


@dataclass(frozen=True)
class SynthConfig:
    n_users: int = 1_000
    n_authors: int = 200
    n_categories: int = 12
    favourites_per_user: int = 3
    rooms_per_request: int = 6
    requests_per_s: float = 4.0
    mean_room_minutes: float = 30.0
    history_warmup: int = 6  # pre-stream entries per user, so sequences carry taste from the start
    base_logit: float = -3.2
    w_category: float = 3.0
    w_favourite: float = 3.0
    w_quality: float = 1.0
    w_popularity: float = 0.8
    w_position: float = 0.15
    w_follow_tab: float = 1.0
    start_ms: int = 1_767_225_600_000


@dataclass
class SyntheticData:
    arrays: SampleArrays
    oracle_logit: np.ndarray  # float64 [N], the planted enter logit

    def split(self, n_train: int) -> tuple[SyntheticData, SyntheticData]:
        return (SyntheticData(self.arrays[:n_train], self.oracle_logit[:n_train]),
                SyntheticData(self.arrays[n_train:], self.oracle_logit[n_train:]))


def raw_id(feature: int, value: np.ndarray | int) -> np.ndarray:
    """Emulates the stream's hashed int64 ids: splitmix64 of (feature, value), never 0."""
    with np.errstate(over="ignore"):
        z = (np.asarray(value).astype(np.uint64) + np.uint64(feature + 1) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    out = z.view(np.int64) if isinstance(z, np.ndarray) else np.int64(z)
    return np.where(out == 0, 1, out)


def make_synthetic(spec: FeatureSpec, n: int, seed: int = 0, config: SynthConfig | None = None) -> SyntheticData:
    """``n`` time-ordered labelled samples in ``spec``'s layout (which must have the live spec's features)."""
    c = config or SynthConfig()
    names = {f.name for f in spec.ids}
    missing = [m for m in _REQUIRED if m not in names]
    assert not missing, f"make_synthetic fills the default live spec; this spec lacks {missing}. " \
                        "Use model.factory.random_arrays for shape-only data."
    rng = np.random.default_rng(seed)

    # ---- the world ----------------------------------------------------------------------------------
    author_cat = rng.integers(0, c.n_categories, c.n_authors)
    quality = rng.normal(0.0, 1.0, c.n_authors)
    taste = rng.dirichlet(np.full(c.n_categories, 0.3), c.n_users)
    favs = np.stack([rng.choice(c.n_authors, c.favourites_per_user, replace=False) for _ in range(c.n_users)])
    is_fav = np.zeros((c.n_users, c.n_authors), dtype=bool)
    is_fav[np.arange(c.n_users)[:, None], favs] = True
    device = rng.integers(0, 3, c.n_users)
    activity = rng.lognormal(0.0, 0.8, c.n_users)
    activity /= activity.sum()
    room_len_ms = c.mean_room_minutes * 60_000
    room_offset = rng.uniform(0, room_len_ms, c.n_authors)

    # ---- impressions (vectorised) -------------------------------------------------------------------
    k = c.rooms_per_request
    n_req = -(-n // k)
    t_req = c.start_ms + np.cumsum(rng.exponential(1000.0 / c.requests_per_s, n_req))
    user = np.repeat(rng.choice(c.n_users, n_req, p=activity), k)[:n]
    t_ms = np.repeat(t_req, k)[:n].astype(np.int64)
    tab = np.repeat(rng.integers(0, 3, n_req), k)[:n]
    position = np.tile(np.arange(k), n_req)[:n]
    # Exposure favours quality a little but not the user's taste, so taste must be learned.
    p_show = np.exp(0.3 * quality)
    author = rng.choice(c.n_authors, n, p=p_show / p_show.sum())
    phase = (t_ms - c.start_ms + room_offset[author]) / room_len_ms
    room_epoch = np.floor(phase).astype(np.int64)
    popularity = np.sqrt(np.sin(np.pi * (phase - room_epoch)))
    room = author * 1_000_000 + room_epoch
    cat = author_cat[author]
    fav = is_fav[user, author].astype(float)
    logit = (c.base_logit + c.w_category * np.minimum(taste[user, cat] * c.n_categories / 4.0, 1.5)
             + c.w_favourite * fav + c.w_quality * quality[author] + c.w_popularity * popularity
             - c.w_position * position + c.w_follow_tab * fav * (tab == 1))
    entered = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    p_engaged = 1.0 / (1.0 + np.exp(-(logit - 0.5)))
    watch_s = np.where(entered, np.minimum(rng.exponential(35.0 * (0.4 + 1.2 * p_engaged)), 100.0), 0.0)
    liked = entered & (rng.random(n) < 0.35 * p_engaged)
    followed = entered & (rng.random(n) < 0.08 * p_engaged)
    gifted = entered & (rng.random(n) < 0.04 * p_engaged)
    label_cols = {"entered": entered, "long_view": entered & (watch_s > 30.0), "liked": liked,
                  "followed": followed, "gifted": gifted}
    labels = np.zeros((n, len(spec.tasks)), dtype=np.float32)
    for j, t in enumerate(spec.tasks):
        assert t.label in label_cols, f"make_synthetic has no label {t.label!r}; it plants {sorted(label_cols)}"
        labels[:, j] = label_cols[t.label]

    # ---- point-in-time features (sequential: each row sees only earlier rows) -----------------------
    L = spec.seq_len
    hist: dict[int, deque] = defaultdict(lambda: deque(maxlen=L))  # user -> (author, room, category), newest last
    by_cat = [np.flatnonzero(author_cat == g) for g in range(c.n_categories)]
    for u in range(c.n_users):  # warm-up history drawn from the user's tastes
        for _ in range(c.history_warmup):
            pool = by_cat[rng.choice(c.n_categories, p=taste[u])]
            if rng.random() < 0.5 or len(pool) == 0:
                a = int(favs[u, rng.integers(c.favourites_per_user)])
            else:
                a = int(pool[rng.integers(len(pool))])
            hist[u].append((a, 10**12 + a, int(author_cat[a])))  # a past room of a, never shown again
    cnt: dict[str, defaultdict] = {k_: defaultdict(float) for k_ in (
        "room_imp", "room_ent", "room_watch", "room_like", "room_gift", "auth_ent", "auth_watch", "auth_fol",
        "user_imp", "user_ent", "user_watch", "ua_cnt", "ua_sec", "ua_last", "uc_cnt")}
    room_start = (room_epoch * room_len_ms - room_offset[author]).astype(np.int64) + c.start_ms

    dense = np.zeros((n, spec.n_dense), dtype=np.float32)
    seq_rows = np.zeros((n, 3, L), dtype=np.int64)  # author, room, category values + 1 (0 = pad)
    dvals = np.zeros((n, 17), dtype=np.float32)
    for i in range(n):
        u, a, r, cg = int(user[i]), int(author[i]), int(room[i]), int(cat[i])
        ua, uc = (u, a), (u, cg)
        ri, re_ = cnt["room_imp"][r], cnt["room_ent"][r]
        ae, ui, ue = cnt["auth_ent"][a], cnt["user_imp"][u], cnt["user_ent"][u]
        last = cnt["ua_last"].get(ua)
        dvals[i] = (
            math.log1p(40.0 * popularity[i] * math.exp(0.5 * quality[a])) / 5.0,
            math.log1p(ri) / 5.0,
            (re_ + 0.1) / (ri + 1.0),
            cnt["room_watch"][r] / (re_ + 1.0) / 60.0,
            (cnt["room_like"][r] + 0.03) / (re_ + 1.0),
            (cnt["room_gift"][r] + 0.01) / (re_ + 1.0),
            min((t_ms[i] - room_start[i]) / 3_600_000.0, 3.0),
            math.log1p(ae) / 5.0,
            cnt["auth_watch"][a] / (ae + 1.0) / 60.0,
            math.log1p(cnt["auth_fol"][a]) / 3.0,
            math.log1p(ui) / 5.0,
            (ue + 0.1) / (ui + 1.0),
            cnt["user_watch"][u] / (ue + 1.0) / 60.0,
            math.log1p(cnt["ua_cnt"][ua]) / 2.0,
            math.log1p(cnt["ua_sec"][ua]) / 5.0,
            1.0 / (1.0 + (t_ms[i] - last) / 3_600_000.0) if last is not None else 0.0,
            math.log1p(cnt["uc_cnt"][uc]) / 2.0,
        )
        h = hist[u]
        for j, (ha, hr, hc) in enumerate(reversed(h)):  # most recent first
            seq_rows[i, 0, j], seq_rows[i, 1, j], seq_rows[i, 2, j] = ha + 1, hr + 1, hc + 1
        # reveal this impression's outcome to the counters (the stream does the same once labels join)
        cnt["room_imp"][r] += 1
        cnt["user_imp"][u] += 1
        if entered[i]:
            w = float(watch_s[i])
            for key, kk, inc in (("room_ent", r, 1), ("room_watch", r, w), ("room_like", r, liked[i]),
                                 ("room_gift", r, gifted[i]), ("auth_ent", a, 1), ("auth_watch", a, w),
                                 ("auth_fol", a, followed[i]), ("user_ent", u, 1), ("user_watch", u, w),
                                 ("ua_cnt", ua, 1), ("ua_sec", ua, w), ("uc_cnt", uc, 1)):
                cnt[key][kk] += float(inc)
            cnt["ua_last"][ua] = float(t_ms[i])
            h.append((a, r, cg))

    dense_names = ("room_audience", "room_impressions", "room_ctr", "room_avg_watch", "room_like_rate",
                   "room_gift_rate", "room_age_min", "author_enters", "author_avg_watch", "author_followers",
                   "user_impressions", "user_ctr", "user_avg_watch", "ua_watch_count", "ua_watch_seconds",
                   "ua_last_watch_age_min", "uc_watch_count")
    for j, d in enumerate(spec.dense):
        if d.name in dense_names:
            dense[:, j] = dvals[:, dense_names.index(d.name)]

    idx = spec.id_index
    ids = np.zeros((n, spec.n_ids), dtype=np.int64)
    values = {"user_id": user, "room_id": room, "author_id": author, "category": cat,
              "hour": (t_ms // 3_600_000) % 24, "device": device[user], "tab": tab, "position": position}
    for name, v in values.items():
        ids[:, idx(name)] = raw_id(idx(name), v)
    seqs = np.zeros((n, spec.n_seqs, L), dtype=np.int64)
    source = {"author_id": 0, "room_id": 1, "category": 2}
    for s in spec.sequences:
        assert s.target in source, f"make_synthetic can fill sequences of author/room/category, not {s.target!r}"
        raw = seq_rows[:, source[s.target]]  # value + 1, 0 = padding
        seqs[:, spec.seq_index(s.name)] = np.where(raw == 0, 0, raw_id(idx(s.target), raw - 1))
    arrays = SampleArrays(ids=ids, seqs=seqs, dense=dense, labels=labels, user=user.astype(np.int64),
                          event_ms=t_ms)
    arrays.check(spec)
    return SyntheticData(arrays, logit)
