"""Zenith: Token Fusion (RSA or TMHSA) then Token Boost (TSwiGLU or TSMoE), stacked, over Prime Tokens.

Every parameter after the tokenizer is *tokenwise* (one weight per token, applied with batched einsum)
except RSA's single ``W_R``, which the paper shares; that is what keeps tokens heterogeneous as depth grows.

* ``Zenith``   = RSA + TSwiGLU (``Arch.ZENITH``)
* ``Zenith++`` = TMHSA + TSMoE, or TSwiGLU with ``boost=tswiglu`` (``Arch.ZENITH_PP``)

RSA shape arithmetic, for ``T`` tokens of width ``D``: ``O = (X Xᵀ / DT) X W_R`` is ``[T, k]``; it is
reshaped row-major to ``[T̂, D]`` with ``T̂ = T·k/D``. With ``k < D`` each new token is made of fragments of
``D/k`` old tokens; with ``k > D`` each old token is cut into ``k/D`` new ones. Stacked layers alternate
``k`` and ``D²/k`` (see ``ModelConfig.rsa_schedule``), so the token count goes ``T -> T̂ -> T -> ...``.

>>> import torch
>>> rsa = RSA(n_tokens=12, d_model=48, k=24)
>>> rsa.t_out, rsa(torch.randn(5, 12, 48)).shape
(6, torch.Size([5, 6, 48]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Arch, Boost, ModelConfig
from model.layers import TokenwiseLayerNorm, TokenwiseLinear
from model.ranker import Ranker
from model.spec import FeatureSpec


class RSA(nn.Module):
    """Retokenized Self-Attention: ``Norm(reshape(O) + reshape(R(X)))`` with ``O = (X·Xᵀ/(D·T))·X·W_R``.

    No softmax and no Q/K projections: the token affinity is the raw Gram matrix. Stability: ``X·Xᵀ`` is
    scaled by ``1/(D·T)`` (not ``1/sqrt(D)``). Inputs are LayerNorm'd, so ``|x|² ≈ D`` and ``X·Xᵀ/D`` is a
    cosine-like matrix with entries of order 1 whatever ``D`` is, and the extra ``1/T`` makes each output
    token a similarity-weighted *average* of the ``T`` projected tokens rather than a sum that grows with
    T. ``1/sqrt(D)`` would leave the diagonal at ``sqrt(D)`` and let the cubic term swamp the residual as
    models grow (it trained worse here). The paper does not say which scaling it uses.
    ``R`` is the residual map to the new shape: a tokenwise linear ``D -> k`` (one weight per input token),
    kept linear so the shortcut stays a clean gradient path; the non-linearity lives in Token Boost.
    """

    def __init__(self, n_tokens: int, d_model: int, k: int) -> None:
        super().__init__()
        assert (n_tokens * k) % d_model == 0, (
            f"RSA needs T*k % D == 0 (T={n_tokens}, k={k}, D={d_model}); choose k so that T*k % D == 0")
        self.t_in, self.d, self.k = n_tokens, d_model, k
        self.t_out = n_tokens * k // d_model
        self.w_r = nn.Linear(d_model, k, bias=False)
        self.residual = TokenwiseLinear(n_tokens, d_model, k)
        self.norm = TokenwiseLayerNorm(self.t_out, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # Associativity: (X Xᵀ)(X W_R) costs T²·(D + k) + T·D·k, never forming a D×D matrix.
        gram = torch.bmm(x, x.transpose(1, 2)) / (self.d * self.t_in)
        o = torch.bmm(gram, self.w_r(x))
        return self.norm((o + self.residual(x)).reshape(b, self.t_out, self.d))


class TMHSA(nn.Module):
    """Tokenwise multi-head self-attention: Q/K/V/O projections are separate per token (and per head, as
    slices of each token's projection); attention runs across tokens with a softmax; no retokenization."""

    def __init__(self, n_tokens: int, d_model: int, n_heads: int) -> None:
        super().__init__()
        assert d_model % n_heads == 0, f"d_model={d_model} must be divisible by n_heads={n_heads}"
        self.h = n_heads
        self.qkv = TokenwiseLinear(n_tokens, d_model, 3 * d_model)
        self.out = TokenwiseLinear(n_tokens, d_model, d_model)
        self.norm = TokenwiseLayerNorm(n_tokens, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # each [B, H, T, d_h]
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.norm(x + self.out(att))


class TSwiGLU(nn.Module):
    """A separate SwiGLU FFN per token, ``Norm(X + W2_t (silu(W1_t x) * W3_t x))``."""

    def __init__(self, n_tokens: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.up = TokenwiseLinear(n_tokens, d_model, 2 * hidden, bias=False)
        self.down = TokenwiseLinear(n_tokens, hidden, d_model, bias=False)
        self.norm = TokenwiseLayerNorm(n_tokens, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.up(x).split(self.hidden, dim=-1)
        return self.norm(x + self.down(F.silu(gate) * up)), x.new_zeros(())


class TSMoE(nn.Module):
    """Tokenwise sparse mixture of experts: every token has its own router and its own ``E`` SwiGLU experts;
    each sample's token goes to its top-k experts (gates renormalised over the k).

    Load balancing (Switch-Transformer style, per token): ``aux = E · Σ_e f_e · P_e`` averaged over tokens,
    where ``f_e`` is the share of the batch routed to expert ``e`` and ``P_e`` the mean router probability;
    it is 1 when balanced and up to ``E`` when one expert takes everything.

    Compute: all experts run densely and unselected experts get gate 0 (exactly the sparse output, with no
    gather/scatter); so the measured FLOPs are the *dense* ones, ``E/top_k`` times the expert FLOPs a
    dispatching kernel would spend. On the small batches of this project dense is faster on CPU.
    """

    def __init__(self, n_tokens: int, d_model: int, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        assert 1 <= top_k <= n_experts, f"top_k must be in 1..n_experts={n_experts}, got {top_k}"
        self.e, self.top_k, self.hidden = n_experts, top_k, hidden
        self.router = nn.Parameter(torch.zeros(n_tokens, d_model, n_experts))
        nn.init.normal_(self.router, std=d_model ** -0.5)
        bound = d_model ** -0.5
        self.w_up = nn.Parameter(torch.empty(n_tokens, n_experts, d_model, 2 * hidden).uniform_(-bound, bound))
        self.w_down = nn.Parameter(torch.empty(n_tokens, n_experts, hidden, d_model)
                                   .uniform_(-hidden ** -0.5, hidden ** -0.5))
        self.norm = TokenwiseLayerNorm(n_tokens, d_model)
        self.last_load: torch.Tensor | None = None  # [T, E] share of the last batch routed to each expert

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(torch.einsum("btd,tde->bte", x, self.router).float(), dim=-1)  # [B, T, E]
        top_val, top_idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_val / top_val.sum(-1, keepdim=True))
        gate, up = torch.einsum("btd,tedh->bteh", x, self.w_up).split(self.hidden, dim=-1)
        h = F.silu(gate) * up * gates.unsqueeze(-1).to(x.dtype)
        y = torch.einsum("bteh,tehd->btd", h, self.w_down)
        chosen = torch.zeros_like(probs).scatter(-1, top_idx, 1.0 / self.top_k)
        load = chosen.mean(0)  # [T, E], sums to 1 per token
        self.last_load = load.detach()
        aux = self.e * (load * probs.mean(0)).sum(-1).mean()
        return self.norm(x + y), aux


class ZenithLayer(nn.Module):
    """Token Fusion then Token Boost; each ends in its own residual + tokenwise norm."""

    def __init__(self, fusion: nn.Module, boost: nn.Module) -> None:
        super().__init__()
        self.fusion, self.boost = fusion, boost

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.boost(self.fusion(x))


class ZenithRanker(Ranker):
    """Zenith (RSA + TSwiGLU) or Zenith++ (TMHSA + TSMoE/TSwiGLU); heads read the flattened final tokens."""

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        config.validate(spec)
        assert config.arch in (Arch.ZENITH, Arch.ZENITH_PP), f"ZenithRanker builds zenith/zenith++, not {config.arch}"
        super().__init__(spec, config)
        d, hidden = config.d_model, config.ffn_mult * config.d_model
        layers, t = [], self.n_tokens
        schedule = config.rsa_schedule(t) if config.arch is Arch.ZENITH else [(t, d, t)] * config.n_layers
        for t_in, k, t_out in schedule:
            fusion = RSA(t_in, d, k) if config.arch is Arch.ZENITH else TMHSA(t_in, d, config.n_heads)
            if config.boost_kind is Boost.TSMOE:
                boost: nn.Module = TSMoE(t_out, d, hidden, config.n_experts, config.top_k)
            else:
                boost = TSwiGLU(t_out, d, hidden)
            layers.append(ZenithLayer(fusion, boost))
            t = t_out
        self.layers = nn.ModuleList(layers)
        self.t_final = t
        self.build_heads(t * d)

    def body(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x, aux, per_layer = tokens, tokens.new_zeros(()), []
        for layer in self.layers:
            x, a = layer(x)
            aux = aux + a
            per_layer.append(x)
        return x.flatten(1), aux * self.config.moe_aux_weight, per_layer

    def moe_layers(self) -> list[TSMoE]:
        return [m for m in self.modules() if isinstance(m, TSMoE)]
