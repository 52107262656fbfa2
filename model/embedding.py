"""ID embedding tables: raw int64 ids in, vectors out, with row-wise sparse updates.

Live rooms get new ids every hour, so an exact vocabulary is useless; ids are hashed into a table of a
fixed size instead. Everything else in the model talks to tables through :class:`EmbeddingTable`, so a
collisionless table with admission and expiry can replace :class:`HashedEmbedding` later without touching
the tokenizer, the trainer or the model-version format.

The trainer publishes only the rows that changed (``touched_rows``), and scorers apply them with
``set_rows``:

>>> import torch
>>> table = HashedEmbedding(num_buckets=1000, dim=4, n_hashes=2)
>>> ids = torch.tensor([[7, 0], [123456789, 7]])
>>> out = table(ids)
>>> out.shape, bool(out[0, 1].abs().sum() == 0)   # id 0 ("missing") is the zero vector
(torch.Size([2, 2, 4]), True)
>>> bool(torch.equal(out[0, 0], out[1, 1]))       # same id, same vector
True
>>> rows = table.touched_rows()                     # rows read by a training-mode forward
>>> sorted(rows.tolist()) == sorted(set(table.bucket_ids(torch.tensor([7, 123456789])).flatten().tolist()))
True
>>> table.set_rows(rows, table.get_rows(rows) + 1.0); table.clear_touched(); len(table.touched_rows())
0
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

_PRIME = (1 << 31) - 1  # Mersenne prime for Carter-Wegman hashing; all products stay below 2^63


class EmbeddingKind(StrEnum):
    HASHED = "hashed"


class EmbeddingTable(nn.Module, abc.ABC):
    """Raw int64 ids of any shape -> ``[..., dim]`` vectors; id 0 means missing and maps to zeros.

    Implementations keep their trainable rows in ``weight`` (a parameter whose gradient is sparse) and
    record which rows a training-mode forward read, because those are exactly the rows the next sparse
    optimizer step changes.
    """

    dim: int
    weight: nn.Parameter

    @abc.abstractmethod
    def forward(self, ids: torch.Tensor) -> torch.Tensor: ...

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def touched_rows(self) -> torch.Tensor:
        """Sorted unique row indices read by training-mode forwards since the last ``clear_touched``."""
        if not self._touched:
            return torch.empty(0, dtype=torch.long, device=self.weight.device)
        rows = torch.unique(torch.cat(self._touched))
        self._touched = [rows]  # keep the buffer compact between calls
        return rows

    def clear_touched(self) -> None:
        self._touched: list[torch.Tensor] = []

    def get_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A detached copy of the given rows, ``[len(rows), dim]``."""
        return self.weight.detach()[rows.to(self.weight.device)].clone()

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite rows in place (how a scorer applies a published delta)."""
        assert values.shape == (len(rows), self.dim), (
            f"values must be [{len(rows)}, {self.dim}], got {tuple(values.shape)}; publish rows of this table")
        self.weight[rows.to(self.weight.device)] = values.to(self.weight.device, self.weight.dtype)

    def _record(self, rows: torch.Tensor) -> None:
        if self.training and torch.is_grad_enabled():
            self._touched.append(torch.unique(rows.detach().flatten()))
            if len(self._touched) > 64:  # bounded memory even if nobody collects for a while
                self._touched = [torch.unique(torch.cat(self._touched))]


class HashedEmbedding(EmbeddingTable):
    """``n_hashes`` independent hashes of each id into one shared table, averaged.

    Two ids collide completely only if *all* their hashes collide, which is ``~1/num_buckets**n_hashes``
    instead of ``1/num_buckets``. The hash is Carter-Wegman ``((a·x + b) mod p) mod num_buckets`` over the
    id's three 31-bit limbs with fixed seeds, done in int64 without overflow, so it gives the same buckets
    on every device and in every process (the scorer must agree with the trainer).
    """

    def __init__(self, num_buckets: int, dim: int, n_hashes: int = 2, seed: int = 0,
                 init_std: float | None = None) -> None:
        super().__init__()
        assert num_buckets >= 2, f"num_buckets must be >= 2, got {num_buckets}"
        assert 1 <= n_hashes <= 8, f"n_hashes must be in 1..8, got {n_hashes}"
        self.num_buckets, self.dim, self.n_hashes = num_buckets, dim, n_hashes
        self.weight = nn.Parameter(torch.empty(num_buckets, dim))
        # Small init: with Adagrad the first updates are ~lr in size, so the table learns from data quickly
        # while untouched rows stay near zero (a fresh room starts close to "unknown").
        nn.init.normal_(self.weight, std=init_std if init_std is not None else 0.1 / math.sqrt(dim))
        g = torch.Generator().manual_seed(0x5EED + seed)
        coeffs = torch.randint(1, _PRIME, (n_hashes, 4), generator=g, dtype=torch.long)  # a0, a1, a2, b
        self.register_buffer("coeffs", coeffs, persistent=False)
        self.clear_touched()

    def bucket_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., n_hashes]`` bucket indices for raw int64 ids."""
        return carter_wegman(ids.unsqueeze(-1), self.coeffs.unsqueeze(0), self.num_buckets)[..., 0, :]

    def embed_buckets(self, buckets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The vectors of ``ids`` given their ``bucket_ids`` (computed elsewhere, e.g. for many tables at once)."""
        if self.training and torch.is_grad_enabled():
            self._record(buckets[ids != 0])  # id 0 reads nothing and gets no gradient
        vec = F.embedding(buckets, self.weight, sparse=True).mean(dim=-2)
        return vec * (ids != 0).unsqueeze(-1).to(vec.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_buckets(self.bucket_ids(ids), ids)


def carter_wegman(ids: torch.Tensor, coeffs: torch.Tensor, num_buckets: int | torch.Tensor) -> torch.Tensor:
    """Bucket indices of ``ids [..., C]`` under each of ``C`` tables' hashes (``coeffs [C, n_hashes, 4]``,
    ``num_buckets`` an int or ``[C, 1]``): ``[..., C, n_hashes]``. One set of tensor ops for all ``C`` columns,
    which is what a batch of small lookups costs on a CPU: the op count, not the arithmetic."""
    x = ids.to(torch.long).unsqueeze(-1)
    mask = (1 << 31) - 1
    limbs = (x & mask, (x >> 31) & mask, (x >> 62) & 3)  # arithmetic shift: sign lands in the top limb
    a = coeffs.to(ids.device)
    h = a[..., 3] + _mod_p(a[..., 0] * limbs[0]) + _mod_p(a[..., 1] * limbs[1]) + a[..., 2] * limbs[2]
    return _mod_p(h) % num_buckets  # every intermediate < 2^63: no overflow on any device


def _mod_p(x: torch.Tensor) -> torch.Tensor:
    """``x mod (2^31 - 1)`` for ``0 <= x < 2^62`` by Mersenne folding: shifts and adds instead of an int64
    division, which is the slowest op in a lookup (same result as ``x % _PRIME``)."""
    x = (x & _PRIME) + (x >> 31)  # < 2^32
    x = (x & _PRIME) + (x >> 31)  # < 2^31 + 2
    return torch.where(x >= _PRIME, x - _PRIME, x)


def make_table(kind: EmbeddingKind, num_buckets: int, dim: int, n_hashes: int, seed: int = 0) -> EmbeddingTable:
    """The one place that knows which table class a config asks for."""
    if kind is EmbeddingKind.HASHED:
        return HashedEmbedding(num_buckets, dim, n_hashes, seed=seed)
    raise ValueError(f"unknown embedding kind {kind!r}; use one of {[k.value for k in EmbeddingKind]}")


class SparseOptim(StrEnum):
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    SPARSE_ADAM = "sparse_adam"


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row (the mean squared gradient of the row), for sparse gradients.

    Why row-wise: the usual element-wise Adagrad doubles the table's memory; one scalar per row costs
    ``1/dim`` of that and works as well for embeddings (it is what large recommender trainers use).
    Only rows present in the sparse gradient are read or written, so a step costs O(touched rows).
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.05, eps: float = 1e-8,
                 initial_accumulator: float = 0.0) -> None:
        assert lr > 0, f"lr must be positive, got {lr}"
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator=initial_accumulator))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator"],
                                              dtype=torch.float32, device=p.device)
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:  # dense gradient: treat rows with any nonzero entry as touched
                    rows = grad.abs().sum(1).nonzero().flatten()
                    values = grad[rows]
                if rows.numel() == 0:
                    continue
                acc = state["sum"].index_add_(0, rows, values.float().pow(2).mean(1))
                scale = group["lr"] / (acc[rows].sqrt() + group["eps"])
                p.index_add_(0, rows, (-scale.unsqueeze(1) * values.float()).to(p.dtype))
        return loss


def make_sparse_optimizer(kind: SparseOptim, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if kind is SparseOptim.ROWWISE_ADAGRAD:
        return RowWiseAdagrad(params, lr=lr)
    if kind is SparseOptim.SPARSE_ADAM:
        return torch.optim.SparseAdam(params, lr=lr)
    raise ValueError(f"unknown sparse optimizer {kind!r}; use one of {[k.value for k in SparseOptim]}")


def build_tables(table_names: Iterable[str], kind: EmbeddingKind, num_buckets: int, dim: int, n_hashes: int,
                 bucket_overrides: dict[str, int] | None = None) -> nn.ModuleDict:
    """One table per distinct table name, seeded by position so two tables never share hash functions."""
    overrides = bucket_overrides or {}
    names = list(dict.fromkeys(table_names))
    unknown = set(overrides) - set(names)
    assert not unknown, f"embedding_bucket_overrides names unknown tables {sorted(unknown)}; use {names}"
    return nn.ModuleDict({
        name: make_table(kind, overrides.get(name, num_buckets), dim, n_hashes, seed=i)
        for i, name in enumerate(names)
    })
