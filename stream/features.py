"""The one feature-assembly path: (candidate context, state snapshot) -> feature record.

The stream calls it to build training samples and the scorer calls it to build ranking requests, so what
the model learns from and what it is served are computed by the same lines of code.

>>> from state.store import Snapshot
>>> spec = default_live_spec()
>>> ctx = Candidate(user="u1", room="r1", author="a1", category="c1", ts_ms=60_000, hour=20,
...                 device="ios", tab="live", position=0)
>>> row = assemble(spec, ctx, Snapshot(as_of_ms=60_000))
>>> row.ids.shape, row.seqs.shape, row.dense.shape
((8,), (3, 20), (17,))
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from model.spec import FeatureSpec, default_live_spec
from state.store import Snapshot

__all__ = ["Candidate", "FeatureRow", "assemble", "hash_id", "default_live_spec"]

NEVER_WATCHED_MIN = 7 * 24 * 60.0  # "last watched this author" for a never-watched author: a week ago
# Bayesian average (pseudo-enters, pseudo-impressions): a prior rate of 0.2 worth 5 impressions. With a
# prior worth 1 impression, a user's first click read as a 60% CTR; on the KuaiRand log the stronger prior
# ranks better by itself (AUC 0.7040 vs 0.7006) and gives the models +0.002 AUC.
USER_CTR_PRIOR = (1.0, 5.0)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (user, live room) pair to score, with the request context."""

    user: str
    room: str
    author: str
    category: str
    ts_ms: int
    hour: int
    device: str
    tab: str
    position: int


@dataclass(frozen=True, slots=True)
class FeatureRow:
    ids: np.ndarray  # int64 [n_ids]
    seqs: np.ndarray  # int64 [n_seqs, seq_len]
    dense: np.ndarray  # float32 [n_dense]


@lru_cache(maxsize=1 << 20)
def hash_id(namespace: str, value: str) -> int:
    """Stable 63-bit id for a raw value; 0 stays reserved for "missing". Stable across processes/runs
    (Python's hash() is salted per process, so it cannot be used here)."""
    if not value:
        return 0
    digest = hashlib.blake2b(f"{namespace}\x1f{value}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def assemble(spec: FeatureSpec, c: Candidate, s: Snapshot) -> FeatureRow:
    category = c.category or s.room_meta.get("category", "")
    author = c.author or s.room_meta.get("author", "")
    raw_ids = {
        "user_id": c.user, "room_id": c.room, "author_id": author, "category": category,
        "hour": str(c.hour), "device": c.device, "tab": c.tab, "position": str(min(c.position, 50)),
    }
    tables = {f.name: f.table_name for f in spec.ids}
    ids = np.array([hash_id(tables[f.name], raw_ids.get(f.name, "")) for f in spec.ids], dtype=np.int64)

    enters = [h for h in s.history if h.kind == "enter"]
    watches = [h for h in s.history if h.kind == "watch"]
    seq_values = {
        "recent_authors": [h.author for h in enters],
        "recent_rooms": [h.room for h in enters],
        "recent_categories": [h.category for h in enters],
    }
    seqs = np.zeros((spec.n_seqs, spec.seq_len), dtype=np.int64)
    for i, sf in enumerate(spec.sequences):
        values = seq_values.get(sf.name, [])[: spec.seq_len]
        seqs[i, : len(values)] = [hash_id(tables[sf.target], v) for v in values]

    u, r, a = s.user, s.room, s.author
    same_author = [h for h in enters if h.author == author and author]
    author_watch_s = sum(h.watch_s for h in watches if h.author == author and author)
    last_age_min = (c.ts_ms - same_author[0].ts_ms) / 60_000 if same_author else NEVER_WATCHED_MIN
    start_ms = float(s.room_meta.get("start_ms", 0) or 0)
    room_age_min = (c.ts_ms - start_ms) / 60_000 if start_ms else 0.0
    values = {
        "room_audience": _log(max(r.get("audience", 0.0), 0.0)),
        "room_impressions": _log(r.get("impressions", 0.0)),
        "room_ctr": (r.get("enters", 0.0) + 1.0) / (r.get("impressions", 0.0) + 10.0),
        "room_avg_watch": _log(r.get("watch_s", 0.0) / max(r.get("watches", 0.0), 1.0)),
        "room_like_rate": r.get("likes", 0.0) / (r.get("enters", 0.0) + 1.0),
        "room_gift_rate": r.get("gifts", 0.0) / (r.get("enters", 0.0) + 1.0),
        "room_age_min": _log(max(room_age_min, 0.0)),
        "author_enters": _log(a.get("enters", 0.0)),
        "author_avg_watch": _log(a.get("watch_s", 0.0) / max(a.get("watches", 0.0), 1.0)),
        "author_followers": _log(a.get("followers", 0.0)),
        "user_impressions": _log(u.get("impressions", 0.0)),
        "user_ctr": (u.get("enters", 0.0) + USER_CTR_PRIOR[0]) / (u.get("impressions", 0.0) + USER_CTR_PRIOR[1]),
        "user_avg_watch": _log(u.get("watch_s", 0.0) / max(u.get("watches", 0.0), 1.0)),
        "ua_watch_count": _log(len(same_author)),
        "ua_watch_seconds": _log(author_watch_s),
        "ua_last_watch_age_min": _log(max(last_age_min, 0.0)),
        "uc_watch_count": _log(sum(1 for h in enters if h.category == category and category)),
    }
    dense = np.array([values[d.name] for d in spec.dense], dtype=np.float32)
    return FeatureRow(ids, seqs, dense)


def _log(x: float) -> float:
    return math.log1p(x)
