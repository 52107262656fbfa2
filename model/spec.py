"""Declarative feature spec: the one contract between feature assembly, training and serving.

A *feature record* is three fixed-shape arrays, laid out by the spec:

* ``ids``   int64[n_ids]            raw (already hashed to int64) categorical ids; 0 means "missing"
* ``seqs``  int64[n_seqs, max_len]  behaviour sequences, most recent first, 0-padded
* ``dense`` float32[n_dense]        real-time statistics, already squashed (log1p / ratios)

The stream writes records in this layout, the trainer and scorer read them, and the model's Prime
Tokenizer decides from the same spec which feature lands in which token.

>>> spec = default_live_spec()
>>> spec.id_index("room_id"), spec.n_ids > 3, spec.seq_len
(1, True, 20)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

OWN_TOKEN = "__own__"
"""Group name meaning "this feature gets a Prime Token of its own"."""


@dataclass(frozen=True)
class IdFeature:
    name: str
    group: str = OWN_TOKEN
    table: str | None = None  # embedding table name; defaults to the feature name (tables can be shared)

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass(frozen=True)
class SequenceFeature:
    """A behaviour sequence, pooled by target attention against the candidate's ``target`` id feature.

    It looks its items up in the embedding table of ``target`` so that sequence items and the candidate
    live in one space. Every sequence gets its own token.
    """

    name: str
    target: str


class DenseKind(StrEnum):
    """What a dense value is, so the model can put it on the right scale (see ``model.dense``)."""

    LOG = "log"  # a log1p count or duration, any non-negative scale
    RATE = "rate"  # a smoothed rate in (0, 1): the model reads it on the logit scale


@dataclass(frozen=True)
class DenseFeature:
    name: str
    group: str
    kind: DenseKind = DenseKind.LOG


@dataclass(frozen=True)
class Task:
    """One prediction head. ``label`` is the sample label column it is trained on (binary)."""

    name: str
    label: str
    weight: float = 1.0  # weight in the combined ranking score


@dataclass(frozen=True)
class FeatureSpec:
    ids: tuple[IdFeature, ...]
    sequences: tuple[SequenceFeature, ...]
    dense: tuple[DenseFeature, ...]
    tasks: tuple[Task, ...]
    seq_len: int = 20
    version: int = 1
    _index: dict[str, int] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.ids] + [s.name for s in self.sequences] + [d.name for d in self.dense]
        dupes = {n for n in names if names.count(n) > 1}
        assert not dupes, f"feature names must be unique; rename {sorted(dupes)}"
        id_names = {f.name for f in self.ids}
        for s in self.sequences:
            assert s.target in id_names, f"sequence {s.name!r} targets unknown id feature {s.target!r}"
        assert self.seq_len > 0, "seq_len must be positive"
        assert self.tasks, "a spec needs at least one task"
        self._index.update({f.name: i for i, f in enumerate(self.ids)})
        self._index.update({s.name: i for i, s in enumerate(self.sequences)})
        self._index.update({d.name: i for i, d in enumerate(self.dense)})

    @property
    def n_ids(self) -> int:
        return len(self.ids)

    @property
    def n_seqs(self) -> int:
        return len(self.sequences)

    @property
    def n_dense(self) -> int:
        return len(self.dense)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(t.label for t in self.tasks)

    def id_index(self, name: str) -> int:
        return self._index[name]

    def seq_index(self, name: str) -> int:
        return self._index[name]

    def dense_index(self, name: str) -> int:
        return self._index[name]

    def own_token_ids(self) -> tuple[IdFeature, ...]:
        return tuple(f for f in self.ids if f.group == OWN_TOKEN)

    def groups(self) -> dict[str, tuple[list[str], list[str]]]:
        """Group name -> (id feature names, dense feature names) for the grouped (non-own) tokens."""
        out: dict[str, tuple[list[str], list[str]]] = {}
        for f in self.ids:
            if f.group != OWN_TOKEN:
                out.setdefault(f.group, ([], []))[0].append(f.name)
        for d in self.dense:
            out.setdefault(d.group, ([], []))[1].append(d.name)
        return out

    def n_tokens(self) -> int:
        return len(self.own_token_ids()) + self.n_seqs + len(self.groups())

    def fingerprint(self) -> int:
        """A 32-bit digest of the layout, stored in every sample and model version to catch skew."""
        text = repr((self.ids, self.sequences, self.dense, self.tasks, self.seq_len, self.version))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def default_live_spec(seq_len: int = 20) -> FeatureSpec:
    """The live-streaming spec used by the simulator, the KuaiRand replay, the stream and the scorer."""
    return FeatureSpec(
        ids=(
            IdFeature("user_id"),
            IdFeature("room_id"),
            IdFeature("author_id"),
            IdFeature("category", group="item"),
            IdFeature("hour", group="context"),
            IdFeature("device", group="context"),
            IdFeature("tab", group="context"),
            IdFeature("position", group="context"),
        ),
        sequences=(
            SequenceFeature("recent_authors", target="author_id"),
            SequenceFeature("recent_rooms", target="room_id"),
            SequenceFeature("recent_categories", target="category"),
        ),
        dense=(
            # the live room, right now
            DenseFeature("room_audience", "room"),
            DenseFeature("room_impressions", "room"),
            DenseFeature("room_ctr", "room", DenseKind.RATE),
            DenseFeature("room_avg_watch", "room"),
            DenseFeature("room_like_rate", "room", DenseKind.RATE),
            DenseFeature("room_gift_rate", "room", DenseKind.RATE),
            DenseFeature("room_age_min", "room"),
            # the streamer, across rooms
            DenseFeature("author_enters", "author"),
            DenseFeature("author_avg_watch", "author"),
            DenseFeature("author_followers", "author"),
            # the user
            DenseFeature("user_impressions", "user"),
            DenseFeature("user_ctr", "user", DenseKind.RATE),
            DenseFeature("user_avg_watch", "user"),
            # user x candidate
            DenseFeature("ua_watch_count", "cross"),
            DenseFeature("ua_watch_seconds", "cross"),
            DenseFeature("ua_last_watch_age_min", "cross"),
            DenseFeature("uc_watch_count", "cross"),
        ),
        tasks=(
            Task("enter", "entered", weight=1.0),
            Task("long_view", "long_view", weight=1.0),
            Task("like", "liked", weight=0.3),
            Task("follow", "followed", weight=0.5),
            Task("gift", "gifted", weight=0.5),
        ),
        seq_len=seq_len,
        # 2: user_ctr's prior is worth 5 impressions (was 1); rates are marked as rates. A new version is a
        # new fingerprint, so old samples, caches and model versions are refused, never silently mixed.
        version=2,
    )
