"""The baselines Zenith must beat, on the same embeddings, Prime Tokens and multi-task heads.

* ``DLRMRanker``: pairwise dot-product interactions between tokens, concatenated with the flattened tokens,
  through a top MLP (DLRM's interaction + top MLP; its "bottom MLP" is the tokenizer's group MLPs).
* ``DCNv2Ranker``: stacked DCNv2: cross layers ``x_{l+1} = x0 ⊙ (W x_l + b) + x_l`` (full rank, or low
  rank ``W = U Vᵀ``) on the flattened tokens, then a deep MLP.
* ``RankMixerRanker``: parameter-free token mixing (each token is cut into T chunks; new token h gathers
  chunk h of every token) then a per-token FFN, each with residual + LayerNorm.
* ``TransformerRanker``: a standard post-norm Transformer encoder over the tokens whose attention and SwiGLU
  FFN are *shared* by all tokens: the token-homogeneity baseline for Zenith++.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Arch, ModelConfig
from model.layers import MLP, TokenwiseLinear
from model.ranker import Ranker
from model.spec import FeatureSpec


class DLRMRanker(Ranker):
    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        config.validate(spec)
        super().__init__(spec, config)
        t, d = self.n_tokens, config.d_model
        rows, cols = torch.triu_indices(t, t, offset=1)
        self.register_buffer("pairs", rows * t + cols, persistent=False)
        self.top = MLP([t * d + len(rows), *config.mlp_hidden], final_act=True)
        self.build_heads(config.mlp_hidden[-1])

    def body(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        b, _, d = tokens.shape
        dots = torch.bmm(tokens, tokens.transpose(1, 2)).flatten(1)[:, self.pairs] / d ** 0.5
        return self.top(torch.cat([tokens.flatten(1), dots], dim=1)), tokens.new_zeros(()), []


class CrossLayer(nn.Module):
    def __init__(self, dim: int, rank: int | None) -> None:
        super().__init__()
        self.w = nn.Linear(dim, dim) if rank is None else nn.Sequential(nn.Linear(dim, rank, bias=False),
                                                                          nn.Linear(rank, dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + x


class DCNv2Ranker(Ranker):
    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        config.validate(spec)
        super().__init__(spec, config)
        n = self.n_tokens * config.d_model
        self.cross = nn.ModuleList(CrossLayer(n, config.cross_rank) for _ in range(config.cross_layers))
        self.deep = MLP([n, *config.mlp_hidden], final_act=True)
        self.build_heads(config.mlp_hidden[-1])

    def body(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x0 = x = tokens.flatten(1)
        for layer in self.cross:
            x = layer(x0, x)
        return self.deep(x), tokens.new_zeros(()), []


class RankMixerBlock(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.t = n_tokens
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn_in = TokenwiseLinear(n_tokens, d_model, hidden)
        self.ffn_out = TokenwiseLinear(n_tokens, hidden, d_model)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # cut every token into T chunks; new token h = chunk h of tokens 0..T-1
        return x.view(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.mix(x))
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class RankMixerRanker(Ranker):
    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        config.validate(spec)
        super().__init__(spec, config)
        d = config.d_model
        self.blocks = nn.ModuleList(RankMixerBlock(self.n_tokens, d, config.ffn_mult * d)
                                    for _ in range(config.n_layers))
        self.build_heads(self.n_tokens * d)

    def body(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        return run_blocks(self.blocks, tokens)


class SharedTransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.h, self.hidden = n_heads, hidden
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.up, self.down = nn.Linear(d_model, 2 * hidden, bias=False), nn.Linear(hidden, d_model, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        x = self.norm1(x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)))
        gate, up = self.up(x).split(self.hidden, dim=-1)
        return self.norm2(x + self.down(F.silu(gate) * up))


class TransformerRanker(Ranker):
    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        config.validate(spec)
        super().__init__(spec, config)
        d = config.d_model
        self.blocks = nn.ModuleList(SharedTransformerBlock(d, config.n_heads, config.ffn_mult * d)
                                    for _ in range(config.n_layers))
        self.build_heads(self.n_tokens * d)

    def body(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        return run_blocks(self.blocks, tokens)


def run_blocks(blocks: nn.ModuleList, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A plain stack of token blocks: flattened output, no auxiliary loss, every layer's tokens."""
    x, per_layer = tokens, []
    for block in blocks:
        x = block(x)
        per_layer.append(x)
    return x.flatten(1), tokens.new_zeros(()), per_layer


BASELINES: dict[Arch, type[Ranker]] = {
    Arch.DLRM: DLRMRanker,
    Arch.DCNV2: DCNv2Ranker,
    Arch.RANKMIXER: RankMixerRanker,
    Arch.TRANSFORMER: TransformerRanker,
}
