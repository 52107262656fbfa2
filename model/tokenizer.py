"""Prime Tokenizer: a feature record -> ``T`` tokens of width ``D`` (``T = spec.n_tokens()``).

Token order (also what :meth:`PrimeTokenizer.token_names` returns):

1. each own-token id feature (``group == OWN_TOKEN``), in spec order: its embedding, projected by its own
   linear map;
2. each behaviour sequence, in spec order: pooled by target attention against the candidate's embedding in
   the sequence's ``target`` table (padding masked), projected by its own linear map;
3. each group of ``spec.groups()``, in that order: the group's id embeddings and dense values concatenated
   and mapped to ``D`` by the group's own two-layer MLP. A feature is never split across tokens.

The output goes through a tokenwise LayerNorm, so every model body starts from tokens of unit RMS.

>>> import torch
>>> from model.spec import default_live_spec
>>> from model.embedding import build_tables, EmbeddingKind
>>> spec = default_live_spec()
>>> tables = build_tables(PrimeTokenizer.table_names(spec), EmbeddingKind.HASHED, 512, 8, 2)
>>> tok = PrimeTokenizer(spec, tables, d_model=16)
>>> B = 3
>>> x = tok(torch.randint(1, 99, (B, spec.n_ids)), torch.randint(0, 99, (B, spec.n_seqs, spec.seq_len)),
...         torch.rand(B, spec.n_dense))
>>> x.shape == (B, spec.n_tokens(), 16), len(tok.token_names()) == spec.n_tokens()
(True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.embedding import HashedEmbedding, carter_wegman
from model.layers import MLP, TokenwiseLayerNorm, TokenwiseLinear
from model.spec import FeatureSpec


class TargetAttention(nn.Module):
    """Pools a sequence by attention against the candidate: weights ``softmax(tau · cos(s_i, W_q t))``.

    Cosine scores with a learned temperature (init 5), not raw dot products: freshly initialised
    embeddings are tiny, so dot-product attention starts flat and "the candidate is in the history" stays
    invisible until the table has grown; cosine makes an exact match stand out from the first step.
    Returns ``[pooled, pooled ⊙ target]`` (``[B, 2E]``, DIN-style) so the match strength reaches the token.
    Padding (id 0) is masked; an all-padding sequence pools to zeros (not NaN).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.query.weight)  # start as plain similarity to the candidate
        self.log_tau = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, items: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # items [B, L, E], mask [B, L] (True = real item), target [B, E]. items and mask may have B = 1 for
        # a sequence shared by every row (one user's candidates): then two plain matmuls, not B copies.
        query = F.normalize(self.query(target), dim=-1)
        if items.shape[0] == 1 and target.shape[0] != 1:
            cos = query @ F.normalize(items[0], dim=-1).T
        else:
            cos = torch.einsum("ble,be->bl", F.normalize(items, dim=-1), query)
        scores = (cos * self.log_tau.exp()).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
        pooled = weights @ items[0] if items.shape[0] == 1 else torch.einsum("bl,ble->be", weights, items)
        return torch.cat([pooled, pooled * target], dim=-1)


class PrimeTokenizer(nn.Module):
    def __init__(self, spec: FeatureSpec, tables: nn.ModuleDict, d_model: int, group_hidden: int | None = None
                 ) -> None:
        super().__init__()
        self.spec, self.tables, self.d_model = spec, tables, d_model
        missing = set(self.table_names(spec)) - set(tables.keys())
        assert not missing, f"no embedding table for {sorted(missing)}; build tables from table_names(spec)"
        dims = {t.dim for t in tables.values()}
        assert len(dims) == 1, f"all embedding tables must share one dim, got {dims}"
        self.emb_dim = emb_dim = dims.pop()

        self._own = [(spec.id_index(f.name), f.table_name) for f in spec.own_token_ids()]
        self._seq = [(spec.seq_index(s.name), spec.id_index(s.target), spec.ids[spec.id_index(s.target)].table_name)
                     for s in spec.sequences]
        by_name = {f.name: f for f in spec.ids}
        self._groups: list[tuple[str, list[tuple[int, str]], list[int]]] = [
            (g, [(spec.id_index(n), by_name[n].table_name) for n in id_names], [spec.dense_index(n) for n in dn])
            for g, (id_names, dn) in spec.groups().items()
        ]
        assert len(self._own) + len(self._seq) + len(self._groups) > 0, "the spec produces no tokens"
        # Every id column any token reads is embedded once per forward, all columns hashed in one go.
        self._columns = sorted({i for i, _ in self._own} | {ti for _, ti, _ in self._seq}
                               | {i for _, id_feats, _ in self._groups for i, _ in id_feats})
        self._column_tables = [spec.ids[i].table_name for i in self._columns]
        hashed = [tables[t] for t in self._column_tables]
        self._batched_hash = all(isinstance(t, HashedEmbedding) for t in hashed) and \
            len({t.n_hashes for t in hashed}) <= 1  # type: ignore[union-attr]
        if self._batched_hash and hashed:
            self.register_buffer("_coeffs", torch.stack([t.coeffs for t in hashed]), persistent=False)
            self.register_buffer("_buckets", torch.tensor([[t.num_buckets] for t in hashed]), persistent=False)
        self.seq_attn = nn.ModuleList(TargetAttention(emb_dim) for _ in self._seq)
        self.own_proj = TokenwiseLinear(len(self._own), emb_dim, d_model) if self._own else None
        self.seq_proj = TokenwiseLinear(len(self._seq), 2 * emb_dim, d_model) if self._seq else None
        hidden = group_hidden or d_model
        self.group_mlps = nn.ModuleList(
            MLP([len(ids) * emb_dim + len(dn), hidden, d_model]) for _, ids, dn in self._groups)
        self.norm = TokenwiseLayerNorm(spec.n_tokens(), d_model)

    @staticmethod
    def table_names(spec: FeatureSpec) -> list[str]:
        return list(dict.fromkeys(f.table_name for f in spec.ids))

    def token_names(self) -> list[str]:
        s = self.spec
        return ([f.name for f in s.own_token_ids()] + [q.name for q in s.sequences]
                + [f"group:{g}" for g, _, _ in self._groups])

    def forward(self, ids: torch.Tensor, seqs: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``ids [B, n_ids]``, ``seqs [B, n_seqs, L]`` or ``[1, n_seqs, L]`` (one user's sequences, shared by
        every row: embedded once), ``dense [B, n_dense]`` -> tokens ``[B, T, D]``."""
        tokens: list[torch.Tensor] = []
        emb = self._embed_columns(ids)
        if self.own_proj is not None:
            tokens.append(self.own_proj(torch.stack([emb[i] for i, _ in self._own], dim=1)))
        if self.seq_proj is not None:
            pooled = []
            for attn, (si, ti, table) in zip(self.seq_attn, self._seq, strict=True):
                items = seqs[:, si]
                pooled.append(attn(self.tables[table](items), items != 0, emb[ti]))
            tokens.append(self.seq_proj(torch.stack(pooled, dim=1)))
        dense = dense.to(self.norm.weight.dtype)
        for mlp, (_, id_feats, dense_idx) in zip(self.group_mlps, self._groups, strict=True):
            parts = [emb[i] for i, _ in id_feats]
            if dense_idx:
                parts.append(dense[:, dense_idx])
            tokens.append(mlp(torch.cat(parts, dim=-1)).unsqueeze(1))
        return self.norm(torch.cat(tokens, dim=1))


    def _embed_columns(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Id column -> its ``[B, E]`` embedding, for every column a token reads."""
        if not self._batched_hash:
            return {i: self.tables[t](ids[:, i]) for i, t in zip(self._columns, self._column_tables, strict=True)}
        cols = ids[:, self._columns]
        buckets = carter_wegman(cols, self._coeffs, self._buckets)  # [B, C, n_hashes]
        return {i: self.tables[t].embed_buckets(buckets[:, c], cols[:, c])  # type: ignore[operator]
                for c, (i, t) in enumerate(zip(self._columns, self._column_tables, strict=True))}


def token_cosine_similarity(tokens: torch.Tensor) -> float:
    """The heterogeneity diagnostic: mean pairwise cosine similarity between distinct tokens of a sample,
    averaged over the batch. ``tokens`` is ``[B, T, D]``; 1.0 means all tokens point the same way."""
    b, t, _ = tokens.shape
    if t < 2:
        return float("nan")
    unit = F.normalize(tokens.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # [B, T, T]
    off_diag = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)
    return float((off_diag / (t * (t - 1))).mean())
