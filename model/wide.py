"""The wide path: a logistic regression over the same inputs, summed into every deep model's logits.

Why it exists: in the online regime (one pass, a few hundred optimizer steps, rooms seen a handful of
times) a deep body learns per-id memorisation slowly -- an id's signal must travel through a projection,
a norm, the body and a tower before it moves a logit. A linear model with per-coordinate learning rates
(FTRL, Adagrad) learns a user's or a room's bias from its first few samples. Wide & Deep (Cheng et al.,
2016) puts both side by side and trains them jointly, so the deep part only has to learn what the linear
part cannot, and the sum is never worse than logistic regression on its own inputs.

Per task, the wide logit is::

    b_task + Σ_f w_task[f, id_f] + Σ_(f,g) w_task[(f,g), (id_f, id_g)] + v_task · dense

* one weight row per raw id of every id feature (a per-user, per-room, per-author ... bias),
* one per *pair* of ids for the configured crosses (user×room, user×author, ... : the classic
  hand-crafted crosses, hashed), all in one hashed table of ``n_tasks``-wide rows,
* a linear map of the normalised dense features (:class:`model.dense.DenseInput`).

The table starts at zero and the head's deep part starts at zero (see ``MultiTaskHeads``), so a fresh
model *is* this logistic regression; both learn from the first batch.

>>> import torch
>>> from model.spec import default_live_spec
>>> spec = default_live_spec()
>>> wide = WidePath(spec, n_buckets=1024, crosses=default_crosses(spec))
>>> ids = torch.randint(1, 10**9, (4, spec.n_ids))
>>> wide(ids, torch.zeros(4, spec.n_dense)).shape, len(wide.crosses)
(torch.Size([4, 5]), 7)
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from model.embedding import HashedEmbedding
from model.spec import OWN_TOKEN, FeatureSpec

WIDE_TABLE = "wide"
"""Name of the wide path's id/cross table among the model's embedding tables (published like any other)."""

# Odd 64-bit constants (splitmix64 / golden ratio): mixing them into a pair key with wrapping int64
# arithmetic gives the same key on every device, and the table's own Carter-Wegman hash spreads it.
_K_FEATURE = 0x1E3779B97F4A7C15
_K_LEFT = 0x3F58476D1CE4E5B9
_K_RIGHT = 0x14D049BB133111EB


def default_crosses(spec: FeatureSpec) -> tuple[tuple[str, str], ...]:
    """The user crossed with every other id feature that has a token of its own or describes the item
    (room, author, category) or the context (tab, hour): the pairs a practitioner would hand-craft first.
    Features missing from ``spec`` are skipped."""
    names = [f.name for f in spec.ids]
    if "user_id" not in names:
        return tuple(itertools.combinations([f.name for f in spec.ids if f.group == OWN_TOKEN], 2))
    partners = ("room_id", "author_id", "category", "tab", "hour", "device", "position")
    return tuple(("user_id", p) for p in partners if p in names)


class WidePath(nn.Module):
    """Per-task logistic regression over hashed ids, hashed id pairs and the dense features."""

    def __init__(self, spec: FeatureSpec, n_buckets: int, crosses: tuple[tuple[str, str], ...],
                 init_bias: float = -2.0) -> None:
        super().__init__()
        n_tasks = len(spec.tasks)
        unknown = {n for pair in crosses for n in pair} - {f.name for f in spec.ids}
        if unknown:
            raise ValueError(f"wide crosses name unknown id features {sorted(unknown)}; "
                             f"use names from {[f.name for f in spec.ids]}")
        self.crosses = crosses
        self.register_buffer("_left", torch.tensor([spec.id_index(a) for a, _ in crosses], dtype=torch.long),
                             persistent=False)
        self.register_buffer("_right", torch.tensor([spec.id_index(b) for _, b in crosses], dtype=torch.long),
                             persistent=False)
        # One key space for single ids and pairs: feature f's ids are salted with f, pair p's with n_ids + p.
        salts = torch.arange(spec.n_ids + len(crosses), dtype=torch.long) * _K_FEATURE
        self.register_buffer("_salt", salts, persistent=False)
        # n_hashes=1: a collision here merges two biases, which a linear model tolerates (as FTRL's hashing
        # trick does); a second hash would halve each id's learning rate for little gain.
        self.table = HashedEmbedding(n_buckets, n_tasks, n_hashes=1, seed=101, init_std=0.0)
        # Dense weights and the bias are stored as rows (one per feature, one for the bias) so that the same
        # row-wise Adagrad that trains the table trains them: per-coordinate steps, as in FTRL.
        self.dense_rows = nn.Parameter(torch.zeros(spec.n_dense, n_tasks))
        self.bias = nn.Parameter(torch.full((1, n_tasks), init_bias))

    def keys(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, n_ids + n_crosses]`` int64 keys; 0 wherever an id (or either side of a pair) is missing."""
        left, right = ids[:, self._left], ids[:, self._right]
        pairs = left * _K_LEFT + right * _K_RIGHT  # wraps in int64, deterministically
        pairs = torch.where((left == 0) | (right == 0), torch.zeros_like(pairs), pairs)
        keys = torch.cat([ids, pairs], dim=1)
        salted = keys ^ self._salt
        return torch.where(keys == 0, torch.zeros_like(salted), torch.where(salted == 0, 1, salted))

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``ids [B, n_ids]`` raw int64, ``dense [B, n_dense]`` normalised -> logits ``[B, n_tasks]``."""
        return self.table(self.keys(ids)).sum(dim=1) + dense @ self.dense_rows + self.bias

    def linear_parameters(self) -> list[nn.Parameter]:
        """The dense features' weight rows and the bias row (seen by every sample, unlike table rows)."""
        return [self.dense_rows, self.bias]

    def row_parameters(self) -> list[nn.Parameter]:
        """Everything the wide path learns, all 2-d and row-wise: the id/cross table, dense rows, bias."""
        return [self.table.weight, *self.linear_parameters()]
