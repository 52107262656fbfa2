"""The common ranker interface every architecture implements, and the ranking score built on it.

A ranker is embeddings -> Prime Tokenizer -> *body* -> multi-task heads. Subclasses only write ``body``;
the input path and the heads are shared, so architectures differ in exactly one place.

* ``forward(batch) -> (logits [B, n_tasks], aux_loss)`` (``aux_loss`` is 0 unless the body has a MoE)
* ``predict(batch) -> probs [B, n_tasks]`` (no grad)
* ``token_outputs(batch) -> [tokens after the tokenizer, after layer 1, ...]`` for the heterogeneity
  diagnostic (vector bodies such as DLRM and DCNv2 return only the tokenizer's tokens)
* ``combined_score(probs, spec)``: the task-weighted score the scorer ranks by.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import torch
from torch import nn

from model.batch import Batch
from model.config import ModelConfig
from model.dense import DenseInput
from model.embedding import EmbeddingTable, build_tables
from model.layers import MultiTaskHeads
from model.spec import FeatureSpec
from model.tokenizer import PrimeTokenizer, token_cosine_similarity
from model.wide import WIDE_TABLE, WidePath, default_crosses


class Ranker(nn.Module, abc.ABC):
    # True when forward has no train-only randomness (dropout, router noise): then the training forward
    # produces exactly the pre-update scores, and the learner can score and learn in one pass.
    train_eval_identical: bool = True

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__()
        self.spec, self.config = spec, config
        tables = build_tables(PrimeTokenizer.table_names(spec), config.emb_kind, config.emb_buckets,
                              config.emb_dim, config.emb_hashes, dict(config.emb_bucket_overrides))
        self.tokenizer = PrimeTokenizer(spec, tables, config.d_model)  # owns the tables (one state-dict key each)
        self.n_tokens = spec.n_tokens()
        self.dense_in = DenseInput(spec, normalize=config.dense_norm)
        self.wide = WidePath(spec, config.wide_buckets, config.wide_crosses or default_crosses(spec)) \
            if config.wide else None

    def build_heads(self, d_in: int) -> None:
        """Subclasses call this once they know the width of the vector their body hands to the heads."""
        self.heads = MultiTaskHeads(d_in, len(self.spec.tasks), self.config.head_hidden,
                                    residual=self.wide is not None)

    @abc.abstractmethod
    def body(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``tokens [B, T, D]`` -> (vector for the heads ``[B, F]``, aux loss (scalar), per-layer tokens)."""

    # ---- the interface ----------------------------------------------------------------------------------
    def encode(self, batch: Batch, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Prime Tokens of a batch; ``dense``: its already normalised dense features, if at hand."""
        return self.tokenizer(batch.ids, batch.seqs, self.dense_in(batch.dense) if dense is None else dense)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.dense_in(batch.dense)
        z, aux, _ = self.body(self.encode(batch, dense))
        logits = self.heads(z).float()
        if self.wide is not None:
            logits = logits + self.wide(batch.ids, dense).float()
        return logits, aux.float()

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(batch)[0])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def token_outputs(self, batch: Batch) -> list[torch.Tensor]:
        was_training = self.training
        self.eval()
        try:
            tokens = self.encode(batch)
            return [tokens, *self.body(tokens)[2]]
        finally:
            self.train(was_training)

    def token_similarity(self, batch: Batch) -> list[float]:
        """Average pairwise cosine similarity between tokens, per layer (index 0 = tokenizer output)."""
        return [token_cosine_similarity(t) for t in self.token_outputs(batch)]

    # ---- parameter groups (dense vs sparse optimizers) --------------------------------------------------
    # Three groups, three learning regimes: the deep body's dense weights (AdamW), the deep embedding rows
    # (row-wise Adagrad at emb_lr) and the wide path (row-wise Adagrad at wide_lr, per-coordinate as FTRL).
    def embedding_tables(self) -> dict[str, EmbeddingTable]:
        """Every hashed table, the wide path's included: the registry publishes their touched rows."""
        tables: dict[str, EmbeddingTable] = dict(self.tokenizer.tables.items())  # type: ignore[arg-type]
        if self.wide is not None:
            tables[WIDE_TABLE] = self.wide.table
        return tables

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.embedding_tables().values()]

    def deep_sparse_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.tokenizer.tables.values()]

    def wide_parameters(self) -> list[nn.Parameter]:
        return self.wide.row_parameters() if self.wide is not None else []

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """The deep body's dense weights (everything not in an embedding table and not in the wide path)."""
        other = {id(p) for p in self.sparse_parameters() + self.wide_parameters()}
        return (p for p in self.parameters() if id(p) not in other)


def task_weights(spec: FeatureSpec) -> torch.Tensor:
    return torch.tensor([t.weight for t in spec.tasks], dtype=torch.float32)


def combined_score(probs: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """The ranking score: ``sum_t weight_t * p_t`` over the spec's tasks (``probs [B, n_tasks]`` -> ``[B]``).

    >>> from model.spec import default_live_spec
    >>> spec = default_live_spec()
    >>> combined_score(torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 1.0]]), spec).tolist()
    [1.0, 1.5]
    """
    assert probs.shape[-1] == len(spec.tasks), f"probs has {probs.shape[-1]} columns, spec has {len(spec.tasks)} tasks"
    return probs @ task_weights(spec).to(probs.device, probs.dtype)
